"""Where EMD-K training settles when the generator cannot represent the teacher.

    python benchmarks/fixed_points.py --out benchmarks/results/fixed_points      # writes .md and .json

A 1-D Gaussian generator g(z) = s z, a teacher with two modes at +-sep of std w (equal weights), an exact student
(the generator's own noisy law, no lag). The two classical fits are known: maximum likelihood (the forward KL, at
every noise level) is the moment match s = sqrt(sep^2 + w^2); the mode-seeking reverse KL is narrower. For each K
and sampling variant the script finds the s at which the expected M-step gradient dL/ds vanishes, i.e. where
training settles: bisection on common random numbers (the same z, eps, t and Langevin noise at every s, so the
estimated gradient is a smooth function of s). EMD-1 with z fixed is Diff-Instruct, the integrated reverse KL.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from emd_fast.emd import EMD, EMDConfig
from emd_fast.execution.backends import NetworkCall
from emd_fast.ops import ReferenceOps
from emd_fast.schedules import VPCosine
from emd_fast.teachers.mixture import GaussianMixtureTeacher


class Scale(nn.Module):
    """The generator g(z) = s z: (N, 1) -> (N, 1)."""

    def __init__(self, s: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s)))

    def forward(self, z: torch.Tensor, y=None) -> torch.Tensor:
        return self.s * z


def mean_gradient(s: float, K: int, variant: str, teacher, n: int, seed: int) -> float:
    """E[dL/ds] of the M-step loss after a K-step E-step, at generator scale s (n samples; the seed fixes them)."""
    schedule = teacher.schedule
    generator = Scale(s)
    own_law = GaussianMixtureTeacher(torch.zeros(1, 1), torch.tensor([s * s]), [1.0], schedule)

    def student(x_t, t, y=None):
        return own_law.denoise(x_t, t)

    g = torch.Generator().manual_seed(seed)
    z, eps, t = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g), schedule.sample_t(n, g, "cpu")
    emd = EMD(teacher, generator, student, EMDConfig(K=K, variant=variant),
              ReferenceOps(torch.Generator().manual_seed(seed + 1)), call=NetworkCall(check=False))
    loss = emd.generator_loss(emd.e_step(z, eps, t))
    return float(torch.autograd.grad(loss, generator.s)[0])


def fixed_point(K: int, variant: str, teacher, lo: float, hi: float, n: int, seed: int, tol: float = 1e-3):
    """The s in [lo, hi] where E[dL/ds] changes sign (None if it does not change sign there)."""
    f_lo, f_hi = (mean_gradient(s, K, variant, teacher, n, seed) for s in (lo, hi))
    if not (f_lo < 0 < f_hi):
        return None
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if mean_gradient(mid, K, variant, teacher, n, seed) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--variants", nargs="+", default=["eps,z", "eps"])
    p.add_argument("--sep", type=float, default=2.0, help="the modes' distance from the origin")
    p.add_argument("--width", type=float, default=0.3, help="the modes' standard deviation")
    p.add_argument("--samples", type=int, default=1 << 18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("fixed_points"), help="writes OUT.md and OUT.json")
    a = p.parse_args(argv)
    if not (a.width > 0 and a.sep >= 0 and a.samples >= 2 and min(a.K) >= 1):
        p.error("--width must be > 0, --sep >= 0, --samples >= 2 and every --K >= 1")
    torch.set_num_threads(1)
    teacher = GaussianMixtureTeacher(torch.tensor([[-a.sep], [a.sep]]), torch.full((2,), a.width**2), torch.ones(2),
                                     VPCosine())
    mle = math.sqrt(a.sep**2 + a.width**2)
    rows = [{"K": K, "variant": v, "s": fixed_point(K, v, teacher, a.width / 2, 1.5 * mle, a.samples, a.seed)}
            for v in a.variants for K in a.K]
    lines = [f"# Where EMD-K settles: a Gaussian generator g(z) = s z on two modes at +-{a.sep} of std {a.width}", "",
             f"Exact student; {a.samples} samples per gradient, seed {a.seed}; `python benchmarks/fixed_points.py`.",
             f"Maximum likelihood (forward KL): s = {mle:.3f}; one mode: s = {a.width}.", "",
             "| variant | " + " | ".join(f"EMD-{K}" for K in a.K) + " |", "|---|" + "---|" * len(a.K)]
    for v in a.variants:
        cells = [next(r["s"] for r in rows if r["K"] == K and r["variant"] == v) for K in a.K]
        lines.append(f"| {v} | " + " | ".join("–" if s is None else f"{s:.3f}" for s in cells) + " |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps({"sep": a.sep, "width": a.width, "samples": a.samples,
                                                      "seed": a.seed, "maximum_likelihood": mle, "rows": rows},
                                                     indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
