"""The teacher's many-step sampler: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1).

Written in EDM variables (x_e = x_t / alpha_t, s = sigma_t / alpha_t) so it serves any Schedule: the denoiser is
called at the t whose log-SNR is -2 log s, on x_t = alpha_t x_e.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def heun_sample(denoise, schedule, noise: torch.Tensor, y=None, num_steps: int = 18, rho: float = 7.0,
                s_min: float | None = None, s_max: float | None = None, on_step=None) -> torch.Tensor:
    """Deterministic Heun sampling from noise (N, ...) ~ N(0, I) with ``denoise(x_t, t, y)``; returns (N, ...).
    ``on_step()``, if given, is called after each of the ``num_steps`` steps (a progress bar)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    lo_lam, hi_lam = schedule.lambda_range
    s_min = s_min if s_min is not None else float(torch.tensor(-0.5 * hi_lam).exp())
    s_max = s_max if s_max is not None else float(torch.tensor(-0.5 * lo_lam).exp())
    i = torch.arange(num_steps, dtype=torch.float64)
    s_steps = (s_max ** (1 / rho) + i / max(num_steps - 1, 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    s_steps = torch.cat([s_steps, torch.zeros(1, dtype=torch.float64)])

    def d_e(x_e, s):
        t = schedule.t_from_lambda(torch.full((x_e.shape[0],), -2 * torch.tensor(s).log().item(),
                                              dtype=torch.float64)).to(x_e)
        alpha = schedule.alpha(t).reshape(-1, *([1] * (x_e.dim() - 1)))
        return denoise(alpha * x_e, t, y).to(torch.float64)

    x = noise.to(torch.float64) * s_steps[0]
    for s_cur, s_next in zip(s_steps[:-1].tolist(), s_steps[1:].tolist()):
        d_cur = (x - d_e(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + (x_next - d_e(x_next, s_next)) / s_next)
        x = x_next
        if on_step is not None:
            on_step()
    return x.to(noise.dtype)
