"""Gaussian-mixture problems: an exact teacher (``emd_fast.teachers.mixture``: a preset, a user's file, a random
mixture), the MLP networks that start from it, exact metrics and plots."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checks import check_host_memory
from ..evaluation.mixture_metrics import mixture_metrics, reference_metrics
from ..evaluation.mixture_plots import plot_run
from ..files import sha256_file
from ..nets.mlp import MLPDenoiser
from ..schedules import make_schedule
from ..seeds import Stream, seed_for
from ..teachers.mixture import PRESETS, GaussianMixtureTeacher, data_std, load_mixture


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


class MixtureProblem:
    """A Gaussian-mixture problem: the exact teacher, MLP networks, exact metrics and scatter plots.

    teacher: any GaussianMixtureTeacher; cfg: the run's options (hidden, depth, teacher_fit_steps, eval_samples,
    seed). A ``Problem`` (``emd_fast.problems``).
    """

    num_classes = 0
    options = frozenset()

    def __init__(self, teacher: GaussianMixtureTeacher, cfg: dict):
        self.cfg, self.teacher = cfg, teacher
        self.sigma_data = data_std(self.teacher)
        exact_rng = torch.Generator().manual_seed(seed_for(cfg["seed"], Stream.EXACT_SAMPLES))
        n = cfg["eval_samples"]  # held with as many generated samples, and the metrics' work on both
        check_host_memory(4 * 4 * n * teacher.dim, f"--eval-samples {n} of {teacher.dim}-D",
                          "lower --eval-samples")
        self.exact, _ = self.teacher.sample(n, exact_rng)

    @classmethod
    def from_config(cls, cfg: dict) -> "MixtureProblem":
        """The mixture of --mixture FILE, else of the embedded preset, in --schedule (default vp_cosine)."""
        schedule = make_schedule(cfg["schedule"] or "vp_cosine")
        teacher = load_mixture(cfg["mixture"], schedule) if cfg.get("mixture") else PRESETS[cfg["preset"]](schedule)
        return cls(teacher, cfg)

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        pass  # the mixture file is read (and checked) when the problem is built, before the teacher fit

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        return {"mixture_sha256": sha256_file(Path(cfg["mixture"]))} if cfg.get("mixture") else {}

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """An MLP copy of the exact teacher denoiser (regressed onto it unless ``fit`` is False: resuming)."""
        cfg = self.cfg
        net = MLPDenoiser(self.teacher.dim, self.teacher.schedule, cfg["hidden"], cfg["depth"],
                          sigma_data=self.sigma_data).to(device)
        return net, self.fit_teacher_network(net) if fit else {}

    def fit_teacher_network(self, net: MLPDenoiser) -> dict:
        """Regress ``net`` onto the exact teacher denoiser (--teacher-fit-steps); returns what config.json records."""
        device = next(net.parameters()).device
        rng = torch.Generator(device).manual_seed(seed_for(self.cfg["seed"], Stream.TEACHER_FIT))
        return {"teacher_fit_loss": fit_denoiser(net, self.teacher, self.cfg["teacher_fit_steps"], 512, rng)}

    def metrics(self, samples: torch.Tensor, y=None) -> dict:
        return mixture_metrics(samples, self.teacher, self.exact)

    def floor(self) -> dict:
        """The metrics of exact teacher samples: what a perfect generator scores."""
        return reference_metrics(self.teacher, self.cfg["eval_samples"],
                                 torch.Generator().manual_seed(seed_for(self.cfg["seed"], Stream.FLOOR)))

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
            f"mode spread     {f['mode_spread']:.3f}    (exact samples: {floor['mode_spread']:.3f}; "
            f"< 1: under-dispersed)",
            f"energy distance {f['energy_distance']:.4f}   (exact samples: {floor['energy_distance']:.4f})",
            f"mean log-lik    {f['mean_loglik']:.3f}   (exact samples: {floor['mean_loglik']:.3f})",
        ]
