"""The one-step generator: a denoiser evaluated at one fixed noise level, g(z) = D(sigma* z, t*)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Generator(nn.Module):
    """One-step generator g(z) = D(sigma_{t*} z, t*): a denoiser evaluated at the fixed noise level t*.

    z: (N, D) -> x: (N, D). Initialised from a (copy of the) teacher denoiser as in the EMD paper, so at
    initialisation g(z) is exactly the teacher's denoiser at log-SNR lambda*.
    """

    def __init__(self, denoiser: nn.Module, t_star: float):
        super().__init__()
        self.denoiser, self.t_star = denoiser, float(t_star)
        self.sigma_star = float(denoiser.schedule.sigma(torch.tensor(self.t_star, dtype=torch.float64)))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.float32)
        return self.denoiser(self.sigma_star * z, t, y)

    @classmethod
    def from_teacher(cls, teacher_net: nn.Module, t_star: float) -> "Generator":
        return cls(copy.deepcopy(teacher_net).requires_grad_(True).train(), t_star)
