"""Embedded problems: analytic Gaussian-mixture teachers that need no download, and the networks for them.

``ring2d``: 8 modes on a circle with unequal weights (2-D, plottable).
``gmm16d``: 10 modes in 16-D with random means, anisotropic covariances and unequal weights.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .metrics import mixture_metrics, reference_metrics
from .networks import Generator, MLPDenoiser
from .plots import plot_run
from .schedules import Schedule
from .teachers import GaussianMixtureTeacher

PRESETS = ("ring2d", "gmm16d")


def ring2d(schedule: Schedule) -> GaussianMixtureTeacher:
    """8 isotropic modes (std 0.2) on a circle of radius 2, weights 1..8 (normalised): ratio 8 between modes."""
    m = 8
    angles = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.arange(1, m + 1, dtype=torch.float64)
    return GaussianMixtureTeacher(means, torch.full((m,), 0.2**2), weights, schedule)


def gmm16d(schedule: Schedule, seed: int = 1234) -> GaussianMixtureTeacher:
    """10 modes in 16-D: means ~ N(0, I) scaled to norm 3, random covariances with std in [0.1, 0.3], weights 1..10."""
    g = torch.Generator().manual_seed(seed)
    m, d = 10, 16
    means = torch.randn(m, d, generator=g, dtype=torch.float64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(torch.randn(m, d, d, generator=g, dtype=torch.float64))
    stds = 0.1 + 0.2 * torch.rand(m, d, generator=g, dtype=torch.float64)
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixtureTeacher(means, covs, torch.arange(1, m + 1, dtype=torch.float64), schedule)


def make_teacher(preset: str, schedule: Schedule) -> GaussianMixtureTeacher:
    if preset == "ring2d":
        return ring2d(schedule)
    if preset == "gmm16d":
        return gmm16d(schedule)
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def data_std(teacher: GaussianMixtureTeacher) -> float:
    """Root-mean-square per-coordinate std of the mixture: sigma_data for the networks' preconditioning."""
    mean = (teacher.weights[:, None] * teacher.means).sum(0)
    second = (teacher.weights[:, None] * (teacher.means**2 + torch.diagonal(teacher.covs, dim1=1, dim2=2))).sum(0)
    return float((second - mean**2).mean().sqrt())


def fit_denoiser(net: MLPDenoiser, teacher: GaussianMixtureTeacher, steps: int, batch: int,
                 generator: torch.Generator, lr: float = 2e-3) -> float:
    """Regress ``net`` onto the exact teacher denoiser on exact noisy samples: a network copy of the teacher.

    The EMD paper initialises the generator and the student from the teacher's network; an analytic teacher has
    none, so this makes one. Returns the final weighted MSE (in units of the EDM loss: ~0 means exact).
    """
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        t = teacher.schedule.sample_t(batch, generator, device)
        x_t = teacher.sample_t(t, generator)
        w = teacher.schedule.weight("edm", t, net.sigma_data)
        loss = (w[:, None] * (net(x_t, t) - teacher.denoise(x_t, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def init_networks(teacher_net: nn.Module, t_star: float) -> tuple[Generator, nn.Module]:
    """Generator = teacher denoiser at t* (lambda*), student = copy of the teacher denoiser (both trainable)."""
    student = copy.deepcopy(teacher_net).requires_grad_(True).train()
    return Generator.from_teacher(teacher_net, t_star), student


class MixtureProblem:
    """An embedded Gaussian-mixture preset: exact teacher, MLP networks, exact metrics and scatter plots.

    The interface the training CLI uses for every problem: ``teacher``, ``sigma_data``, ``num_classes``,
    ``teacher_network``, ``metrics``, ``floor``, ``plot``, ``summary_lines``.
    """

    num_classes = 0

    def __init__(self, preset: str, schedule: Schedule, cfg: dict):
        self.cfg, self.teacher = cfg, make_teacher(preset, schedule)
        self.sigma_data = data_std(self.teacher)
        self.exact, _ = self.teacher.sample(cfg["eval_samples"], torch.Generator().manual_seed(cfg["seed"] + 2))

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """An MLP copy of the exact teacher denoiser (regressed onto it unless ``fit`` is False: resuming)."""
        cfg = self.cfg
        net = MLPDenoiser(self.teacher.dim, self.teacher.schedule, cfg["hidden"], cfg["depth"],
                          sigma_data=self.sigma_data).to(device)
        if not fit:
            return net, {}
        rng = torch.Generator(device).manual_seed(cfg["seed"] + 1)
        return net, {"teacher_fit_loss": fit_denoiser(net, self.teacher, cfg["teacher_fit_steps"], 512, rng)}

    def metrics(self, samples: torch.Tensor, y=None) -> dict:
        return mixture_metrics(samples, self.teacher, self.exact)

    def floor(self) -> dict:
        """The metrics of exact teacher samples: what a perfect generator scores."""
        return reference_metrics(self.teacher, self.cfg["eval_samples"],
                                 torch.Generator().manual_seed(self.cfg["seed"] + 4))

    def plot(self, path, samples, y, metrics, history, title) -> None:
        plot_run(path, samples, self.exact, self.teacher, metrics, history, title)

    @staticmethod
    def progress(m: dict) -> dict:
        return {"modes": f"{m['modes_covered']}/{m['num_modes']}", "tv": f"{m['mode_tv']:.3f}"}

    @staticmethod
    def summary_lines(f: dict, floor: dict) -> list[str]:
        return [
            f"modes covered   {f['modes_covered']}/{f['num_modes']}   (exact samples: {floor['modes_covered']})",
            f"mode-weight TV  {f['mode_tv']:.4f}   (exact samples: {floor['mode_tv']:.4f})",
            f"off-mode        {f['off_mode']:.4f}   (exact samples: {floor['off_mode']:.4f})",
            f"mode spread     {f['mode_spread']:.3f}    (exact samples: {floor['mode_spread']:.3f}; < 1: under-dispersed)",
            f"energy distance {f['energy_distance']:.4f}   (exact samples: {floor['energy_distance']:.4f})",
            f"mean log-lik    {f['mean_loglik']:.3f}   (exact samples: {floor['mean_loglik']:.3f})",
        ]
