"""``python -m emd_fast.sample``: one-step samples from a distillation run's generator, to a PNG grid and/or a .npz.

    python -m emd_fast.sample runs/digits_K4_seed0                         # 10 per class, a row per class
    python -m emd_fast.sample runs/digits_K4_seed0 --labels 3 3 7 --out three.png three.npz
    python -m emd_fast.sample runs/digits_K4_seed0/checkpoints/step_0000300.json --n 5000 --out s.npz
    python -m emd_fast.sample runs/ring2d_K8_seed0 --n 10000 --out ring.npz

The generator is rebuilt from the run's config.json (the problem's teacher network at lambda*) and loaded from the
newest checkpoint of the run directory, or from the checkpoint JSON given. The .npz holds ``images`` (N, *data_shape)
float32 as generated (not clamped) and ``labels`` (N,) int64 (-1 for an unconditional run). PNG grids are drawn for
1-channel images, in [-1, 1].
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from . import train
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_state_dict_strict
from .digits import class_rows, save_grid


def find_checkpoint(path: Path) -> Path:
    """The checkpoint JSON ``path`` (or the one beside its .safetensors), or the newest in the run directory ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        return path.with_suffix(".json")
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise CheckpointError(f"no checkpoint in {path / 'checkpoints'}")
    return found[-1]


def load_run(path: Path, device) -> tuple[train.Run, int, Path]:
    """(Run rebuilt from the run's config.json with the checkpoint's generator loaded, its step, the checkpoint)."""
    ckpt = find_checkpoint(Path(path))
    tensors, state = load_checkpoint(ckpt)
    config_path = ckpt.parent.parent / "config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the run's config {config_path}: {e}") from None
    if {k: cfg.get(k) for k in state.get("config", {})} != state.get("config"):
        raise CheckpointError(f"{ckpt} was written by another config than {config_path}")
    run = train.Run(cfg, torch.device(device), fit_teacher=False)
    load_state_dict_strict(run.distiller.generator, tensors, "generator.", ckpt)
    run.distiller.generator.eval()
    return run, state["step"], ckpt


@torch.no_grad()
def generate(run: train.Run, labels: torch.Tensor | None, n: int, seed: int,
             chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n one-step samples (n, *data_shape) fp32 (CPU) for ``labels`` (n,) or, for a class-conditional run given
    None, uniform random labels; z and random labels come from one generator seeded with ``seed``."""
    dist = run.distiller
    rng = torch.Generator(dist.device).manual_seed(seed)
    z = torch.randn((n, *dist.shape), generator=rng, device=dist.device)
    if labels is None and dist.num_classes:
        labels = torch.randint(dist.num_classes, (n,), generator=rng, device=dist.device)
    y = labels.to(dist.device) if labels is not None else None
    x = torch.cat([dist.generator(z[i:i + chunk], None if y is None else y[i:i + chunk]).float().cpu()
                   for i in range(0, n, chunk)])
    return x, None if labels is None else labels.cpu()


def choose_labels(args, num_classes: int) -> tuple[torch.Tensor | None, int, int | None]:
    """(labels or None, n, samples per class for a row-per-class grid or None) from --labels / --per-class / --n;
    ValueError when they do not fit the run."""
    if (args.labels is not None or args.per_class is not None) and not num_classes:
        raise ValueError("--labels/--per-class need a class-conditional run; this one is unconditional (use --n)")
    if args.labels is not None:
        labels = torch.tensor(args.labels, dtype=torch.int64)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {args.labels}")
        return labels, len(labels), None
    if args.per_class is not None or (args.n is None and num_classes):
        per = 10 if args.per_class is None else args.per_class
        if per < 1:
            raise ValueError(f"--per-class must be >= 1, got {per}")
        return torch.arange(num_classes).repeat_interleave(per), num_classes * per, per
    n = 100 if args.n is None else args.n
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    return None, n, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=Path, help="run directory (its newest checkpoint) or a checkpoint .json")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--labels", type=int, nargs="+", help="class label of each sample, e.g. --labels 3 3 7")
    which.add_argument("--per-class", type=int, help="N samples of every class, a row per class "
                                                     "(default for a class-conditional run: 10)")
    which.add_argument("--n", type=int, help="number of samples, random labels (default for an unconditional run: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of z (and of random labels)")
    p.add_argument("--out", type=Path, nargs="+", default=None,
                   help="output files, .png (grid) and/or .npz (default: <run>/samples/onestep_step<S>_seed<seed>.png, "
                        ".npz for non-image data)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        for path in args.out or ():
            if path.suffix not in (".png", ".npz"):
                raise ValueError(f"--out {path}: the suffix must be .png or .npz")
        run, step, ckpt = load_run(args.run, device)
        shape, num_classes = run.distiller.shape, run.distiller.num_classes
        labels, n, per_class = choose_labels(args, num_classes)
        is_image = len(shape) == 3 and shape[0] == 1
        suffix = ".png" if is_image else ".npz"
        outs = args.out or [ckpt.parent.parent / "samples" / f"onestep_step{step}_seed{args.seed}{suffix}"]
        if any(p.suffix == ".png" for p in outs) and not is_image:
            raise ValueError(f"PNG grids need 1-channel images; this run's samples have shape {shape}: use .npz")
        x, y = generate(run, labels, n, args.seed)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            np.savez(path, images=x.numpy(), labels=(y if y is not None else torch.full((n,), -1)).numpy())
        elif per_class:
            save_grid(path, class_rows(x, y, per_class, num_classes), per_class, f"one-step samples, step {step}")
        else:
            save_grid(path, x, min(n, max(10, round(math.sqrt(n)))), f"one-step samples, step {step}")
        print(f"wrote {path} ({n} samples from {ckpt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
