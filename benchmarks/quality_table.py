"""Distillation quality on the embedded mixture: EMD-K, noise cancellation, sampling variants, over several seeds.

    python benchmarks/quality_table.py --out runs/quality --seeds 0 1 2 --workers 2

Each configuration x seed is one `python -m emd_fast.train` run (skipped if its summary.json exists, so an
interrupted sweep continues). Prints a markdown table of mean +- std over seeds and writes quality_table.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# name -> CLI overrides; everything else is the train CLI's default
CONFIGS = {
    "EMD-1 (eps,.) cancel (Diff-Instruct)": ["--K", "1", "--variant", "eps"],
    "EMD-1 (eps,z) cancel": ["--K", "1"],
    "EMD-4 (eps,z) cancel": ["--K", "4"],
    "EMD-8 (eps,z) cancel": ["--K", "8"],
    "EMD-16 (eps,z) cancel": ["--K", "16"],
    "EMD-8 (eps,z) no cancel": ["--K", "8", "--no-cancel-noise"],
    "EMD-8 (x,z) cancel": ["--K", "8", "--variant", "x,z"],
    "EMD-8, fixed z step": ["--K", "8", "--z-step", "fixed"],
    "EMD-8, no EMA": ["--K", "8", "--ema", "0"],
    "EMD-1, no EMA": ["--K", "1", "--ema", "0"],
    "EMD-8, fixed z step, no EMA (the defaults before)": ["--K", "8", "--z-step", "fixed", "--ema", "0"],
    "EMD-8 (eps,z) cancel, bf16 networks": ["--K", "8", "--precision", "bf16"],
    "EMD-8 (eps,z) cancel, deferred checks (fused Adam)": ["--K", "8", "--finite-check", "deferred"],
}
METRICS = ("modes_covered", "mode_tv", "off_mode", "mode_spread", "energy_distance", "mean_loglik")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_one(job: tuple[str, list[str], int, Path, list[str]]) -> tuple[str, int, dict]:
    import torch

    from emd_fast import train
    from emd_fast.training.checkpoint import list_checkpoints

    name, args, seed, out, extra = job
    torch.set_num_threads(1)
    run_dir = out / f"{_slug(name)}_seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        resume = ["--resume"] if list_checkpoints(run_dir / "checkpoints") else []  # an interrupted sweep
        if train.main(["--out", str(run_dir), "--seed", str(seed), "--quiet", *args, *extra, *resume]) != 0:
            raise RuntimeError(f"run {run_dir} failed")
    return name, seed, json.loads(summary_path.read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="configurations: exact names, or substrings")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="options passed to every run (after --)")
    a = p.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    configs = {k: v for k, v in CONFIGS.items() if not a.only or any(s == k or s not in CONFIGS and s in k
                                                                     for s in a.only)}
    jobs = [(name, args, seed, a.out, extra) for name, args in configs.items() for seed in a.seeds]
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with ProcessPoolExecutor(a.workers) as pool:
        for name, seed, summary in pool.map(run_one, jobs):
            results[name].append({"seed": seed, **summary["final"], "iters_per_s": summary["iters_per_s"]})
    floor = summary["exact_sample_floor"]
    rows = ["| configuration | modes covered | mode TV | off-mode | spread | energy distiller. | mean log-lik | it/s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        cells = []
        for m in METRICS + ("iters_per_s",):
            vals = [r[m] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.3g} ± {sd:.2g}")
        covered = "/".join(str(r["modes_covered"]) for r in runs)
        rows.append(f"| {name} | {covered} | " + " | ".join(cells[1:]) + " |")
    rows.append(f"| exact teacher samples (floor) | {floor['modes_covered']} | {floor['mode_tv']:.3g} | "
                f"{floor['off_mode']:.3g} | {floor['mode_spread']:.3g} | {floor['energy_distance']:.3g} | "
                f"{floor['mean_loglik']:.3g} | |")
    table = "\n".join(rows)
    print(f"seeds {a.seeds}; modes covered listed per seed\n\n{table}")
    (a.out / "quality_table.json").write_text(json.dumps({"seeds": a.seeds, "extra": extra, "results": results,
                                                          "floor": floor, "table": table}, indent=1))


if __name__ == "__main__":
    main()
