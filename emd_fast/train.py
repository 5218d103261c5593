"""``python -m emd_fast.train``: distill a teacher into a one-step generator with EM Distillation.

With no arguments it distills the embedded default (an 8-mode 2-D Gaussian mixture with exact scores) on the GPU if
there is one, else the CPU, and writes a run directory:
    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import digits, problems
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint, write_json_atomic
from .distiller import BACKENDS, Distiller
from .emd import VARIANTS, EMDConfig
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
                "phase_every", "inception", "compile"}


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
    e.add_argument("--gamma-z", type=float, default=0.01, help="Langevin step size on z")
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
    e.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="elementwise work of the iteration: plain PyTorch, or the fused Triton kernels (Langevin "
                        "update with in-kernel Philox noise, noise-cancelled M-step loss, student DSM loss)")
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
    r.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile the generator, student and teacher network (same results up to rounding; "
                        "checkpoints unchanged); what cannot be compiled here is said and left eager")
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
        emd_cfg = EMDConfig(K=cfg["K"], gamma_eps=cfg["gamma_eps"], gamma_z=cfg["gamma_z"], variant=cfg["variant"],
                            cancel_noise=cfg["cancel_noise"], gen_weighting=cfg["gen_weighting"],
                            student_weighting=cfg["student_weighting"], t_min=cfg["t_min"], t_max=cfg["t_max"])
        self.distiller = Distiller(self.teacher, generator, student, emd_cfg, batch=cfg["batch"], lr_g=cfg["lr_g"],
                                   lr_s=cfg["lr_s"], betas_g=cfg["betas_g"], betas_s=cfg["betas_s"],
                                   seed=cfg["seed"], sigma_data=self.problem.sigma_data,
                                   num_classes=self.problem.num_classes, backend=cfg["backend"], device=device)

    def evaluate(self) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
        """Metrics of eval_samples generator samples from a fixed (z, y) (the same every evaluation)."""
        rng = torch.Generator(self.distiller.device).manual_seed(self.cfg["seed"] + 3)
        samples, y = self.distiller.sample(self.cfg["eval_samples"], rng)
        return self.problem.metrics(samples, y), samples, y


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
    validate(cfg)
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    if not cfg["resume"] and list_checkpoints(ckpt_dir):
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    latest = list_checkpoints(ckpt_dir)[-1] if cfg["resume"] else None
    if cfg["resume"] and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")

    t0 = time.perf_counter()
    run = Run(cfg, device, fit_teacher=latest is None)
    dist = run.distiller
    if cfg.get("compile"):
        from .compiled import compile_networks

        print("\n".join(compile_networks(dist, mode=cfg["compile"]).lines()), file=sys.stderr)
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

    log = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg["steps"], initial=dist.step_count, disable=cfg["quiet"], desc="EMD", unit="it",
               dynamic_ncols=True)
    train_s, start_step, last = 0.0, dist.step_count, {}
    timer, timed_iters = PhaseTimer(device), 0
    try:
        while dist.step_count < cfg["steps"]:
            timed = cfg["phase_every"] and (dist.step_count + 1) % cfg["phase_every"] == 0
            ts = time.perf_counter()
            with timer if timed else contextlib.nullcontext():
                losses = dist.step()
            train_s += time.perf_counter() - ts
            timed_iters += bool(timed)
            step = dist.step_count
            rec = {"step": step, **{k: float(v) for k, v in losses.items()}}
            if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
                metrics, samples, y = run.evaluate()
                rec |= {k: v for k, v in metrics.items() if k != "mode_weights"}
                last = metrics
                if cfg["plot_every"] and step % cfg["plot_every"] == 0:
                    plot(f"step_{step:07d}.png", metrics, samples, y)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if checkpoint_due():
                checkpoint()
            bar.update(1)
            bar.set_postfix(loss_g=f"{rec['loss_g']:.3g}", loss_s=f"{rec['loss_s']:.3g}",
                            **(run.problem.progress(last) if last else {}), refresh=False)
    except KeyboardInterrupt:
        bar.close()
        checkpoint()
        print(f"interrupted at step {dist.step_count}: checkpoint written; continue with --resume --out {out}",
              file=sys.stderr)
        raise
    finally:
        log.close()
    bar.close()
    if not checkpoint_due():  # the last step's checkpoint, unless the loop just wrote it
        checkpoint()
    final, samples, y = run.evaluate()
    plot("final.png", final, samples, y)
    steps_run = dist.step_count - start_step
    summary = {
        "out": str(out), "preset": cfg["preset"], "steps": dist.step_count, "device": str(device),
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "iters_per_s": round(steps_run / train_s, 2) if train_s else None,
        "samples_per_s": round(steps_run * cfg["batch"] / train_s, 1) if train_s else None,
        "phase_ms_per_iter": timer.summary(timed_iters), "phase_timed_iters": timed_iters,
        "final": final, "exact_sample_floor": run.problem.floor(),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log matches an uninterrupted run."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def format_summary(s: dict, lines: list[str]) -> str:
    return "\n".join([
        f"run directory: {s['out']}",
        f"steps {s['steps']} on {s['device']}: {s['iters_per_s']} it/s, {s['samples_per_s']} samples/s "
        f"(setup {s['setup_s']} s, training {s['train_s']} s)",
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
