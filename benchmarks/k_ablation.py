"""The EMD paper's K ablation on the digits preset: FD and recall against the number of Langevin steps K at equal
iterations and at equal training time, and seconds per step.

    python benchmarks/k_ablation.py run --out runs/k_ablation            # 15 runs, one after another (resumable)
    python benchmarks/k_ablation.py report --out runs/k_ablation         # figure + JSON + markdown table

``run``: one ``python -m emd_fast.train --preset digits`` per K x seed with today's preset defaults, only --K,
--seed and --steps given. Every run makes at least the preset's 300 steps (equal iterations are read at step 300);
EMD-1 and EMD-2 make more, so that they train at least as long as EMD-4's 300 steps: equal training time is read at
the longest training time every run reached (the last evaluation at or before it). A finished run (summary.json) is
skipped, an interrupted one continues with --resume. The times are those of the machine the runs share: on a busy
machine they are noisy.

``report``: the curves and the sweep figure by ``emd_fast.report`` (RESULTS/k_ablation_digits/index.html and PNGs),
the numbers in RESULTS/k_ablation_digits.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
EQUAL_STEPS = 300  # the digits preset's --steps
# steps per K: EMD-1 and EMD-2 about 1.15x EMD-4's 300-step training time at the per-step costs measured on 2 CPU
# cores (EMD-1 1.5 s, EMD-16 4.8 s per step under load; linear in K between)
STEPS = {1: 500, 2: 450, 4: 300, 8: 300, 16: 300}


def run_dir(out: Path, k: int, seed: int) -> Path:
    return out / f"digits_K{k}_seed{seed}"


def run_all(out: Path, ks, seeds) -> None:
    """Seed by seed (a partial sweep holds whole seeds), each K; a failed run is reported and the sweep goes on."""
    for seed in seeds:
        for k in ks:
            directory = run_dir(out, k, seed)
            if (directory / "summary.json").is_file():
                continue
            resume = ["--resume"] if any((directory / "checkpoints").glob("step_*.json")) else []
            cmd = [sys.executable, "-m", "emd_fast.train", "--preset", "digits", "--K", str(k), "--seed", str(seed),
                   "--steps", str(STEPS[k]), "--out", str(directory), "--quiet", *resume]
            print(" ".join(cmd), flush=True)
            code = subprocess.run(cmd).returncode
            if code != 0:
                print(f"run {directory} ended with exit code {code}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("run", "report"))
    p.add_argument("--out", type=Path, default=Path("runs/k_ablation"), help="folder of the run directories")
    p.add_argument("--K", type=int, nargs="+", default=KS)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    a = p.parse_args(argv)
    if a.what == "run":
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


def report(out: Path, ks, seeds) -> None:
    """The report of every run there is (finished or not), the sweep figure and numbers into RESULTS."""
    from emd_fast.evaluation.report import make_report

    runs = {k: [run_dir(out, k, s) for s in seeds if (run_dir(out, k, s) / "config.json").is_file()] for k in ks}
    runs = {k: dirs for k, dirs in runs.items() if dirs}
    index = make_report([d for dirs in runs.values() for d in dirs], out / "report", sweep_key="K")
    data = json.loads((index.parent / "report.json").read_text())
    table, rows = digits_table(runs, data["sweep"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "k_ablation_digits.png").write_bytes((index.parent / "sweep.png").read_bytes())
    (RESULTS / "k_ablation_digits.json").write_text(json.dumps({
        "command": "python benchmarks/k_ablation.py run && python benchmarks/k_ablation.py report",
        "steps": STEPS, "seeds": list(seeds), "sweep": data["sweep"], "runs": data["runs"], "digits_table": rows,
        "digits_table_md": table, "machine": platform.platform(), "cpu_count": os.cpu_count()}, indent=1))
    print(f"report: {index}\n\n{table}")


if __name__ == "__main__":
    main()
