"""Image-network files: our safetensors format, and teachers from our files or NVlabs/EDM and EDM2 network pickles.

Our format (``format`` = "emd_fast.unet"): the network's state dict (fp32) with metadata ``arch`` (JSON, see
``unet.py``; files written before SongUNet support have no ``network``/``precond`` in it and load as ADM with EDM
preconditioning), ``schedule`` (JSON, ``Schedule.config()``) and ``config`` (a name, e.g. "digits").
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..files import file_version, parse_json, read_safetensors, save_safetensors_atomic
from ..nets.unet import ImageDenoiser, build_network
from ..schedules import make_schedule
from .edm2_pickle import edm2_network, is_edm2_network
from .edm_pickle import PRECONDS, edm_network, edm_network_node, read_edm_pickle

FORMAT = "emd_fast.unet"
# the readers of teacher network files other than ours, by suffix: each returns an ImageDenoiser


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


def load_nvlabs_pickle(path: str | Path, dropout: float | None = 0.0) -> ImageDenoiser:
    """Our network (eval mode) of an NVlabs network pickle, read once without its code and converted by the reader of
    its network's class: EDM2's Precond (``edm2_pickle``), EDM's EDMPrecond/VPPrecond/VEPrecond (``edm_pickle``).
    ``dropout``: 0 by default, None keeps the pickle's. CheckpointError (one line) for what does not convert."""
    data, source = read_edm_pickle(path), str(path)
    convert = edm2_network if is_edm2_network(edm_network_node(data, source)) else edm_network
    return convert(data, source, dropout)


# teacher network files other than ours, by suffix
READERS = {".pkl": load_nvlabs_pickle, ".pickle": load_nvlabs_pickle}


def network_precond(path: str | Path) -> str | None:
    """The preconditioning of a teacher network file, found without building the network: "edm", "vp" or "ve" for
    our files (from their metadata) and NVlabs/EDM pickles (from the network's class; the pickle is read whole, its
    weights lie inline), "edm2" for EDM2 pickles, None for a pickle of another class (which does not load).
    CheckpointError (one line) for a file that cannot be read. A pickle is read once per process while the file
    stays the same (``files.file_version``; the option checks ask more than once)."""
    if Path(path).suffix.lower() in READERS:
        try:
            key = file_version(Path(path).stat())
        except OSError:
            return _pickle_precond(path)  # the reader's one-line error
        if key not in _PICKLE_PRECONDS:
            _PICKLE_PRECONDS[key] = _pickle_precond(path)
        return _PICKLE_PRECONDS[key]
    meta, _ = read_safetensors(path, FORMAT, "U-Net", "an emd_fast U-Net", with_tensors=False)
    arch = parse_json(meta.get("arch", "{}"), "arch metadata")
    precond = arch.get("precond") if isinstance(arch, dict) else None
    return precond.get("type") if isinstance(precond, dict) else "edm"  # files older than SongUNet support: EDM


_PICKLE_PRECONDS: dict[tuple, str | None] = {}  # network_precond's pickles: files.file_version -> precond


def _pickle_precond(path: str | Path) -> str | None:
    node = edm_network_node(read_edm_pickle(path), str(path))
    return "edm2" if is_edm2_network(node) else PRECONDS.get(node.class_name)


def load_guide_network(path: str | Path, teacher: ImageDenoiser) -> ImageDenoiser:
    """The network that guides ``teacher`` (``--guide``: a file as ``load_teacher_network`` reads), computing in the
    teacher's schedule; ValueError (one line) where its samples are not the teacher's (shape, latents) or its classes
    are neither none nor the teacher's."""
    guide = load_teacher_network(path)

    def samples(net) -> str:
        latents = getattr(net, "latents", None)
        return (f"{net.img_channels}x{net.img_resolution}x{net.img_resolution} "
                + ("pixels" if latents is None else f"latents of {latents.vae}"))

    if samples(guide) != samples(teacher):
        raise ValueError(f"--guide {path}: its samples are {samples(guide)}, the teacher's {samples(teacher)}")
    if getattr(guide, "latents", None) and guide.latents.config() != teacher.latents.config():
        raise ValueError(f"--guide {path}: its latents' scale and bias are not the teacher's")
    if guide.label_dim not in (0, teacher.label_dim):
        raise ValueError(f"--guide {path}: {guide.label_dim} classes, the teacher has {teacher.label_dim} (a guide "
                         f"is unconditional or has the teacher's classes)")
    guide.schedule = teacher.schedule  # the same function in any schedule (its preconditioning)
    return guide


def load_teacher_network(path: str | Path, device=None) -> ImageDenoiser:
    """A teacher network, in eval mode, from our .safetensors file or a file of a suffix in ``READERS``: an
    NVlabs/EDM or EDM2 network pickle (.pkl, converted in memory by ``load_nvlabs_pickle``: EDM's schedule range
    within what its preconditioning supports). CheckpointError (one line) for anything unreadable."""
    return READERS.get(Path(path).suffix.lower(), load_network)(path).to(device).eval()
