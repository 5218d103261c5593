"""Checkpoints: tensors in safetensors, state (step, config, optimizer hyperparameters) in a small JSON.

``step_0001000.safetensors`` is written first, then ``step_0001000.json`` which records the tensors file's
SHA-256 and a SHA-256 of its own content (step and config included); each is written to a temporary file, fsync-ed
and renamed, so a checkpoint is either complete (its JSON exists and both hashes match) or invisible. An interrupted
write never replaces a good checkpoint; what it leaves (temporary files, a tensors file newer than every JSON) is
removed by ``remove_orphans``. Files get the usual permissions of the user's umask and are never written through a link
(``emd_fast.files``); a checkpoint is read only from regular files (a FIFO or device named like one is refused).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError, FileRefused
from ..files import read_json, run_subdir, save_safetensors_atomic, sha256_file, write_json_atomic

CHECKPOINT_NAME = re.compile(r"step_(\d{7,})\.json")


def _state_hash(state: dict) -> str:
    """SHA-256 of a checkpoint JSON's content without its own hash (canonical JSON: sorted keys)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep`` (0 = all). Returns the JSON path."""
    directory = run_subdir(directory)
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
    found = [p for p in Path(directory).glob("step_*.json") if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def set_aside_later(directory: Path, step: int) -> tuple[Path | None, list[int]]:
    """Move the checkpoints of ``directory`` after ``step`` into a folder of their own,
    ``abandoned_after_step_<step>`` (``_2``, ... if taken), where no resume, sample or pruning looks: a run that
    continues from an earlier checkpoint (--resume-from) abandons them, and its newest checkpoint is then its own.
    Nothing is deleted. Returns (that folder, the steps moved), (None, []) if there were none."""
    later = [p for p in list_checkpoints(directory) if checkpoint_step(p) > step]
    if not later:
        return None, []
    target, n = directory / f"abandoned_after_step_{step:07d}", 1
    while os.path.lexists(target):
        n += 1
        target = directory / f"abandoned_after_step_{step:07d}_{n}"
    target.mkdir()
    for meta in later:  # the tensors first: a kill in between leaves a record without tensors, never the reverse
        for path in (meta.with_suffix(".safetensors"), meta):
            if os.path.lexists(path):
                path.rename(target / path.name)
    return target, [checkpoint_step(p) for p in later]


def checkpoint_step(path) -> int | None:
    """The step a checkpoint record's name ``step_<7+ digits>.json`` gives (a Path or a str); None for another name."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def remove_orphans(directory: Path) -> list[Path]:
    """Delete what interrupted writes leave in a checkpoint directory: temporary files, and a tensors file without
    its JSON that is newer than every checkpoint (its write was killed before the JSON's). A tensors file without its
    JSON among older checkpoints is no interrupted write (its record was moved away) and stays. Returns the removed
    paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    newest = max((checkpoint_step(p) for p in list_checkpoints(directory)), default=-1)
    orphans = [p for p in directory.glob("*.tmp")] + [
        p for p in directory.glob("step_*.safetensors")
        if (step := checkpoint_step(p.with_suffix(".json"))) is not None and step > newest]
    for p in orphans:  # a link is removed itself, never followed; a private write folder with what it holds
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return orphans


def load_checkpoint(meta_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint (its JSON's own hash, then the tensors' hash); CheckpointError names what is
    wrong."""
    meta_path = Path(meta_path)
    try:
        state = read_json(meta_path, "checkpoint record")
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(state, dict) or not {"step", "tensors_file", "sha256", "state_sha256"} <= set(state):
        raise CheckpointError(f"{meta_path} is not an emd_fast checkpoint record (an object with step, tensors_file, "
                              f"sha256 and state_sha256)")
    if state["state_sha256"] != _state_hash(state):
        raise CheckpointError(f"checkpoint {meta_path} is corrupt: its content does not match its SHA-256")
    step = checkpoint_step(meta_path)
    if step is not None and step != state["step"]:
        raise CheckpointError(f"checkpoint {meta_path} holds step {state['step']}, not the step of its name")
    name = state["tensors_file"]
    if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
        raise CheckpointError(f"checkpoint {meta_path} names tensors file {str(name)[:80]!r}, not a file beside it")
    weights = meta_path.with_name(name)
    if not os.path.lexists(weights):
        raise CheckpointError(f"checkpoint {meta_path} refers to missing tensors file {weights.name}")
    try:
        if sha256_file(weights, "checkpoint tensors file") != state["sha256"]:
            raise CheckpointError(f"checkpoint {weights} is corrupt: its SHA-256 does not match {meta_path.name}")
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    return load_file(str(weights)), state


def load_state_dict_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source,
                           load=None, own: dict[str, torch.Tensor] | None = None) -> None:
    """Load ``prefix``-ed tensors into module (with ``load(state_dict)`` if given, e.g. a sharded network's loader,
    else ``module.load_state_dict``); CheckpointError lists missing/unexpected keys or shape mismatches against
    ``own`` (default: the module's whole state dict)."""
    own = module.state_dict() if own is None else own
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


def config_differences(written, cfg: dict) -> str:
    """What differs between a checkpoint's config and the run's, e.g. "K: checkpoint 8, run 4" ("" if nothing).
    Options added to emd_fast after the checkpoint was written are not in it and take their defaults (resume_config
    refuses them when given explicitly), so an older run resumes after an upgrade."""
    if not isinstance(written, dict):
        return "the checkpoint holds no config"
    return ", ".join(f"{k}: checkpoint {v!r}, run {cfg.get(k)!r}" for k, v in written.items() if cfg.get(k) != v)


def resume_checkpoint(cfg: dict, ckpt_dir: Path) -> Path:
    """The checkpoint a resumed run continues from: --resume-from, else the newest one in ``ckpt_dir``
    (CheckpointError if there is none)."""
    if cfg.get("resume_from"):
        return checkpoint_record(Path(cfg["resume_from"]), "--resume-from")
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
    return found[-1]


def checkpoint_record(path: Path, what: str) -> Path:
    """The record (.json) of the checkpoint ``path`` names: a step_*.json, or the .safetensors beside one;
    CheckpointError for anything else (e.g. a run's metrics.jsonl)."""
    if path.suffix not in (".json", ".safetensors") or checkpoint_step(path.with_suffix(".json")) is None:
        raise CheckpointError(f"{what} {path}: not a checkpoint (checkpoints/step_<step>.json or its .safetensors)")
    return path.with_suffix(".json")


def load_resume_checkpoint(cfg: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of the checkpoint a run resumes from, verified; if it is corrupt and --resume-from did not
    name it, the CheckpointError names the newest intact checkpoint to continue from instead."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if cfg.get("resume_from"):
            raise
        for older in reversed([p for p in list_checkpoints(path.parent) if p != path]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}; the newest intact checkpoint is {older}: continue from it with "
                                  f"--resume-from {older}") from None
        raise CheckpointError(f"{e}; no intact checkpoint is left in {path.parent}") from None
