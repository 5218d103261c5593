"""What the E-step changes: EMD-K's M-step gradient against EMD-1's on a run's checkpoint, per noise level.

    python benchmarks/estep_effect.py runs/ring2d_K8_seed0 --K 8
    python benchmarks/estep_effect.py runs/ring2d_K8_seed0 --K 4 16 --bins 4 --out effect.json

The run's generator and student as checkpointed, its configuration except K. On one large batch (``--samples``) with
the same z, eps, t and Langevin noise for every K, in ``--bins`` noise-level bins of equal size: the cosine between
EMD-K's and EMD-1's generator gradients, their norm ratio, and the ratio of the M-step residuals |eps_K - eta_K| /
|eps_1 - eta_1|. Over ``--batches`` independent batches of the run's batch size: the gradient's signal-to-noise
ratio |E g|^2 / E|g|^2 for each K (unbiased estimates of both; Adam divides the gradient's scale out, its step along
the mean direction grows with this ratio). A cosine near 1 and equal ratios in every bin mean that EMD-K takes
EMD-1's step with less noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from emd_fast.emd import EMD, EStep
from emd_fast.errors import CheckpointError, RunError
from emd_fast.execution.backends import NetworkCall
from emd_fast.ops import ReferenceOps
from emd_fast.training.build import Run, load_run


def rows(es: EStep, index: torch.Tensor) -> EStep:
    """The E-step's examples ``index``."""
    return EStep(**{f.name: None if getattr(es, f.name) is None else getattr(es, f.name)[index]
                    for f in dataclasses.fields(EStep)})


class Effect:
    """The run's networks and EMD configuration with any K. ``seed`` fixes the inputs and the Langevin noise."""

    def __init__(self, run: Run, seed: int = 0):
        self.dist, self.seed = run.distiller, seed
        self.params = list(self.dist.generator.parameters())

    def emd(self, K: int, noise_seed: int) -> EMD:
        d = self.dist
        return EMD(d.teacher, d.generator, d.student, dataclasses.replace(d.cfg, K=K),
                   ReferenceOps(torch.Generator(d.device).manual_seed(noise_seed)), d.emd.sigma_data,
                   call=NetworkCall(check=False))

    def inputs(self, n: int, g: torch.Generator):
        """z, eps (n, ...), t (n,) as the run draws them, labels (n,) or None."""
        d = self.dist
        z, y = d.sample_inputs(n, g)
        eps = torch.randn(z.shape, generator=g, device=d.device)
        return z, eps, d.teacher.schedule.sample_t(n, g, d.device, d.cfg.t_min, d.cfg.t_max), y

    def gradient(self, emd: EMD, es: EStep, y) -> torch.Tensor:
        """The generator's M-step gradient, flattened."""
        return torch.cat([g.flatten() for g in torch.autograd.grad(emd.generator_loss(es, y), self.params)])

    def per_noise_level(self, K: int, n: int, bins: int) -> list[dict]:
        """EMD-K against EMD-1 on the same n examples, in ``bins`` noise-level bins (by t, equal counts), then over
        all of them (the last row)."""
        z, eps, t, y = self.inputs(n, torch.Generator(self.dist.device).manual_seed(self.seed))
        emds = {k: self.emd(k, self.seed + 1) for k in (1, K)}
        steps = {k: emd.e_step(z, eps, t, y) for k, emd in emds.items()}
        out = []
        for part in [*torch.tensor_split(torch.argsort(t), bins), torch.arange(n)]:  # the bins, then all
            y_part = None if y is None else y[part]
            g = {k: self.gradient(emds[k], rows(steps[k], part), y_part) for k in emds}
            r = {k: (es.eps[part] - (0 if es.eta is None else es.eta[part])).flatten(1).norm(dim=1).mean()
                 for k, es in steps.items()}
            out.append({"t_from": float(t[part].min()), "t_to": float(t[part].max()),
                        "cosine": float(torch.nn.functional.cosine_similarity(g[K], g[1], dim=0)),
                        "gradient_ratio": float(g[K].norm() / g[1].norm()), "residual_ratio": float(r[K] / r[1])})
        return out

    def signal_to_noise(self, K: int, batch: int, batches: int) -> float:
        """|E g|^2 / E|g|^2 of EMD-K's generator gradient over ``batches`` independent batches of ``batch``."""
        g = torch.Generator(self.dist.device).manual_seed(self.seed + 2)
        grads = []
        for i in range(batches):
            z, eps, t, y = self.inputs(batch, g)
            emd = self.emd(K, self.seed + 3 + i)
            grads.append(self.gradient(emd, emd.e_step(z, eps, t, y), y))
        grads = torch.stack(grads)
        mean = grads.mean(0)
        noise = (grads - mean).square().sum(1).sum() / (batches - 1)  # E|g - E g|^2, unbiased
        return float((mean.square().sum() - noise / batches) / grads.square().sum(1).mean())  # |E g|^2 unbiased


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--K", type=int, nargs="+", default=[8], help="the K to compare with EMD-1")
    p.add_argument("--samples", type=int, default=4096, help="examples of the per-noise-level comparison")
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--batches", type=int, default=32, help="batches of the signal-to-noise estimate (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the numbers as JSON")
    a = p.parse_args(argv)
    if a.batches < 2 or a.bins < 1 or a.samples < a.bins:
        p.error("--batches must be >= 2, --bins >= 1 and --samples >= --bins")
    try:
        run = load_run(a.run, a.device, training_state=True)[0]  # generator and student as they trained
    except (CheckpointError, RunError) as e:
        p.error(str(e))
    effect, batch = Effect(run, a.seed), run.cfg["batch"]
    result = {"run": str(a.run),
              "snr": {K: effect.signal_to_noise(K, batch, a.batches) for K in dict.fromkeys((1, *a.K))},
              "per_noise_level": {K: effect.per_noise_level(K, a.samples, a.bins) for K in a.K}}
    print(f"gradient signal-to-noise |E g|^2 / E|g|^2 over {a.batches} batches of {batch}: "
          + ", ".join(f"EMD-{K} {v:.3f}" for K, v in result["snr"].items()))
    for K, bins in result["per_noise_level"].items():
        print(f"\nEMD-{K} against EMD-1 ({a.samples} examples)\n| t | gradient cosine | gradient norm ratio | "
              "residual norm ratio |\n|---|---|---|---|")
        for b in bins:
            where = f"{b['t_from']:.3g}-{b['t_to']:.3g}" + (" (all)" if b is bins[-1] else "")
            print(f"| {where} | {b['cosine']:.3f} | {b['gradient_ratio']:.2f} | "
                  f"{b['residual_ratio']:.2f} |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
