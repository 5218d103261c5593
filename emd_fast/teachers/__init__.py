"""Teachers: a denoiser ``D(x_t, t, y) ~ E[x | x_t]`` and its score ``(alpha_t D - x_t) / sigma_t^2``. A teacher is
any object with ``.denoise`` and ``.schedule`` (``Teacher``); the modules here read each teacher format:

    mixture          exact Gaussian mixtures (presets, .json/.npz files, random mixtures)
    network_file     teacher network files: emd_fast U-Net safetensors, NVlabs/EDM pickles (``edm_pickle``)
    diffusers_folder diffusers model and pipeline folders
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..files import sha256_file
from ..schedules import Schedule, expand_like


class Teacher(Protocol):
    """What the EMD step needs from a teacher. x_t: (N, ...), t: (N,), y: (N,) int labels or None."""

    schedule: Schedule
    data_shape: tuple[int, ...]

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor: ...


def score_from_denoiser(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """s(x_t) = (alpha_t D(x_t) - x_t) / sigma_t^2, (N, ...)."""
    alpha, sigma = (expand_like(v, x_t) for v in schedule.alpha_sigma(t))
    return (alpha * d - x_t) / sigma**2


class NetworkTeacher(nn.Module):
    """A teacher given by a denoiser network ``net(x_t, t, y)`` (frozen); ``source``: the file it was read from."""

    def __init__(self, net: nn.Module, schedule: Schedule, data_shape: tuple[int, ...], source=None):
        super().__init__()
        self.net, self.schedule, self.data_shape = net.requires_grad_(False).eval(), schedule, tuple(data_shape)
        self.source = source

    def to_config(self) -> dict:
        """What a run's config.json records of its teacher: the file and its SHA-256, architecture and schedule."""
        source = {} if self.source is None else {"file": str(self.source),
                                                 "sha256": sha256_file(Path(self.source), reuse=True)}
        return {**source, "arch": getattr(self.net, "arch", None), "schedule": self.schedule.config()}

    @torch.no_grad()
    def denoise(self, x_t, t, y=None):
        return self.net(x_t, t, y)

    def score(self, x_t, t, y=None):
        return score_from_denoiser(self.schedule, x_t, t, self.denoise(x_t, t, y))


class GuidedNetworkTeacher(NetworkTeacher):
    """A network teacher guided by a second network g (EDM2's guidance): D = g + w (D_net - g), w the guidance weight
    (1: the network alone). g gets the class labels where it is class-conditional (autoguidance by a smaller, less
    trained network), none where it is not (classifier-free guidance by an unconditional network)."""

    def __init__(self, net: nn.Module, guide: nn.Module, weight: float, schedule: Schedule,
                 data_shape: tuple[int, ...], source=None, guide_source=None):
        super().__init__(net, schedule, data_shape, source)
        self.guide, self.weight = guide.requires_grad_(False).eval(), float(weight)
        self.guide_source = guide_source

    def to_config(self) -> dict:
        guide = {} if self.guide_source is None else {"guide_sha256": sha256_file(Path(self.guide_source),
                                                                                               reuse=True)}
        return super().to_config() | {"guide_arch": getattr(self.guide, "arch", None), "guide_weight": self.weight,
                                      **guide}

    @torch.no_grad()
    def denoise(self, x_t, t, y=None):
        g = self.guide(x_t, t, y if self.guide.label_dim else None)
        return g.lerp(self.net(x_t, t, y), self.weight)
