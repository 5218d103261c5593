"""Helpers shared by the kernel wrappers: boundary checks, memory layout, the tiling (the launch rule), launches
(recordable, for the ahead-of-time compile check).

Layout: a kernel walks its tensors as flat arrays in one shared element order, with the batch index
outermost, so that ``row = flat_index // row_numel`` picks the per-example scalars. That order is the
row-major (contiguous) order, or NHWC when the reference tensor is channels_last: both are zero-copy.
An input laid out differently (a transposed or sliced view) is copied once with ``.contiguous()``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from emd_fast.checks import check_like

NUM_WARPS = 4
THREADS = 32 * NUM_WARPS
PER_PROGRAM, PER_VECTOR, PER_ELEMENT = 0, 1, 2  # how often a kernel loads the per-example values


def check_inputs(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Float dtypes, equal shapes and devices, non-empty, and a device the kernels can run on."""
    check_like(ref_name, ref, **others)
    if ref.numel() == 0:
        raise ValueError(f"{ref_name} is empty (shape {tuple(ref.shape)})")
    if ref.device.type == "meta" and _recorded is not None:
        return  # recording_launches(): nothing runs
    if ref.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"Triton kernels need CUDA tensors but {ref_name} is on {ref.device} "
                         "(set TRITON_INTERPRET=1 to run them on the CPU)")


def check_gamma(name: str, gamma: float) -> None:
    if isinstance(gamma, torch.Tensor) or not gamma > 0:
        raise ValueError(f"{name} must be a Python number > 0, got {gamma}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a wrapper makes it: ``kernel[grid](*args, **constexprs, num_warps=num_warps)``."""
    kernel: Any  # a triton.jit function
    grid: tuple[int, ...]
    args: tuple  # the runtime arguments: tensors, ints, floats, in the kernel's order
    constexprs: dict[str, Any]
    num_warps: int


_recorded: list[Launch] | None = None


def launch(kernel, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any], num_warps: int) -> None:
    """Launch ``kernel``; inside ``recording_launches()`` only record the launch."""
    if _recorded is not None:
        _recorded.append(Launch(kernel, grid, args, constexprs, num_warps))
        return
    kernel[grid](*args, **constexprs, num_warps=num_warps)


@contextlib.contextmanager
def recording_launches():
    """Within: every launch the wrappers make is appended to the yielded list instead of run, and inputs may be
    on the ``meta`` device (outputs then are meta tensors), so the launches for any size are listed without a GPU
    (``benchmarks/aot_check.py`` compiles them ahead of time)."""
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


def is_channels_last(ref: torch.Tensor) -> bool:
    """True if the kernels walk ref (and its companions) in NHWC order."""
    return ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last)


def flat(x: torch.Tensor | None, cl: bool) -> torch.Tensor | None:
    """1-D view of x in the kernel's element order; a copy only if x is laid out otherwise."""
    if x is None:
        return None
    return (x.permute(0, 2, 3, 1) if cl else x).contiguous().view(-1)


def unflat(x: torch.Tensor, shape: torch.Size, cl: bool) -> torch.Tensor:
    """Inverse of ``flat``: view a flat kernel output as ``shape`` (channels_last if cl)."""
    if cl:
        n, c, h, w = shape
        return x.view(n, h, w, c).permute(0, 3, 1, 2)
    return x.view(shape)


def per_example(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.contiguous()


@dataclass(frozen=True)
class Tiling:
    """How a kernel walks its flat tensors: ``grid`` programs, each a tile of ``rows`` x ``vec`` consecutive
    elements (a tile row is one 16-byte vector of the narrowest tensor); ``per_row`` says how often the
    per-example values are loaded: once a program (PER_PROGRAM: the tile lies inside one example), once a
    tile row (PER_VECTOR: ``vec`` divides the example) or per element (PER_ELEMENT)."""
    grid: tuple[int]
    rows: int
    vec: int
    big: bool  # int64 offsets
    per_row: int

    @property
    def block(self) -> int:
        return self.rows * self.vec

    def constexprs(self) -> dict[str, int | bool]:
        return {"R": self.rows, "V": self.vec, "BIG": self.big, "PER_ROW": self.per_row}


def tiling(numel: int, row_numel: int, *tensors: torch.Tensor) -> Tiling:
    """The launch rule: one 16-byte vector per thread and tensor, NUM_WARPS * 32 threads a program. V = 16 bytes /
    the smallest element size of ``tensors`` (4 fp32, 8 bf16/fp16), so every load and store is one 128-bit
    access, and a program is THREADS x V elements: 4096x64 fp32 runs 512 programs (about 4 per SM of an H100,
    against 128 before), 128x3x128x128 fp32 12288. Larger programs (several vectors per thread) were measured by
    the AOT check to need up to 112 registers (bf16), under 8 blocks per SM, for no fewer bytes moved."""
    vec = 16 // min(t.element_size() for t in tensors)
    block = THREADS * vec
    per_row = PER_PROGRAM if row_numel % block == 0 else PER_VECTOR if row_numel % vec == 0 else PER_ELEMENT
    return Tiling((triton.cdiv(numel, block),), THREADS, vec, numel + block >= 2**31, per_row)


@triton.jit
def tile(R: tl.constexpr, V: tl.constexpr, BIG: tl.constexpr):
    """(first, starts, o) of this program: its first element, the [R] first elements of its tile rows and the
    [R, V] element offsets (int64 only when BIG)."""
    pid = tl.program_id(0)
    if BIG:
        pid = pid.to(tl.int64)
    first = pid * (R * V)
    starts = first + tl.arange(0, R) * V
    return first, starts, starts[:, None] + tl.arange(0, V)[None, :]


@triton.jit
def load_per_row(ptr, first, starts, o, numel, row_numel, other, PER_ROW: tl.constexpr):
    """ptr[example] in fp32 for the tile (first, starts, o), broadcastable to [R, V]: one scalar load a program
    (PER_ROW 0), one load a tile row (1) or a gather per element (2)."""
    if PER_ROW == 0:
        v = tl.load(ptr + first // row_numel)
    elif PER_ROW == 1:
        v = tl.load(ptr + starts // row_numel, mask=starts < numel, other=other)[:, None]
    else:
        v = tl.load(ptr + o // row_numel, mask=o < numel, other=other)
    return v.to(tl.float32)
