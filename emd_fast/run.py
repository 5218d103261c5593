"""A distillation run described by a config (the training CLI's options as a dict): problem, networks, Distiller,
and the loop that writes the run directory.

    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json

``train(cfg, explicit)`` resolves the config (preset defaults, --fast, a resumed run's own settings), checks it before
any expensive work, then trains; ``Run(cfg, device)`` rebuilds a run's objects (``emd_fast.sample`` uses it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .digits import DigitsProblem
from .mixtures import PRESETS as MIXTURES, load_mixture
from .problems import MixtureProblem, init_networks
from .checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, load_state_dict_strict, remove_orphans,
                         save_checkpoint, sha256_file, write_json_atomic, write_text_atomic)
from .distiller import Distiller, Execution, triton_available
from .distributed import Ranks, communication_failed, data_parallel, fully_sharded, rank_seed
from .emd import EMDConfig
from .profiling import PhaseTimer
from .schedules import make_schedule

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
RUNTIME_KEYS = {"steps", "out", "resume", "resume_from", "device", "eval_every", "ckpt_every", "plot_every", "keep", "quiet",
                "phase_every", "inception", "compile", "fast", "cuda_graph", "channels_last", "finite_check",
                "fid_every", "fid_samples", "fid_ref", "grad_checkpoint", "dist_timeout", "shard"}
DIST_TIMEOUT_S = 1800  # default --dist-timeout: longest wait of any collective (an evaluation or FID on rank 0)
LOG_EVERY = 25  # iterations between writes of metrics.jsonl (one host sync each), besides evaluations and checkpoints
WARM_ITERS = 10  # first iterations of a (re)started run left out of the steady throughput: compilation, graph capture


class RunError(ValueError):
    """A run cannot start or continue as asked (one line, said to the user as is)."""


class Stopped(Exception):
    """The run stopped on a signal at an iteration boundary, after writing a checkpoint; ``exit_code`` = 128 + it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, and what Slurm and Kubernetes send
# The CUDA graph of an iteration does not capture DDP's gradient all-reduce.
GRAPHS_NOT_DISTRIBUTED = "not with torch.distributed (the gradient all-reduce is not captured)"


class StopSignals:
    """While active, SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before a kill) only record
    that a stop was asked for (``signum``): the training loop finishes its iteration, writes a checkpoint and stops.
    Handlers can only be installed from the main thread; elsewhere the signals keep their behaviour, as do signals
    the process ignores (SIGINT in a shell's background job)."""

    def __enter__(self) -> "StopSignals":
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS
                             if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def requested(self, ranks: Ranks) -> int | None:
        """The signal to stop on at this iteration boundary: this process's, or in a distributed run any rank's (an
        all-reduce: every rank asks at the same boundary, so all stop at the same one)."""
        return ranks.agree(self.signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# --- the config --------------------------------------------------------------------------------------------------

def jsonable(cfg: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def with_preset_defaults(cfg: dict, explicit: set[str], keys=None) -> dict:
    """cfg with its preset's PRESET_DEFAULTS for the options (among ``keys``, default all) not in ``explicit``."""
    defaults = PRESET_DEFAULTS.get(cfg["preset"], {})
    return cfg | {k: v for k, v in defaults.items() if k not in explicit and (keys is None or k in keys)}


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
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise RunError(f"--device {name}: emd_fast runs on cpu or cuda devices")
    return device


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
    if not 0 <= cfg["seed"] < 2**63:
        raise RunError(f"--seed must be in [0, 2**63), got {cfg['seed']}")
    for key in ("ema", "ema_rampup"):
        if not (cfg[key] >= 0 and math.isfinite(cfg[key])):
            raise RunError(f"--{key.replace('_', '-')} must be a number >= 0, got {cfg[key]}")
    diffusers_teacher = bool(cfg.get("teacher")) and Path(cfg["teacher"]).is_dir()
    for key in ("teacher", "mixture", "inception", "fid_ref", "prompts"):
        if cfg.get(key) and not Path(cfg[key]).is_file() and not (key == "teacher" and diffusers_teacher):
            what = "a directory, not a file" if Path(cfg[key]).is_dir() else "no such file"
            raise RunError(f"--{key.replace('_', '-')} {cfg[key]}: {what} (emd_fast never downloads it)")
    if diffusers_teacher:
        from .diffusers_teacher import check_options

        check_options(cfg)
    else:
        if cfg.get("teacher"):
            from .diffusers_teacher import check_not_a_folders_file

            check_not_a_folders_file(cfg["teacher"])
        for key in ("prompts", "grad_checkpoint"):
            if cfg.get(key):
                raise RunError(f"--{key.replace('_', '-')} applies to diffusers teachers (--teacher DIR)")
    if cfg.get("fid_ref") and not cfg.get("inception"):
        raise RunError("--fid-ref needs --inception (the Inception-v3 TorchScript file the statistics were made with)")
    check_problem_options(cfg)
    out = Path(cfg["out"])
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a directory")


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
    if not saved_path.is_file():
        raise CheckpointError(f"--resume: {saved_path} does not exist")
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume: cannot read {saved_path}: {e}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {saved_path} does not hold a run config")
    clash = {k: (saved.get(k), cfg[k]) for k in explicit - RUNTIME_KEYS
             if k in cfg and jsonable({k: cfg[k]})[k] != saved.get(k)}
    if clash:
        pairs = ", ".join(f"{k}: run has {a}, asked {b}" for k, (a, b) in sorted(clash.items()))
        raise CheckpointError(f"--resume: the checkpoint in {out} is from another config ({pairs})")
    merged = {k: saved.get(k, v) for k, v in cfg.items() if k not in RUNTIME_KEYS}
    merged.update({k: cfg[k] for k in RUNTIME_KEYS if k in cfg})
    return merged


def file_hashes(cfg: dict) -> dict:
    """SHA-256 of the teacher / mixture / prompt file the run reads, or of a diffusers teacher folder's UNet and
    scheduler (recorded in its config: a resume that finds another file is refused)."""
    from .diffusers_teacher import folder_sha256

    return {f"{key}_sha256": (folder_sha256 if Path(cfg[key]).is_dir() else sha256_file)(Path(cfg[key]))
            for key in ("teacher", "mixture", "prompts") if cfg.get(key)}


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
    return cfg, device, notes


# --- the objects of a run ----------------------------------------------------------------------------------------

def make_problem(cfg: dict):
    """The run's problem: teacher, metrics and plots (a MixtureProblem, DigitsProblem, ImageProblem or, for a
    diffusers folder, DiffusersProblem)."""
    if cfg.get("teacher") and Path(cfg["teacher"]).is_dir():
        from .diffusers_problem import DiffusersProblem

        return DiffusersProblem(cfg)
    if cfg.get("teacher"):
        from .image_problem import ImageProblem

        return ImageProblem(cfg)
    schedule = make_schedule(cfg["schedule"] or "vp_cosine")
    if cfg.get("mixture"):
        return MixtureProblem(load_mixture(cfg["mixture"], schedule), cfg)
    if cfg["preset"] == "digits":
        return DigitsProblem(schedule, cfg)
    return MixtureProblem(MIXTURES[cfg["preset"]](schedule), cfg)


class Run:
    """Everything built from a config: the problem (teacher, metrics, plots), the networks and the Distiller.
    ``ranks``: this process's place in a distributed run (default: the only process): its share of the batch, its
    own random streams, data-parallel networks."""

    def __init__(self, cfg: dict, device: torch.device, fit_teacher: bool, ranks: Ranks = Ranks()):
        self.cfg, self.ranks, self.problem = cfg, ranks, make_problem(cfg)
        self.teacher = self.problem.teacher
        emd_cfg = EMDConfig(K=cfg["K"], gamma_eps=cfg["gamma_eps"], gamma_z=cfg["gamma_z"], z_step=cfg["z_step"],
                            variant=cfg["variant"], cancel_noise=cfg["cancel_noise"],
                            gen_weighting=cfg["gen_weighting"], student_weighting=cfg["student_weighting"],
                            t_min=cfg["t_min"], t_max=cfg["t_max"]).validate(self.teacher.schedule)  # before the fit
        self.t_star = self.teacher.schedule.t_at_lambda(cfg["lambda_star"])
        torch.manual_seed(cfg["seed"])  # network initialisation
        net, self.init_info = self.problem.teacher_network(device, fit=fit_teacher)
        generator, student = init_networks(net, self.t_star)
        # channels_last and finite_check are runtime options: a saved config (emd_fast.sample) has none
        shard = cfg.get("shard") and ranks.distributed
        execution = Execution(backend=cfg["backend"], precision=cfg["precision"],
                              channels_last=cfg.get("channels_last", False),
                              finite_check=cfg.get("finite_check", "sync"))
        self.distiller = Distiller(self.teacher, generator, student, emd_cfg,
                                   batch=ranks.per_rank_batch(cfg["batch"]), global_batch=cfg["batch"],
                                   lr_g=cfg["lr_g"], lr_s=cfg["lr_s"], betas_g=cfg["betas_g"], betas_s=cfg["betas_s"],
                                   seed=rank_seed(cfg["seed"], ranks.rank), sigma_data=self.problem.sigma_data,
                                   num_classes=self.problem.num_classes, classes=cfg.get("labels"),
                                   ema_halflife_kimg=cfg["ema"], ema_rampup=cfg["ema_rampup"],
                                   execution=execution, device=device,
                                   data_parallel=data_parallel(device) if ranks.distributed and not shard else None,
                                   shard=fully_sharded(device, ranks.world) if shard else None)

    def sample(self, n: int, rng: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """n samples of the (EMA) generator from (z, y) drawn from ``rng``, the same whatever the number of
        processes: each rank generates its rows, rank 0 gathers them. (samples (n, ...) or None off rank 0, y)."""
        dist, rows = self.distiller, self.ranks.rows(n)
        z, y = dist.sample_inputs(n, rng)
        z_own, y_own = z[rows], None if y is None else y[rows]
        if dist.sharded:  # all ranks call a sharded network together: as many rows (padding) on each
            longest = -(-n // self.ranks.world)
            z_own, y_own = (None if v is None else torch.cat([v, v.new_zeros((longest - len(v), *v.shape[1:]))])
                            for v in (z_own, y_own))
        return self.ranks.gather_rows(dist.generate(z_own, y_own)[:rows.stop - rows.start], n), y

    def evaluate(self) -> tuple[dict | None, torch.Tensor | None, torch.Tensor | None]:
        """Metrics of eval_samples generator samples from a fixed (z, y) (the same every evaluation); in a
        distributed run every rank must call it and rank 0 gets them (the others: None, None, y)."""
        rng = torch.Generator(self.distiller.device).manual_seed(self.cfg["seed"] + 3)
        samples, y = self.sample(self.cfg["eval_samples"], rng)
        return None if samples is None else self.problem.metrics(samples, y), samples, y

    @property
    def fid_seed(self) -> int:
        """The seed of the samples whose FID a run reports (``emd_fast.fid calc`` uses it too, by default)."""
        return self.cfg["seed"] + 7

    def sample_batches(self, n: int, seed: int, chunk: int = 250):
        """n samples of the (EMA) generator, ``chunk`` at a time, from a generator seeded with ``seed`` (made by all
        ranks of a distributed run, gathered on rank 0; None on the others)."""
        rng = torch.Generator(self.distiller.device).manual_seed(seed)
        for i in range(0, n, chunk):
            yield self.sample(min(chunk, n - i), rng)[0]


def find_checkpoint(path: Path) -> Path:
    """The checkpoint JSON ``path`` (or the one beside its .safetensors), or the newest in the run directory ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        return path.with_suffix(".json")
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"no checkpoint in {path / 'checkpoints'}")
    return found[-1]


def load_run(path: str | Path, device, training_state: bool = False) -> tuple[Run, int, Path]:
    """A finished or running run, for sampling: (Run rebuilt from its config.json with the checkpoint's sampling
    generator loaded — the EMA if the run keeps one, else the generator —, the checkpoint's step, the checkpoint).
    ``training_state``: load everything the checkpoint holds instead (generator, student, EMA, optimizers, random
    state), for tools that look at the training itself."""
    ckpt = find_checkpoint(Path(path))
    tensors, state = load_checkpoint(ckpt)
    config_path = ckpt.parent.parent / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the run's config {config_path}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(state.get("config"), dict) or \
            {k: cfg.get(k) for k in state["config"]} != state["config"]:
        raise CheckpointError(f"{ckpt} was written by another config than {config_path}")
    cfg["out"] = str(ckpt.parent.parent)  # the run's directory (a diffusers run's prompt embeddings are there)
    run = Run(cfg, parse_device(device), fit_teacher=False)
    dist = run.distiller
    if training_state:
        dist.load_state_tensors(tensors, state["step"], str(ckpt))
    else:
        load_state_dict_strict(dist.sampler, tensors, "ema." if dist.ema is not None else "generator.", ckpt)
        dist.sampler.eval()
    return run, state["step"], ckpt


# --- the training loop -------------------------------------------------------------------------------------------

def out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: CUDA's OutOfMemoryError or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


@contextlib.contextmanager
def cpu_memory_limit(device: torch.device):
    """On a CPU (Linux), the process's address space limited to its size now plus 80% of the RAM available: an
    allocation beyond that fails (and is caught) instead of succeeding on overcommit and summoning the kernel's OOM
    killer, and the rest of the machine keeps some memory."""
    available = _meminfo_bytes("/proc/meminfo", "MemAvailable:")
    used = _meminfo_bytes("/proc/self/status", "VmSize:")
    if device.type != "cpu" or available is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + int(0.8 * available)
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _meminfo_bytes(path: str, key: str) -> int | None:
    """A ``key: <n> kB`` line of a /proc file in bytes, None where there is no such file or line."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(key)), None)


def _first_step(step, dist: Distiller, device: torch.device):
    """The run's first iteration; an allocation failure becomes a RunError naming a batch that fits (measured by
    halving the batch until one eager iteration runs: the run is abandoned anyway)."""
    try:
        with cpu_memory_limit(device):
            return step()
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        asked = dist.batch
    fits = asked // 2
    while fits >= 1:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        dist.batch = fits
        try:
            with cpu_memory_limit(device):
                dist.step()
            break
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            fits //= 2
    hint = f"batch {fits} ran one iteration here (measured): pass --batch {fits}" if fits else \
        "not even batch 1 fits"
    raise RunError(f"--batch {asked} does not fit in the memory of {device}: {hint}")


class RunLock:
    """An exclusive OS lock (flock) on ``<run directory>/.lock`` while a run uses the directory. The kernel releases it
    when the process ends, however it ends, so a killed run never leaves a stale lock; a second run on the same
    directory gets a RunError naming the holder's pid."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"

    def __enter__(self) -> "RunLock":
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunError(f"{self.path.parent} is in use by another run (pid {holder}): wait for it to finish, or "
                           f"choose another --out") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def check_free_space(out: Path, checkpoint_bytes: int) -> None:
    """RunError unless the file system of ``out`` has room for one more checkpoint (with a 10% margin): a new
    checkpoint is written in full before the oldest kept one is deleted."""
    free = shutil.disk_usage(out).free
    if free < 1.1 * checkpoint_bytes:
        raise RunError(f"--out {out}: {free / 2**20:.1f} MiB free on its file system, one checkpoint of this run "
                       f"needs {checkpoint_bytes / 2**20:.1f} MiB")


def check_batch_memory(dist: Distiller, device: torch.device) -> None:
    """RunError if the batch cannot fit whatever the networks: an iteration holds at least six data-sized fp32
    tensors per example at once (z, x = g(z), eps, x_t and two denoiser outputs). Catches an absurd --batch at once;
    the first iteration measures the rest (_first_step)."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = _meminfo_bytes("/proc/meminfo", "MemAvailable:")
    need = 6 * 4 * math.prod(dist.shape) * dist.batch
    if available is not None and need > available:
        raise RunError(f"--batch {dist.batch} needs at least {need / 2**30:.1f} GiB of memory for its samples and "
                       f"chains alone, {device} has {available / 2**30:.1f} GiB available: lower --batch (even "
                       f"{available // (6 * 4 * math.prod(dist.shape))} would leave nothing for the networks)")


def config_differences(written, cfg: dict) -> str:
    """What differs between a checkpoint's config and the run's, e.g. "K: checkpoint 8, run 4" ("" if nothing).
    Options added to emd_fast after the checkpoint was written are not in it and take their defaults (resume_config
    refuses them when given explicitly), so an older run resumes after an upgrade."""
    if not isinstance(written, dict):
        return "the checkpoint holds no config"
    return ", ".join(f"{k}: checkpoint {v!r}, run {cfg.get(k)!r}" for k, v in written.items() if cfg.get(k) != v)


def resume_checkpoint(cfg: dict, ckpt_dir: Path) -> Path:
    """The checkpoint a resumed run continues from: --resume-from, else the newest one in ``ckpt_dir``
    (CheckpointError if there is none)."""
    if cfg.get("resume_from"):
        return Path(cfg["resume_from"]).with_suffix(".json")
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
    return found[-1]


def load_resume_checkpoint(cfg: dict, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of the checkpoint a run resumes from, verified; if it is corrupt and --resume-from did not
    name it, the CheckpointError names the newest intact checkpoint to continue from instead."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if cfg.get("resume_from"):
            raise
        for older in reversed([p for p in list_checkpoints(path.parent) if p != path]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(f"{e}; the newest intact checkpoint is {older}: continue from it with "
                                  f"--resume-from {older}") from None
        raise CheckpointError(f"{e}; no intact checkpoint is left in {path.parent}") from None


def train(cfg: dict, explicit: set[str] = frozenset()) -> dict | None:
    """Run (or resume) a distillation described by ``cfg`` (the CLI options as a dict). Returns the summary.

    The run directory is locked while the run uses it (RunLock). A run directory this call created that fails before
    its first checkpoint is removed again: nothing half-made is left. Launched by torchrun, this process is one rank
    of a data-parallel run (``emd_fast.distributed``): rank 0 alone creates, locks and writes the directory and
    returns the summary (the others return None); when another rank fails or hangs, this one stops with a RunError.
    """
    ranks = Ranks.from_env()
    cfg, device, notes = resolve(cfg, explicit, ranks.distributed)
    ranks.per_rank_batch(cfg["batch"])
    check_shard(cfg, ranks)
    device = ranks.device(device)
    with ranks.process_group(device, cfg.get("dist_timeout", DIST_TIMEOUT_S)), contextlib.ExitStack() as lock:
        created = False
        try:
            created, latest = ranks.on_main(open_run_directory, cfg, lock)
            return _train(cfg, device, notes, latest, ranks)
        except BaseException as e:
            if created and ranks.main and not list_checkpoints(cfg["out"] / "checkpoints"):
                shutil.rmtree(cfg["out"], ignore_errors=True)
            if ranks.distributed and communication_failed(e):
                raise RunError(f"process {ranks.rank} of {ranks.world} stopped: another process of the run failed, "
                               f"died or hung past --dist-timeout ({str(e).splitlines()[0][:200]})") from None
            raise


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


def open_run_directory(cfg: dict, lock: contextlib.ExitStack) -> tuple[bool, Path | None]:
    """Create (a new run) and lock the run directory (RunLock, held until ``lock`` closes), remove what a killed
    checkpoint write left behind. Returns (whether this call created the directory, the checkpoint to resume from or
    None); a directory it created is removed again if it fails."""
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    created = False
    if not cfg["resume"]:
        try:
            out.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise RunError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    try:
        if out.is_dir():
            lock.enter_context(RunLock(out))
        if not cfg["resume"] and list_checkpoints(ckpt_dir):
            raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                                  f"--out")
        remove_orphans(ckpt_dir)
        return created, resume_checkpoint(cfg, ckpt_dir) if cfg["resume"] else None
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: dict, device: torch.device, notes: list[str], latest: Path | None, ranks: Ranks) -> dict | None:
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    t0 = time.perf_counter()
    hashes = file_hashes(cfg)
    saved_cfg = {k: v for k, v in jsonable(cfg).items() if k not in RUNTIME_KEYS}
    if latest is not None:
        tensors, state = load_resume_checkpoint(cfg, latest)
        changed = [k for k, v in hashes.items() if state.get("config", {}).get(k) != v]
        if changed:
            raise CheckpointError(f"--resume: the {changed[0].removesuffix('_sha256')} file "
                                  f"{cfg[changed[0].removesuffix('_sha256')]} is not the one this run started from "
                                  f"(its SHA-256 differs)")
    saved_cfg |= hashes
    run = Run(cfg, device, fit_teacher=latest is None, ranks=ranks)
    dist = run.distiller
    check_free_space(out, dist.checkpoint_bytes())
    check_batch_memory(dist, device)
    fid = None
    if cfg.get("fid_ref") and ranks.main:
        from .image_metrics import FID

        fid = FID(cfg["inception"], cfg["fid_ref"], device)
    if cfg["compile"]:
        from .compiled import compile_networks

        notes += compile_networks(dist, mode=cfg["compile"]).lines()
    step = dist.step
    if cfg["cuda_graph"]:
        from .graphs import GraphedStep, graphs_unavailable

        if why := graphs_unavailable(dist) or (ranks.distributed and GRAPHS_NOT_DISTRIBUTED):
            raise RunError(f"--cuda-graph: {why}")
        step = GraphedStep(dist)
    if notes and ranks.main:
        print("\n".join(notes), file=sys.stderr)
    if latest is not None:
        if differences := config_differences(state.get("config"), saved_cfg):
            raise CheckpointError(f"{latest} was written by another config ({differences})")
        dist.load_state_tensors(ranks.own_view(tensors), state["step"], str(latest))
        if state.get("processes", 1) != ranks.world:  # new per-rank streams; parameters and optimizers continue
            dist.reseed(rank_seed(cfg["seed"], ranks.rank, state["step"]))
        if ranks.main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
    else:
        init_metrics, _, _ = run.evaluate()  # the generator at initialisation (teacher denoiser at lambda*)
        if ranks.main:
            write_json_atomic(out / "config.json", {**saved_cfg, "t_star": run.t_star, **run.init_info,
                                                    "teacher_info": run.teacher.to_config(), "torch": torch.__version__})
            rec = {"step": 0, **{k: v for k, v in init_metrics.items() if k != "mode_weights"}}
            (out / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    setup_s = time.perf_counter() - t0

    def checkpoint_due() -> bool:
        return bool(cfg["ckpt_every"]) and dist.step_count % cfg["ckpt_every"] == 0

    def checkpoint():  # every rank calls it: gathering the ranks' random states is the barrier before the write
        random_states = ranks.gather_random_state(dist.random_state())
        tensors = dist.state_tensors() if ranks.main or dist.sharded else None  # sharded: gathered by all ranks
        if ranks.main:
            state = {"config": saved_cfg, "torch": torch.__version__, "processes": ranks.world}
            save_checkpoint(ckpt_dir, dist.step_count, tensors | random_states, state, keep=cfg["keep"])

    def fid_now() -> dict:  # every rank makes its share of the samples; rank 0 computes the FID
        batches = run.sample_batches(cfg["fid_samples"], run.fid_seed)
        if fid is None:
            for _ in batches:
                pass
            return {}
        value, n = fid(batches)
        return {"fid": value, "fid_samples": n}

    def plot(name, metrics, samples, y):
        if not ranks.main:
            return
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        source = cfg.get("teacher") or cfg.get("mixture") or cfg["preset"]
        title = (f"EMD-{cfg['K']} ({cfg['variant']}, cancel={cfg['cancel_noise']}) on {Path(str(source)).name}, "
                 f"step {dist.step_count}")
        run.problem.plot(out / "samples" / name, samples, y, metrics, history, title)

    log = MetricsLog(out / "metrics.jsonl" if ranks.main else None, dist)
    bar = tqdm(total=cfg["steps"], initial=dist.step_count, disable=cfg["quiet"] or not ranks.main, desc="EMD",
               unit="it", dynamic_ncols=True)
    graphed = cfg["cuda_graph"]
    other_s, start_step, last = 0.0, dist.step_count, {}
    timer, timed_iters = PhaseTimer(device), 0
    loop_t0 = warm_t0 = time.perf_counter()
    warm_other_s = 0.0
    try:
        with StopSignals() as stop:
            while not (stopped := stop.requested(ranks)) and dist.step_count < cfg["steps"]:
                timed = cfg["phase_every"] and not graphed and (dist.step_count + 1) % cfg["phase_every"] == 0
                with timer if timed else contextlib.nullcontext():
                    first = dist.step_count == start_step and not ranks.distributed  # (halving the batch: 1 process)
                    losses = _first_step(step, dist, device) if first else step()
                dist.update_ema()
                timed_iters += bool(timed)
                n = dist.step_count
                if n - start_step == WARM_ITERS:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    warm_t0, warm_other_s = time.perf_counter(), other_s
                evaluate = cfg["eval_every"] and (n % cfg["eval_every"] == 0 or n == cfg["steps"])
                fid_due = cfg.get("fid_ref") and cfg["fid_every"] and n % cfg["fid_every"] == 0 and n < cfg["steps"]
                log.add(n, losses)
                if evaluate or fid_due or checkpoint_due() or n % LOG_EVERY == 0 or n == cfg["steps"]:
                    log.sync()  # one host sync; raises here, before any checkpoint, if a deferred check failed
                    ts = time.perf_counter()
                    metrics = None
                    if evaluate:
                        metrics, samples, y = run.evaluate()
                        last = metrics
                    if fid_due:
                        metrics = (metrics or {}) | fid_now()
                    log.write(metrics and {k: v for k, v in metrics.items() if k != "mode_weights"})
                    if evaluate and cfg["plot_every"] and n % cfg["plot_every"] == 0:
                        plot(f"step_{n:07d}.png", metrics, samples, y)
                    if checkpoint_due():
                        checkpoint()
                    other_s += time.perf_counter() - ts
                    bar.set_postfix(**log.postfix(), **(run.problem.progress(last) if last else {}), refresh=False)
                bar.update(1)
            if stopped:  # at an iteration boundary (the same on every rank): everything a resume needs is consistent
                bar.close()
                log.sync()
                if not checkpoint_due():
                    checkpoint()
                raise Stopped(stopped, f"stopped by {signal.Signals(stopped).name} after step {dist.step_count}: "
                                       f"checkpoint written; continue with --resume --out {out}" if ranks.main else "")
    except KeyboardInterrupt:  # raised outside the signal handlers' reach (e.g. not in the main thread)
        bar.close()
        log.sync()
        if ranks.distributed:  # the other ranks are not at a boundary: no consistent checkpoint to write
            raise
        checkpoint()
        print(f"interrupted at step {dist.step_count}: checkpoint written; continue with --resume --out {out}",
              file=sys.stderr)
        raise
    except FloatingPointError:
        log.sync(check=False)  # keep the losses logged before the failure
        raise
    finally:
        log.close()
        bar.close()  # before the error message, if any
    loop_end = time.perf_counter()
    train_s = loop_end - loop_t0 - other_s
    steady_s = loop_end - warm_t0 - (other_s - warm_other_s)
    if not checkpoint_due():  # the last step's checkpoint, unless the loop just wrote it
        checkpoint()
    final, samples, y = run.evaluate()
    fid_metrics = fid_now() if cfg.get("fid_ref") else {}
    if not ranks.main:
        return None
    final |= fid_metrics
    plot("final.png", final, samples, y)
    floor = run.problem.floor()
    steps_run = dist.step_count - start_step
    summary = {
        "out": str(out), "preset": cfg["preset"], "problem": type(run.problem).__name__, "steps": dist.step_count,
        "device": str(device), "processes": ranks.world,
        "execution": {**dataclasses.asdict(dist.execution), "compile": cfg["compile"], "cuda_graph": graphed},
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "iters_per_s": round(steps_run / train_s, 2) if train_s else None,
        "samples_per_s": round(steps_run * cfg["batch"] / train_s, 1) if train_s else None,
        "steady_iters_per_s": (round((steps_run - WARM_ITERS) / steady_s, 2)
                               if steps_run > WARM_ITERS and steady_s > 0 else None),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None),
        "phase_ms_per_iter": timer.summary(timed_iters), "phase_timed_iters": timed_iters,
        "phase_note": ("none: a CUDA-graph iteration is one launch (run with --no-cuda-graph to time phases)"
                       if graphed else f"every {cfg['phase_every']}-th iteration, device synchronised per phase"
                       if cfg["phase_every"] else "none (--phase-every 0)"),
        "final": final, "exact_sample_floor": floor, "summary_lines": run.problem.summary_lines(final, floor),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


class MetricsLog:
    """metrics.jsonl, one line per iteration. The values stay on the device until ``sync`` reads all pending ones
    with one host sync (checking the deferred finite flag first); ``write`` appends them, evaluation metrics joined
    to the last one. path None (ranks other than 0): the values are checked, nothing is written."""

    def __init__(self, path: Path | None, distiller: Distiller):
        self.file, self.distiller = open(path, "a") if path else None, distiller
        self.pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.ready: list[dict] = []
        self.last: dict = {}

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, losses))

    def sync(self, check: bool = True) -> None:
        """Read the pending values (one host sync); with ``check``, raise if the deferred finite flag is set or
        (deferred checks: the Distiller checked the sync path itself) a value shows divergence."""
        if check:
            self.distiller.raise_if_nonfinite()
        if self.pending:
            values = torch.stack([torch.stack(list(v.values())) for _, v in self.pending]).tolist()
            records = [{"step": step, **dict(zip(losses, row))} for (step, losses), row in zip(self.pending, values)]
            self.pending.clear()
            self.ready += records
            for rec in records if check and self.distiller.deferred else ():
                self.distiller.guard.check(rec["step"], rec)

    def write(self, metrics: dict | None = None) -> None:
        if metrics and self.ready:
            self.ready[-1] |= metrics
        if self.file:
            self.file.writelines(json.dumps(rec) + "\n" for rec in self.ready)
            self.file.flush()
        self.last = self.ready[-1] if self.ready else self.last
        self.ready.clear()

    def postfix(self) -> dict[str, str]:
        return {k: f"{self.last[k]:.3g}" for k in ("loss_g", "loss_s") if k in self.last}

    def close(self) -> None:
        self.write()
        if self.file:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (and a line torn by a kill), so the log matches an
    uninterrupted run; the shortened log replaces the old one atomically (a kill meanwhile loses nothing)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill or a full disk
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
