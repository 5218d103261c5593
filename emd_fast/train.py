"""``python -m emd_fast.train``: distill a teacher into a one-step generator with EM Distillation.

With no arguments it distills the embedded default (an 8-mode 2-D Gaussian mixture with exact scores) on the GPU if
there is one, else the CPU, and writes a run directory:
    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import digits, problems
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint, write_json_atomic
from .distiller import BACKENDS, FINITE_CHECKS, PRECISIONS, Distiller, Execution
from .emd import VARIANTS, Z_STEPS, EMDConfig
from .profiling import PhaseTimer
from .schedules import SCHEDULES, WEIGHTINGS, make_schedule

PROBLEMS = {"ring2d": problems.MixtureProblem, "gmm16d": problems.MixtureProblem, "digits": digits.DigitsProblem}
# Per-preset defaults: they replace the parser's defaults of the options not given on the command line.
PRESET_DEFAULTS = {
    "digits": dict(schedule="edm", K=4, gamma_eps=0.3, gamma_z=0.01, lambda_star=-4.0, lr_g=1e-4, lr_s=1e-3,
                   batch=64, steps=300, eval_every=50, ckpt_every=100, eval_samples=1000),
}
# Settings that may differ between a run and its resumption; everything else must match the checkpoint.
RUNTIME_KEYS = {"steps", "out", "resume", "device", "eval_every", "ckpt_every", "plot_every", "keep", "quiet",
                "phase_every", "inception", "compile", "fast", "cuda_graph", "channels_last", "finite_check"}
LOG_EVERY = 25  # iterations between writes of metrics.jsonl (one host sync each), besides evaluations and checkpoints
WARM_ITERS = 10  # first iterations of a (re)started run left out of the steady throughput: compilation, graph capture


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emd_fast.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="EM Distillation (Xie et al. 2024) of a diffusion teacher into a one-step generator. "
                    "Each iteration: K Langevin steps on (eps, z) targeting p_T(x_t) p_theta(z|x_t) (E-step), a "
                    "generator update on the noise-cancelled denoising loss (M-step), and a student score update.",
        epilog="preset defaults, used for the options not given: " + "; ".join(
            f"{name}: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
            for name, d in PRESET_DEFAULTS.items()))
    a = p.add_argument_group("problem")
    a.add_argument("--preset", choices=tuple(PROBLEMS), default="ring2d",
                   help="embedded teacher: ring2d = 8 unequal modes in 2-D; gmm16d = 10 modes in 16-D; digits = "
                        "class-conditional U-Net on sklearn's 8x8 digits (its own defaults: see the end)")
    a.add_argument("--schedule", choices=tuple(SCHEDULES), default="vp_cosine", help="noise schedule")
    a.add_argument("--hidden", type=int, default=128, help="MLP width of the generator / student")
    a.add_argument("--depth", type=int, default=3, help="residual blocks of the generator / student MLP")
    a.add_argument("--teacher-fit-steps", type=int, default=1500,
                   help="steps regressing an MLP onto the exact teacher denoiser; generator and student start "
                        "as copies of it (the paper initialises both from the teacher network)")
    e = p.add_argument_group("EMD")
    e.add_argument("--K", type=int, default=8, help="Langevin steps per E-step (EMD-K); 0 = no MCMC")
    e.add_argument("--gamma-eps", type=float, default=0.3, help="Langevin step size on eps")
    e.add_argument("--gamma-z", type=float, default=0.01,
                   help="Langevin step size on z (with --z-step scaled: its value at high noise)")
    e.add_argument("--z-step", choices=Z_STEPS, default="scaled",
                   help="scaled: gamma_z * sigma^2 / (sigma^2 + alpha^2 sigma_data^2) per example, the z-chain's "
                        "curvature ~ alpha^2/sigma^2 J^T J divided out, stable at every noise level; fixed: gamma_z "
                        "(diverges at low noise on ill-conditioned teachers)")
    e.add_argument("--variant", choices=VARIANTS, default="eps,z",
                   help="sampled variables: eps,z (reparametrized), x,z (joint), eps or x (z fixed)")
    e.add_argument("--cancel-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the book-kept Langevin noise from the M-step residual")
    e.add_argument("--lambda-star", type=float, default=-4.0,
                   help="log-SNR at which the teacher denoiser becomes the generator: g(z) = D(sigma* z, t*)")
    e.add_argument("--gen-weighting", choices=WEIGHTINGS, default="inv_snr", help="w(t) of the generator loss")
    e.add_argument("--student-weighting", choices=WEIGHTINGS, default="edm", help="w(t) of the student loss")
    e.add_argument("--t-min", type=float, default=None, help="smallest noise level t sampled (default: schedule's)")
    e.add_argument("--t-max", type=float, default=None, help="largest noise level t sampled (default: schedule's)")
    f = p.add_argument_group("speed (none changes what is computed beyond float rounding)")
    f.add_argument("--fast", action="store_true",
                   help="the fastest settings this machine supports, for the speed options not given: on a GPU "
                        "--backend triton --compile --cuda-graph --finite-check deferred --channels-last (images "
                        "only); on a CPU --compile --finite-check deferred. What is skipped is said")
    f.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="elementwise work of the iteration: plain PyTorch, or the fused Triton kernels (Langevin "
                        "update with in-kernel Philox noise, noise-cancelled M-step loss, student DSM loss)")
    f.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile the generator, student and teacher network (same results up to rounding; "
                        "checkpoints unchanged); what cannot be compiled here is said and left eager")
    f.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the whole iteration in one CUDA graph after 3 eager ones (needs a CUDA device and "
                        "--finite-check deferred)")
    f.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                   help="bf16: the network calls under autocast(bfloat16); fp32 master weights, optimizer state, "
                        "Langevin chain and losses; an analytic teacher stays exact fp32")
    f.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="image networks and data in NHWC memory order")
    f.add_argument("--finite-check", choices=FINITE_CHECKS, default="sync",
                   help="sync: check every network output and gradient for nan/inf and stop at once (host syncs); "
                        "deferred: a device-side flag makes the fused Adam skip non-finite updates and the run "
                        "stops at the next log write (every %d steps), before any checkpoint" % LOG_EVERY)
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1500, help="training iterations")
    o.add_argument("--batch", type=int, default=256, help="batch size")
    o.add_argument("--lr-g", type=float, default=1e-4, help="generator Adam learning rate")
    o.add_argument("--lr-s", type=float, default=1e-3, help="student score network Adam learning rate")
    o.add_argument("--betas-g", type=float, nargs=2, default=(0.0, 0.99), help="generator Adam betas")
    o.add_argument("--betas-s", type=float, nargs=2, default=(0.0, 0.99), help="student Adam betas")
    o.add_argument("--seed", type=int, default=0, help="seed of the run's single random stream")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<preset>_K<K>_seed<seed>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    r.add_argument("--eval-every", type=int, default=250, help="steps between metric evaluations")
    r.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    r.add_argument("--plot-every", type=int, default=0, help="steps between PNG plots (0: only the final one)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints kept (0: all)")
    r.add_argument("--phase-every", type=int, default=50,
                   help="time the phases of every N-th iteration (synchronising the device; 0: never)")
    r.add_argument("--eval-samples", type=int, default=2000, help="samples used by the metrics")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--inception", type=Path, default=None,
                   help="image presets: Inception-v3 TorchScript file (inception-2015-12-05.pt, never downloaded); "
                        "adds FID to the real data on its features to the metrics")
    return p


def _explicit(parser: argparse.ArgumentParser, argv) -> set[str]:
    """Names of the options given on the command line (not defaulted)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def _jsonable(cfg: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def with_preset_defaults(cfg: dict, explicit: set[str], keys=None) -> dict:
    """cfg with its preset's PRESET_DEFAULTS for the options (among ``keys``, default all) not in ``explicit``."""
    defaults = PRESET_DEFAULTS.get(cfg["preset"], {})
    return cfg | {k: v for k, v in defaults.items() if k not in explicit and (keys is None or k in keys)}


def make_problem(cfg: dict):
    return PROBLEMS[cfg["preset"]](cfg["preset"], make_schedule(cfg["schedule"]), cfg)


class Run:
    """Everything built from a config: the problem (teacher, metrics, plots), the networks and the Distiller."""

    def __init__(self, cfg: dict, device: torch.device, fit_teacher: bool):
        self.cfg, self.problem = cfg, make_problem(cfg)
        self.teacher = self.problem.teacher
        self.t_star = self.teacher.schedule.t_at_lambda(cfg["lambda_star"])
        torch.manual_seed(cfg["seed"])  # network initialisation
        net, self.init_info = self.problem.teacher_network(device, fit=fit_teacher)
        generator, student = problems.init_networks(net, self.t_star)
        emd_cfg = EMDConfig(K=cfg["K"], gamma_eps=cfg["gamma_eps"], gamma_z=cfg["gamma_z"], z_step=cfg["z_step"],
                            variant=cfg["variant"],
                            cancel_noise=cfg["cancel_noise"], gen_weighting=cfg["gen_weighting"],
                            student_weighting=cfg["student_weighting"], t_min=cfg["t_min"], t_max=cfg["t_max"])
        # configs saved before --precision existed have none; channels_last and finite_check are runtime options
        execution = Execution(backend=cfg["backend"], precision=cfg.get("precision", "fp32"),
                              channels_last=cfg.get("channels_last", False),
                              finite_check=cfg.get("finite_check", "sync"))
        self.distiller = Distiller(self.teacher, generator, student, emd_cfg, batch=cfg["batch"], lr_g=cfg["lr_g"],
                                   lr_s=cfg["lr_s"], betas_g=cfg["betas_g"], betas_s=cfg["betas_s"],
                                   seed=cfg["seed"], sigma_data=self.problem.sigma_data,
                                   num_classes=self.problem.num_classes, execution=execution, device=device)

    def evaluate(self) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Metrics of eval_samples generator samples from a fixed (z, y) (the same every evaluation)."""
        rng = torch.Generator(self.distiller.device).manual_seed(self.cfg["seed"] + 3)
        samples, y = self.distiller.sample(self.cfg["eval_samples"], rng)
        return self.problem.metrics(samples, y), samples, y


def with_fast_defaults(cfg: dict, explicit: set[str], device: torch.device) -> tuple[dict, list[str]]:
    """--fast: the fastest speed settings for ``device`` for the options not in ``explicit`` (the backend only for a
    new run: a resumed run keeps its own). Returns the new cfg and one line per setting left out, with the reason."""
    if not cfg["fast"]:
        return cfg, []
    from .kernels import triton_available

    gpu = device.type == "cuda"
    fast, skipped = {"compile": "default", "finite_check": "deferred"}, []
    if gpu and triton_available():
        fast["backend"] = "triton"
    else:
        skipped.append("fused Triton kernels: " + ("triton is not installed" if gpu else
                                                   "they need a CUDA GPU (on a CPU they run only interpreted, "
                                                   "for tests)"))
    if gpu:
        fast |= {"cuda_graph": True, "channels_last": True}  # channels_last applies to image data only
    else:
        skipped.append(f"CUDA graphs: no CUDA device (running on {device})")
        skipped.append("channels_last: a GPU convolution layout, not used on the CPU")
    keep = explicit | ({"backend"} if cfg["resume"] else set())
    return cfg | {k: v for k, v in fast.items() if k not in keep}, [f"--fast: skipped {line}" for line in skipped]


def validate(cfg: dict) -> None:
    for key in ("steps", "batch", "hidden", "depth", "eval_samples"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("eval_every", "ckpt_every", "plot_every", "teacher_fit_steps", "keep", "phase_every"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg.get("inception") and not Path(cfg["inception"]).is_file():
        raise ValueError(f"--inception {cfg['inception']} not found (emd_fast never downloads it)")
    for key in ("lr_g", "lr_s"):
        if not (cfg[key] > 0 and math.isfinite(cfg[key])):
            raise ValueError(f"--{key.replace('_', '-')} must be a positive number, got {cfg[key]}")


def _resume_config(out: Path, cfg: dict, explicit: set[str]) -> dict:
    """The saved run's config, with the runtime options given now; a conflicting hyperparameter is an error."""
    saved_path = out / "config.json"
    if not saved_path.is_file():
        raise CheckpointError(f"--resume: {saved_path} does not exist")
    saved = json.loads(saved_path.read_text())
    clash = {k: (saved.get(k), cfg[k]) for k in explicit - RUNTIME_KEYS
             if k in cfg and _jsonable({k: cfg[k]})[k] != saved.get(k)}
    if clash:
        pairs = ", ".join(f"{k}: run has {a}, asked {b}" for k, (a, b) in sorted(clash.items()))
        raise CheckpointError(f"--resume: the checkpoint in {out} is from another config ({pairs})")
    merged = {k: saved.get(k, v) for k, v in cfg.items() if k not in RUNTIME_KEYS}
    merged.update({k: cfg[k] for k in RUNTIME_KEYS if k in cfg})
    return merged


def train(cfg: dict, explicit: set[str] = frozenset()) -> dict:
    """Run (or resume) a distillation described by ``cfg`` (the CLI options as a dict). Returns the summary.

    Options not in ``explicit`` take their preset's defaults (PRESET_DEFAULTS); on --resume the saved run's.
    """
    cfg = with_preset_defaults(cfg, explicit)
    cfg["out"] = Path(cfg["out"] or Path("runs") / f"{cfg['preset']}_K{cfg['K']}_seed{cfg['seed']}")
    if cfg["resume"]:
        cfg = with_preset_defaults(_resume_config(cfg["out"], cfg, set(explicit)), explicit, RUNTIME_KEYS)
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg, notes = with_fast_defaults(cfg, set(explicit), device)
    validate(cfg)
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    if not cfg["resume"] and list_checkpoints(ckpt_dir):
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    latest = list_checkpoints(ckpt_dir)[-1] if cfg["resume"] else None
    if cfg["resume"] and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")

    t0 = time.perf_counter()
    run = Run(cfg, device, fit_teacher=latest is None)
    dist = run.distiller
    if cfg["compile"]:
        from .compiled import compile_networks

        notes += compile_networks(dist, mode=cfg["compile"]).lines()
    step = dist.step
    if cfg["cuda_graph"]:
        from .graphs import GraphedStep, graphs_unavailable

        if why := graphs_unavailable(dist):
            raise ValueError(f"--cuda-graph: {why}")
        step = GraphedStep(dist)
    if notes:
        print("\n".join(notes), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = {k: v for k, v in _jsonable(cfg).items() if k not in RUNTIME_KEYS}
    if latest is not None:
        tensors, state = load_checkpoint(latest)
        if state.get("config") != saved_cfg:
            raise CheckpointError(f"{latest} was written by another config")
        dist.load_state_tensors(tensors, state["step"], str(latest))
        _truncate_metrics(out / "metrics.jsonl", state["step"])
    else:
        write_json_atomic(out / "config.json", {**saved_cfg, "t_star": run.t_star, **run.init_info,
                                                "teacher": run.teacher.to_config(), "torch": torch.__version__})
        init_metrics, _, _ = run.evaluate()  # the generator at initialisation (teacher denoiser at lambda*)
        rec = {"step": 0, **{k: v for k, v in init_metrics.items() if k != "mode_weights"}}
        (out / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    setup_s = time.perf_counter() - t0

    def checkpoint_due() -> bool:
        return bool(cfg["ckpt_every"]) and dist.step_count % cfg["ckpt_every"] == 0

    def checkpoint():
        state = {"config": saved_cfg, "torch": torch.__version__}
        save_checkpoint(ckpt_dir, dist.step_count, dist.state_tensors(), state, keep=cfg["keep"])

    def plot(name, metrics, samples, y):
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        title = (f"EMD-{cfg['K']} ({cfg['variant']}, cancel={cfg['cancel_noise']}) on {cfg['preset']}, "
                 f"step {dist.step_count}")
        run.problem.plot(out / "samples" / name, samples, y, metrics, history, title)

    log = MetricsLog(out / "metrics.jsonl", dist)
    bar = tqdm(total=cfg["steps"], initial=dist.step_count, disable=cfg["quiet"], desc="EMD", unit="it",
               dynamic_ncols=True)
    graphed = cfg["cuda_graph"]
    other_s, start_step, last = 0.0, dist.step_count, {}
    timer, timed_iters = PhaseTimer(device), 0
    loop_t0 = warm_t0 = time.perf_counter()
    warm_other_s = 0.0
    try:
        while dist.step_count < cfg["steps"]:
            timed = cfg["phase_every"] and not graphed and (dist.step_count + 1) % cfg["phase_every"] == 0
            with timer if timed else contextlib.nullcontext():
                losses = step()
            timed_iters += bool(timed)
            n = dist.step_count
            if n - start_step == WARM_ITERS:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                warm_t0, warm_other_s = time.perf_counter(), other_s
            evaluate = cfg["eval_every"] and (n % cfg["eval_every"] == 0 or n == cfg["steps"])
            log.add(n, losses)
            if evaluate or checkpoint_due() or n % LOG_EVERY == 0 or n == cfg["steps"]:
                log.sync()  # one host sync; raises here, before any checkpoint, if a deferred check failed
                ts = time.perf_counter()
                metrics = None
                if evaluate:
                    metrics, samples, y = run.evaluate()
                    last = metrics
                log.write(metrics and {k: v for k, v in metrics.items() if k != "mode_weights"})
                if evaluate and cfg["plot_every"] and n % cfg["plot_every"] == 0:
                    plot(f"step_{n:07d}.png", metrics, samples, y)
                if checkpoint_due():
                    checkpoint()
                other_s += time.perf_counter() - ts
                bar.set_postfix(**log.postfix(), **(run.problem.progress(last) if last else {}), refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        log.sync()
        checkpoint()
        print(f"interrupted at step {dist.step_count}: checkpoint written; continue with --resume --out {out}",
              file=sys.stderr)
        raise
    except FloatingPointError:
        log.sync(check=False)  # keep the losses logged before the failure
        raise
    finally:
        log.close()
    bar.close()
    loop_end = time.perf_counter()
    train_s = loop_end - loop_t0 - other_s
    steady_s = loop_end - warm_t0 - (other_s - warm_other_s)
    if not checkpoint_due():  # the last step's checkpoint, unless the loop just wrote it
        checkpoint()
    final, samples, y = run.evaluate()
    plot("final.png", final, samples, y)
    steps_run = dist.step_count - start_step
    summary = {
        "out": str(out), "preset": cfg["preset"], "steps": dist.step_count, "device": str(device),
        "execution": {**dataclasses.asdict(dist.execution), "compile": cfg["compile"], "cuda_graph": graphed},
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "iters_per_s": round(steps_run / train_s, 2) if train_s else None,
        "samples_per_s": round(steps_run * cfg["batch"] / train_s, 1) if train_s else None,
        "steady_iters_per_s": (round((steps_run - WARM_ITERS) / steady_s, 2)
                               if steps_run > WARM_ITERS and steady_s > 0 else None),
        "phase_ms_per_iter": timer.summary(timed_iters), "phase_timed_iters": timed_iters,
        "phase_note": ("none: a CUDA-graph iteration is one launch (run with --no-cuda-graph to time phases)"
                       if graphed else f"every {cfg['phase_every']}-th iteration, device synchronised per phase"
                       if cfg["phase_every"] else "none (--phase-every 0)"),
        "final": final, "exact_sample_floor": run.problem.floor(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


class MetricsLog:
    """metrics.jsonl, one line per iteration. The losses stay on the device until ``sync`` reads all pending ones
    with one host sync (checking the deferred finite flag first); ``write`` appends them, evaluation metrics joined
    to the last one."""

    def __init__(self, path: Path, distiller: Distiller):
        self.file, self.distiller = open(path, "a"), distiller
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
        for rec in self.ready:
            self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.last = self.ready[-1] if self.ready else self.last
        self.ready.clear()

    def postfix(self) -> dict[str, str]:
        return {k: f"{self.last[k]:.3g}" for k in ("loss_g", "loss_s") if k in self.last}

    def close(self) -> None:
        self.write()
        self.file.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log matches an uninterrupted run."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def format_summary(s: dict, lines: list[str]) -> str:
    return "\n".join([
        f"run directory: {s['out']}",
        f"steps {s['steps']} on {s['device']}: {s['iters_per_s']} it/s, {s['samples_per_s']} samples/s "
        f"(setup {s['setup_s']} s, training {s['train_s']} s"
        + (f"; after the first {WARM_ITERS} iterations {s['steady_iters_per_s']} it/s)" if s["steady_iters_per_s"]
           else ")"),
        "execution: " + ", ".join(f"{k} {v}" for k, v in s["execution"].items()),
        *lines,
        *(["time per iteration by phase (ms): " + ", ".join(f"{k} {v}" for k, v in s["phase_ms_per_iter"].items())]
          if s["phase_ms_per_iter"] else []),
        f"plot: {Path(s['out']) / 'samples' / 'final.png'}",
    ])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = vars(args)
    cfg["betas_g"], cfg["betas_s"] = tuple(cfg["betas_g"]), tuple(cfg["betas_s"])
    try:
        summary = train(cfg, _explicit(parser, argv))
    except (ValueError, FloatingPointError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    lines = PROBLEMS[summary["preset"]].summary_lines(summary["final"], summary["exact_sample_floor"])
    print(format_summary(summary, lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
