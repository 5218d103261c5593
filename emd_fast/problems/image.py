"""Image problems, and the problem of a teacher network file (``--teacher``: an NVlabs/EDM network pickle or an
emd_fast U-Net file).

Generator and student start from the teacher's network, as in the paper. The metrics need no feature network: pixel
statistics of the one-step samples (mean, std, the fraction outside [-1, 1]) beside those of the teacher's own
18-step Heun samples (the floor); FID, when asked for (``--fid-ref`` with ``--inception``), is computed by the run.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..evaluation.images import class_rows, figure, save_figure, show
from ..evaluation.reference import reference_samples
from ..files import sha256_file
from ..schedules import make_schedule
from ..seeds import Stream, seed_for
from ..teachers import NetworkTeacher
from ..teachers.network_file import load_teacher_network

HEUN_STEPS = 18  # the teacher's reference sampler: 18 Heun steps = 35 network evaluations
REFERENCE_SAMPLES = 256  # at most this many teacher samples for the floor and the plots
GRID_CLASSES = 10  # plots show a row per class for at most this many classes, else a plain grid


def check_labels(cfg: dict, num_classes: int) -> None:
    """--labels (cfg["labels"]) fit a teacher with ``num_classes`` classes (0: unconditional); ValueError if not."""
    labels = cfg.get("labels")
    if labels is not None and not num_classes:
        raise ValueError(f"--labels: the teacher {cfg['teacher']} is unconditional (label_dim 0)")
    if labels is not None and not all(0 <= c < num_classes for c in labels):
        raise ValueError(f"--labels must lie in [0, {num_classes}) for this teacher, got {labels}")


class ImageProblem:
    """Image teachers: a NetworkTeacher on (C, H, W) data; pixel-statistics metrics against the teacher's own Heun
    samples, sample grids. ``from_config`` reads a teacher file (--teacher FILE): a ``Problem`` (``emd_fast.problems``).

    The network computes the same function in any Schedule (its preconditioning is written in s = sigma/alpha), so
    ``--schedule`` may replace the file's own (by default EDM's sigma range within what the network supports).
    """

    reads = ("teacher network files (--teacher FILE: an NVlabs/EDM network pickle, an emd_fast U-Net "
             ".safetensors)")
    options = frozenset()

    def __init__(self, teacher: NetworkTeacher, cfg: dict, sigma_data: float, num_classes: int):
        self.teacher, self.cfg, self.sigma_data, self.num_classes = teacher, cfg, sigma_data, num_classes
        check_labels(cfg, self.num_classes)

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_file()

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        from ..teachers.diffusers_folder import check_not_a_folders_file

        check_not_a_folders_file(cfg["teacher"])

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        return {"teacher_sha256": sha256_file(Path(cfg["teacher"]))}

    @classmethod
    def from_config(cls, cfg: dict) -> "ImageProblem":
        net = load_teacher_network(cfg["teacher"])
        if cfg.get("schedule"):
            net.schedule = make_schedule(cfg["schedule"])
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        return cls(NetworkTeacher(net, net.schedule, shape, source=Path(cfg["teacher"])), cfg, net.sigma_data,
                   net.label_dim)

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """Moves the teacher to ``device`` and returns its network (init_networks copies it; ``fit`` is moot)."""
        self.teacher.to(device)
        return self.teacher.net, {}

    @functools.cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's Heun samples (n, C, H, W) on the CPU and their labels (n,) or None, n <= REFERENCE_SAMPLES:
        labels cycle through the run's classes. Drawn with a progress bar, cached (``evaluation.reference``)."""
        n = min(self.cfg["eval_samples"], REFERENCE_SAMPLES)
        y = None
        if self.num_classes:
            classes = torch.as_tensor(self.cfg.get("labels") or range(self.num_classes))
            y = classes[torch.arange(n) % len(classes)]
        seed = seed_for(self.cfg["seed"], Stream.REFERENCE)
        return reference_samples(self.teacher, n, seed, y, HEUN_STEPS, 64, self.cfg.get("quiet", False)), y

    @property
    def reference_images(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference samples as images (pixel teachers: as they are)."""
        return self.reference

    @staticmethod
    def metrics(samples: torch.Tensor, y=None) -> dict:
        """Pixel statistics of samples (N, C, H, W): mean, std, and the fraction of pixels outside [-1, 1]."""
        x = samples.detach().double().cpu()
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError("generator samples contain nan/inf")
        return {"pixel_mean": float(x.mean()), "pixel_std": float(x.std()),
                "saturated": float((x.abs() > 1).double().mean())}

    def floor(self) -> dict:
        """The same statistics of the teacher's Heun samples: what the one-step generator should match."""
        return self.metrics(self.reference[0])

    def _grid(self, ax, images, y, title):
        per = 8
        if y is not None and self.num_classes <= GRID_CLASSES:
            show(ax, class_rows(images, y, per, self.num_classes), per, title)
        else:
            show(ax, images[:per * per], per, title)

    def plot(self, path, samples, y, metrics, history, title) -> None:
        """One-step samples beside the teacher's Heun samples (a row per class for few classes), as a PNG."""
        fig = figure((12, 6.4))
        axes = fig.subplots(1, 2)
        self._grid(axes[0], samples.cpu(), None if y is None else y.cpu(),
                   f"one-step generator (pixel std {metrics['pixel_std']:.3f})")
        self._grid(axes[1], *self.reference_images, f"teacher, Heun {HEUN_STEPS} steps")
        save_figure(fig, path, title)

    @staticmethod
    def progress(m: dict) -> dict:
        return {"std": f"{m['pixel_std']:.3f}", **({"fid": f"{m['fid']:.2f}"} if "fid" in m else {})}

    @staticmethod
    def summary_lines(f: dict, floor: dict) -> list[str]:
        rows = [(f"{name:<16}{f[key]:.4f}   (teacher, Heun {HEUN_STEPS} steps: {floor[key]:.4f})")
                for name, key in (("pixel mean", "pixel_mean"), ("pixel std", "pixel_std"),
                                  ("saturated", "saturated"))]
        return rows + ([f"FID             {f['fid']:.3f}   ({f['fid_samples']} samples)"] if "fid" in f else [])
