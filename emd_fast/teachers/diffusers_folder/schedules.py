"""The noise levels of a diffusers folder's scheduler, as this project's continuous ``Schedule``.

* DDPM family (UNets): ``DiscreteSchedule`` turns the scheduler's ``alphas_cumprod`` (T discrete timesteps) into a
  continuous schedule on t in [0, T-1]: the log-SNR lambda_i = log(abar_i / (1 - abar_i)) is interpolated linearly
  between neighbouring integer timesteps, alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t) (variance
  preserving), and the UNet is called at the fractional timestep t. This is how diffusers' own samplers reach noise
  levels between the training timesteps: ``EulerDiscreteScheduler._sigma_to_t`` interpolates log sigma linearly
  between timesteps, and log sigma = -lambda / 2 there. At integer t the schedule is exactly the scheduler's (abar_t).
* Flow matching (SD3, FLUX): ``FlowMatching`` (``emd_fast.schedules``) with the time shift k that
  FlowMatchEulerDiscreteScheduler applies: its ``shift``, or with ``use_dynamic_shifting`` the resolution-dependent
  shift the pipelines compute from the number of image tokens (mu linear in it; k = e^mu for time_shift_type
  "exponential", k = mu for "linear": both are the static shift map with that k). t runs over the scheduler's
  training times 1/N .. 1 - 1/N (N = num_train_timesteps; time 1, pure noise, is left out), and the transformer is
  called at the scheduler's timestep N s(t).
"""
from __future__ import annotations

import math

import torch

from ...schedules import FlowMatching, Schedule
from .folder import FLOW_DEFAULTS, TeacherFolder
from .loading import diffusers_module, first_lines


class DiscreteSchedule(Schedule):
    """A diffusers scheduler's noise levels: alphas_cumprod (T,) on the timesteps 0..T-1, t continuous in between
    (log-SNR interpolated linearly, see the module docstring). t_max is the last timestep with abar > 0 (a zero
    terminal SNR has lambda = -inf)."""

    name = "diffusers_discrete"

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or not bool(((abar >= 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be at least 2 values in [0, 1), strictly decreasing")
        positive = int((abar > 0).sum())
        self.lam_table = (abar[:positive] / (1 - abar[:positive])).log()  # (T',) float64, decreasing
        self.num_timesteps = abar.numel()
        self.t_min, self.t_max = 0.0, float(positive - 1)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """lam_table on ``device``, copied there once (no host-device copies inside a training step)."""
        if device not in self._on_device:
            self._on_device[device] = self.lam_table.to(device)
        return self._on_device[device]

    def lam(self, t):
        """log-SNR at fractional timesteps t (N,), linear between the integer timesteps; in t's dtype."""
        table = self._table(t.device)
        tt = t.to(torch.float64).clamp(self.t_min, self.t_max)
        lo = tt.floor().clamp(max=self.t_max - 1).long()
        frac = tt - lo
        return (table[lo] * (1 - frac) + table[lo + 1] * frac).to(t.dtype)

    def alpha(self, t):
        return torch.sigmoid(self.lam(t).to(torch.float64)).sqrt().to(t.dtype)

    def sigma(self, t):
        return torch.sigmoid(-self.lam(t).to(torch.float64)).sqrt().to(t.dtype)

    def t_from_lambda(self, lam):
        """The fractional timestep with log-SNR ``lam`` (inverse of ``lam``), clamped to [t_min, t_max]."""
        table = self._table(lam.device)
        lam64 = lam.to(torch.float64)
        hi = torch.searchsorted(-table, -lam64.reshape(-1)).reshape(lam64.shape)  # first timestep with lambda <= lam
        lo = (hi - 1).clamp(0, table.numel() - 2)
        frac = (table[lo] - lam64) / (table[lo] - table[lo + 1])
        return (lo + frac).clamp(self.t_min, self.t_max).to(lam.dtype)

    def generator_t(self, lam: float) -> float:
        """The training timestep nearest to log-SNR ``lam``: the UNet is trained at integer timesteps, and a stock
        diffusers scheduler calls it at exactly this one in an exported one-step pipeline (docs/export.md)."""
        return float(round(self.t_at_lambda(lam)))

    def config(self):
        return {**super().config(), "num_train_timesteps": self.num_timesteps}


def flow_shift(scheduler_config: dict, image_tokens: int) -> float:
    """The time shift k of a FlowMatchEulerDiscreteScheduler config for images of ``image_tokens`` transformer tokens:
    its ``shift``, or with dynamic shifting e^mu ("exponential") or mu ("linear"), mu as the pipelines compute it
    (linear in the token count) from the loaded scheduler's config: the file's values over the scheduler's defaults."""
    cfg = {**FLOW_DEFAULTS, **scheduler_config}
    if not cfg["use_dynamic_shifting"]:
        return float(cfg["shift"])
    base_len, max_len = cfg["base_image_seq_len"], cfg["max_image_seq_len"]
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (max_len - base_len)
    mu = image_tokens * slope + cfg["base_shift"] - slope * base_len
    if cfg["time_shift_type"] == "exponential":
        return math.exp(mu)
    if mu <= 0:
        raise ValueError(f"the linear dynamic time shift mu = {mu:.4g} at {image_tokens} image tokens is not a time "
                         f"shift (need mu > 0): choose another --resolution")
    return float(mu)


def noise_scheduler(folder: TeacherFolder):
    """diffusers' DDPMScheduler with the noise levels of a DDPM-family folder's scheduler config (betas,
    alphas_cumprod)."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    options = {k: v for k, v in folder.scheduler_config.items() if k in keep}
    try:
        return diffusers_module().DDPMScheduler(**options)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:  # e.g. a number of the wrong type
        raise ValueError(f"{folder.scheduler}/scheduler_config.json: no noise levels from its "
                         f"{', '.join(sorted(options))}: {first_lines(e)[:200]}") from None


def load_schedule(folder: TeacherFolder, shape: tuple[int, int, int] | None = None) -> Schedule:
    """The folder's noise levels for samples of ``shape`` (C, H, W; default the folder's own): a flow model's shift
    may depend on it. A
    DiscreteSchedule of the alphas_cumprod diffusers' DDPMScheduler computes from the scheduler config, or a
    FlowMatching schedule over the scheduler's training times."""
    if folder.flow:
        n = folder.num_train_timesteps
        tokens = folder.image_tokens(shape or folder.data_shape())
        return FlowMatching(flow_shift(folder.scheduler_config, tokens), t_min=1 / n, t_max=1 - 1 / n)
    alphas_cumprod = noise_scheduler(folder).alphas_cumprod
    try:
        return DiscreteSchedule(alphas_cumprod)
    except ValueError as e:
        raise ValueError(f"{folder.scheduler}/scheduler_config.json: {e} (fp32, as diffusers computes them)") from None
