"""The embedded image problem: sklearn's 8x8 handwritten digits (1797 images, 10 classes, shipped with scikit-learn).

The teacher is a class-conditional U-Net trained by ``python -m emd_fast.pretrain`` and shipped in
``emd_fast/assets/`` with the digits classifier whose features the metrics use. Pixels 0..16 are scaled to [-1, 1]
(x = pixel / 8 - 1); images are (N, 1, 8, 8) float32.

Metrics of one-step samples x with conditioning labels y (``DigitsProblem.metrics``), on images clamped to [-1, 1]:
    class_accuracy    fraction of samples the classifier assigns to their label y
    classes_covered   classes that receive >= 20% of a uniform share of the classifier's predictions; class_tv: the
                      total variation of that class histogram to uniform
    fd_real           Frechet distance of classifier features to all 1797 real digits ("FID on digits")
    fd_teacher        Frechet distance to the teacher's many-step (Heun) samples with balanced labels
    precision/recall  k-NN precision and recall (k = 3) of the features against the real digits
The floor is the same metrics for an independent set of the teacher's Heun samples: what the one-step generator
should approach.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..evaluation.image_metrics import (
    DigitsClassifier,
    InceptionFeatures,
    class_coverage,
    frechet_distance,
    precision_recall,
)
from ..evaluation.images import class_rows, figure, save_figure, show
from ..evaluation.reference import reference_samples
from ..files import read_safetensors, save_safetensors_atomic
from ..schedules import Schedule, make_schedule
from ..seeds import Stream, seed_for
from ..teachers import NetworkTeacher
from ..teachers.network_file import load_network

ASSETS = Path(__file__).parents[1] / "assets"
TEACHER_FILE = ASSETS / "digits_teacher.safetensors"
CLASSIFIER_FILE = ASSETS / "digits_classifier.safetensors"
INFO_FILE = ASSETS / "digits_info.json"
IMAGE_SHAPE, NUM_CLASSES = (1, 8, 8), 10
HEUN_STEPS = 18  # the teacher's many-step sampler: 18 Heun steps = 35 network evaluations
CLASSIFIER_FORMAT = "emd_fast.digits_classifier"


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits: images (1797, 1, 8, 8) float32 in [-1, 1] and labels (1797,) int64."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: nothing is downloaded

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1
    return x, torch.as_tensor(data.target, dtype=torch.int64)


def _missing(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} not found: run `python -m emd_fast.pretrain` to train the digits networks")


def load_teacher_unet(schedule: Schedule | None = None, path: Path = TEACHER_FILE, device=None) -> nn.Module:
    """The shipped digits U-Net in eval mode, optionally re-expressed in another schedule (the preconditioning is
    written in s = sigma/alpha, so the denoiser is the same function of (x_t / alpha, s) in any schedule)."""
    if not Path(path).is_file():
        raise _missing(path)
    net = load_network(path, device)
    if schedule is not None:
        net.schedule = schedule
    return net


def save_classifier(net: DigitsClassifier, path: Path) -> None:
    """Write net's weights to safetensors, its width as metadata (atomically)."""
    save_safetensors_atomic({k: v.float() for k, v in net.state_dict().items()}, path,
                            {"format": CLASSIFIER_FORMAT, "width": str(net.head.in_features // 4)})


def load_classifier(path: Path = CLASSIFIER_FILE, device=None) -> DigitsClassifier:
    """The shipped DigitsClassifier in eval mode; CheckpointError for a missing or foreign file."""
    if not Path(path).is_file():
        raise _missing(path)
    meta, tensors = read_safetensors(path, CLASSIFIER_FORMAT, "classifier", "a digits classifier")
    net = DigitsClassifier(width=int(meta["width"]))
    net.load_state_dict(tensors)
    return net.to(device).eval().requires_grad_(False)


class DigitsProblem:
    """The ``digits`` preset: a ``Problem`` (``emd_fast.problems``).

    Teacher: the shipped U-Net as a NetworkTeacher in ``schedule``; the generator and the student start as copies
    of it. The real digits' features and the teacher's Heun samples are computed once, when first needed.
    """

    num_classes = NUM_CLASSES
    options = frozenset()

    @classmethod
    def from_config(cls, cfg: dict) -> "DigitsProblem":
        return cls(make_schedule(cfg["schedule"] or "vp_cosine"), cfg)

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        pass

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        return {}  # the shipped teacher: part of the installed package

    def __init__(self, schedule: Schedule, cfg: dict, teacher_file: Path = TEACHER_FILE,
                 classifier_file: Path = CLASSIFIER_FILE):
        self.cfg, self.classifier_file = cfg, classifier_file
        net = load_teacher_unet(schedule, teacher_file)
        self.teacher = NetworkTeacher(net, schedule, IMAGE_SHAPE, source=teacher_file)
        self.sigma_data = net.sigma_data

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """Moves the teacher to ``device`` and returns a copy of its U-Net (``fit`` is irrelevant: it is trained)."""
        self.teacher.to(device)
        return copy.deepcopy(self.teacher.net), {}

    @functools.cached_property
    def classifier(self) -> DigitsClassifier:
        return load_classifier(self.classifier_file)

    @functools.cached_property
    def real(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 1797 real digits (N, 1, 8, 8), their labels (N,) and classifier features (N, F)."""
        x, y = load_digits_data()
        return x, y, self.classifier.features(x).double()

    def teacher_samples(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n Heun samples of the teacher with balanced labels from noise seeded by ``seed``: (n, 1, 8, 8), (n,).
        Drawn in one batch with a progress bar, cached (``evaluation.reference``)."""
        y = torch.arange(n) % NUM_CLASSES
        return reference_samples(self.teacher, n, seed, y, HEUN_STEPS, n, self.cfg.get("quiet", False)), y

    @functools.cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's Heun samples that fd_teacher compares with: images, labels, features (eval_samples of them)."""
        x, y = self.teacher_samples(self.cfg["eval_samples"], seed_for(self.cfg["seed"], Stream.REFERENCE))
        return x, y, self.classifier.features(x.clamp(-1, 1)).double()

    @functools.cached_property
    def inception(self) -> tuple[InceptionFeatures, torch.Tensor] | None:
        """The user's Inception network (--inception) and the real digits' Inception features, or None."""
        if not self.cfg.get("inception"):
            return None
        net = InceptionFeatures(self.cfg["inception"], torchscript=self.cfg.get("inception_torchscript", False))
        return net, net(self.real[0])

    @torch.no_grad()
    def metrics(self, samples: torch.Tensor, y: torch.Tensor) -> dict:
        """Class accuracy and coverage, Frechet distances and precision/recall of samples (N, 1, 8, 8), labels (N,);
        with --inception also fid_inception: FID to the real digits on Inception-v3 pool features."""
        x = samples.detach().float().cpu().clamp(-1, 1)
        feats = self.classifier.features(x)
        pred = self.classifier.head(feats).argmax(1)
        feats = feats.double()
        covered, tv = class_coverage(pred, NUM_CLASSES)
        precision, recall = precision_recall(self.real[2], feats)
        out = {"class_accuracy": float((pred == y.cpu()).double().mean()), "classes_covered": covered,
               "class_tv": tv, "fd_real": frechet_distance(feats, self.real[2]),
               "fd_teacher": frechet_distance(feats, self.reference[2]), "precision": precision, "recall": recall}
        if self.inception is not None:
            net, real = self.inception
            out["fid_inception"] = frechet_distance(net(x), real)
        return out

    def floor(self) -> dict:
        """The metrics of an independent set of the teacher's Heun samples (its fd_teacher: the sampling noise)."""
        seed = seed_for(self.cfg["seed"], Stream.TEACHER_METRICS)
        return self.metrics(*self.teacher_samples(self.cfg["eval_samples"], seed))

    def plot(self, path, samples, y, metrics, history, title) -> None:
        """One-step samples, the teacher's Heun samples and real digits (a row per class), and the metric curves."""
        per = 10
        fig = figure((22, 5.8))
        axes = fig.subplots(1, 4)
        show(axes[0], class_rows(samples, y, per, NUM_CLASSES), per,
             f"one-step generator: accuracy {metrics['class_accuracy']:.3f}, FD {metrics['fd_real']:.1f}")
        show(axes[1], class_rows(*self.reference[:2], per, NUM_CLASSES), per, f"teacher, Heun {HEUN_STEPS} steps")
        show(axes[2], class_rows(*self.real[:2], per, NUM_CLASSES), per, "real digits")
        ax = axes[3]
        evals = [h for h in history if "fd_real" in h]
        if evals:
            steps = [h["step"] for h in evals]
            for key in ("fd_real", "fd_teacher"):
                ax.plot(steps, [h[key] for h in evals], label=key)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(loc="lower left")
            acc = ax.twinx()
            acc.plot(steps, [h["class_accuracy"] for h in evals], "k--", label="class accuracy")
            acc.set_ylim(0, 1.02)
            acc.legend(loc="center right")
        ax.set_title("metrics during training")
        save_figure(fig, path, title, dpi=90)

    @staticmethod
    def progress(m: dict) -> dict:
        return {"acc": f"{m['class_accuracy']:.3f}", "fd": f"{m['fd_real']:.2f}"}

    @staticmethod
    def summary_lines(f: dict, floor: dict) -> list[str]:
        rows = [("class accuracy", "class_accuracy", ".4f"), ("classes covered", "classes_covered", "d"),
                ("class TV", "class_tv", ".4f"), ("FD to real", "fd_real", ".3f"),
                ("FD to teacher", "fd_teacher", ".3f"), ("precision", "precision", ".4f"),
                ("recall", "recall", ".4f")]
        rows += [("FID (Inception)", "fid_inception", ".3f")] if "fid_inception" in f else []
        return [f"{name:<16}{f[k]:{fmt}}   (teacher, Heun {HEUN_STEPS} steps: {floor[k]:{fmt}})"
                for name, k, fmt in rows]
