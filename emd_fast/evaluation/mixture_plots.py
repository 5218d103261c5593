"""PNG figures of a run: generator samples over the teacher's density, mode weights, and the metric curves."""
from __future__ import annotations

from pathlib import Path

import torch

from ..teachers.mixture import GaussianMixtureTeacher
from .images import figure, save_figure


def _projection(teacher: GaussianMixtureTeacher) -> torch.Tensor:
    """(D, 2) orthonormal directions to draw D >= 3 dimensional samples along: the top principal directions of the
    weighted mode means, completed (one mode, collinear means) by those of the mixture's average covariance."""
    w = teacher.weights
    centred = w.sqrt()[:, None] * (teacher.means - (w[:, None] * teacher.means).sum(0))
    between, within = centred.T @ centred, (w[:, None, None] * teacher.covs).sum(0)
    scale = float(torch.trace(between)) or 1.0
    directions = torch.linalg.eigh(between + 1e-6 * scale / float(torch.trace(within)) * within).eigenvectors
    return directions[:, -2:].flip(1)


def _draw_samples(ax, gen: torch.Tensor, ref: torch.Tensor, teacher: GaussianMixtureTeacher) -> None:
    """Generator samples against the teacher: over its log-density (2-D), as a histogram over its density (1-D),
    or both projected on two principal directions (D >= 3). gen, ref: (N, D) float64."""
    if teacher.dim == 1:
        lo, hi = float(ref.min()) - 0.5, float(ref.max()) + 0.5
        grid = torch.linspace(lo, hi, 400, dtype=torch.float64)[:, None]
        ax.hist(gen[:, 0].numpy(), bins=100, range=(lo, hi), density=True, alpha=0.5, color="tab:red",
                label="generator (one step)")
        ax.plot(grid[:, 0].numpy(), teacher.log_prob(grid).exp().numpy(), c="tab:blue", label="teacher density")
        ax.set_title("generator samples against the teacher density")
        ax.legend(loc="upper right")
        return
    if teacher.dim == 2:
        lo, hi = ref.min(0).values - 0.5, ref.max(0).values + 0.5
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200, dtype=torch.float64),
                                torch.linspace(lo[1], hi[1], 200, dtype=torch.float64), indexing="xy")
        logp = teacher.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(gx.shape)
        ax.contourf(gx, gy, logp.clamp(min=-12), levels=30, cmap="Blues")
        ax.set_title("generator samples over the teacher log-density")
    else:
        proj = _projection(teacher)
        gen, ref = gen @ proj, ref @ proj
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:blue", label="teacher (exact)")
        ax.set_title(f"{teacher.dim}-D samples on two principal directions")
    ax.scatter(gen[:, 0], gen[:, 1], s=2, alpha=0.5, c="tab:red", label="generator (one step)")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_aspect("equal", adjustable="datalim")


def plot_run(path: Path, samples: torch.Tensor, exact: torch.Tensor, teacher: GaussianMixtureTeacher,
             metrics: dict, history: list[dict], title: str) -> None:
    """Write a 3-panel PNG. samples, exact: (N, D) generator and exact teacher samples."""
    from matplotlib.ticker import MaxNLocator  # with the figure, as images.figure imports matplotlib

    fig = figure((16, 5))
    axes = fig.subplots(1, 3)
    _draw_samples(axes[0], samples.detach().double().cpu(), exact.double().cpu(), teacher)

    ax = axes[1]
    idx = torch.arange(teacher.num_modes)
    ax.bar(idx - 0.2, teacher.weights.tolist(), width=0.4, label="true")
    ax.bar(idx + 0.2, metrics["mode_weights"], width=0.4, label="generator")
    ax.set_xlabel("mode")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # mode indices, not fractions of one
    ax.set_ylabel("weight")
    ax.set_title(f"modes covered {metrics['modes_covered']}/{metrics['num_modes']}, TV {metrics['mode_tv']:.3f}")
    ax.legend()

    ax = axes[2]
    evals = [h for h in history if "mode_tv" in h]
    if evals:
        steps = [h["step"] for h in evals]
        ax.plot(steps, [h["mode_tv"] for h in evals], label="mode TV")
        ax.plot(steps, [h["energy_distance"] for h in evals], label="energy distance")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend()
    ax.set_title("metrics during training")
    save_figure(fig, path, title, dpi=90)
