"""A run's config: the training CLI's options as a dict, with preset defaults, --fast defaults and a resumed
run's own settings, checked before any expensive work."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, FileRefused, RunError
from ..execution.backends import triton_available
from ..execution.distributed import Ranks
from ..files import describe, read_json
from ..nets.lora import check_lora_options
from ..problems import check_foreign_options, problem_class
from ..teachers.diffusers_folder import check_guidance
from ..teachers.mixture import PRESETS as MIXTURES
from .loggers import check_loggers

MIXTURE_PRESETS = tuple(MIXTURES)
# Hyperparameter presets for a teacher file (--teacher): see docs/presets.md for every value's source.
TEACHER_PRESETS = ("edm-imagenet64", "edm-cifar10")


PRESETS = (*MIXTURE_PRESETS, "digits", *TEACHER_PRESETS)


_IMAGE_RUN = dict(eval_every=1000, ckpt_every=1000, plot_every=5000, eval_samples=1000, fid_every=20000)


# Per-preset defaults: they replace the parser's defaults of the options not given on the command line.
PRESET_DEFAULTS = {
    "digits": dict(schedule="edm", K=4, gamma_eps=0.3, gamma_z=0.01, lambda_star=-4.0, lr_g=1e-4, lr_s=1e-3,
                   batch=64, steps=300, eval_every=50, ckpt_every=100, eval_samples=1000),
    "edm-imagenet64": dict(K=8, gamma_eps=0.3, gamma_z=0.01, lambda_star=-6.0, lr_g=2e-6, lr_s=2e-6,
                           betas_g=(0.0, 0.999), betas_s=(0.0, 0.999), batch=256, steps=200_000, ema=2000.0,
                           **_IMAGE_RUN),
    "edm-cifar10": dict(K=8, gamma_eps=0.3, gamma_z=0.01, lambda_star=-4.0, lr_g=1e-5, lr_s=1e-5,
                        betas_g=(0.0, 0.999), betas_s=(0.0, 0.999), batch=256, steps=200_000, ema=500.0,
                        **_IMAGE_RUN),
}


# Settings that may differ between a run and its resumption; everything else must match the checkpoint.
RUNTIME_KEYS = {"steps", "out", "resume", "resume_from", "device", "eval_every", "ckpt_every", "plot_every", "keep",
                "quiet", "phase_every", "inception", "compile", "fast", "cuda_graph", "channels_last", "finite_check",
                "fid_every", "fid_samples", "fid_ref", "grad_checkpoint", "dist_timeout", "shard",
                "inception_torchscript", "log", "t_star", "compile_cache"}


MAX_K = 1000  # --K: Langevin steps per iteration
RUN_CONFIG_BYTES = 512 << 20  # a run's config.json (a mixture teacher's means and covariances are in it)
DIST_TIMEOUT_S = 1800  # default --dist-timeout: longest wait of any collective (an evaluation or FID on rank 0)


# The CUDA graph of an iteration does not capture DDP's gradient all-reduce.
GRAPHS_NOT_DISTRIBUTED = "not with torch.distributed (the gradient all-reduce is not captured)"


def jsonable(cfg: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def with_preset_defaults(cfg: dict, explicit: set[str], keys=None) -> dict:
    """cfg with its preset's PRESET_DEFAULTS for the options (among ``keys``, default all) not in ``explicit``."""
    defaults = PRESET_DEFAULTS.get(cfg["preset"], {})
    return cfg | {k: v for k, v in defaults.items() if k not in explicit and (keys is None or k in keys)}


def with_teacher_defaults(cfg: dict, explicit: set[str]) -> dict:
    """cfg with its teacher's own defaults (the problem's ``option_defaults``, e.g. the loss weightings of an
    epsilon-prediction network) for the options not in ``explicit``."""
    defaults = getattr(problem_class(cfg), "option_defaults", None)
    return cfg | {k: v for k, v in (defaults(cfg) if defaults else {}).items() if k not in explicit}


def run_name(cfg: dict) -> str:
    """runs/<name>_K<K>_seed<seed>: the preset, else the teacher or mixture file's stem."""
    source = cfg.get("teacher") or cfg.get("mixture")
    name = Path(source).stem if source and cfg["preset"] in (None, *MIXTURE_PRESETS) else cfg["preset"]
    return f"{name}_K{cfg['K']}_seed{cfg['seed']}"


def check_problem_options(cfg: dict) -> None:
    """The problem options fit together: a teacher preset needs --teacher, --teacher and --mixture exclude each
    other and an embedded preset, --labels needs a class-conditional teacher (checked once it is loaded)."""
    preset, teacher, mixture = cfg["preset"], cfg.get("teacher"), cfg.get("mixture")
    if teacher and mixture:
        raise RunError("--teacher and --mixture exclude each other: one teacher per run")
    if preset in TEACHER_PRESETS and not teacher:
        raise RunError(f"--preset {preset} sets hyperparameters for a teacher file: pass --teacher PATH (EDM's "
                       f"network pickle or its emd_fast .safetensors conversion)")
    if (teacher or mixture) and preset in (*MIXTURE_PRESETS, "digits"):
        raise RunError(f"--preset {preset} is an embedded teacher; it cannot be combined with "
                       f"{'--teacher' if teacher else '--mixture'}")
    if cfg.get("labels") is not None and not teacher and preset != "digits":
        raise RunError("--labels needs a class-conditional teacher (--teacher or --preset digits)")


def parse_device(name: str | None) -> torch.device:
    """The run's device (default: cuda if available), checked to exist here; RunError otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise RunError(f"--device {name}: there is one cpu device (cpu or cpu:0)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise RunError(f"--device {name}: emd_fast runs on cpu or cuda devices")
    return device


def check_seed(seed: int, option: str = "--seed") -> None:
    """RunError unless ``seed`` is a seed torch takes: an integer in [0, 2**63)."""
    if not 0 <= seed < 2**63:
        raise RunError(f"{option} must be in [0, 2**63), got {seed}")


def validate(cfg: dict) -> None:
    """Everything that can be checked from the config alone, before any expensive work (RunError, one line)."""
    for key in ("steps", "batch", "hidden", "depth", "eval_samples", "fid_samples"):
        if cfg[key] < 1:
            raise RunError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("eval_every", "ckpt_every", "plot_every", "teacher_fit_steps", "keep", "phase_every", "fid_every"):
        if cfg[key] < 0:
            raise RunError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    for key in ("lr_g", "lr_s"):
        if not (cfg[key] > 0 and math.isfinite(cfg[key])):
            raise RunError(f"--{key.replace('_', '-')} must be a positive number, got {cfg[key]}")
    if not cfg.get("dist_timeout", DIST_TIMEOUT_S) > 0:
        raise RunError(f"--dist-timeout must be a positive number of seconds, got {cfg['dist_timeout']}")
    check_seed(cfg["seed"])
    if cfg["K"] > MAX_K:
        raise RunError(f"--K must be at most {MAX_K} (Langevin steps per iteration, each a teacher call; the EMD "
                       f"paper uses up to 16), got {cfg['K']}")
    for key in ("gamma_eps", "gamma_z", "lambda_star"):  # finite even where the variant leaves one unused
        if not math.isfinite(cfg[key]):
            raise RunError(f"--{key.replace('_', '-')} must be a finite number, got {cfg[key]}")
    if cfg.get("guidance_scale") is not None:  # None: the teacher family's default
        check_guidance(cfg["guidance_scale"])
    for key in ("ema", "ema_rampup"):
        if not (cfg[key] >= 0 and math.isfinite(cfg[key])):
            raise RunError(f"--{key.replace('_', '-')} must be a number >= 0, got {cfg[key]}")
    folder_teacher = bool(cfg.get("teacher")) and Path(cfg["teacher"]).is_dir()
    for key in ("teacher", "mixture", "inception", "fid_ref", "prompts", "guide"):
        if cfg.get(key) and not (key == "teacher" and folder_teacher):
            kind = describe(cfg[key])
            if kind not in ("a regular file", "a symbolic link to a regular file"):
                never = " (emd_fast never downloads it)" if kind == "no such file" else ", not a regular file"
                raise RunError(f"--{key.replace('_', '-')} {cfg[key]}: {kind}{never}")
    check_problem_options(cfg)
    problem = problem_class(cfg)
    check_foreign_options(cfg, problem)
    problem.check_options(cfg)
    check_loggers(cfg.get("log"))
    check_lora_options(cfg)
    if cfg.get("fid_ref") and not cfg.get("inception"):
        raise RunError("--fid-ref needs --inception (the Inception-v3 weights the statistics were made with)")
    if cfg.get("inception_torchscript") and not cfg.get("inception"):
        raise RunError("--inception-torchscript says how to read --inception, which is not given")
    if cfg.get("compile_cache") and not cfg.get("compile"):
        raise RunError("--compile-cache keeps the artefacts of --compile (or --fast), which is not given")
    image_run = bool(cfg.get("teacher")) or cfg["preset"] == "digits"
    for key in ("inception", "fid_ref"):
        if cfg.get(key) and not image_run:
            raise RunError(f"--{key.replace('_', '-')}: FID is for image runs (--teacher, --preset digits); a "
                           f"mixture run is measured against its exact teacher")
    out = Path(cfg["out"])
    kind = describe(out)  # never raises (a path too long to stat reads as missing: creating it says why)
    if kind not in ("no such file", "a directory", "a symbolic link to a directory"):
        raise RunError(f"--out {out} exists and is not a directory ({kind})")


def with_fast_defaults(cfg: dict, explicit: set[str], device: torch.device,
                       distributed: bool = False) -> tuple[dict, list[str]]:
    """--fast: the fastest speed settings for ``device`` for the options not in ``explicit`` (the backend only for a
    new run: a resumed run keeps its own; no CUDA graph for a ``distributed`` run). Returns the new cfg and one line
    per setting left out, with the reason."""
    if not cfg["fast"]:
        return cfg, []
    gpu = device.type == "cuda"
    fast, skipped = {"compile": "default", "finite_check": "deferred"}, []
    if gpu and triton_available():
        fast["backend"] = "triton"
    else:
        skipped.append("fused Triton kernels: " + ("triton is not installed" if gpu else
                                                   "they need a CUDA GPU (on a CPU they run only interpreted, "
                                                   "for tests)"))
    if cfg.get("shard"):
        del fast["compile"]
        skipped.append("torch.compile: not with --shard (untested with FSDP2)")
    if gpu:
        fast["channels_last"] = True  # image data only
        if distributed:
            skipped.append(f"CUDA graphs: {GRAPHS_NOT_DISTRIBUTED}; the iteration runs eagerly around the compiled "
                           f"networks")
        else:
            fast["cuda_graph"] = True
    else:
        skipped.append(f"CUDA graphs: no CUDA device (running on {device})")
        skipped.append("channels_last: a GPU convolution layout, not used on the CPU")
    keep = explicit | ({"backend"} if cfg["resume"] else set())
    return cfg | {k: v for k, v in fast.items() if k not in keep}, [f"--fast: skipped {line}" for line in skipped]


def resume_config(out: Path, cfg: dict, explicit: set[str]) -> dict:
    """The saved run's config, with the runtime options given now; a conflicting hyperparameter is an error."""
    saved_path = out / "config.json"
    if not os.path.lexists(saved_path):
        raise CheckpointError(f"--resume: {saved_path} does not exist")
    try:
        saved = read_json(saved_path, "--resume: the run's config", RUN_CONFIG_BYTES)
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {saved_path} does not hold a run config")
    clash = {k: (saved.get(k), cfg[k]) for k in explicit - RUNTIME_KEYS
             if k in cfg and jsonable({k: cfg[k]})[k] != saved.get(k)}
    if clash:
        pairs = ", ".join(f"{k}: run has {a}, asked {b}" for k, (a, b) in sorted(clash.items()))
        raise CheckpointError(f"--resume: the checkpoint in {out} is from another config ({pairs})")
    merged = {k: saved.get(k, v) for k, v in cfg.items() if k not in RUNTIME_KEYS}
    merged.update({k: cfg[k] for k in RUNTIME_KEYS if k in cfg})
    return merged | ({"t_star": saved["t_star"]} if "t_star" in saved else {})  # the run keeps its generator's t*


def file_hashes(cfg: dict) -> dict:
    """SHA-256 of every file the run's problem reads (recorded in its config: a resume that finds another file is
    refused)."""
    return problem_class(cfg).input_files(cfg)


def resolve(cfg: dict, explicit: set[str], distributed: bool = False) -> tuple[dict, torch.device, list[str]]:
    """The full config of a new or resumed run, its device and notes for the user; RunError / CheckpointError if it
    cannot run. Options not in ``explicit`` take their preset's defaults; on --resume the saved run's."""
    if cfg["preset"] is None and not cfg.get("teacher") and not cfg.get("mixture"):
        cfg["preset"] = "ring2d"  # the embedded default
    cfg = with_preset_defaults(cfg, explicit)
    cfg["out"] = Path(cfg["out"] or Path("runs") / run_name(cfg))
    if cfg["resume"]:
        cfg = with_preset_defaults(resume_config(cfg["out"], cfg, set(explicit)), explicit, RUNTIME_KEYS)
    device = parse_device(cfg["device"])
    cfg, notes = with_fast_defaults(cfg, set(explicit), device, distributed)
    validate(cfg)
    if not cfg["resume"]:  # a resumed run keeps its saved settings
        cfg = with_teacher_defaults(cfg, set(explicit))
    return cfg, device, notes


def check_shard(cfg: dict, ranks: Ranks) -> None:
    """--shard needs several processes (torchrun) and excludes what is untested with sharded networks (RunError)."""
    if not cfg.get("shard"):
        return
    if not ranks.distributed:
        raise RunError("--shard shards the networks across the processes of a torchrun launch: run it under "
                       "torchrun (one process holds whole networks: drop --shard)")
    for key in ("cuda_graph", "compile"):
        if cfg.get(key):
            raise RunError(f"--{key.replace('_', '-')} is not supported with --shard (untested with FSDP2)")
