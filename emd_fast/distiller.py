"""A distillation run's state: the networks, their optimizers and the one random stream; ``step()`` = one iteration."""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import CheckpointError, load_state_dict_strict
from .emd import EMD, EMDConfig, EStep, ReferenceOps
from .profiling import phase

BACKENDS = ("reference", "triton")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
FINITE_CHECKS = ("sync", "deferred")


@dataclass(frozen=True)
class Execution:
    """How an iteration runs. None of these change what it computes beyond float rounding (bf16: see README).

    backend: elementwise work in plain PyTorch ("reference") or the fused Triton kernels ("triton");
    kernel_noise: triton only: the Langevin noise is drawn inside the kernels from a seeded NoiseStream (False: from
        the run's torch.Generator, element for element as on the reference path);
    precision: "fp32", or "bf16": every network call under torch.autocast(bfloat16); the weights (fp32 masters), the
        optimizer state, the Langevin chain and the losses stay fp32;
    channels_last: image networks and the data tensors in NHWC memory order (a GPU convolution speed-up);
    finite_check: "sync" checks every network output and gradient for nan/inf and raises at once (host syncs);
        "deferred" keeps a device-side flag: an update with a non-finite loss or gradient, and every one after it, is
        skipped by the fused Adam step itself, and ``raise_if_nonfinite()`` reports it at the next host sync.
        "deferred" has no host sync in ``step()``, which is what CUDA-graph capture needs.
    """

    backend: str = "reference"
    kernel_noise: bool = True
    precision: str = "fp32"
    channels_last: bool = False
    finite_check: str = "sync"

    def validate(self) -> "Execution":
        for name, allowed in (("backend", BACKENDS), ("precision", tuple(PRECISIONS)),
                              ("finite_check", FINITE_CHECKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        return self


class Distiller:
    """One EMD training run.

    teacher: .denoise / .schedule / .data_shape; generator: z (N, *data_shape) -> x; student: D_psi(x_t, t, y).
    All randomness (z, eps, t and the Langevin noise) comes from one torch.Generator seeded with ``seed``; with the
    triton backend and kernel noise the Langevin noise comes from a NoiseStream seeded with ``seed`` instead.
    ``execution`` says how the iteration runs (backend, precision, memory format, finite checks): see Execution.
    """

    def __init__(self, teacher, generator: nn.Module, student: nn.Module, cfg: EMDConfig, *, batch: int,
                 lr_g: float, lr_s: float, betas_g=(0.0, 0.99), betas_s=(0.0, 0.99), seed: int = 0,
                 sigma_data: float = 1.0, num_classes: int = 0, execution: Execution = Execution(), device="cpu"):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        for name, lr in (("lr_g", lr_g), ("lr_s", lr_s)):
            if not lr > 0:
                raise ValueError(f"{name} must be > 0, got {lr}")
        for name, betas in (("betas_g", betas_g), ("betas_s", betas_s)):
            if not all(0 <= b < 1 for b in betas):
                raise ValueError(f"{name} must lie in [0, 1), got {tuple(betas)}")
        self.device, self.execution = torch.device(device), execution.validate()
        self.shape = tuple(teacher.data_shape)
        self.memory_format = (torch.channels_last if execution.channels_last and len(self.shape) == 3
                              else torch.contiguous_format)
        nets = [generator, student] + ([teacher] if isinstance(teacher, nn.Module) else [])
        for net in nets:
            net.to(self.device, memory_format=self.memory_format)
        self.teacher, self.generator, self.student = teacher, generator, student
        self.batch, self.num_classes, self.step_count = batch, num_classes, 0
        self.rng = torch.Generator(self.device).manual_seed(seed)
        self.deferred = execution.finite_check == "deferred"
        ops = make_ops(execution.backend, self.rng, seed, self.device, execution.kernel_noise)
        self.emd = EMD(teacher, self.generator, self.student, cfg, ops, sigma_data, check_outputs=not self.deferred,
                       autocast=PRECISIONS[execution.precision])
        # deferred checks: fused Adam reads found_inf and skips its update on the device while it is 1;
        # capturable (step counts on the device) where CUDA graphs can capture it
        adam = dict(fused=True, capturable=self.device.type == "cuda") if self.deferred else {}
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_g, betas=tuple(betas_g), **adam)
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=lr_s, betas=tuple(betas_s), **adam)
        self.found_inf = torch.zeros((), device=self.device)  # 1.0 once a non-finite loss/gradient was met (deferred)
        self.finite_steps = torch.zeros((), dtype=torch.int64, device=self.device)  # iterations before that
        if self.deferred:
            self.opt_g.found_inf = self.opt_s.found_inf = self.found_inf
        self.guard = DivergenceGuard()

    @property
    def cfg(self) -> EMDConfig:
        return self.emd.cfg

    def _randn(self, n: int) -> torch.Tensor:
        """(n, *data_shape) standard normals in the run's memory format (drawn in NCHW order on every path)."""
        x = torch.randn((n, *self.shape), generator=self.rng, device=self.device)
        return x.contiguous(memory_format=self.memory_format)

    def _labels(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Uniform class labels (n,) for a class-conditional teacher, else None."""
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), generator=generator, device=self.device)

    def _sample_t(self, n: int) -> torch.Tensor:
        return self.teacher.schedule.sample_t(n, self.rng, self.device, self.cfg.t_min, self.cfg.t_max)

    def step(self) -> dict[str, torch.Tensor]:
        """One EMD iteration: E-step, generator M-step update, student DSM update.

        Returns 0-dim device tensors (no host sync): the losses, the gradient norms and the E-step's moves (see
        ``e_step_moves``). With sync finite checks the run's health is checked here (DivergenceError)."""
        n = self.batch
        z, eps, t, y = self._randn(n), self._randn(n), self._sample_t(n), self._labels(n, self.rng)
        es = self.emd.e_step(z, eps, t, y)
        loss_g = self.emd.generator_loss(es, y)
        grad_g = self._update(self.opt_g, loss_g, "generator")
        loss_s = self.emd.student_loss(es.x0, self._sample_t(n), self._randn(n), y)
        grad_s = self._update(self.opt_s, loss_s, "student")
        if self.deferred:
            self.finite_steps.add_(1 - self.found_inf.long())
        self.step_count += 1
        out = {"loss_g": loss_g.detach(), "loss_s": loss_s.detach(), "grad_g": grad_g, "grad_s": grad_s,
               **e_step_moves(z, eps, es)}
        if not self.deferred:  # one host sync for all of them
            self.guard.check(self.step_count, dict(zip(out, torch.stack(list(out.values())).tolist())))
        return out

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, name: str) -> torch.Tensor:
        """Backward and optimizer step; returns the gradient norm (0-dim, on the device)."""
        opt.zero_grad(set_to_none=True)
        with phase(f"{name} backward"):
            loss.backward()
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one multi-tensor norm launch
        finite = torch.isfinite(loss.detach() + norm)  # nan/inf anywhere in the loss or a gradient
        if self.deferred:
            torch.maximum(self.found_inf, (~finite).float(), out=self.found_inf)
        elif not bool(finite):  # one host sync for the loss and every gradient
            raise FloatingPointError(f"{name} loss or gradient is nan/inf at step {self.step_count + 1}; "
                                     f"parameters were left unchanged")
        with phase(f"{name} optimizer"):
            opt.step()
        return norm

    def raise_if_nonfinite(self) -> None:
        """Deferred checks: FloatingPointError if an iteration so far met a nan/inf loss or gradient (one host sync;
        call it before trusting the parameters, e.g. before a checkpoint). No-op with sync checks."""
        if self.deferred and bool(self.found_inf):
            good = int(self.finite_steps)
            raise FloatingPointError(f"a loss or gradient became nan/inf at step {good + 1}; that update and every "
                                     f"later one were skipped (the parameters are those of step {good}, up to the "
                                     f"generator update of step {good + 1} if only the student's was non-finite)")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n one-step samples g(z, y), z ~ N(0, I) and uniform labels y from ``generator``: (n, *data_shape) fp32,
        and the labels (n,) (None for an unconditional teacher)."""
        z = torch.randn((n, *self.shape), generator=generator, device=self.device)
        y = self._labels(n, generator)
        return self.generator(z, y), y

    # --- checkpoint state -------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as flat name -> tensor (safetensors-ready)."""
        out = {f"generator.{k}": v for k, v in self.generator.state_dict().items()}
        out |= {f"student.{k}": v for k, v in self.student.state_dict().items()}
        for prefix, opt in (("opt_g", self.opt_g), ("opt_s", self.opt_s)):
            for idx, st in opt.state_dict()["state"].items():
                out |= {f"{prefix}.{idx}.{k}": torch.as_tensor(v) for k, v in st.items()}
        out["rng"] = self.rng.get_state()
        return out | self.emd.ops.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int, source: str) -> None:
        load_state_dict_strict(self.generator, tensors, "generator.", source)
        load_state_dict_strict(self.student, tensors, "student.", source)
        for prefix, opt in (("opt_g", self.opt_g), ("opt_s", self.opt_s)):
            sd = opt.state_dict()
            state: dict[int, dict] = {}
            for key, v in tensors.items():
                if key.startswith(prefix + "."):
                    idx, name = key[len(prefix) + 1:].split(".", 1)
                    state.setdefault(int(idx), {})[name] = v.to(self.device) if name != "step" else v
            if len(state) != len(sd["param_groups"][0]["params"]):
                raise CheckpointError(f"{source}: {prefix} holds state for {len(state)} parameters, "
                                      f"the model has {len(sd['param_groups'][0]['params'])}")
            opt.load_state_dict({**sd, "state": state})
        if "rng" not in tensors:
            raise CheckpointError(f"{source}: no random-generator state")
        self.rng.set_state(tensors["rng"])
        self.emd.ops.load_state_tensors(tensors)
        self.step_count = step
        self.found_inf.zero_()
        self.finite_steps.fill_(step)


def e_step_moves(z0: torch.Tensor, eps0: torch.Tensor, es: EStep) -> dict[str, torch.Tensor]:
    """How far the E-step moved its chains, from z0, eps0 (N, ...) to es.z, es.eps: the batch means of the
    per-example RMS moves ("z_move", "eps_move"), the largest of either ("move_max") and its noise level
    ("t_move_max"). 0-dim device tensors (no host sync)."""
    dz, de = ((b - a).flatten(1).float().pow(2).mean(1).sqrt() for a, b in ((z0, es.z), (eps0, es.eps)))
    worst = torch.maximum(dz, de)
    i = worst.argmax()
    return {"z_move": dz.mean(), "eps_move": de.mean(), "move_max": worst[i], "t_move_max": es.t[i].float()}


class DivergenceError(FloatingPointError):
    """A run is diverging: a monitored quantity exploded (raised before it turns into nan)."""


class DivergenceGuard:
    """Stops a diverging run early, naming the quantity, the step, the noise level and the knob to turn.

    Both Langevin variables have N(0, I) priors and a healthy chain moves them O(1) per E-step, so a batch-mean
    move above MAX_MOVE per element means the chains have left every plausible region; a gradient norm above
    GRAD_JUMP times its running median (last WINDOW checked steps, after MIN_HISTORY of them) is a blow-up in
    progress. The history is not checkpointed: after a resume it starts again.
    """

    MAX_MOVE, GRAD_JUMP, WINDOW, MIN_HISTORY = 10.0, 1e3, 200, 20
    KNOBS = {"z": "use the noise-scaled z step (--z-step scaled), lower gamma_z (--gamma-z) or raise --t-min",
             "eps": "lower gamma_eps (--gamma-eps) or raise --t-min"}

    def __init__(self):
        self.history = {key: deque(maxlen=self.WINDOW) for key in ("grad_g", "grad_s")}

    def check(self, step: int, rec: dict[str, float]) -> None:
        """rec: one step's values from ``Distiller.step`` as floats. DivergenceError if one exploded."""
        for var in ("z", "eps"):
            move = rec[f"{var}_move"]
            if not move <= self.MAX_MOVE:
                raise DivergenceError(
                    f"E-step diverging at step {step}: {var} moved {move:.3g} per element on average over the K "
                    f"Langevin steps (the largest move, {rec['move_max']:.3g}, at noise level t = "
                    f"{rec['t_move_max']:.3g}); {self.KNOBS[var]}")
        for key, who in (("grad_g", "generator"), ("grad_s", "student")):
            hist, norm = self.history[key], rec[key]
            if len(hist) >= self.MIN_HISTORY:
                median = statistics.median(hist)
                if norm > self.GRAD_JUMP * median:
                    raise DivergenceError(
                        f"{who} gradient norm jumped to {norm:.3g} at step {step}, {norm / median:.3g}x its running "
                        f"median {median:.3g} (E-step: largest move {rec['move_max']:.3g} at t = "
                        f"{rec['t_move_max']:.3g}); lower the learning rate, {self.KNOBS['z']}")
            hist.append(norm)


def make_ops(backend: str, rng: torch.Generator, seed: int, device: torch.device, kernel_noise: bool = True):
    """The elementwise backend of the EMD iteration: plain PyTorch or the fused Triton kernels."""
    if backend == "reference":
        return ReferenceOps(rng)
    if backend == "triton":
        from .fast import TritonOps
        from .kernels import triton_available

        if not triton_available():
            raise ValueError("backend 'triton' needs triton and a CUDA GPU (or TRITON_INTERPRET=1 on CPU)")
        return TritonOps(rng, seed, device, kernel_noise)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
