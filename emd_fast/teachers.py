"""Teachers: a denoiser ``D(x_t, t, y) ~ E[x | x_t]`` and its score ``(alpha_t D - x_t) / sigma_t^2``.

``GaussianMixtureTeacher`` is exact: the noisy marginal of a Gaussian mixture is again a Gaussian mixture,
    p_t(x_t) = sum_k pi_k N(x_t; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I),
so its score, denoiser and log-density are closed-form at every t.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .checkpoint import sha256_file
from .checks import check_per_example
from .schedules import Schedule, expand_like


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
        source = {} if self.source is None else {"file": str(self.source), "sha256": sha256_file(Path(self.source))}
        return {**source, "arch": getattr(self.net, "arch", None), "schedule": self.schedule.config()}

    @torch.no_grad()
    def denoise(self, x_t, t, y=None):
        return self.net(x_t, t, y)

    def score(self, x_t, t, y=None):
        return score_from_denoiser(self.schedule, x_t, t, self.denoise(x_t, t, y))


class GaussianMixtureTeacher:
    """Exact teacher for p(x) = sum_k pi_k N(mu_k, Sigma_k) in D dimensions.

    means: (M, D); covs: (M, D, D) symmetric positive definite (or (M,) isotropic variances);
    weights: (M,) positive, normalised here. Everything is stored in float64 for the eigendecomposition and
    evaluated in the dtype of x_t.
    """

    def __init__(self, means, covs, weights, schedule: Schedule):
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (M, D), got {tuple(means.shape)}")
        m, d = means.shape
        if covs.dim() == 1:
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        if covs.shape != (m, d, d):
            raise ValueError(f"covs must have shape ({m}, {d}, {d}) or ({m},), got {tuple(covs.shape)}")
        if weights.shape != (m,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {m} positive numbers, got {weights.tolist()}")
        if not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError("covs must be symmetric")
        evals, evecs = torch.linalg.eigh(covs)
        if not bool((evals > 0).all()):
            raise ValueError("covs must be positive definite")
        self.schedule, self.data_shape = schedule, (d,)
        self.means, self.covs, self.weights = means, covs, weights / weights.sum()
        self._evals, self._evecs = evals, evecs  # (M, D), (M, D, D): Sigma_k = U diag(l) U^T
        self._on_device: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_config(self) -> dict:
        return {"means": self.means.tolist(), "covs": self.covs.tolist(), "weights": self.weights.tolist()}

    def _terms(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Per-component log-densities (N, M) and precision-weighted residuals C_k^{-1}(x_t - alpha mu_k) (N, M, D),
        with C_k = alpha^2 Sigma_k + sigma^2 I and per-example alpha, sigma of shape (N,)."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (N, {self.dim}), got {tuple(x_t.shape)}")
        mu, lam, u, logw = self._constants(x_t.device, x_t.dtype)
        dt = x_t.dtype
        alpha, sigma = alpha.to(dt)[:, None, None], sigma.to(dt)[:, None, None]
        var = alpha**2 * lam[None] + sigma**2  # (N, M, D) eigenvalues of C_k
        proj = torch.einsum("nmd,mde->nme", x_t[:, None, :] - alpha * mu[None], u)  # in each eigenbasis
        logp = logw - 0.5 * ((proj**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        prec_diff = torch.einsum("nme,mde->nmd", proj / var, u)
        return logp, prec_diff

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(means, eigenvalues, eigenvectors, log-weights) in ``dtype`` on ``device``, copied there once: a training
        step then makes no host-to-device copies (which a CUDA graph could not capture)."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = tuple(v.to(device, dtype) for v in (self.means, self._evals, self._evecs,
                                                                       self.weights.log()))
        return self._on_device[key]

    def _noisy_terms(self, x_t, t):
        check_per_example("x_t", x_t, t=t)
        return self._terms(x_t, *self.schedule.alpha_sigma(t.to(x_t.dtype)))

    def log_prob_t(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t), (N,)."""
        return torch.logsumexp(self._noisy_terms(x_t, t)[0], dim=1)

    def score(self, x_t, t, y=None):
        """grad log p_t(x_t), (N, D)."""
        logp, prec_diff = self._noisy_terms(x_t, t)
        resp = torch.softmax(logp, dim=1)
        return -(resp[:, :, None] * prec_diff).sum(1)

    def denoise(self, x_t, t, y=None):
        """E[x | x_t] = (x_t + sigma^2 s(x_t)) / alpha (Tweedie), (N, D). Exact in x_t's dtype: an enclosing
        autocast (a bf16 training run) does not apply to the analytic teacher."""
        with torch.autocast(x_t.device.type, enabled=False):
            alpha, sigma = (expand_like(v.to(x_t.dtype), x_t) for v in self.schedule.alpha_sigma(t))
            return (x_t + sigma**2 * self.score(x_t, t)) / alpha

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the clean mixture (alpha=1, sigma=0), (N,)."""
        return torch.logsumexp(self._clean_logp(x), dim=1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean sample, (N,) int64."""
        return self._clean_logp(x).argmax(dim=1)

    def _clean_logp(self, x):
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return self._terms(x, ones, torch.zeros_like(ones))[0]

    def mahalanobis2(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of clean samples to every component, (N, M)."""
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        _, prec_diff = self._terms(x, ones, torch.zeros_like(ones))
        diff = x[:, None, :] - self._constants(x.device, x.dtype)[0][None]
        return (diff * prec_diff).sum(-1)

    def sample(self, n: int, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (n, D) fp32 and their component labels (n,)."""
        labels = torch.multinomial(self.weights.float().to(device), n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs).float().to(device)
        noise = torch.randn(n, self.dim, generator=generator, device=device)
        x = self.means.float().to(device)[labels] + torch.einsum("nde,ne->nd", chol[labels], noise)
        return x, labels

    def sample_t(self, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact samples of the noisy marginal at per-example t (N,): alpha_t x + sigma_t eps, (N, D) fp32."""
        x, _ = self.sample(t.shape[0], generator, t.device)
        alpha, sigma = (v[:, None] for v in self.schedule.alpha_sigma(t))
        return alpha * x + sigma * torch.randn(x.shape, generator=generator, device=t.device)
