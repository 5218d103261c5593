"""Noise schedules ``x_t = alpha_t * x + sigma_t * eps`` and the loss weightings w(t).

Every method takes a per-example noise level ``t`` of shape (N,) and returns tensors of shape (N,).
``lambda_t = log(alpha_t^2 / sigma_t^2)`` is the log signal-to-noise ratio; it decreases with t.
"""
from __future__ import annotations

import math

import torch

WEIGHTINGS = ("uniform", "snr", "inv_snr", "sqrt_inv_snr", "edm")
# A network that predicts the noise (c_out = sigma/alpha: an epsilon-prediction diffusers UNet, EDM's VP and VE
# preconditionings) gives a denoiser D = (x_t - sigma eps_hat) / alpha whose errors are its output's times sigma/alpha
# (at the last timestep: 157 for DDPM's linear betas, 14.6 for Stable Diffusion's scaled-linear ones, 80 at EDM's
# largest sigma): losses weighted for EDM's preconditioned networks (edm, inv_snr) are then dominated by the largest
# noise levels. These weigh both losses in noise-prediction units instead; snr is also such a teacher's own training
# weighting (docs/teachers.md).
NOISE_PREDICTION_WEIGHTINGS = {"student_weighting": "snr", "gen_weighting": "sqrt_inv_snr"}


class Schedule:
    """Base class: subclasses define ``alpha``, ``sigma``, ``t_from_lambda`` and the t range."""

    name: str
    t_min: float
    t_max: float

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_from_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """log-SNR lambda_t, (N,)."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha(t), self.sigma(t)

    @property
    def lambda_range(self) -> tuple[float, float]:
        """(lambda at t_max, lambda at t_min): the log-SNRs this schedule covers."""
        ends = torch.tensor([self.t_max, self.t_min], dtype=torch.float64)
        lo, hi = self.lam(ends).tolist()
        return lo, hi

    def t_at_lambda(self, lam: float) -> float:
        """The noise level t with log-SNR ``lam``; ValueError outside the schedule's range."""
        lo, hi = self.lambda_range
        if not (lo <= lam <= hi):
            raise ValueError(f"lambda*={lam} is outside the {self.name} schedule's log-SNR range [{lo:.3f}, {hi:.3f}]")
        return float(self.t_from_lambda(torch.tensor(lam, dtype=torch.float64)))

    def generator_t(self, lam: float) -> float:
        """The noise level t* of the one-step generator for log-SNR lambda* = ``lam``: ``t_at_lambda``."""
        return self.t_at_lambda(lam)

    def sample_t(self, n: int, generator: torch.Generator, device, t_min: float | None = None,
                 t_max: float | None = None) -> torch.Tensor:
        """n noise levels, uniform in t on [t_min, t_max] (defaults: the schedule's range), fp32 (n,)."""
        lo = self.t_min if t_min is None else t_min
        hi = self.t_max if t_max is None else t_max
        u = torch.rand(n, generator=generator, device=device)
        return lo + (hi - lo) * u

    def weight(self, kind: str, t: torch.Tensor, sigma_data: float = 1.0) -> torch.Tensor:
        """Loss weighting w(t), (N,).

        uniform: 1.  snr: alpha^2/sigma^2 (on an epsilon-prediction denoiser D = (x_t - sigma eps_hat) / alpha,
        w ||D - x||^2 is the noise-prediction MSE ||eps_hat - eps||^2).  inv_snr: sigma^2/alpha^2 (the generator
        gradient becomes the plain denoiser difference D_T - D_psi).  sqrt_inv_snr: sigma/alpha (the generator
        gradient becomes the noise-prediction difference eps_T - eps_psi = alpha/sigma (D_T - D_psi)).  edm:
        Karras et al.'s (s^2 + s_d^2) / (s * s_d)^2 with s = sigma/alpha (unit-variance denoiser targets).
        """
        alpha, sigma = self.alpha_sigma(t)
        if kind == "uniform":
            return torch.ones_like(t)
        if kind == "snr":
            return (alpha / sigma) ** 2
        if kind == "inv_snr":
            return (sigma / alpha) ** 2
        if kind == "sqrt_inv_snr":
            return sigma / alpha
        if kind == "edm":
            s = sigma / alpha
            return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
        raise ValueError(f"unknown weighting {kind!r}; choose one of {WEIGHTINGS}")

    def config(self) -> dict:
        return {"name": self.name, "t_min": self.t_min, "t_max": self.t_max}


class VPCosine(Schedule):
    """Variance-preserving cosine schedule: alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2), t in (0, 1)."""

    name = "vp_cosine"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"vp_cosine needs 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = t_min, t_max

    def alpha(self, t):
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.sin(0.5 * math.pi * t)

    def t_from_lambda(self, lam):
        return (2 / math.pi) * torch.atan(torch.exp(-0.5 * lam))


class EDMSchedule(Schedule):
    """EDM / variance-exploding schedule: alpha_t = 1, sigma_t = t, t in [sigma_min, sigma_max].

    ``sample_t`` uses EDM's log-normal training distribution (P_mean, P_std), clamped to the range.
    """

    name = "edm"

    def __init__(self, t_min: float = 0.002, t_max: float = 80.0, p_mean: float = -1.2, p_std: float = 1.2):
        if not (0 < t_min < t_max):
            raise ValueError(f"edm needs 0 < sigma_min < sigma_max, got {t_min}, {t_max}")
        self.t_min, self.t_max, self.p_mean, self.p_std = t_min, t_max, p_mean, p_std

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def t_from_lambda(self, lam):
        return torch.exp(-0.5 * lam)

    def sample_t(self, n, generator, device, t_min=None, t_max=None):
        lo = self.t_min if t_min is None else t_min
        hi = self.t_max if t_max is None else t_max
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, device=device)
        return log_sigma.exp().clamp(lo, hi)

    def config(self):
        return {**super().config(), "p_mean": self.p_mean, "p_std": self.p_std}


class FlowMatching(Schedule):
    """Rectified flow (flow matching): x_t = (1 - s) x + s eps, alpha = 1 - s, sigma = s (not variance preserving).

    s(t) = k t / (1 + (k - 1) t) is the noise level at time t in (0, 1) for a time ``shift`` k (diffusers'
    FlowMatchEulerDiscreteScheduler ``shift``; k = 1: s = t). t is the unshifted time, so uniform t sampling and
    ``--t-min/--t-max`` follow the spacing the teacher's sampler uses; the noise level of a log-SNR is the same for
    every k: s = sigmoid(-lambda / 2). A network predicting the velocity v = eps - x has the denoiser D = x_t - s v.
    s = 1 (lambda = -inf, pure noise) is left out of the range: t_max < 1.
    """

    name = "flow"

    def __init__(self, shift: float = 1.0, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not (math.isfinite(shift) and shift > 0 and 0 < t_min < t_max < 1):
            raise ValueError(f"flow needs shift > 0 and 0 < t_min < t_max < 1, got shift={shift}, t_min={t_min}, "
                             f"t_max={t_max}")
        self.shift, self.t_min, self.t_max = float(shift), t_min, t_max

    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) in float64, (N,)."""
        t64 = t.to(torch.float64)
        return self.shift * t64 / (1 + (self.shift - 1) * t64)

    def alpha(self, t):
        return (1 - self.noise_level(t)).to(t.dtype)

    def sigma(self, t):
        return self.noise_level(t).to(t.dtype)

    def lam(self, t):
        s = self.noise_level(t)
        return (2 * (torch.log1p(-s) - torch.log(s))).to(t.dtype)

    def t_from_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """The time whose noise level is s (inverse of ``sigma``): t = s / (k - (k - 1) s)."""
        s64 = s.to(torch.float64)
        return (s64 / (self.shift - (self.shift - 1) * s64)).to(s.dtype)

    def t_from_lambda(self, lam):
        return self.t_from_sigma(torch.sigmoid(-0.5 * lam.to(torch.float64))).to(lam.dtype)

    def config(self):
        return {**super().config(), "shift": self.shift}


SCHEDULES = {"vp_cosine": VPCosine, "edm": EDMSchedule, "flow": FlowMatching}


def make_schedule(name: str, **kwargs) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {tuple(SCHEDULES)}")
    return SCHEDULES[name](**kwargs)


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-example (N,) tensor as (N, 1, ..., 1) to broadcast against x of shape (N, ...)."""
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))
