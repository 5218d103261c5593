"""Checkpoints: tensors in safetensors, state (step, config, optimizer hyperparameters) in a small JSON.

``step_0001000.safetensors`` is written first, then ``step_0001000.json`` which records the tensors file's
SHA-256 and a SHA-256 of its own content (step and config included); each is written to a temporary file, fsync-ed
and renamed, so a checkpoint is either complete (its JSON exists and both hashes match) or invisible. An interrupted
write never replaces a good checkpoint; what it leaves (temporary files, a tensors file without its JSON) is removed
by ``remove_orphans``. Files get the usual permissions of the user's umask.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
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


CHECKPOINT_NAME = re.compile(r"step_(\d{7,})\.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_replace(tmp: Path, final: Path) -> None:
    """fsync tmp, give it the umask's permissions (some writers create 0600 files), rename it over final."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` through a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _atomic_replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """Write tensors (detached, contiguous, on the CPU) to ``path`` via a temporary file, fsync and rename. A failed
    write (a full disk) is an OSError naming the file, and leaves ``path`` as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    except SafetensorError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e}") from None
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


def _state_hash(state: dict) -> str:
    """SHA-256 of a checkpoint JSON's content without its own hash (canonical JSON: sorted keys)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep`` (0 = all). Returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"step_{step:07d}"
    weights = directory / f"{stem}.safetensors"
    save_safetensors_atomic(tensors, weights)
    meta = directory / f"{stem}.json"
    record = {**state, "step": step, "tensors_file": weights.name, "sha256": sha256_file(weights)}
    write_json_atomic(meta, {**record, "state_sha256": _state_hash(record)})
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink()
            (directory / f"{old.stem}.safetensors").unlink(missing_ok=True)
    return meta


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (a ``step_<7+ digits>.json`` exists), oldest first; other files are not checkpoints."""
    found = [p for p in Path(directory).glob("step_*.json") if CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def remove_orphans(directory: Path) -> list[Path]:
    """Delete what interrupted writes leave in a checkpoint directory: temporary files and tensors files without
    their JSON. Returns the removed paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    complete = {p.stem for p in list_checkpoints(directory)}
    orphans = [p for p in directory.glob("*.tmp")] + [p for p in directory.glob("step_*.safetensors")
                                                     if p.stem not in complete]
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans


def load_checkpoint(meta_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint (its JSON's own hash, then the tensors' hash); CheckpointError names what is
    wrong."""
    meta_path = Path(meta_path)
    try:
        state = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint metadata {meta_path}: {e}") from None
    if not isinstance(state, dict) or not {"step", "tensors_file", "sha256", "state_sha256"} <= set(state):
        raise CheckpointError(f"{meta_path} is not an emd_fast checkpoint record (an object with step, tensors_file, "
                              f"sha256 and state_sha256)")
    if state["state_sha256"] != _state_hash(state):
        raise CheckpointError(f"checkpoint {meta_path} is corrupt: its content does not match its SHA-256")
    match = CHECKPOINT_NAME.fullmatch(meta_path.name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(f"checkpoint {meta_path} holds step {state['step']}, not the step of its name")
    weights = meta_path.with_name(str(state["tensors_file"]))
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {meta_path} refers to missing tensors file {weights.name}")
    if sha256_file(weights) != state["sha256"]:
        raise CheckpointError(f"checkpoint {weights} is corrupt: its SHA-256 does not match {meta_path.name}")
    return load_file(str(weights)), state


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source,
                           load=None) -> None:
    """Load ``prefix``-ed tensors into module (with ``load(state_dict)`` if given, e.g. a sharded network's loader,
    else ``module.load_state_dict``); CheckpointError lists missing/unexpected keys or shape mismatches."""
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
    (load or module.load_state_dict)(sub)
