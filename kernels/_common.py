"""Helpers shared by the kernel wrappers: boundary checks, memory layout, block indexing.

Layout: a kernel walks its tensors as flat arrays in one shared element order, with the batch index
outermost, so that ``row = flat_index // row_numel`` picks the per-example scalars. That order is the
row-major (contiguous) order, or NHWC when the reference tensor is channels_last: both are zero-copy.
An input laid out differently (a transposed or sliced view) is copied once with ``.contiguous()``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from emd_fast.checks import check_like

SUB = 512  # elements per sub-block; a Langevin program handles 4 sub-blocks (one Philox call gives 4 normals)
BLOCK = 4 * SUB  # elements per program
NUM_WARPS = 4


def check_inputs(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Float dtypes, equal shapes and devices, non-empty, and a device the kernels can run on."""
    check_like(ref_name, ref, **others)
    if ref.numel() == 0:
        raise ValueError(f"{ref_name} is empty (shape {tuple(ref.shape)})")
    if ref.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"Triton kernels need CUDA tensors but {ref_name} is on {ref.device} "
                         "(set TRITON_INTERPRET=1 to run them on the CPU)")


def check_gamma(name: str, gamma: float) -> None:
    if isinstance(gamma, torch.Tensor) or not gamma > 0:
        raise ValueError(f"{name} must be a Python number > 0, got {gamma}")


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


def launch_shape(numel: int, row_numel: int, size: int) -> tuple[tuple[int], bool, bool]:
    """(grid, BIG, ALIGNED): one program per BLOCK elements; BIG asks for int64 offsets; ALIGNED: every block
    of ``size`` elements lies inside one row (one scalar load of the per-example values, no division)."""
    return (triton.cdiv(numel, BLOCK),), numel + BLOCK >= 2**31, row_numel % size == 0


@triton.jit
def program_start(SIZE: tl.constexpr, BIG: tl.constexpr):
    """Offset of this program's first element (SIZE elements a program), int64 only when BIG."""
    pid = tl.program_id(0)
    if BIG:
        pid = pid.to(tl.int64)
    return pid * SIZE


@triton.jit
def load_per_row(ptr, start, o, numel, row_numel, other, ALIGNED: tl.constexpr):
    """ptr[row] in fp32 for the offsets o = start + [0, size): a scalar load when ALIGNED (one row), else a gather."""
    if ALIGNED:
        v = tl.load(ptr + start // row_numel, mask=start < numel, other=other)
    else:
        v = tl.load(ptr + o // row_numel, mask=o < numel, other=other)
    return v.to(tl.float32)
