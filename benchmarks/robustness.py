"""Robustness sweep: EMD-1 and EMD-K on a seeded family of random Gaussian mixtures the defaults were not tuned on.

    python benchmarks/robustness.py --out runs/robustness --workers 2                   # about an hour on 2 cores
    python benchmarks/robustness.py --out runs/robustness_old -- --z-step fixed --ema 0  # the defaults before
    python benchmarks/robustness.py --out runs/hardest --only 1 9 12 15 17 18 --K 1 8 --seeds 0 1 -- --steps 1500

The family (``family``): dimension 2-32, 4-40 modes, covariance condition numbers 1-50, separations from touching
(2 stds) to far apart (12 stds), Dirichlet weights; every mixture is normalised to unit data std. Each mixture x K x
seed is one `python -m emd_fast.train --mixture FILE` run with the defaults, except the budget options below (and
whatever follows ``--``). A run that stops with a non-finite or diverging value counts as a divergence.

Results: ``robustness.json`` (every run's final metrics, the exact-sample floor of every mixture) and
``robustness.md`` (per-mixture and aggregate tables, and EMD-K paired with EMD-1 mixture by mixture on mode TV, its
two parts, off-mode mass and on-mode weight TV (``weight_tv``), and energy distance). Targets: zero divergences;
EMD-8's mean mode TV and energy distance no worse than EMD-1's, and better on the hardest third (most modes, worst
conditioning); every mode with weight >= 1% covered in >= 95% of the runs. Beside the exact-sample floor (sampling
noise alone), each mixture's network floor: the same generator fitted to exact samples for the same number of steps
(``network_floor``), what the budget lets any objective reach. Runs whose summary.json exists are not repeated.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BUDGET = ["--steps", "300", "--batch", "128", "--teacher-fit-steps", "300", "--eval-every", "0",
          "--eval-samples", "2000", "--phase-every", "0", "--quiet", "--keep", "1"]
METRICS = ("mode_tv", "energy_distance", "mode_spread", "off_mode", "weight_tv")
PAIRED = {"mode_tv": "mode TV", "off_mode": "off-mode", "weight_tv": "on-mode weight TV",
          "energy_distance": "energy distance"}


def family(n: int, seed: int = 2026) -> list[dict]:
    """n mixture specifications (random_mixture's arguments), log-uniform in dimension, condition and separation."""
    g = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        specs.append(dict(seed=1000 + i, dim=int(round(2 ** g.uniform(1, 5))), modes=int(g.integers(4, 41)),
                          condition=float(np.exp(g.uniform(0, math.log(50)))),
                          separation=float(np.exp(g.uniform(math.log(2), math.log(12)))),
                          concentration=float(g.choice([0.5, 1.0, 3.0]))))
    return specs


def hardness(spec: dict) -> float:
    """Most modes and worst conditioning: the mean of both on a log scale over the family's ranges."""
    return math.log(spec["modes"] / 4) / math.log(10) + math.log(spec["condition"]) / math.log(50)


def write_mixture(spec: dict, path: Path) -> None:
    from emd_fast.schedules import VPCosine
    from emd_fast.teachers.mixture import random_mixture

    t = random_mixture(VPCosine(), **spec)
    path.write_text(json.dumps({"means": t.means.tolist(), "covs": t.covs.tolist(), "weights": t.weights.tolist()}))


def run_one(job: tuple) -> dict:
    import torch

    from emd_fast import train
    from emd_fast.training.checkpoint import list_checkpoints

    index, mixture, K, seed, out, extra = job
    torch.set_num_threads(1)
    run_dir = out / f"mix{index:02d}_K{K}_seed{seed}"
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        failed = run_dir / "failed.txt"
        if failed.is_file():
            return {"mixture": index, "K": K, "seed": seed, "diverged": True, "error": failed.read_text()}
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            resume = ["--resume"] if list_checkpoints(run_dir / "checkpoints") else []  # an interrupted sweep
            rc = train.main(["--mixture", str(mixture), "--K", str(K), "--seed", str(seed), "--out", str(run_dir),
                             *BUDGET, *extra, *resume])
        if rc != 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            failed.write_text(err.getvalue().strip())
            return {"mixture": index, "K": K, "seed": seed, "diverged": True, "error": err.getvalue().strip()}
    summary = json.loads(summary_path.read_text())
    return {"mixture": index, "K": K, "seed": seed, "diverged": False, **summary["final"],
            "floor": summary["exact_sample_floor"], "iters_per_s": summary["iters_per_s"]}


def network_floor(job: tuple) -> dict:
    """The same generator network fitted directly to exact teacher samples for the sweep's budget of steps
    (``capacity_floor.train_floor``: unbiased MMD, Adam at capacity_floor's LR, seed 0): what the network reaches in
    these steps when its objective is exact, i.e. how much of a mixture's error any distillation objective could
    remove."""
    import torch

    from emd_fast.train import build_parser

    from capacity_floor import LR, train_floor

    index, mixture, out, extra = job
    path = out / f"mix{index:02d}_network_floor.json"
    if not path.is_file():
        torch.set_num_threads(1)
        cfg = vars(build_parser().parse_args(["--mixture", str(mixture), "--seed", "0", *BUDGET, *extra,
                                              "--lr-g", str(LR)]))
        path.write_text(json.dumps(train_floor(cfg, "mmd", [cfg["steps"]])[cfg["steps"]]))
    return json.loads(path.read_text())


def covered_big_modes(result: dict, weights: list[float]) -> tuple[int, int]:
    """(modes with weight >= 1% that got >= 20% of their weight, modes with weight >= 1%)."""
    big = [i for i, w in enumerate(weights) if w >= 0.01]
    return sum(result["mode_weights"][i] >= 0.2 * weights[i] for i in big), len(big)


def weight_tv(metrics: dict, weights: list[float]) -> float:
    """Total variation between the weights of the on-mode samples, renormalised, and the true weights: mode TV
    without its off-mode bin, i.e. whether the mass that landed on modes is split between them correctly (1 when no
    sample is on a mode)."""
    on = sum(metrics["mode_weights"])
    if on == 0:
        return 1.0
    return 0.5 * sum(abs(f / on - w) for f, w in zip(metrics["mode_weights"], weights))


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3g} ± {sd:.2g}"


def per_mixture_means(results: list[dict], K: int, metric: str) -> dict[int, float]:
    """Mixture index -> the mean of ``metric`` over the seeds of EMD-K (mixtures where every run diverged left out)."""
    out: dict[int, list[float]] = {}
    for r in results:
        if r["K"] == K and not r["diverged"]:
            out.setdefault(r["mixture"], []).append(r[metric])
    return {i: statistics.mean(v) for i, v in out.items()}


def paired(results: list[dict], ks: list[int], hard: set[int]) -> list[str]:
    """EMD-K against EMD-1 mixture by mixture (means over seeds), per measure: on how many mixtures it is lower
    (better), the median difference, and the same over the hardest third."""
    lines = ["| K vs EMD-1 | measure | lower on | median diff. | hardest third: lower on |", "|---|---|---|---|---|"]
    for K in ks:
        if K == 1:
            continue
        for metric, name in PAIRED.items():
            base, other = per_mixture_means(results, 1, metric), per_mixture_means(results, K, metric)
            diff = {i: other[i] - base[i] for i in base.keys() & other.keys()}
            hard_diff = [d for i, d in diff.items() if i in hard]
            lines.append(f"| {K} | {name} | {sum(d < 0 for d in diff.values())}/{len(diff)} | "
                         + (f"{statistics.median(diff.values()):+.3g}" if diff else "–")
                         + f" | {sum(d < 0 for d in hard_diff)}/{len(hard_diff)} |")
    return lines


def report(specs: list[dict], weights: list[list[float]], results: list[dict], ks: list[int],
           net_floors: dict[int, dict]) -> str:
    """Markdown tables of the mixtures in ``net_floors`` (index -> its network floor's metrics): aggregate per K
    beside both floors, then one row per mixture. "Hardest third" is that of the whole family."""
    def with_weight_tv(metrics: dict, i: int) -> dict:
        return {**metrics, "weight_tv": weight_tv(metrics, weights[i])}

    results = [r if r["diverged"] else
               {**with_weight_tv(r, r["mixture"]), "floor": with_weight_tv(r["floor"], r["mixture"])} for r in results]
    net_floors = {i: with_weight_tv(f, i) for i, f in net_floors.items()}
    hard = set(sorted(range(len(specs)), key=lambda i: -hardness(specs[i]))[:len(specs) // 3]) & set(net_floors)
    lines = ["## Aggregate (mean ± std over mixtures x seeds; diverged runs excluded from the means)", "",
             "| K | runs | diverged | mode TV | energy distiller. | spread | off-mode | on-mode weight TV | "
             "big modes covered | hardest third: mode TV | hardest third: energy distiller. | it/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for K in ks:
        rs = [r for r in results if r["K"] == K]
        ok = [r for r in rs if not r["diverged"]]
        cov = [covered_big_modes(r, weights[r["mixture"]]) for r in ok]
        hits, total = sum(c for c, _ in cov), sum(t for _, t in cov)
        hard_ok = [r for r in ok if r["mixture"] in hard]
        lines.append(f"| {K} | {len(rs)} | {len(rs) - len(ok)} | " + " | ".join(
            mean_sd([r[m] for r in ok]) for m in METRICS) + f" | {hits}/{total} ({100 * hits / max(total, 1):.1f}%) | "
            + f"{mean_sd([r['mode_tv'] for r in hard_ok])} | {mean_sd([r['energy_distance'] for r in hard_ok])} | "
            + f"{mean_sd([r['iters_per_s'] for r in ok])} |")
    floors = {i: next((r["floor"] for r in results if r["mixture"] == i and not r["diverged"]), None)
              for i in net_floors}
    known = [f for f in floors.values() if f]
    cov = [covered_big_modes(f, weights[i]) for i, f in net_floors.items()]
    hits, total = sum(c for c, _ in cov), sum(t for _, t in cov)
    lines.append(f"| network floor (exact-sample fit, same steps) | {len(net_floors)} | – | " + " | ".join(
        mean_sd([f[m] for f in net_floors.values()]) for m in METRICS)
        + f" | {hits}/{total} ({100 * hits / max(total, 1):.1f}%) | "
        + f"{mean_sd([net_floors[i]['mode_tv'] for i in hard])} | "
        + f"{mean_sd([net_floors[i]['energy_distance'] for i in hard])} | – |")
    lines.append(f"| exact samples (floor) | {len(known)} | – | " + " | ".join(
        mean_sd([f[m] for f in known]) for m in METRICS) + " | – | – | – | – |")
    if 1 in ks and len(ks) > 1:
        lines += ["", "## Paired with EMD-1 (per mixture, means over seeds; lower is better)", "",
                  *paired(results, ks, hard)]
    lines += ["", "## Per mixture (mode TV / energy distance, mean over seeds; D diverged runs)", "",
              "| # | dim | modes | condition | separation | hard | " + " | ".join(f"EMD-{K}" for K in ks)
              + " | network floor | exact floor |", "|---" * (8 + len(ks)) + "|"]
    for i in net_floors:
        spec, cells = specs[i], []
        for K in ks:
            rs = [r for r in results if r["mixture"] == i and r["K"] == K]
            ok = [r for r in rs if not r["diverged"]]
            div = len(rs) - len(ok)
            cells.append((f"{statistics.mean(r['mode_tv'] for r in ok):.3f} / "
                          f"{statistics.mean(r['energy_distance'] for r in ok):.4f}" if ok else "–")
                         + (f" ({div}D)" if div else ""))
        f = floors[i]
        lines.append(f"| {i} | {spec['dim']} | {spec['modes']} | {spec['condition']:.1f} | {spec['separation']:.1f} | "
                     f"{'yes' if i in hard else ''} | " + " | ".join(cells)
                     + f" | {net_floors[i]['mode_tv']:.3f} / {net_floors[i]['energy_distance']:.4f}"
                     + (f" | {f['mode_tv']:.3f} / {f['energy_distance']:.4f} |" if f else " | – |"))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/robustness"))
    p.add_argument("--mixtures", type=int, default=20, help="size of the family")
    p.add_argument("--K", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", type=int, nargs="+", default=None, metavar="INDEX",
                   help="run these mixtures of the family only (e.g. the hardest third at a longer budget)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("extra", nargs=argparse.REMAINDER, help="options passed to every run (after --)")
    a = p.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    a.out.mkdir(parents=True, exist_ok=True)
    specs = family(a.mixtures)
    chosen = sorted(set(a.only)) if a.only else list(range(len(specs)))
    if not set(chosen) <= set(range(len(specs))):
        p.error(f"--only takes indices of the family, 0 to {len(specs) - 1}")
    files = []
    for i, spec in enumerate(specs):
        files.append(a.out / f"mixture{i:02d}.json")
        if not files[-1].is_file():
            write_mixture(spec, files[-1])
    weights = [json.loads(f.read_text())["weights"] for f in files]
    jobs = [(i, files[i], K, seed, a.out, extra) for i in chosen for K in a.K for seed in a.seeds]
    jobs.sort(key=lambda j: -j[2])  # longest first: better packing on the workers
    with ProcessPoolExecutor(a.workers) as pool:
        results = list(pool.map(run_one, jobs))
        net_floors = dict(zip(chosen, pool.map(network_floor, [(i, files[i], a.out, extra) for i in chosen])))
    results.sort(key=lambda r: (r["mixture"], r["K"], r["seed"]))
    table = report(specs, weights, results, a.K, net_floors)
    print(table)
    (a.out / "robustness.md").write_text(f"extra options: {extra or 'none'}; budget: {' '.join(BUDGET)}\n\n{table}\n")
    (a.out / "robustness.json").write_text(json.dumps({"budget": BUDGET, "extra": extra, "family": specs,
                                                       "results": results, "network_floors": net_floors},
                                                      indent=1))


if __name__ == "__main__":
    main()
