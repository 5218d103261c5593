"""The fused backend: the elementwise parts of an EMD iteration as Triton kernels (``emd_fast.kernels``).

``TritonOps`` is :class:`emd_fast.ops.ReferenceOps` with the elementwise methods replaced, so the EMD iteration
is the same code on both paths. Noise: by default the Langevin kernels draw it themselves (Philox, from a seeded
``NoiseStream`` whose counter advances on the device: reproducible, never reused, no host sync); with
``kernel_noise=False`` it is drawn from the run's torch.Generator exactly as on the reference path, so a fast iteration
can be compared element by element.
"""
from __future__ import annotations

import torch

from ..kernels import langevin, losses
from ..ops import ReferenceOps


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
