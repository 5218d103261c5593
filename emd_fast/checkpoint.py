"""Checkpoints: tensors in safetensors, state (step, config, optimizer hyperparameters) in a small JSON.

``step_0001000.safetensors`` is written first, then ``step_0001000.json`` which records the tensors file's
SHA-256; each is written to a temporary file, fsync-ed and renamed, so a checkpoint is either complete (its JSON
exists and the hash matches) or invisible. An interrupted write never replaces a good checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    _atomic_replace(tmp, path)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """Write tensors (detached, contiguous, on the CPU) to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    _atomic_replace(tmp, path)


def read_safetensors(path: Path, file_format: str, what: str,
                     kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata says ``format == file_format``; CheckpointError
    (one line) for an unreadable file ("cannot read <what> file") or a foreign format ("is not <kind> file")."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {what} file {path}: {e}") from None
    if meta.get("format") != file_format:
        raise CheckpointError(f"{path} is not {kind} file (format={meta.get('format')!r})")
    return meta, tensors


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep`` (0 = all). Returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"step_{step:07d}"
    weights = directory / f"{stem}.safetensors"
    save_safetensors_atomic(tensors, weights)
    meta = directory / f"{stem}.json"
    write_json_atomic(meta, {**state, "step": step, "tensors_file": weights.name, "sha256": sha256_file(weights)})
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink()
            (directory / f"{old.stem}.safetensors").unlink(missing_ok=True)
    return meta


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (their JSON exists), oldest first."""
    return sorted(Path(directory).glob("step_*.json"))


def load_checkpoint(meta_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint; CheckpointError names what is wrong."""
    meta_path = Path(meta_path)
    try:
        state = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from None
    weights = meta_path.with_name(state.get("tensors_file", ""))
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {meta_path} refers to missing tensors file {weights.name}")
    if sha256_file(weights) != state.get("sha256"):
        raise CheckpointError(f"checkpoint {weights} is corrupt: its SHA-256 does not match {meta_path.name}")
    return load_file(str(weights)), state


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source) -> None:
    """Load ``prefix``-ed tensors into module; CheckpointError lists missing/unexpected keys or shape mismatches."""
    own = module.state_dict()
    sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: {prefix[:-1]} keys do not match: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for k, v in sub.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {prefix}{k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)}")
    module.load_state_dict(sub)
