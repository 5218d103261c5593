"""What ``--log tensorboard`` / ``--log wandb`` cost per training iteration on the default problem (ring2d, the
train CLI's defaults: MLPs 128 x 3, batch 256, EMD-8), against the iteration itself.

    python benchmarks/logging_overhead.py --out benchmarks/results/logging_overhead.json

The iteration: median time of ``--iters`` ``Distiller.step()`` calls after a warm-up. The logging: a run's loggers
get the lines of metrics.jsonl at each write of the log, every LOG_EVERY iterations (``Loggers.records``); the median
time of ``--windows`` such writes (LOG_EVERY lines of real losses each) divided by LOG_EVERY is the cost per iteration.
W&B logs offline here (WANDB_MODE=offline; online, ``wandb.log`` hands the same data to the same local process). A
plot's images (the PNG figure, at --plot-every and at the end) are timed apart: once per plot, not per iteration.
On a shared CPU both times are noisy; the JSON records the load average beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from emd_fast import train
from emd_fast.optional import installed_version
from emd_fast.training.build import Run
from emd_fast.training.config import resolve
from emd_fast.training.loggers import Loggers
from emd_fast.training.loop import LOG_EVERY

KINDS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "both": ("tensorboard", "wandb")}


def default_run(out: Path, device: str | None) -> Run:
    """The default problem with the train CLI's defaults (the teacher fit skipped: it does not change the cost)."""
    cfg = vars(train.build_parser().parse_args(["--out", str(out), "--teacher-fit-steps", "0", "--quiet"]
                                               + (["--device", device] if device else [])))
    cfg, device, _ = resolve(cfg, {"out", "teacher_fit_steps", "quiet", "device"})
    return Run(cfg, device, fit_teacher=True)


def timed_steps(run: Run, n: int) -> tuple[list[float], list[dict]]:
    """Seconds of n iterations, and their metrics lines as metrics.jsonl holds them."""
    times, lines, distiller = [], [], run.distiller
    for _ in range(n):
        start = time.perf_counter()
        losses = distiller.step()
        if distiller.device.type == "cuda":
            torch.cuda.synchronize(distiller.device)
        times.append(time.perf_counter() - start)
        lines.append({"step": distiller.step_count, **{k: float(v) for k, v in losses.items()},
                      "time_s": sum(times), "wall_s": sum(times)})
    return times, lines


def logging_cost(kinds, run: Run, lines: list[dict], windows: int) -> tuple[list[float], float]:
    """(seconds of each write of LOG_EVERY lines, seconds of one plot's images) for a fresh run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "mode_tv": 0.5, "time_s": 0.0}) + "\n")
        loggers = Loggers(kinds, out, {k: str(v) for k, v in run.cfg.items()}, run.distiller)
        times = []
        for w in range(windows):
            window = [{**line, "step": w * LOG_EVERY + i + 1} for i, line in enumerate(lines[:LOG_EVERY])]
            start = time.perf_counter()
            loggers.records(window)
            times.append(time.perf_counter() - start)
        samples, y = run.sample(512, torch.Generator(run.distiller.device).manual_seed(0))
        figure = out / "plot.png"
        run.problem.plot(figure, samples, y, run.problem.metrics(samples), [], "logging overhead")
        start = time.perf_counter()
        loggers.images(windows * LOG_EVERY, figure, samples, y, run.problem)
        plot_s = time.perf_counter() - start
        loggers.close()
    return times, plot_s


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=40, help="timed iterations")
    p.add_argument("--windows", type=int, default=20, help="timed log writes (LOG_EVERY lines each) per logger")
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    a = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as tmp:
        run = default_run(Path(tmp) / "run", a.device)
    timed_steps(run, 3)  # warm-up
    times, lines = timed_steps(run, max(a.iters, LOG_EVERY))
    iteration_s = statistics.median(times)
    rows = {}
    for name, kinds in KINDS.items():
        writes, plot_s = logging_cost(kinds, run, lines, a.windows)
        per_iter = statistics.median(writes) / LOG_EVERY
        rows[name] = {"ms_per_write": 1e3 * statistics.median(writes), "ms_per_iter": 1e3 * per_iter,
                      "percent_of_iter": 100 * per_iter / iteration_s, "ms_per_plot": 1e3 * plot_s}
    print(f"default problem on {run.distiller.device}: {1e3 * iteration_s:.2f} ms per iteration (median of "
          f"{len(times)}); loggers written every {LOG_EVERY} iterations")
    print(f"{'logger':<12} {'ms/write':>9} {'ms/iter':>8} {'% of iter':>10} {'ms/plot':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['ms_per_write']:>9.3f} {r['ms_per_iter']:>8.4f} {r['percent_of_iter']:>9.3f}% "
              f"{r['ms_per_plot']:>8.1f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({
            "problem": "ring2d, train CLI defaults", "device": str(run.distiller.device),
            "iteration_ms": 1e3 * iteration_s, "iteration_ms_all": [1e3 * t for t in times], "log_every": LOG_EVERY,
            "windows": a.windows, "loggers": rows, "machine": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "versions": {p: installed_version(p) for p in ("torch", "tensorboard", "wandb")}}, indent=1))


if __name__ == "__main__":
    main()
