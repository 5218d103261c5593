"""Preconditioning of a denoiser (Karras et al. 2022, Table 1), written for any Schedule.

With s = sigma_t / alpha_t and x = x_t / alpha_t (the EDM-scaled image at noise level s), a network F becomes
    D(x_t, t) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)).
The three preconditionings of NVlabs/EDM (EDMPrecond, VPPrecond, VEPrecond), each a function of s (N,) giving four
(N,) fp32 tensors, with the noise levels it supports and a JSON-able config that ``make_precond`` rebuilds it from:
    edm  c_skip = s_d^2 / (s^2 + s_d^2), c_out = s s_d / sqrt(s^2 + s_d^2), c_in = 1 / sqrt(s^2 + s_d^2),
         c_noise = log(s) / 4;  supports [sigma_min, sigma_max] (by default every s > 0)
    vp   c_skip = 1, c_out = -s, c_in = 1 / sqrt(s^2 + 1), c_noise = (M - 1) t(s), where t(s) inverts
         s(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1);  supports [s(epsilon_t), s(1)]
    ve   c_skip = 1, c_out = s, c_in = 1, c_noise = log(s / 2);  supports [sigma_min, sigma_max]
The coefficients are computed in fp32 with EDM's order of operations, so a converted EDM network is the same function.
"""
from __future__ import annotations

import math

import torch

from ..schedules import Schedule, expand_like


class Precond:
    """c_skip, c_out, c_in, c_noise of s (N,); ``sigma_min``/``sigma_max``: the supported noise levels."""

    type: str
    sigma_min: float
    sigma_max: float

    def __call__(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError


class EDMPrecond(Precond):
    """EDM's preconditioning for data of standard deviation sigma_data (the config writes sigma_max=inf as None)."""

    type = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.0, sigma_max: float | None = math.inf):
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)
        self.sigma_max = math.inf if sigma_max is None else float(sigma_max)

    def __call__(self, s):
        sd = self.sigma_data
        return (sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt(), s.log() / 4)

    def config(self):
        return {"type": self.type, "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": None if math.isinf(self.sigma_max) else self.sigma_max}


class VPPrecond(Precond):
    """The variance-preserving SDE's preconditioning (Song et al. 2021) in DDPM time t in [epsilon_t, 1]."""

    type = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min, self.sigma_max = self.sigma(self.epsilon_t), self.sigma(1.0)

    def sigma(self, t: float) -> float:
        """s(t) in float64."""
        return math.sqrt(math.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def __call__(self, s):
        t = ((self.beta_min**2 + 2 * self.beta_d * (1 + s**2).log()).sqrt() - self.beta_min) / self.beta_d
        return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), (self.M - 1) * t

    def config(self):
        return {"type": self.type, "beta_d": self.beta_d, "beta_min": self.beta_min, "M": self.M,
                "epsilon_t": self.epsilon_t}


class VEPrecond(Precond):
    """The variance-exploding SDE's preconditioning (Song et al. 2021)."""

    type = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __call__(self, s):
        return torch.ones_like(s), s, torch.ones_like(s), (0.5 * s).log()

    def config(self):
        return {"type": self.type, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


PRECONDS = {cls.type: cls for cls in (EDMPrecond, VPPrecond, VEPrecond)}


def make_precond(config: dict) -> Precond:
    """The preconditioning a ``config()`` dict describes; ValueError for an unknown type or parameter."""
    kwargs = dict(config)
    kind = kwargs.pop("type", None)
    if kind not in PRECONDS:
        raise ValueError(f"unknown preconditioning type {kind!r}; choose one of {tuple(PRECONDS)}")
    try:
        return PRECONDS[kind](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad {kind} preconditioning config {config}: {e}") from None


def precondition(precond: Precond, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, model, *args):
    """D(x_t, t) = c_skip x + c_out model(c_in x, c_noise, *args), x = x_t / alpha_t, s = sigma_t / alpha_t.

    x_t: (N, ...), t: (N,) -> (N, ...) float32; ``model(x, c_noise (N,), *args)`` is the raw network F.
    """
    alpha, sigma = schedule.alpha_sigma(t.float())
    x = x_t.float() / expand_like(alpha, x_t)
    c_skip, c_out, c_in, c_noise = precond(sigma / alpha)
    return expand_like(c_skip, x) * x + expand_like(c_out, x) * model(expand_like(c_in, x) * x, c_noise, *args)
