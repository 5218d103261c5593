"""Boundary checks: one-line errors that name the offending argument, raised before any work is done."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_values_trusted = False


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must have the shape and device of ``ref`` (dtype may differ)."""
    for name, x in others.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


@contextlib.contextmanager
def trusted_values():
    """Inside, checks that read tensor values on the host (label ranges) are skipped: for the training loop's own
    tensors on its sync-free (deferred / CUDA-graph) path, where such a read would stall the device."""
    global _values_trusted
    before, _values_trusted = _values_trusted, True
    try:
        yield
    finally:
        _values_trusted = before


def value_checks_wanted(x: torch.Tensor) -> bool:
    """Whether a check may read x's values on the host: not inside ``trusted_values()``, torch.compile or a CUDA-graph
    capture."""
    return not (_values_trusted or torch.compiler.is_compiling()
                or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_per_example(ref_name: str, ref: torch.Tensor, **vectors: torch.Tensor | None) -> None:
    """Every tensor in ``vectors`` must be a per-example (N,) vector on ref's device, N = ref.shape[0]."""
    for name, v in vectors.items():
        if v is None:
            continue
        if v.dim() != 1 or v.shape[0] != ref.shape[0]:
            raise ValueError(f"{name} must have shape ({ref.shape[0]},) to match {ref_name} {tuple(ref.shape)}, "
                             f"got {tuple(v.shape)}")
        if v.device != ref.device:
            raise ValueError(f"{name} is on {v.device} but {ref_name} is on {ref.device}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(**tensors: torch.Tensor | None) -> None:
    for name, x in tensors.items():
        if x is not None and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; expected one of float32, bfloat16, float16")


def check_finite(what: str, x: torch.Tensor) -> None:
    """Raise FloatingPointError if x holds NaN/inf (one host sync; used on the reference path)."""
    if not bool(torch.isfinite(x).all()):
        bad = "nan" if bool(torch.isnan(x).any()) else "inf"
        raise FloatingPointError(f"{what} contains {bad}")


def check_like(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Float dtypes for all, and the shape and device of ``ref`` for every tensor in ``others``."""
    check_float(**{ref_name: ref}, **others)
    check_same(ref_name, ref, **others)


def meminfo_bytes(path: str, key: str) -> int | None:
    """A ``key: <n> kB`` line of a /proc file in bytes, None where there is no such file or line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(key)), None)


def check_host_memory(need: int, what: str, hint: str) -> None:
    """ValueError (one line) if ``need`` bytes exceed the memory this machine has available (Linux; no check
    elsewhere): ``what`` needs them, ``hint`` says what to lower."""
    available = meminfo_bytes("/proc/meminfo", "MemAvailable:")
    if available is not None and need > available:
        raise ValueError(f"{what} needs {need / 2**30:.1f} GiB of memory, this machine has {available / 2**30:.1f} GiB "
                         f"available: {hint}")
