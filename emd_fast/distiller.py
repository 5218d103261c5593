"""A distillation run's state: the networks, their optimizers and the one random stream; ``step()`` = one iteration."""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import CheckpointError, load_state_dict_strict
from .emd import EMD, EMDConfig, ReferenceOps
from .profiling import phase


class Distiller:
    """One EMD training run.

    teacher: .denoise / .schedule / .data_shape; generator: z (N, *data_shape) -> x; student: D_psi(x_t, t, y).
    All randomness (z, eps, t and the Langevin noise) comes from one torch.Generator seeded with ``seed``; with the
    triton backend the Langevin noise is drawn inside the kernels from a NoiseStream seeded with ``seed`` instead
    (``kernel_noise=False``: from the torch.Generator, as on the reference path).
    """

    def __init__(self, teacher, generator: nn.Module, student: nn.Module, cfg: EMDConfig, *, batch: int,
                 lr_g: float, lr_s: float, betas_g=(0.0, 0.99), betas_s=(0.0, 0.99), seed: int = 0,
                 sigma_data: float = 1.0, num_classes: int = 0, backend: str = "reference", kernel_noise: bool = True,
                 device="cpu"):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        for name, lr in (("lr_g", lr_g), ("lr_s", lr_s)):
            if not lr > 0:
                raise ValueError(f"{name} must be > 0, got {lr}")
        for name, betas in (("betas_g", betas_g), ("betas_s", betas_s)):
            if not all(0 <= b < 1 for b in betas):
                raise ValueError(f"{name} must lie in [0, 1), got {tuple(betas)}")
        self.device = torch.device(device)
        self.teacher, self.generator, self.student = teacher, generator.to(self.device), student.to(self.device)
        self.batch, self.shape, self.num_classes, self.step_count = batch, tuple(teacher.data_shape), num_classes, 0
        self.rng = torch.Generator(self.device).manual_seed(seed)
        self.emd = EMD(teacher, self.generator, self.student, cfg, make_ops(backend, self.rng, seed, self.device,
                                                                              kernel_noise), sigma_data)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_g, betas=tuple(betas_g))
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=lr_s, betas=tuple(betas_s))

    @property
    def cfg(self) -> EMDConfig:
        return self.emd.cfg

    def _randn(self, n: int) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=self.rng, device=self.device)

    def _labels(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Uniform class labels (n,) for a class-conditional teacher, else None."""
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), generator=generator, device=self.device)

    def _sample_t(self, n: int) -> torch.Tensor:
        return self.teacher.schedule.sample_t(n, self.rng, self.device, self.cfg.t_min, self.cfg.t_max)

    def step(self) -> dict[str, torch.Tensor]:
        """One EMD iteration: E-step, generator M-step update, student DSM update. Returns detached losses."""
        n = self.batch
        z, eps, t, y = self._randn(n), self._randn(n), self._sample_t(n), self._labels(n, self.rng)
        es = self.emd.e_step(z, eps, t, y)
        loss_g = self.emd.generator_loss(es, y)
        self._update(self.opt_g, loss_g, "generator")
        loss_s = self.emd.student_loss(es.x0, self._sample_t(n), self._randn(n), y)
        self._update(self.opt_s, loss_s, "student")
        self.step_count += 1
        return {"loss_g": loss_g.detach(), "loss_s": loss_s.detach()}

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor, name: str) -> None:
        opt.zero_grad(set_to_none=True)
        with phase(f"{name} backward"):
            loss.backward()
        if self.cfg.check_finite:
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            finite = torch.stack([torch.isfinite(loss).all(), *(torch.isfinite(g).all() for g in grads)])
            if not bool(finite.all()):  # one host sync for the loss and every gradient
                raise FloatingPointError(f"{name} loss or gradient is nan/inf at step {self.step_count + 1}; "
                                         f"parameters were left unchanged")
        with phase(f"{name} optimizer"):
            opt.step()

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


BACKENDS = ("reference", "triton")


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
