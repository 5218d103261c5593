"""Image-network files: our safetensors format, and teachers from our files or NVlabs/EDM network pickles.

Our format (``format`` = "emd_fast.unet"): the network's state dict (fp32) with metadata ``arch`` (JSON, see
``unet.py``; files written before SongUNet support have no ``network``/``precond`` in it and load as ADM with EDM
preconditioning), ``schedule`` (JSON, ``Schedule.config()``) and ``config`` (a name, e.g. "digits").
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..files import parse_json, read_safetensors, save_safetensors_atomic
from ..nets.unet import ImageDenoiser, build_network
from ..schedules import make_schedule
from .edm_pickle import load_edm_pickle

FORMAT = "emd_fast.unet"
# the readers of teacher network files other than ours, by suffix: each returns an ImageDenoiser
READERS = {".pkl": load_edm_pickle, ".pickle": load_edm_pickle}


def save_network(net: ImageDenoiser, path: str | Path, name: str = "custom",
                 extra: dict[str, str] | None = None) -> None:
    """Write net's weights (fp32) to safetensors with its arch, schedule and a config name as metadata (atomically);
    ``extra``: more metadata (e.g. an exported generator's noise level)."""
    meta = {"format": FORMAT, "config": name, "arch": json.dumps(net.arch),
            "schedule": json.dumps(net.schedule.config()), **(extra or {})}
    save_safetensors_atomic({k: v.detach().float() for k, v in net.state_dict().items()}, Path(path), meta)


def load_network(path: str | Path, device=None) -> ImageDenoiser:
    """The network of our safetensors file (architecture and schedule from its metadata), in eval mode.

    CheckpointError (one line) for a missing or corrupt file, foreign metadata, or keys/shapes that do not match.
    """
    meta, tensors = read_safetensors(path, FORMAT, "U-Net", "an emd_fast U-Net")
    try:
        arch, sched = parse_json(meta["arch"], "arch metadata"), parse_json(meta["schedule"], "schedule metadata")
        if not isinstance(sched, dict):
            raise ValueError(f"schedule is a {type(sched).__name__}, not an object")
        schedule = make_schedule(sched.pop("name"), **sched)
        net = build_network(arch, schedule, {k: v.float() for k, v in tensors.items()}, str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable U-Net metadata ({str(e).splitlines()[0]})") from None
    return net.to(device).eval()


def load_teacher_network(path: str | Path, device=None) -> ImageDenoiser:
    """A teacher network, in eval mode, from our .safetensors file or a file of a suffix in ``READERS``: an
    NVlabs/EDM network pickle (.pkl, converted in memory by ``edm_pickle.load_edm_pickle``: EDM's schedule range
    within what its preconditioning supports). CheckpointError (one line) for anything unreadable."""
    return READERS.get(Path(path).suffix.lower(), load_network)(path).to(device).eval()
