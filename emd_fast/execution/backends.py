"""The fused backend: the elementwise parts of an EMD iteration as Triton kernels (``emd_fast.kernels``).

``TritonOps`` is :class:`emd_fast.ops.ReferenceOps` with the elementwise methods replaced, so the EMD iteration
is the same code on both paths. Noise: by default the Langevin kernels draw it themselves (Philox, from a seeded
``NoiseStream`` whose counter advances on the device: reproducible, never reused, no host sync); with
``kernel_noise=False`` it is drawn from the run's torch.Generator exactly as on the reference path, so a fast iteration
can be compared element by element.
"""
from __future__ import annotations

import os

import torch

from ..checks import check_finite
from ..kernels import langevin, losses
from ..ops import ReferenceOps
from ..optional import installed_version, require


class TritonOps(ReferenceOps):
    generator_loss = staticmethod(losses.generator_loss)
    dsm_loss = staticmethod(losses.dsm_loss)

    def __init__(self, rng: torch.Generator, seed: int, device, kernel_noise: bool = True):
        super().__init__(rng)
        self.stream = langevin.NoiseStream(seed, device) if kernel_noise else None

    def randn_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """None (the kernel draws the noise) or explicit noise from the run's generator (equivalence mode)."""
        return None if self.stream is not None else super().randn_like(x)

    def langevin_eps_step(self, eps, eta, d_teacher, d_student, alpha, sigma, gamma, noise, g=None):
        return langevin.langevin_eps_step(eps, eta, d_teacher, d_student, alpha, sigma, gamma, noise=noise, g=g,
                                          stream=self.stream)

    def langevin_z_step(self, z, jtv, gamma, noise):
        return langevin.langevin_z_step(z, jtv, gamma, noise=noise, stream=self.stream)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.stream is None:
            return {}
        return {f"noise_stream.{k}": v for k, v in self.stream.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.stream is not None:
            prefix = "noise_stream."
            self.stream.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


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
        from .backends import TritonOps

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
