"""Capacity floor: the EMD generator network trained directly on exact teacher samples.

    python benchmarks/capacity_floor.py --seeds 0 1 2                      # ring2d, EMD's budget and 4x longer
    python benchmarks/capacity_floor.py --mixture my.json --steps 6000

The same generator as a `python -m emd_fast.train` run with the same options (the teacher-fit MLP read at lambda*,
the same EMA), trained with Adam to minimise a two-sample distance between a batch of its samples and a batch of
exact teacher samples: MMD^2 with a sum of Gaussian kernels (``--loss mmd``, bandwidths geometric over
[0.01, 2] x sqrt(D) x data std) or the energy distance (``--loss energy``), both unbiased. Its gradients are exact in
expectation, so the result says what the network can reach at a step budget: how much of EMD's off-mode mass and
within-mode spread is the objective and how much the network. Metrics of the EMA generator (what EMD reports) are
printed at ``--report`` steps and written to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from pathlib import Path

import torch

from emd_fast.problems import init_networks
from emd_fast.training.build import make_problem
from emd_fast.training.distiller import ema_update

METRICS = ("modes_covered", "mode_tv", "off_mode", "mode_spread", "energy_distance")
LR = 1e-3  # Adam learning rate of the direct fit (--lr)


def pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None] - b[None]).pow(2).sum(-1)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of samples x (N, D), y (M, D) with k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))."""
    def gram(a, b):
        return torch.exp(-pairwise(a, b)[..., None] / (2 * bandwidths**2)).sum(-1)

    n, m, k = x.shape[0], y.shape[0], bandwidths.numel()
    return ((gram(x, x).sum() - n * k) / (n * (n - 1)) + (gram(y, y).sum() - m * k) / (m * (m - 1))
            - 2 * gram(x, y).mean())


def energy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| of samples x (N, D), y (M, D)."""
    def distiller(a, b):
        return (pairwise(a, b) + 1e-12).sqrt()

    n, m = x.shape[0], y.shape[0]
    return 2 * distiller(x, y).mean() - distiller(x, x).sum() / (n * (n - 1)) - distiller(y, y).sum() / (m * (m - 1))


def train_floor(cfg: dict, loss: str, report: list[int]) -> dict[int, dict]:
    """Metrics of the EMA generator at each step in ``report`` (cfg: the train CLI's options as a dict)."""
    problem = make_problem(cfg)
    teacher = problem.teacher
    torch.manual_seed(cfg["seed"])
    net, _ = problem.teacher_network(torch.device("cpu"), fit=True)
    gen = init_networks(net, teacher.schedule.t_at_lambda(cfg["lambda_star"]))[0]
    ema = copy.deepcopy(gen).requires_grad_(False).eval()
    opt = torch.optim.Adam(gen.parameters(), lr=cfg["lr_g"], betas=tuple(cfg["betas_g"]))
    rng = torch.Generator().manual_seed(cfg["seed"])
    bandwidths = torch.logspace(-2, math.log10(2), 8) * math.sqrt(teacher.dim) * problem.sigma_data
    z_eval = torch.randn(cfg["eval_samples"], teacher.dim, generator=torch.Generator().manual_seed(cfg["seed"] + 3))
    out = {}
    for step in range(1, max(report) + 1):
        x = gen(torch.randn(cfg["batch"], teacher.dim, generator=rng))
        y, _ = teacher.sample(cfg["batch"], rng)
        value = mmd(x, y, bandwidths) if loss == "mmd" else energy(x, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        ema_update(ema, gen, step * cfg["batch"], cfg["batch"], cfg["ema"], cfg["ema_rampup"])
        if step in report:
            with torch.no_grad():
                out[step] = problem.metrics(ema(z_eval))
    return out


def main(argv=None) -> None:
    from emd_fast.train import build_parser

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=("mmd", "energy"), default="mmd")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--report", type=int, nargs="+", default=[1500, 6000], help="steps at which to report")
    p.add_argument("--lr", type=float, default=LR, help="Adam learning rate of the direct fit")
    p.add_argument("--out", type=Path, default=None, help="results JSON")
    a, rest = p.parse_known_args(argv)
    torch.set_num_threads(1)
    train_parser = build_parser()
    rows = {}
    for seed in a.seeds:
        cfg = vars(train_parser.parse_args([*rest, "--seed", str(seed), "--lr-g", str(a.lr)]))
        cfg["preset"] = cfg["preset"] or (None if cfg["mixture"] else "ring2d")
        rows[seed] = train_floor(cfg, a.loss, sorted(a.report))
        floor = make_problem(cfg).floor()
    lines = [f"capacity floor ({a.loss}, lr {a.lr}, seeds {a.seeds}; EMA generator; mean ± std)", "",
             "| steps | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for step in sorted(a.report):
        cells = []
        for m in METRICS:
            vals = [rows[s][step][m] for s in a.seeds]
            cells.append(f"{statistics.mean(vals):.3g} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2g}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("| exact samples | " + " | ".join(f"{floor[m]:.3g}" for m in METRICS) + " |")
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"loss": a.loss, "lr": a.lr, "options": rest, "results": rows,
                                     "exact_samples": floor, "table": "\n".join(lines)}, indent=1))


if __name__ == "__main__":
    main()
