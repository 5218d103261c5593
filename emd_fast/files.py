"""Files written and read safely: SHA-256, atomic replacement (temporary file, fsync, rename), safetensors with
a format tag."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
