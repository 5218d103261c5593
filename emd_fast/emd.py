"""The EMD iteration: E-step (K Langevin steps), M-step generator loss, student denoising-score update.

Notation follows docs/design.md: x_t = alpha_t g(z) + sigma_t eps, delta = s_T - s_psi. The elementwise parts go
through an ``ops`` backend (``emd_fast.ops.Ops``): :class:`~emd_fast.ops.ReferenceOps` (plain PyTorch) or the fused
Triton kernels (:mod:`emd_fast.execution.backends`); the networks and the control flow are shared, so both paths run
the same algorithm.

Sampling variants (the paper's ablation):
    "eps,z"  reparametrized: Langevin on (eps, z); moving z moves x_t with eps held fixed.
    "x,z"    joint: Langevin on (x_t, z); moving z leaves x_t fixed and changes eps = (x_t - alpha g(z)) / sigma.
    "eps"    eps only, z fixed.      "x"  x_t only, z fixed.
The x-space step size is sigma_t^2 * gamma_eps, which makes an x step equal to an eps step when z is fixed: so
"x" and "eps" are the same chain (a test checks it) and "x,z" differs from "eps,z" only in how z's move is coupled.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .checks import check_finite
from .execution.profiling import phase
from .ops import Ops
from .schedules import WEIGHTINGS, Schedule, expand_like

VARIANTS = ("eps,z", "x,z", "eps", "x")
Z_STEPS = ("scaled", "fixed")


@dataclass
class EMDConfig:
    """Hyperparameters of one EMD iteration (the paper's knobs)."""

    K: int = 8  # Langevin steps per E-step; 0 = no MCMC
    gamma_eps: float = 0.3  # step size on eps (x-space chains use sigma_t^2 * gamma_eps)
    gamma_z: float = 0.01  # step size on z (variants "eps,z" and "x,z"), at high noise if z_step is "scaled"
    z_step: str = "scaled"  # "scaled": gamma_z scaled with the noise level (EMD.z_step_size); "fixed": gamma_z
    variant: str = "eps,z"
    cancel_noise: bool = True  # subtract the book-kept noise eta_K from the M-step residual
    gen_weighting: str = "inv_snr"  # w(t) of the M-step loss
    student_weighting: str = "edm"  # w~(t) of the student DSM loss
    t_min: float | None = None  # E-step / M-step noise-level range (None: the schedule's)
    t_max: float | None = None

    def validate(self, schedule: Schedule | None = None) -> "EMDConfig":
        """Self, checked (ValueError naming the knob); with ``schedule``, also the noise-level range."""
        if not isinstance(self.K, int) or self.K < 0:
            raise ValueError(f"K must be an integer >= 0, got {self.K}")
        if not self.gamma_eps > 0:
            raise ValueError(f"gamma_eps must be > 0, got {self.gamma_eps}")
        if not 0 < self.gamma_eps < 1:
            raise ValueError(f"gamma_eps must be < 1 (the eps chain contracts by 1 - gamma_eps), got {self.gamma_eps}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.moves_z and not 0 < self.gamma_z < 1:
            raise ValueError(f"gamma_z must be in (0, 1) for variant {self.variant!r}, got {self.gamma_z}")
        if self.z_step not in Z_STEPS:
            raise ValueError(f"z_step must be one of {Z_STEPS}, got {self.z_step!r}")
        for name in ("gen_weighting", "student_weighting"):
            if getattr(self, name) not in WEIGHTINGS:
                raise ValueError(f"{name} must be one of {WEIGHTINGS}, got {getattr(self, name)!r}")
        if schedule is not None:
            lo = schedule.t_min if self.t_min is None else self.t_min
            hi = schedule.t_max if self.t_max is None else self.t_max
            if not schedule.t_min <= lo < hi <= schedule.t_max:
                raise ValueError(f"the noise levels [t_min, t_max] = [{lo}, {hi}] must be an increasing range inside "
                                 f"the {schedule.name} schedule's [{schedule.t_min}, {schedule.t_max}]")
        return self

    @property
    def moves_z(self) -> bool:
        return self.variant in ("eps,z", "x,z")

    @property
    def in_x(self) -> bool:
        return self.variant.startswith("x")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EStep:
    """E-step output, all (N, ...) except t/alpha/sigma (N,). eta is None without noise cancellation."""

    z: torch.Tensor
    eps: torch.Tensor
    eta: torch.Tensor | None
    x_t: torch.Tensor
    x0: torch.Tensor  # g(z_0), the generator's own sample at the start (the student trains on it)
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor


def checked_call(what: str | None, net, *args) -> torch.Tensor:
    """``net(*args)``, raising FloatingPointError if the output named ``what`` (None: not checked) holds NaN/inf."""
    out = net(*args)
    if what:
        check_finite(what, out)
    return out


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Inside, the modules' parameters do not require grad: a VJP through an output made here computes J^T v only
    (eager autograd prunes the weight gradients anyway; a torch.compile-d backward would compute them all), and a
    no-grad call sees the same parameters as one of the frozen teacher (a compiled network, or block, then reuses
    the teacher's graph: torch.compile specialises on requires_grad). Toggles each parameter twice per ``with``;
    a plain function (an exact score given as the student) has none."""
    params = [p for module in modules if isinstance(module, nn.Module) for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class EMD:
    """The math of one EMD iteration, independent of optimizers and bookkeeping.

    teacher: has .denoise(x_t, t, y) and .schedule; generator: z (N, ...) -> x (N, ...);
    student: D_psi(x_t, t, y) -> (N, ...). ops: ReferenceOps or a fused backend with the same methods.
    call: how a network is called, ``call(what, net, *args)``: ``checked_call`` (the default) raises on a NaN/inf
    output named ``what``; an execution backend may add autocast or defer the checks (``NetworkCall``).
    train_generator, train_student: what the two losses call to run generator and student with gradients (default:
    the networks themselves; e.g. a DistributedDataParallel wrapper of the same network, which averages the
    gradients across processes). The E-step always calls the networks themselves.
    """

    def __init__(self, teacher, generator: nn.Module, student: nn.Module, cfg: EMDConfig, ops: Ops, sigma_data=1.0,
                 call=None, train_generator: nn.Module | None = None, train_student: nn.Module | None = None):
        self.teacher, self.generator, self.student = teacher, generator, student
        self.train_generator, self.train_student = train_generator or generator, train_student or student
        self.schedule, self.ops, self.sigma_data = teacher.schedule, ops, sigma_data
        self.cfg = cfg.validate(self.schedule)
        self._net = call or checked_call

    def _generate(self, z, y, with_vjp: bool):
        """g(z) (detached) and, if asked, the pullback v -> J_g(z)^T v; called, and the pullback too, inside
        ``e_step``'s ``frozen``."""
        if not with_vjp:
            with torch.no_grad(), phase("generator forward"):
                return self._net("generator output", self.generator, z, y), None
        z = z.detach().requires_grad_(True)
        with torch.enable_grad(), phase("generator forward"):
            g = self._net("generator output", self.generator, z, y)

        def pullback(v):
            # still inside e_step's frozen(): an activation-checkpointed generator recomputes its forward in this
            # backward, and must record the same graph as in the forward (no weight gradients)
            with phase("generator VJP"):
                return torch.autograd.grad(g, z, v)[0]

        return g.detach(), pullback

    def z_step_size(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor | float:
        """The Langevin step on z, per example (N,) for z_step "scaled", else the float gamma_z.

        In z the curvature of -log pi is about I + (alpha^2 / sigma^2) J_g^T J_g: the likelihood
        N(x_t; alpha g(z), sigma^2 I) seen through the generator. It grows without bound as t -> 0, so a fixed step
        is unstable at low noise whenever J_g is not small. The scaled step divides gamma_z by that curvature with
        ||J_g||^2 ~ sigma_data^2 (a generator mapping unit-variance latents to data of scale sigma_data):
            gamma_z(t) = gamma_z * sigma^2 / (sigma^2 + alpha^2 sigma_data^2),
        so step x curvature stays ~gamma_z at every noise level, and the step is gamma_z at high noise. It is fixed
        for the K steps and used in drift and noise alike, so each chain is still a Langevin chain on its target.
        """
        if self.cfg.z_step == "fixed":
            return self.cfg.gamma_z
        s2 = sigma.float() ** 2
        return self.cfg.gamma_z * s2 / (s2 + (alpha.float() * self.sigma_data) ** 2)

    @torch.no_grad()
    def _denoisers(self, x_t, t, y):
        with phase("teacher forward"):
            d_t = self._net("teacher denoiser output", self.teacher.denoise, x_t, t, y)
        with phase("student forward"):
            d_s = self._net("student denoiser output", self.student, x_t, t, y)
        return d_t, d_s

    def e_step(self, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, y=None) -> EStep:
        """K Langevin steps targeting p_T(x_t) p_theta(z | x_t), started from the generator's own joint.

        z, eps: (N, ...) initial latent and noise (z_0, eps_0 ~ N(0, I)); t: (N,).
        Generator and student are frozen throughout (``frozen``): the VJPs leave their weights out, and their no-grad
        calls see the parameters of the teacher's.
        """
        with frozen(self.generator, self.student):
            return self._e_step(z, eps, t, y)

    def _e_step(self, z, eps, t, y) -> EStep:
        cfg, ops = self.cfg, self.ops
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = expand_like(alpha, eps), expand_like(sigma, eps)
        eta = eps.clone() if cfg.cancel_noise else None  # eta_0 = eps_0
        gamma_z = self.z_step_size(alpha, sigma) if cfg.moves_z else None
        g, pullback = self._generate(z, y, with_vjp=cfg.moves_z and cfg.K > 0)
        x0, x_t = g, a * g + s * eps
        for k in range(cfg.K):
            if k > 0 and cfg.moves_z:
                g, pullback = self._generate(z, y, with_vjp=True)
                if cfg.in_x:
                    eps = (x_t - a * g) / s  # x_t held fixed while z moved
                else:
                    x_t = a * g + s * eps  # eps held fixed while z moved
            try:
                d_t, d_s = self._denoisers(x_t, t, y)
            except FloatingPointError as e:
                raise FloatingPointError(
                    f"{e} at Langevin step {k + 1} of {cfg.K} of the E-step (noise levels t from {float(t.min()):.3g}):"
                    f" the chain diverged; with variant {cfg.variant!r} and z_step {cfg.z_step!r}: use the scaled z "
                    f"step, lower gamma_z / gamma_eps or raise t_min") from None
            with phase("langevin eps update"):
                eps_new, eta, v, x_t = ops.langevin_eps_step(eps, eta, d_t, d_s, alpha, sigma, cfg.gamma_eps,
                                                             ops.randn_like(eps), g)
            if cfg.moves_z:
                # grad_z log pi = alpha J^T delta - z  on (eps, z);  alpha J^T eps / sigma - z  on (x, z)
                jtv = pullback(a * eps / s if cfg.in_x else v)
                with phase("langevin z update"):
                    z = ops.langevin_z_step(z, jtv, gamma_z, ops.randn_like(z))
            eps = eps_new
        return EStep(z=z, eps=eps, eta=eta, x_t=x_t, x0=x0, t=t, alpha=alpha, sigma=sigma)

    def generator_loss(self, es: EStep, y=None) -> torch.Tensor:
        """M-step: w(t) ||sg(x_t) - alpha g_theta(sg(z_K))||^2 / (2 sigma^2), with the noise-cancelled residual."""
        with phase("M-step forward"):
            g = self._net("generator output", self.train_generator, es.z.detach(), y)
            eps = es.eps
            if self.cfg.in_x and self.cfg.moves_z:
                a, s = expand_like(es.alpha, g), expand_like(es.sigma, g)
                eps = (es.x_t - a * g.detach()) / s
            w = self.schedule.weight(self.cfg.gen_weighting, es.t, self.sigma_data)
            return self.ops.generator_loss(g, eps, es.eta, es.alpha, es.sigma, w)

    def student_loss(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, y=None) -> torch.Tensor:
        """Student DSM: w~(t) ||D_psi(alpha x + sigma eps, t) - x||^2 on generator samples x (detached), t: (N,)."""
        with phase("student DSM forward"):
            alpha, sigma = self.schedule.alpha_sigma(t)
            x = x.detach()
            x_t = expand_like(alpha, x) * x + expand_like(sigma, x) * eps
            d = self._net(None, self.train_student, x_t, t, y)  # not checked here: the loss is, with its gradients
            w = self.schedule.weight(self.cfg.student_weighting, t, self.sigma_data)
            return self.ops.dsm_loss(d, x, w)
