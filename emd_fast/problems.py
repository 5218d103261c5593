"""Gaussian-mixture problems: an exact teacher (``emd_fast.mixtures``: a preset, a user's file, a random mixture),
the MLP networks that start from it, exact metrics and plots."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .metrics import mixture_metrics, reference_metrics
from .mixtures import data_std
from .networks import Generator, MLPDenoiser
from .plots import plot_run
from .teachers import GaussianMixtureTeacher

def fit_denoiser(net: MLPDenoiser, teacher: GaussianMixtureTeacher, steps: int, batch: int,
                 generator: torch.Generator, lr: float = 2e-3) -> float:
    """Regress ``net`` onto the exact teacher denoiser on exact noisy samples: a network copy of the teacher.

    The EMD paper initialises the generator and the student from the teacher's network; an analytic teacher has
    none, so this makes one. Returns the final weighted MSE (in units of the EDM loss: ~0 means exact).
    """
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        t = teacher.schedule.sample_t(batch, generator, device)
        x_t = teacher.sample_t(t, generator)
        w = teacher.schedule.weight("edm", t, net.sigma_data)
        loss = (w[:, None] * (net(x_t, t) - teacher.denoise(x_t, t)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def init_networks(teacher_net: nn.Module, t_star: float) -> tuple[Generator, nn.Module]:
    """Generator = teacher denoiser at t* (lambda*), student = copy of the teacher denoiser (both trainable)."""
    student = copy.deepcopy(teacher_net).requires_grad_(True).train()
    return Generator.from_teacher(teacher_net, t_star), student


class MixtureProblem:
    """A Gaussian-mixture problem: the exact teacher, MLP networks, exact metrics and scatter plots.

    teacher: any GaussianMixtureTeacher; cfg: the run's options (hidden, depth, teacher_fit_steps, eval_samples,
    seed). The interface the training CLI uses for every problem: ``teacher``, ``sigma_data``, ``num_classes``,
    ``teacher_network``, ``metrics``, ``floor``, ``plot``, ``progress``, ``summary_lines``.
    """

    num_classes = 0

    def __init__(self, teacher: GaussianMixtureTeacher, cfg: dict):
        self.cfg, self.teacher = cfg, teacher
        self.sigma_data = data_std(self.teacher)
        self.exact, _ = self.teacher.sample(cfg["eval_samples"], torch.Generator().manual_seed(cfg["seed"] + 2))

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """An MLP copy of the exact teacher denoiser (regressed onto it unless ``fit`` is False: resuming)."""
        cfg = self.cfg
        net = MLPDenoiser(self.teacher.dim, self.teacher.schedule, cfg["hidden"], cfg["depth"],
                          sigma_data=self.sigma_data).to(device)
        if not fit:
            return net, {}
        rng = torch.Generator(device).manual_seed(cfg["seed"] + 1)
        return net, {"teacher_fit_loss": fit_denoiser(net, self.teacher, cfg["teacher_fit_steps"], 512, rng)}

    def metrics(self, samples: torch.Tensor, y=None) -> dict:
        return mixture_metrics(samples, self.teacher, self.exact)

    def floor(self) -> dict:
        """The metrics of exact teacher samples: what a perfect generator scores."""
        return reference_metrics(self.teacher, self.cfg["eval_samples"],
                                 torch.Generator().manual_seed(self.cfg["seed"] + 4))

    def plot(self, path, samples, y, metrics, history, title) -> None:
        plot_run(path, samples, self.exact, self.teacher, metrics, history, title)

    @staticmethod
    def progress(m: dict) -> dict:
        return {"modes": f"{m['modes_covered']}/{m['num_modes']}", "tv": f"{m['mode_tv']:.3f}"}

    @staticmethod
    def summary_lines(f: dict, floor: dict) -> list[str]:
        return [
            f"modes covered   {f['modes_covered']}/{f['num_modes']}   (exact samples: {floor['modes_covered']})",
            f"mode-weight TV  {f['mode_tv']:.4f}   (exact samples: {floor['mode_tv']:.4f})",
            f"off-mode        {f['off_mode']:.4f}   (exact samples: {floor['off_mode']:.4f})",
            f"mode spread     {f['mode_spread']:.3f}    (exact samples: {floor['mode_spread']:.3f}; < 1: under-dispersed)",
            f"energy distance {f['energy_distance']:.4f}   (exact samples: {floor['energy_distance']:.4f})",
            f"mean log-lik    {f['mean_loglik']:.3f}   (exact samples: {floor['mean_loglik']:.3f})",
        ]
