"""The elementwise parts of an EMD iteration in plain PyTorch: the reference twins of ``emd_fast.kernels``.

Shapes: data-shaped tensors are (N, ...) (vectors (N, D) or images (N, C, H, W)); ``alpha``, ``sigma``,
``weight`` are per-example (N,). Inputs may be fp32 / bf16 / fp16; the math is done in fp32 and results
are returned in the dtype of the first data argument (the losses: fp32 scalars).

Notation (docs/design.md): delta = s_T - s_psi = alpha * (D_T - D_psi) / sigma^2, the teacher-minus-student score.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

from .checks import check_like, check_per_example
from .schedules import expand_like


def langevin_eps_step(eps, eta, d_teacher, d_student, alpha, sigma, gamma, noise, g=None):
    """One Langevin step on eps with noise book-keeping.

    eps' = eps + gamma * (sigma * delta - eps) + sqrt(2 gamma) * noise
    eta' = (1 - gamma) * eta + sqrt(2 gamma) * noise          (the pure-noise part of eps; None -> None)
    v    = alpha * delta                                       (the z-update's VJP vector)
    x'   = alpha * g + sigma * eps'                            (only if the generator output g is given)

    Returns (eps', eta', v, x'), each (N, ...) in eps.dtype (eta', x' may be None).
    """
    check_like("eps", eps, eta=eta, d_teacher=d_teacher, d_student=d_student, noise=noise, g=g)
    check_per_example("eps", eps, alpha=alpha, sigma=sigma)
    if not gamma > 0:
        raise ValueError(f"gamma_eps must be > 0, got {gamma}")
    f32 = torch.float32
    a, s = expand_like(alpha.to(f32), eps), expand_like(sigma.to(f32), eps)
    e, n = eps.to(f32), noise.to(f32)
    delta = a * (d_teacher.to(f32) - d_student.to(f32)) / s**2
    root = math.sqrt(2 * gamma)
    eps_new = e + gamma * (s * delta - e) + root * n
    eta_new = None if eta is None else (1 - gamma) * eta.to(f32) + root * n
    x_new = None if g is None else a * g.to(f32) + s * eps_new
    out = eps.dtype
    return (eps_new.to(out), None if eta_new is None else eta_new.to(out), (a * delta).to(out),
            None if x_new is None else x_new.to(out))


def langevin_z_step(z, jtv, gamma, noise):
    """One Langevin step on the latent: z' = z + gamma * (J_g^T v - z) + sqrt(2 gamma) * noise.

    z, jtv (= J_g(z)^T v from the VJP), noise: (N, ...); gamma: a float > 0, or per-example step sizes (N,)
    (the noise-scaled z step of ``emd.EMDConfig``; their values are not checked: that would need a host sync).
    Returns z' in z.dtype.
    """
    check_like("z", z, jtv=jtv, noise=noise)
    f32 = torch.float32
    if isinstance(gamma, torch.Tensor):
        check_per_example("z", z, gamma=gamma)
        gamma = expand_like(gamma.to(f32), z)
        root = (2 * gamma).sqrt()
    elif not gamma > 0:
        raise ValueError(f"gamma_z must be > 0, got {gamma}")
    else:
        root = math.sqrt(2 * gamma)
    zf = z.to(f32)
    return (zf + gamma * (jtv.to(f32) - zf) + root * noise.to(f32)).to(z.dtype)


def generator_loss(g, eps, eta, alpha, sigma, weight):
    """M-step loss on the (noise-cancelled) E-step sample, differentiable in the generator output g.

    The E-step sample is x_t = sg(alpha g + sigma r) with residual r = eps - eta (eta None: r = eps,
    no cancellation); the loss is the per-element mean of  w * (x_t - alpha g)^2 / (2 sigma^2),
    whose value is mean(w r^2) / 2 and whose gradient is dL/dg = -w alpha r / (sigma * numel).
    g, eps, eta: (N, ...); alpha, sigma, weight: (N,). Returns an fp32 scalar.
    """
    check_like("g", g, eps=eps, eta=eta)
    check_per_example("g", g, alpha=alpha, sigma=sigma, weight=weight)
    f32 = torch.float32
    a, s, w = (expand_like(v.to(f32), g) for v in (alpha, sigma, weight))
    r = eps.to(f32) if eta is None else eps.to(f32) - eta.to(f32)
    gf = g.to(f32)
    x_t = (a * gf + s * r).detach()
    return (w * (x_t - a * gf) ** 2 / (2 * s**2)).mean()


def dsm_loss(d, x, weight):
    """Student denoising score-matching loss: per-element mean of w * (D_psi(x_t) - x)^2.

    d (the student's denoiser output, differentiable), x (the clean generator sample): (N, ...);
    weight: (N,). Returns an fp32 scalar.
    """
    check_like("d", d, x=x)
    check_per_example("d", d, weight=weight)
    w = expand_like(weight.to(torch.float32), d)
    return (w * (d.to(torch.float32) - x.to(torch.float32)) ** 2).mean()


class Ops(Protocol):
    """The elementwise backend of an EMD iteration (``ReferenceOps``, or the fused ``TritonOps``): the four
    functions above, the Langevin noise, and the backend's own random state for checkpoints."""

    def langevin_eps_step(self, eps, eta, d_teacher, d_student, alpha, sigma, gamma, noise, g=None): ...

    def langevin_z_step(self, z, jtv, gamma, noise): ...

    def generator_loss(self, g, eps, eta, alpha, sigma, weight) -> torch.Tensor: ...

    def dsm_loss(self, d, x, weight) -> torch.Tensor: ...

    def randn_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """Noise for a Langevin step, or None where the backend draws it itself."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


class ReferenceOps:
    """The reference backend: ops.py functions, noise from one torch.Generator."""

    langevin_eps_step = staticmethod(langevin_eps_step)
    langevin_z_step = staticmethod(langevin_z_step)
    generator_loss = staticmethod(generator_loss)
    dsm_loss = staticmethod(dsm_loss)

    def __init__(self, rng: torch.Generator):
        self.rng = rng

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # all its randomness is the run's torch.Generator, checkpointed by the Distiller

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
