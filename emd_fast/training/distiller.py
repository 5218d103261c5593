"""A distillation run's state: the networks, their optimizers and the one random stream; ``step()`` = one iteration."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import trusted_values
from ..emd import EMD, EMDConfig, EStep, frozen
from ..errors import CheckpointError
from ..execution.backends import BACKENDS, NetworkCall, make_ops
from ..execution.distributed import (
    full_optimizer_state,
    full_tensors,
    load_full_model_state,
    load_full_optimizer_state,
)
from ..execution.profiling import phase
from ..nets.lora import shared_copy
from ..schedules import expand_like
from .checkpoint import load_state_dict_strict
from .health import DivergenceGuard

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
    num_classes > 0: a class-conditional teacher; labels are drawn uniformly from ``classes`` (default: all).
    ema_halflife_kimg > 0: an exponential moving average of the generator (``ema``, updated by ``update_ema``)
    whose half-life is that many thousand generator samples, or ``ema_rampup`` times the samples seen so far if
    that is shorter (EDM's schedule: early averages do not hold on to the initial generator).
    Data-parallel runs (``emd_fast.execution.distributed``): ``batch`` is this process's share, ``global_batch`` the
    examples of one iteration over all processes (the EMA counts those), ``data_parallel`` wraps generator and student
    for their training forward so that the losses' gradients are averaged across processes. Sharded runs (``--shard``):
    ``shard`` shards generator, student and EMA in place across the processes instead (FSDP2, see
    ``distributed.fully_sharded``; the EMA is copied before, and sharded like the generator: its update stays local
    to each shard; a LoRA run's frozen base is left out, whole on every process and still shared by the networks);
    ``state_tensors`` then gathers full tensors on process 0 (the same checkpoint as unsharded).
    """

    def __init__(self, teacher, generator: nn.Module, student: nn.Module, cfg: EMDConfig, *, batch: int,
                 lr_g: float, lr_s: float, betas_g=(0.0, 0.99), betas_s=(0.0, 0.99), seed: int = 0,
                 sigma_data: float = 1.0, num_classes: int = 0, classes=None, ema_halflife_kimg: float = 0.0,
                 ema_rampup: float = 0.05, execution: Execution = Execution(), device="cpu",
                 global_batch: int | None = None, data_parallel=None, shard=None):
        if data_parallel and shard:
            raise ValueError("a network is either data-parallel or sharded, not both")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if not (ema_halflife_kimg >= 0 and ema_rampup >= 0):
            raise ValueError(f"the EMA half-life and ramp-up must be >= 0, got {ema_halflife_kimg}, {ema_rampup}")
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
        self.global_batch = global_batch or batch
        self.classes = None if classes is None else torch.as_tensor(classes, dtype=torch.int64, device=self.device)
        if self.classes is not None and (not num_classes or self.classes.numel() == 0 or
                                         int(self.classes.min()) < 0 or int(self.classes.max()) >= num_classes):
            raise ValueError(f"classes must be a non-empty subset of the teacher's labels [0, {num_classes}), "
                             f"got {self.classes.tolist()}")
        self.ema_halflife_kimg, self.ema_rampup = ema_halflife_kimg, ema_rampup
        # the teacher's tensors (a LoRA run's frozen base, see nets.lora) are never copied, trained or saved
        self.teacher_tensors = {id(t) for t in (*teacher.parameters(), *teacher.buffers())} \
            if isinstance(teacher, nn.Module) else set()
        frozen = {p for net in (generator, student) for p in net.parameters() if not p.requires_grad}  # LoRA's base
        self.ema = None
        if ema_halflife_kimg:
            shared = [*(p for p in generator.parameters() if p in frozen),
                      *(b for b in generator.buffers() if id(b) in self.teacher_tensors)]
            self.ema = shared_copy(generator, shared).requires_grad_(False).eval()
        self.sharded = shard is not None
        for net in (generator, student, self.ema) if shard else ():
            if net is not None:
                shard(net, frozen)
        self.rng = torch.Generator(self.device).manual_seed(seed)
        self.deferred = execution.finite_check == "deferred"
        ops = make_ops(execution.backend, self.rng, seed, self.device, execution.kernel_noise)
        wrap = data_parallel or (lambda net: net)
        call = NetworkCall(PRECISIONS[execution.precision], check=not self.deferred)
        self.emd = EMD(teacher, self.generator, self.student, cfg, ops, sigma_data, call=call,
                       train_generator=wrap(self.generator), train_student=wrap(self.student))
        # deferred checks: fused Adam reads found_inf and skips its update on the device while it is 1;
        # capturable (step counts on the device) where CUDA graphs can capture it
        adam = dict(fused=True, capturable=self.device.type == "cuda") if self.deferred else {}
        self.opt_g = torch.optim.Adam(trainable(self.generator), lr=lr_g, betas=tuple(betas_g), **adam)
        self.opt_s = torch.optim.Adam(trainable(self.student), lr=lr_s, betas=tuple(betas_s), **adam)
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
        """Uniform class labels (n,) (from ``classes`` if given) for a class-conditional teacher, else None."""
        if not self.num_classes:
            return None
        if self.classes is None:
            return torch.randint(self.num_classes, (n,), generator=generator, device=self.device)
        return self.classes[torch.randint(len(self.classes), (n,), generator=generator, device=self.device)]

    def _sample_t(self, n: int) -> torch.Tensor:
        return self.teacher.schedule.sample_t(n, self.rng, self.device, self.cfg.t_min, self.cfg.t_max)

    def step(self) -> dict[str, torch.Tensor]:
        """One EMD iteration: E-step, generator M-step update, student DSM update.

        Returns 0-dim device tensors (no host sync): the losses, the gradient norms and the E-step's moves (see
        ``e_step_moves``). With sync finite checks the run's health is checked here (DivergenceError)."""
        n = self.batch
        z, eps, t, y = self._randn(n), self._randn(n), self._sample_t(n), self._labels(n, self.rng)
        with trusted_values() if self.deferred else contextlib.nullcontext():  # y is ours: no host read to check it
            es = self.emd.e_step(z, eps, t, y)
            loss_g = self.emd.generator_loss(es, y)
            grad_g = self._update(self.opt_g, loss_g, "generator")
            loss_s = self.emd.student_loss(es.x0, self._sample_t(n), self._randn(n), y)
            grad_s = self._update(self.opt_s, loss_s, "student")
        if self.deferred:
            self.finite_steps.add_(1 - self.found_inf.long())
        self.step_count += 1
        out = {"loss_g": loss_g.detach(), "loss_s": loss_s.detach(), "grad_g": grad_g, "grad_s": grad_s,
               **e_step_moves(z, eps, es, self.emd.sigma_data)}
        if not self.deferred:  # checked at once, one host sync for all of them (deferred: when the log reads them)
            self.check_health([{"step": self.step_count, **dict(zip(out, torch.stack(list(out.values())).tolist()))}])
        return out

    def check_health(self, records: list[dict]) -> None:
        """The run's health, in both finite-check modes: FloatingPointError if an update met a nan/inf (deferred
        checks: the device flag, one host sync), DivergenceError if the logged values of ``records`` (one dict per
        iteration with its "step") show divergence (``DivergenceGuard``)."""
        self.raise_if_nonfinite()
        for rec in records:
            self.guard.check(rec["step"], rec)

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, name: str) -> torch.Tensor:
        """Backward and optimizer step; returns the gradient norm (0-dim, on the device)."""
        opt.zero_grad(set_to_none=True)
        with phase(f"{name} backward"):
            loss.backward()
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # one multi-tensor norm launch
        if self.sharded:  # the norms of the shards (DTensors): combined across the processes
            norm = norm.full_tensor()
        finite = torch.isfinite(loss.detach() + norm)  # nan/inf anywhere in the loss or a gradient
        if self.deferred:
            torch.maximum(self.found_inf, (~finite).float(), out=self.found_inf)
        elif not bool(finite):  # one host sync for the loss and every gradient
            raise FloatingPointError(f"{name} loss or gradient is nan/inf at step {self.step_count + 1}; "
                                     f"parameters were left unchanged")
        with phase(f"{name} optimizer"):
            opt.step()
        return norm

    def update_ema(self) -> None:
        """Move the EMA generator towards the generator after an iteration (no-op without an EMA)."""
        if self.ema is not None:
            ema_update(self.ema, self.generator, self.step_count * self.global_batch, self.global_batch,
                       self.ema_halflife_kimg, self.ema_rampup)

    def raise_if_nonfinite(self) -> None:
        """Deferred checks: FloatingPointError if an iteration so far met a nan/inf loss or gradient (one host sync;
        call it before trusting the parameters, e.g. before a checkpoint). No-op with sync checks."""
        if self.deferred and bool(self.found_inf):
            good = int(self.finite_steps)
            raise FloatingPointError(f"a loss or gradient became nan/inf at step {good + 1}; that update and every "
                                     f"later one were skipped (the parameters are those of step {good}, up to the "
                                     f"generator update of step {good + 1} if only the student's was non-finite)")

    @property
    def sampler(self) -> nn.Module:
        """The generator that samples, evaluations and exports use: the EMA if there is one."""
        return self.generator if self.ema is None else self.ema

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
        """n one-step samples g(z, y) of ``sampler``, made ``chunk`` at a time, z ~ N(0, I) from ``generator`` and
        y = ``labels`` (n,) or, for a class-conditional teacher, uniform labels from ``generator`` after z:
        (n, *data_shape) fp32 and the labels (n,) (None for an unconditional teacher)."""
        z, y = self.sample_inputs(n, generator, labels)
        return self.generate(z, y, chunk), y

    def sample_inputs(self, n: int, generator: torch.Generator,
                      labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inputs of ``sample``: z (n, *data_shape) ~ N(0, I) from ``generator``, then ``labels`` (n,) or
        uniform labels from ``generator`` (None for an unconditional teacher)."""
        z = torch.randn((n, *self.shape), generator=generator, device=self.device)
        return z, self._labels(n, generator) if labels is None else labels.to(self.device)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, y: torch.Tensor | None, chunk: int = 1000) -> torch.Tensor:
        """``sampler``(z, y) made ``chunk`` rows at a time: z (n, *data_shape), y (n,) or None -> (n, ...) fp32
        (n may be 0: a process's share of a few samples). The sampler is frozen meanwhile, as in the E-step: a compiled
        generator reuses the E-step's no-grad graphs."""
        with frozen(self.sampler):
            return torch.cat([self.sampler(z[i:i + chunk], None if y is None else y[i:i + chunk]).float()
                              for i in range(0, len(z) or 1, chunk)])

    # --- checkpoint state -------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as flat name -> tensor (safetensors-ready).
        Sharded: the full tensors (as an unsharded run's) on process 0, only the random state on the others; every
        process must call it."""
        out = {}
        for name in self._networks():
            out |= {f"{name}.{k}": v for k, v in self._model_state(name).items()}
        for prefix, net, opt in (("opt_g", self.generator, self.opt_g), ("opt_s", self.student, self.opt_s)):
            for idx, st in self._optimizer_state(net, opt).items():
                out |= {f"{prefix}.{idx}.{k}": torch.as_tensor(v) for k, v in st.items()}
        return out | self.random_state()

    def _networks(self) -> dict[str, nn.Module]:
        nets = {"generator": self.generator, "student": self.student}
        return nets | ({"ema": self.ema} if self.ema is not None else {})

    def _own_state(self, name: str) -> dict[str, torch.Tensor]:
        """The state dict of network ``name`` (this process's shards where sharded) without the tensors saved
        elsewhere: every tensor is saved once, under the first of generator, student and EMA that holds it, and the
        teacher's (a LoRA run's frozen base) never."""
        nets = self._networks()
        elsewhere = set(self.teacher_tensors)
        for other in list(nets)[:list(nets).index(name)]:
            elsewhere |= {id(t) for t in (*nets[other].parameters(), *nets[other].buffers())}
        held = (*nets[name].named_parameters(remove_duplicate=False), *nets[name].named_buffers(remove_duplicate=False))
        skip = {k for k, t in held if id(t) in elsewhere}
        return {k: v for k, v in nets[name].state_dict().items() if k not in skip}

    def _model_state(self, name: str) -> dict[str, torch.Tensor]:
        return full_tensors(self._own_state(name)) if self.sharded else self._own_state(name)

    def _optimizer_state(self, net: nn.Module, opt: torch.optim.Optimizer) -> dict[int, dict]:
        return full_optimizer_state(net, opt) if self.sharded else opt.state_dict()["state"]

    def random_state(self) -> dict[str, torch.Tensor]:
        """The state of the run's random streams: the torch.Generator, the backend's own (the kernel noise) and, for
        networks with dropout layers (--lora-dropout), torch's default generator of the device, which they use."""
        return {"rng": self.rng.get_state(), **self.emd.ops.state_tensors(),
                **({"dropout_rng": self._dropout_generator.get_state()} if self._dropout_generator else {})}

    @property
    def _dropout_generator(self) -> torch.Generator | None:
        dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for net in (self.generator, self.student)
                      for m in net.modules())
        if not dropout:
            return None
        return torch.cuda.default_generators[self.device.index or 0] if self.device.type == "cuda" \
            else torch.random.default_generator

    def reseed(self, seed: int) -> None:
        """Restart every random stream (the torch.Generator, the kernel NoiseStream, the dropout's) from ``seed``."""
        self.rng.manual_seed(seed)
        if self._dropout_generator:
            self._dropout_generator.manual_seed(seed ^ 1)  # not the stream of self.rng
        fresh = make_ops(self.execution.backend, torch.Generator(self.device), seed, self.device,
                         self.execution.kernel_noise)
        self.emd.ops.load_state_tensors(fresh.state_tensors())

    def checkpoint_bytes(self) -> int:
        """About the size of one checkpoint file (``checkpoint_bytes``): every tensor saved once (``_own_state``),
        Adam moments of what the optimizers train, the random state."""
        tensors = [t for name in self._networks() for t in self._own_state(name).values()]
        trained = [p for opt in (self.opt_g, self.opt_s) for group in opt.param_groups for p in group["params"]]
        return checkpoint_bytes([*tensors, *self.random_state().values()], trained)

    def load_network_state(self, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load the ``name``-prefixed tensors of ``state_tensors`` into that network ("generator", "student", "ema")
        (CheckpointError naming missing, unexpected or misshapen ones)."""
        net = self._networks()[name]
        load = (functools.partial(load_full_model_state, net) if self.sharded
                else functools.partial(net.load_state_dict, strict=False))  # the teacher's tensors are not saved
        load_state_dict_strict(net, tensors, f"{name}.", source, load=load, own=self._own_state(name))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int, source: str) -> None:
        """Continue from ``state_tensors`` (sharded or not, whatever wrote them); sharded, every process holds all
        of them and keeps its shards."""
        for name in self._networks():
            self.load_network_state(name, tensors, source)
        for prefix, net, opt in (("opt_g", self.generator, self.opt_g), ("opt_s", self.student, self.opt_s)):
            sd = opt.state_dict()
            state: dict[int, dict] = {}
            for key, v in tensors.items():
                if key.startswith(prefix + "."):
                    idx, name = key[len(prefix) + 1:].split(".", 1)
                    state.setdefault(int(idx), {})[name] = v.to(self.device) if name != "step" else v
            if len(state) != len(sd["param_groups"][0]["params"]):
                raise CheckpointError(f"{source}: {prefix} holds state for {len(state)} parameters, "
                                      f"the model has {len(sd['param_groups'][0]['params'])}")
            if self.sharded:
                load_full_optimizer_state(net, opt, state)
            else:
                opt.load_state_dict({**sd, "state": state})
            match_param_layouts(opt)
        if "rng" not in tensors:
            raise CheckpointError(f"{source}: no random-generator state")
        self.rng.set_state(tensors["rng"])
        if self._dropout_generator and "dropout_rng" in tensors:
            self._dropout_generator.set_state(tensors["dropout_rng"])
        self.emd.ops.load_state_tensors(tensors)
        self.step_count = step
        self.found_inf.zero_()
        self.finite_steps.fill_(step)


@torch.no_grad()
def ema_update(ema: nn.Module, source: nn.Module, samples_seen: int, batch: int, halflife_kimg: float,
               rampup: float) -> None:
    """One step of EDM's exponential moving average: ema <- beta ema + (1 - beta) source with
    beta = 0.5^(batch / half-life), the half-life halflife_kimg thousand samples or, if shorter and rampup > 0,
    rampup x samples_seen. Buffers are copied."""
    halflife = halflife_kimg * 1000
    if rampup:
        halflife = min(halflife, samples_seen * rampup)
    beta = 0.5 ** (batch / max(halflife, 1e-8))
    pairs = [(e, p) for e, p in zip(ema.parameters(), source.parameters()) if e is not p]  # not a shared base
    if pairs:
        torch._foreach_lerp_(*map(list, zip(*pairs)), 1 - beta)
    for b_ema, b in zip(ema.buffers(), source.buffers()):
        if b_ema is not b:
            b_ema.copy_(b)


def trainable(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``net`` an optimizer updates: those that require grad (all of them, or a LoRA network's
    adapters)."""
    return [p for p in net.parameters() if p.requires_grad]


def match_param_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of ``opt`` its parameter's memory layout (a checkpoint stores them
    contiguous; a channels_last run's parameters are not). The fused Adam kernel pairs the state with the parameter
    element by element in memory: with different layouts it would update the wrong elements."""
    for p, st in opt.state.items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def e_step_moves(z0: torch.Tensor, eps0: torch.Tensor, es: EStep, sigma_data: float) -> dict[str, torch.Tensor]:
    """How far the E-step moved its chains, from z0, eps0 (N, ...) to es.z, es.eps: batch means of the per-example
    RMS moves of z and eps ("z_move", "eps_move") and of x_t in data scales, |x_t,K - x_t,0| / (alpha sigma_data +
    sigma) ("x_move"); the largest x move ("x_move_max") and its noise level ("t_move_max"). 0-dim device tensors
    (no host sync)."""
    def rms(v):
        return v.flatten(1).float().pow(2).mean(1).sqrt()

    a, s = (expand_like(v, es.x_t) for v in (es.alpha, es.sigma))
    dx = rms(es.x_t - (a * es.x0 + s * eps0)) / (es.alpha * sigma_data + es.sigma)
    x_max, i = dx.max(0)  # index_select, not t[i]: indexing by a tensor reads it on the host (capture forbids it)
    return {"z_move": rms(es.z - z0).mean(), "eps_move": rms(es.eps - eps0).mean(), "x_move": dx.mean(),
            "x_move_max": x_max, "t_move_max": es.t.index_select(0, i.view(1)).squeeze(0).float()}


def checkpoint_bytes(tensors, trained) -> int:
    """About the size of one checkpoint file, from the shapes alone (nothing is gathered or copied): the ``tensors``
    it saves, two Adam moments and a step count per ``trained`` parameter, and ~100 bytes of safetensors header per
    tensor (~300 per Adam state)."""
    size = sum(t.numel() * t.element_size() + 100 for t in tensors)
    return size + sum(2 * p.numel() * p.element_size() + 4 + 300 for p in trained)
