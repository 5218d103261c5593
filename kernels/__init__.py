"""Fused Triton kernels of the EMD hot paths, each beside its PyTorch twin in ``emd_fast.ops``.

``triton_available()`` says whether they can run here; the kernel names are imported lazily, so this
package imports without Triton (using a kernel then raises ImportError).
"""
from __future__ import annotations

import importlib
import os

import torch

_EXPORTS = {"langevin_eps_step": "langevin", "langevin_z_step": "langevin", "NoiseStream": "langevin",
            "generator_loss": "losses", "dsm_loss": "losses"}
__all__ = [*_EXPORTS, "triton_available"]


def triton_available() -> bool:
    """True if Triton imports and kernels can run: on a CUDA GPU, or on the CPU with TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    except ImportError as e:
        raise ImportError(f"emd_fast.kernels.{name} needs Triton (pip install 'emd_fast[triton]'): {e}") from e
    return getattr(module, name)
