"""The EMD paper's K ablation on the digits preset: FD and recall against the number of Langevin steps K at equal
iterations and at equal training time, and seconds per step.

    python benchmarks/k_ablation.py time                                 # seconds per step per K, on an idle machine
    python benchmarks/k_ablation.py run --out runs/k_ablation            # 15 runs, one after another (resumable)
    python benchmarks/k_ablation.py report --out runs/k_ablation         # figure + JSON + markdown table

``time``: each K trains TIME_STEPS steps with evaluation off, the K one after another, --repeat rounds; seconds per
step are read from the run's own training clock between steps TIME_FROM and TIME_STEPS (the first steps warm up).
The smallest of the rounds is each K's figure (a shared virtual machine's neighbours only ever add time), all rounds
are kept in RESULTS/k_ablation_step_time.json with the load average before and after (run it with the machine
otherwise idle).

``run``: one ``python -m emd_fast.train --preset digits`` per K x seed with today's preset defaults, only --K,
--seed and --steps given. Every run makes at least the preset's 300 steps (equal iterations are read at step 300);
the cheaper K make more steps, so that each trains at least as long as EMD-8's 300 steps at the idle seconds per
step (STEPS). A finished run (summary.json) is skipped, an interrupted or shorter one continues with --resume (the
number of steps only decides where a run stops, so a longer run resumed is the same run).

``report``: the curves and the sweep figure by ``emd_fast.report`` (RESULTS/k_ablation_digits/index.html and PNGs),
the numbers in RESULTS/k_ablation_digits.json and a markdown table on stdout. Training time at equal wall time is the
step count times the idle seconds per step of ``time``, not the runs' own clocks: the runs share the machine with
other work, so their clocks measure the load as much as K.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
EQUAL_STEPS = 300  # the digits preset's --steps
# steps per K: each K trains at least as long as EMD-8's 300 steps at the idle seconds per step
# (RESULTS/k_ablation_step_time.json: 0.140, 0.236, 0.325, 0.542 and 0.966 s for K = 1, 2, 4, 8, 16 on this
# project's 2-core CPU machine), to the next evaluation (every 50 steps); EMD-16 is read where that time runs out,
# before its step 300
STEPS = {1: 1200, 2: 700, 4: 550, 8: 300, 16: 300}
TIME_FROM, TIME_STEPS = 10, 60
STEP_TIME = RESULTS / "k_ablation_step_time.json"


def run_dir(out: Path, k: int, seed: int) -> Path:
    return out / f"digits_K{k}_seed{seed}"


def run_all(out: Path, ks, seeds) -> None:
    """Seed by seed (a partial sweep holds whole seeds), each K; a failed run is reported and the sweep goes on."""
    for seed in seeds:
        for k in ks:
            directory = run_dir(out, k, seed)
            summary = directory / "summary.json"
            if summary.is_file() and json.loads(summary.read_text()).get("steps", 0) >= STEPS[k]:
                continue
            resume = ["--resume"] if any((directory / "checkpoints").glob("step_*.json")) else []
            cmd = [sys.executable, "-m", "emd_fast.train", "--preset", "digits", "--K", str(k), "--seed", str(seed),
                   "--steps", str(STEPS[k]), "--out", str(directory), "--quiet", *resume]
            print(" ".join(cmd), flush=True)
            run = subprocess.Popen(cmd)
            try:
                code = run.wait()
            except KeyboardInterrupt:  # the run stops at its next iteration with a checkpoint; the sweep stops
                run.send_signal(signal.SIGINT)
                run.wait()
                raise SystemExit(f"stopped: {directory} checkpointed where it stopped; the same command resumes") \
                    from None
            if code != 0:
                print(f"run {directory} ended with exit code {code}", flush=True)


def time_steps(ks, repeat: int) -> dict[int, float]:
    """Idle seconds per training step of each K, the smallest of ``repeat`` rounds
    (RESULTS/k_ablation_step_time.json)."""
    import tempfile

    import torch

    load_before, rounds = os.getloadavg(), {k: [] for k in ks}
    for k in [k for _ in range(repeat) for k in ks]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "emd_fast.train", "--preset", "digits", "--K", str(k), "--steps",
                   str(TIME_STEPS), "--eval-every", "0", "--plot-every", "0", "--ckpt-every", "0", "--out", tmp,
                   "--quiet"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            lines = Path(tmp, "metrics.jsonl").read_text().splitlines()
            clock = {r["step"]: r["time_s"] for r in map(json.loads, lines) if "time_s" in r}
        rounds[k].append((clock[TIME_STEPS] - clock[TIME_FROM]) / (TIME_STEPS - TIME_FROM))
        print(f"K = {k}: {rounds[k][-1]:.3f} s / step", flush=True)
    per_step = {k: min(r) for k, r in rounds.items()}
    RESULTS.mkdir(exist_ok=True)
    STEP_TIME.write_text(json.dumps({
        "command": f"python benchmarks/k_ablation.py time --repeat {repeat}", "s_per_step": per_step,
        "rounds": rounds,
        "steps": [TIME_FROM, TIME_STEPS], "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "processor": platform.processor(), "cpu_count": os.cpu_count()}, indent=1))
    return per_step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("time", "run", "report"))
    p.add_argument("--out", type=Path, default=Path("runs/k_ablation"), help="folder of the run directories")
    p.add_argument("--K", type=int, nargs="+", default=KS)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--repeat", type=int, default=3, help="time: rounds over the K (the smallest counts)")
    a = p.parse_args(argv)
    if a.what == "time":
        time_steps(a.K, a.repeat)
    elif a.what == "run":
        run_all(a.out, a.K, a.seeds)
    else:
        report(a.out, a.K, a.seeds)


TABLE = (("class acc.", "class_accuracy", 3), ("FD to real", "fd_real", 3), ("FD to teacher", "fd_teacher", 3),
         ("precision", "precision", 3), ("recall", "recall", 3))


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}g} ± {sd:.2g}"


def digits_table(runs: dict[int, list[Path]], sweep: dict) -> tuple[str, list[dict]]:
    """The README's digits table re-measured: the teacher's floor, each EMD-K at step EQUAL_STEPS, EMD-1 at the
    equal training time; mean ± std over seeds. Returns the markdown and the rows."""
    rows = []
    floors = list({d.name.rsplit("_", 1)[1]: json.loads((d / "summary.json").read_text())["exact_sample_floor"]
                   for ds in runs.values() for d in ds if (d / "summary.json").is_file()}.values())  # one per seed
    rows.append({"method": "teacher, Heun 18 steps (floor)", "nfe": 35, "n": len(floors),
                 **{k: [f[k] for f in floors] for _, k, _ in TABLE}})
    for k, dirs in runs.items():
        at = []
        for d in dirs:
            lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line]
            at += [r for r in lines if r["step"] == EQUAL_STEPS and "fd_real" in r]
        rows.append({"method": f"EMD-{k}, {EQUAL_STEPS} steps" + (" (preset default)" if k == 4 else ""), "nfe": 1,
                     "n": len(at), **{key: [r[key] for r in at] for _, key, _ in TABLE}})
    one = next((v for v in sweep["values"] if v["value"] == 1), None)
    if one and sweep.get("equal_time_s"):
        at = [r["at_time"] for r in one["runs"] if r["at_time"]]
        lines = {d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x] for d in runs[1]}
        full = [next(r for r in lines[Path(x["run"])] if r["step"] == a["step"]) for x, a in zip(one["runs"], at)]
        rows.append({"method": f"EMD-1, steps {'/'.join(str(a['step']) for a in at)} (equal training time, "
                               f"{sweep['equal_time_s']:.0f} s)", "nfe": 1, "n": len(full),
                     **{key: [r[key] for r in full] for _, key, _ in TABLE}})
    header = "| method | network evaluations | seeds | " + " | ".join(name for name, _, _ in TABLE) + " |"
    lines = [header, "|" + "---|" * (3 + len(TABLE))]
    for row in rows:
        lines.append(f"| {row['method']} | {row['nfe']} | {row['n']} | " +
                     " | ".join(_cell(row[key], d) for _, key, d in TABLE) + " |")
    return "\n".join(lines), rows


def draw_time_curves(runs: dict[int, list[Path]], step_time: dict[int, float], metrics, path: Path) -> None:
    """Each metric against the idle training time (steps x idle seconds per step), one line per K (mean over the
    seeds at the evaluations all its seeds reached, the spread shaded)."""
    from emd_fast.evaluation.images import figure, save_figure

    fig = figure((5.2 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for k, dirs in runs.items():
            evals = [{r["step"]: r[metric] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                      if metric in r} for d in dirs]
            steps = sorted(set.intersection(*(set(e) for e in evals)))
            values = [[e[s] for e in evals] for s in steps]
            mean = [statistics.mean(v) for v in values]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            t = [s * step_time[k] for s in steps]
            ax.plot(t, mean, label=f"EMD-{k}")
            ax.fill_between(t, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)], alpha=0.15)
        ax.set_xlabel("training time on one idle machine (s): steps x idle s / step")
        ax.set_ylabel(metric)
        if metric.startswith("fd"):  # from ~200 at step 0 to ~10
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    save_figure(fig, path, "digits: metrics against training time (mean ± std over seeds)")


def report(out: Path, ks, seeds) -> None:
    """The report of every run there is (finished or not), the sweep figure and numbers into RESULTS."""
    from emd_fast.evaluation.report import make_report

    runs = {k: [run_dir(out, k, s) for s in seeds if (run_dir(out, k, s) / "config.json").is_file()] for k in ks}
    runs = {k: dirs for k, dirs in runs.items() if dirs}
    if not STEP_TIME.is_file():
        raise SystemExit(f"{STEP_TIME} is missing: measure the idle seconds per step first "
                         "(python benchmarks/k_ablation.py time)")
    step_time = {int(k): v for k, v in json.loads(STEP_TIME.read_text())["s_per_step"].items()}
    index = make_report([d for dirs in runs.values() for d in dirs], out / "report", sweep_key="K",
                        step_time=step_time)
    data = json.loads((index.parent / "report.json").read_text())
    table, rows = digits_table(runs, data["sweep"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "k_ablation_digits.png").write_bytes((index.parent / "sweep.png").read_bytes())
    draw_time_curves(runs, step_time, data["sweep"]["metrics"], RESULTS / "k_ablation_digits_time.png")
    (RESULTS / "k_ablation_digits.json").write_text(json.dumps({
        "command": "python benchmarks/k_ablation.py run && python benchmarks/k_ablation.py report",
        "steps": STEPS, "seeds": list(seeds), "s_per_step_idle": step_time, "sweep": data["sweep"],
        "runs": data["runs"], "digits_table": rows,
        "digits_table_md": table, "machine": platform.platform(), "cpu_count": os.cpu_count()}, indent=1))
    print(f"report: {index}\n\n{table}")


if __name__ == "__main__":
    main()
