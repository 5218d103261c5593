"""Problems: what a run distils and how it is judged. A problem owns its teacher, the network that generator and
student start from, its metrics, plots and progress figures, the checks of its options, the files it reads (hashed
into the run's config) and the random streams it derives from the run's seed.

    MixtureProblem     an exact Gaussian-mixture teacher (a preset or --mixture FILE), MLP networks
    DigitsProblem      the shipped class-conditional U-Net on 8x8 digits (--preset digits)
    ImageProblem       a teacher network file: NVlabs/EDM's and EDM2's pickles, emd_fast safetensors (--teacher FILE)
    DiffusersProblem   a diffusers model or pipeline folder (--teacher DIR)

A teacher format plugs in as a Problem class whose ``claims(path)`` recognises its files, listed once in
``TEACHER_PROBLEMS``; the options only it takes, its file hashes and its checks are its own
(docs/adding_a_teacher.md).
"""
from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..nets.generator import Generator
from ..teachers import Teacher

# --teacher PATH: the first of these whose claims(PATH) is true reads it ("module:Class" under emd_fast.problems,
# imported only when needed: a mixture run never imports diffusers). The catch-alls come last: any folder, any file.
TEACHER_PROBLEMS = ("diffusers_folder:DiffusersProblem", "image:ImageProblem")


class Problem(Protocol):
    """What a run needs from its problem. cfg: the run's options as a dict (see ``emd_fast.training.config``).

    The problem of a ``--teacher`` format (one of ``TEACHER_PROBLEMS``) also says which paths it reads:
    ``claims(path) -> bool`` (static, from the path alone: a suffix, a file beside it) and ``reads``, in words;
    ``option_notes`` ({option: who takes it, in words}) where an option applies to fewer teachers than ``reads``.
    Optional: ``option_defaults(cfg) -> dict`` (classmethod), the defaults of options that depend on the teacher
    (a new run's options not given on the command line take them), e.g. the loss weightings of an
    epsilon-prediction network. Optional, where samples are not images as they are: ``decode(samples) -> images``
    (N, 3, H, W) in [-1, 1], used by ``emd_fast.sample`` (an attribute that may be None: samples are images as they
    are); ``encode(prompts) -> embeddings`` for ``emd_fast.sample --prompt``.
    """

    teacher: Teacher
    sigma_data: float  # the data's standard deviation: the preconditioning's and the scaled z step's scale
    num_classes: int  # 0: unconditional; else labels y in [0, num_classes) (prompt indices for text-to-image)
    options: frozenset[str]  # the options only some teacher formats take that this one takes (cfg keys: "prompts")

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        """ValueError (one line) if the options do not fit this problem: from the config alone, before any
        expensive work."""

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        """{"<option>_sha256": SHA-256} of every file the run reads (a resume that finds another file is refused)."""

    @classmethod
    def from_config(cls, cfg: dict) -> "Problem": ...

    def teacher_network(self, device: torch.device, fit: bool) -> tuple[nn.Module, dict]:
        """The denoiser network generator and student start from (fit to the teacher first where that is needed
        and ``fit``), and what to record about it in config.json. A problem that fits one (an analytic teacher has
        no network) also has ``fit_teacher_network(net) -> dict``: a run builds the network unfitted, checks what
        it can (the disk), then fits it."""

    def metrics(self, samples: torch.Tensor, y: torch.Tensor | None) -> dict: ...

    def floor(self) -> dict:
        """The metrics of the teacher's own samples: what a perfect generator scores."""

    def plot(self, path: Path, samples: torch.Tensor, y, metrics: dict, history: list[dict], title: str) -> None: ...

    def progress(self, metrics: dict) -> dict[str, str]:
        """A few figures for the progress bar."""

    def summary_lines(self, final: dict, floor: dict) -> list[str]: ...


def _load(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def problem_class(cfg: dict) -> type:
    """The Problem class of a config: by its --teacher PATH, --mixture, or the embedded preset."""
    if cfg.get("teacher"):
        teacher = Path(cfg["teacher"])
        for spec in TEACHER_PROBLEMS:
            if (cls := _load(spec)).claims(teacher):
                return cls
        formats = "; ".join(_load(spec).reads for spec in TEACHER_PROBLEMS)
        raise ValueError(f"--teacher {teacher}: not a teacher emd_fast reads ({formats})")
    if cfg.get("preset") == "digits":
        from .digits import DigitsProblem

        return DigitsProblem
    from .mixture import MixtureProblem

    return MixtureProblem


def check_foreign_options(cfg: dict, problem: type) -> None:
    """ValueError if ``cfg`` gives an option that only other teacher formats take (each lists its own in
    ``options``)."""
    for cls in map(_load, TEACHER_PROBLEMS):
        for key in sorted(cls.options - problem.options):
            if cfg.get(key):
                who = getattr(cls, "option_notes", {}).get(key, cls.reads)
                raise ValueError(f"--{key.replace('_', '-')} applies to {who}")


def make_problem(cfg: dict) -> Problem:
    return problem_class(cfg).from_config(cfg)


def init_networks(teacher_net: nn.Module, t_star: float) -> tuple[Generator, nn.Module]:
    """Generator = teacher denoiser at t* (lambda*), student = copy of the teacher denoiser (both trainable)."""
    student = copy.deepcopy(teacher_net).requires_grad_(True).train()
    return Generator.from_teacher(teacher_net, t_star), student
