"""PNG figures of a run: generator samples over the teacher's density, mode weights, and the metric curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .images import save_figure  # noqa: E402
from .teachers import GaussianMixtureTeacher  # noqa: E402


def _projection(teacher: GaussianMixtureTeacher) -> torch.Tensor:
    """(D, 2): identity for 2-D data, else the top-2 principal directions of the mode means."""
    if teacher.dim == 2:
        return torch.eye(2, dtype=torch.float64)
    centred = teacher.means - teacher.means.mean(0)
    return torch.linalg.svd(centred, full_matrices=False).Vh[:2].T


def plot_run(path: Path, samples: torch.Tensor, exact: torch.Tensor, teacher: GaussianMixtureTeacher,
             metrics: dict, history: list[dict], title: str) -> None:
    """Write a 3-panel PNG. samples, exact: (N, D) generator and exact teacher samples."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    proj = _projection(teacher)
    gen = samples.detach().double().cpu() @ proj
    ref = exact.double().cpu() @ proj
    ax = axes[0]
    if teacher.dim == 2:
        lo, hi = ref.min(0).values - 0.5, ref.max(0).values + 0.5
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200, dtype=torch.float64),
                                torch.linspace(lo[1], hi[1], 200, dtype=torch.float64), indexing="xy")
        logp = teacher.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1)).reshape(gx.shape)
        ax.contourf(gx, gy, logp.clamp(min=-12), levels=30, cmap="Blues")
        ax.set_title("generator samples over the teacher log-density")
    else:
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:blue", label="teacher (exact)")
        ax.set_title(f"PCA projection of {teacher.dim}-D samples")
    ax.scatter(gen[:, 0], gen[:, 1], s=2, alpha=0.5, c="tab:red", label="generator (one step)")
    ax.legend(loc="upper right", markerscale=4)
    ax.set_aspect("equal", adjustable="datalim")

    ax = axes[1]
    idx = torch.arange(teacher.num_modes)
    ax.bar(idx - 0.2, teacher.weights.tolist(), width=0.4, label="true")
    ax.bar(idx + 0.2, metrics["mode_weights"], width=0.4, label="generator")
    ax.set_xlabel("mode")
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
