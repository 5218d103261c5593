"""The elementwise backends of an EMD iteration (``make_ops``): plain PyTorch (``ops.ReferenceOps``) or the fused
Triton kernels (``triton_ops.TritonOps``, imported only when chosen: triton is an optional dependency); and
``NetworkCall``, how the iteration calls a network.
"""
from __future__ import annotations

import os

import torch

from ..checks import check_finite
from ..ops import ReferenceOps
from ..optional import installed_version, require

BACKENDS = ("reference", "triton")


def triton_available() -> bool:
    """True if Triton is installed and its kernels can run: on a CUDA GPU, or on the CPU with TRITON_INTERPRET=1."""
    return installed_version("triton") is not None and (torch.cuda.is_available() or
                                                        os.environ.get("TRITON_INTERPRET") == "1")


def make_ops(backend: str, rng: torch.Generator, seed: int, device: torch.device, kernel_noise: bool = True):
    """The elementwise backend of the EMD iteration: plain PyTorch or the fused Triton kernels."""
    if backend == "reference":
        return ReferenceOps(rng)
    if backend == "triton":
        require("triton", "the fused Triton kernels (backend 'triton')")
        if not triton_available():
            raise ValueError("backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU, for tests)")
        from .triton_ops import TritonOps

        return TritonOps(rng, seed, device, kernel_noise)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class NetworkCall:
    """How the EMD iteration calls a network (``EMD(call=...)``): under ``torch.autocast(autocast)`` when a dtype is
    given (outputs returned in fp32), and raising FloatingPointError on a NaN/inf output if ``check`` (one host sync
    each; deferred finite checks turn it off and watch the losses and gradients on the device instead)."""

    def __init__(self, autocast: torch.dtype | None = None, check: bool = True):
        self.autocast, self.check = autocast, check

    def __call__(self, what: str | None, net, *args) -> torch.Tensor:
        if self.autocast is None:
            out = net(*args)
        else:
            with torch.autocast(args[0].device.type, dtype=self.autocast):
                out = net(*args).float()
        if self.check and what:
            check_finite(what, out)
        return out
