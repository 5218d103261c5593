"""The denoiser network of vector data: an EDM-preconditioned residual MLP.

Preconditioning (Karras et al. 2022, ``precond.EDMPrecond``) written for any Schedule: with s = sigma_t / alpha_t and
x = x_t / alpha_t,  D(x_t, t) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_per_example
from ..schedules import Schedule
from .precond import EDMPrecond, precondition


class RandomFourierFeatures(nn.Module):
    """c_noise (N,) -> (N, dim) random Fourier features (fixed frequencies)."""

    def __init__(self, dim: int, scale: float = 4.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c):
        arg = 2 * math.pi * c[:, None] * self.freqs[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class MLPDenoiser(nn.Module):
    """D(x_t, t, y): (N, D) x (N,) -> (N, D). A residual MLP whose blocks are modulated by the noise embedding."""

    def __init__(self, dim: int, schedule: Schedule, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 sigma_data: float = 1.0):
        super().__init__()
        self.dim, self.schedule, self.sigma_data, self.precond = dim, schedule, sigma_data, EDMPrecond(sigma_data)
        self.arch = {"dim": dim, "hidden": hidden, "depth": depth, "emb_dim": emb_dim, "sigma_data": sigma_data}
        self.embed = nn.Sequential(RandomFourierFeatures(emb_dim), nn.Linear(emb_dim, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.mods = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (N, {self.dim}), got {tuple(x_t.shape)}")
        check_per_example("x_t", x_t, t=t)
        return precondition(self.precond, self.schedule, x_t, t, self.mlp)

    def mlp(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The raw network F: (N, D) x (N,) -> (N, D)."""
        emb = self.embed(c_noise)
        h = self.inp(x)
        for block, mod in zip(self.blocks, self.mods):
            scale, shift = mod(emb).chunk(2, dim=1)
            h = h + block(nn.functional.silu(h * (1 + scale) + shift))
        return self.out(nn.functional.silu(h))
