"""The teacher's reference samples: its many-step Heun samples, which the metrics' floor, ``fd_teacher`` and the plots
compare the one-step generator with. Drawing them is long work (35 network evaluations per sample: minutes for a real
teacher on a CPU), so it shows a progress bar and its result is cached on disk, in a folder shared by all runs:

    $EMD_FAST_CACHE/reference/<key>.safetensors      (default $XDG_CACHE_HOME/emd_fast, else ~/.cache/emd_fast)

The key is a SHA-256 over everything the samples depend on: the teacher (its file's or folder's SHA-256, architecture,
schedule, guidance scale, prompt embeddings, weight dtype), the noise seed, the number of samples and their labels,
the number of Heun steps, the chunk size and the device type. A resume, or a second run of the same teacher with the
same seed and count, reads them instead of drawing them again. ``EMD_FAST_CACHE=off`` turns the cache off; an
unreadable cache file is drawn again and replaced; a cache that cannot be written is skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..progress import Progress
from .heun import heun_sample

CACHE_FORMAT = "emd_fast.reference_samples"


def cache_folder() -> Path | None:
    """Where reference samples are cached: $EMD_FAST_CACHE/reference (None when EMD_FAST_CACHE is off/none/0)."""
    root = os.environ.get("EMD_FAST_CACHE")
    if root is not None and root.strip().lower() in ("off", "none", "0", ""):
        return None
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emd_fast"
    return Path(root) / "reference"


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def teacher_identity(teacher) -> dict:
    """What defines a teacher's samples, without file paths: its config (content SHA-256, architecture, schedule,
    guidance), the dtype of its weights and, for text teachers, the SHA-256 of the prompt embeddings."""
    identity = {k: v for k, v in teacher.to_config().items() if k not in ("file", "folder")}
    identity["dtype"] = str(next(teacher.net.parameters()).dtype)
    prompts = getattr(teacher.net, "prompts", None)
    if prompts is not None:
        identity["prompts"] = _tensor_sha(prompts.embeddings)
    if getattr(teacher, "uncond", None) is not None:
        identity["uncond"] = _tensor_sha(teacher.uncond)
    return identity


def reference_samples(teacher, n: int, seed: int, y: torch.Tensor | None, steps: int, chunk: int,
                      quiet: bool = False) -> torch.Tensor:
    """n Heun samples (n, *teacher.data_shape) on the CPU from noise drawn on the CPU with ``seed``, labels y (n,) or
    None, ``steps`` Heun steps, ``chunk`` samples at a time on the teacher's device; from the cache if there."""
    device = next(teacher.net.parameters()).device
    key = {"format": 1, "teacher": teacher_identity(teacher), "n": n, "seed": seed, "steps": steps, "chunk": chunk,
           "labels": None if y is None else _tensor_sha(y), "device": device.type}
    text = json.dumps(key, sort_keys=True)
    folder = cache_folder()
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.safetensors" if folder else None
    if path is not None and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == text:
                    x = f.get_tensor("x")
                    if x.shape == (n, *teacher.data_shape):
                        return x
        except (OSError, SafetensorError):
            pass  # unreadable: drawn again and replaced
    noise = torch.randn((n, *teacher.data_shape), generator=torch.Generator().manual_seed(seed))
    chunks = range(0, n, chunk)
    with Progress(len(chunks) * steps, f"teacher reference samples ({n}, Heun {steps} steps)", unit="step",
                  quiet=quiet, leave=False) as bar:
        x = torch.cat([heun_sample(teacher.denoise, teacher.schedule, noise[i:i + chunk].to(device),
                                   None if y is None else y[i:i + chunk].to(device), steps, on_step=bar.update).cpu()
                       for i in chunks])
    if path is not None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"x": x.contiguous()}, str(tmp), metadata={"format": CACHE_FORMAT, "key": text})
            os.replace(tmp, path)
        except (OSError, SafetensorError):  # a read-only or full cache: the run goes on without it
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return x
