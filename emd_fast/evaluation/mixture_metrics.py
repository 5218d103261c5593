"""Exact metrics of a generator against an analytic Gaussian-mixture teacher.

Mode statistics assign each sample to its most probable component under the true mixture, and count it as *on* that
mode only if it lies inside the component's 99.9% ellipsoid (squared Mahalanobis distance below the chi-square
quantile); everything else is *off-mode*. The mode-weight TV is taken over the M modes plus the off-mode bin, so a
blurry generator that smears mass between modes is penalised, not credited to the nearest mode. The same metrics on
exact teacher samples of the same size (``reference_metrics``) give the noise floor to compare with.
"""
from __future__ import annotations

import math

import torch

from ..teachers.mixture import GaussianMixtureTeacher

COVERAGE_FRACTION = 0.2  # a mode is covered if it receives >= 20% of its true weight
ON_MODE_PROB = 0.999  # a sample is on a mode if inside that component's 99.9% probability ellipsoid


def chi2_quantile(dim: int, p: float = ON_MODE_PROB) -> float:
    """Wilson-Hilferty approximation of the chi-square(dim) quantile (exact for dim=2: -2 log(1-p))."""
    if dim == 2:
        return -2 * math.log(1 - p)
    z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
    return dim * (1 - 2 / (9 * dim) + z * math.sqrt(2 / (9 * dim))) ** 3


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic), x: (N, D), y: (M, D). Zero iff the laws agree."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def mixture_metrics(samples: torch.Tensor, teacher: GaussianMixtureTeacher, exact: torch.Tensor) -> dict:
    """samples: (N, D) generator samples; exact: (M, D) exact teacher samples for the energy distance.

    Returns modes_covered (count), mode_tv (total variation between the sample and true weights of the M modes and
    the off-mode bin), off_mode (fraction of samples on no mode), mode_spread (mean squared Mahalanobis distance
    per dimension of on-mode samples to their mode: ~1 for exact samples, < 1 under-dispersed), energy_distance,
    mean_loglik (mean log p(x) under the true mixture), and the per-mode weights.
    """
    if samples.dim() != 2 or samples.shape[1] != teacher.dim:
        raise ValueError(f"samples must have shape (N, {teacher.dim}), got {tuple(samples.shape)}")
    samples = samples.detach().double().cpu()
    if not bool(torch.isfinite(samples).all()):
        raise FloatingPointError("generator samples contain nan/inf")
    m = teacher.num_modes
    d2 = teacher.mahalanobis2(samples)
    label = teacher.assign(samples)
    on_mode = d2.gather(1, label[:, None])[:, 0] < chi2_quantile(teacher.dim)
    label = torch.where(on_mode, label, torch.full_like(label, m))  # bin m = off-mode
    freq = torch.bincount(label, minlength=m + 1).double() / samples.shape[0]
    d2_on = d2.gather(1, label.clamp(max=m - 1)[:, None])[:, 0][on_mode]
    true = torch.cat([teacher.weights, torch.zeros(1, dtype=torch.float64)])
    return {
        "modes_covered": int((freq[:m] >= COVERAGE_FRACTION * true[:m]).sum()),
        "num_modes": m,
        "mode_tv": float(0.5 * (freq - true).abs().sum()),
        "off_mode": float(freq[m]),
        "mode_spread": float(d2_on.mean() / teacher.dim) if bool(on_mode.any()) else float("nan"),
        "energy_distance": energy_distance(samples, exact.double().cpu()),
        "mean_loglik": float(teacher.log_prob(samples).mean()),
        "mode_weights": [round(v, 4) for v in freq[:m].tolist()],
    }


def reference_metrics(teacher: GaussianMixtureTeacher, n: int, generator: torch.Generator) -> dict:
    """The same metrics for n exact samples against another n exact samples: the floor a perfect generator hits."""
    a, _ = teacher.sample(n, generator)
    b, _ = teacher.sample(n, generator)
    return mixture_metrics(a, teacher, b)
