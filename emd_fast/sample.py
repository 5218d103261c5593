"""``python -m emd_fast.sample``: one-step samples from a distillation run: a PNG grid, a folder of PNGs, a .npz.

    python -m emd_fast.sample runs/digits_K4_seed0                         # 10 per class, a row per class
    python -m emd_fast.sample runs/digits_K4_seed0 --labels 3 3 7 --out three.png three.npz
    python -m emd_fast.sample runs/imagenet --n 50000 --out samples/        # one PNG per image, for FID tools
    python -m emd_fast.sample runs/ring2d_K8_seed0 --n 10000 --out ring.npz
    python -m emd_fast.sample runs/sd --prompt "a photo of a cat" --n 16 --out cats.png   # text-to-image run

The generator is rebuilt from the run's config.json and loaded from the newest checkpoint of the run directory, or
from the checkpoint JSON given; the EMA weights if the run keeps an EMA. A latent diffusers run's samples are decoded
by the teacher's VAE; in a text-to-image run the labels are the run's prompts (``--labels`` picks them by line
number among the non-blank lines), or ``--prompt`` gives a new one. Outputs by suffix: ``.png`` a grid (1- or
3-channel images), ``.npz`` ``images`` (N, *data_shape) float32 as generated (not clamped) and ``labels`` (N,) int64
(-1 for an unconditional run) — with ``--uint8`` instead ``arr_0`` (N, H, W, C) uint8, the layout of the
guided-diffusion FID evaluator —, and a path ending in ``/`` (or an existing directory) one PNG per image,
``000000.png`` on, which clean-fid, torch-fidelity and EDM's fid.py read.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cli import add_debug_flag, path_arg, run_as_process, run_command
from .evaluation.images import class_rows, is_image_shape, save_grid, save_png_folder, to_uint8
from .files import atomic_write, make_dirs, run_subdir
from .training.build import load_run
from .training.config import check_seed


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
    if args.per_class is not None or (args.n is None and 0 < num_classes <= 100):
        per = 10 if args.per_class is None else args.per_class
        if per < 1:
            raise ValueError(f"--per-class must be >= 1, got {per}")
        return torch.arange(num_classes).repeat_interleave(per), num_classes * per, per
    n = 100 if args.n is None else args.n
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    return None, n, None


def output_kind(path: str) -> str:
    """'folder' (a path ending in / or an existing directory), 'png' or 'npz'; ValueError otherwise."""
    if path.endswith("/") or Path(path).is_dir():
        return "folder"
    if Path(path).suffix in (".png", ".npz"):
        return Path(path).suffix[1:]
    raise ValueError(f"--out {path}: give a .png (grid), a .npz, or a folder (ending in /) for one PNG per image")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=path_arg, help="run directory (its newest checkpoint) or a checkpoint .json")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--labels", type=int, nargs="+", help="class label of each sample, e.g. --labels 3 3 7")
    which.add_argument("--per-class", type=int, help="N samples of every class, a row per class "
                                                     "(default for a run with at most 100 classes: 10)")
    which.add_argument("--n", type=int, help="number of samples, random labels (default otherwise: 100)")
    p.add_argument("--prompt", default=None,
                   help="text-to-image run: the prompt of every sample (encoded by the teacher's text encoder; "
                        "default --n 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of z (and of random labels)")
    p.add_argument("--out", nargs="+", default=None,
                   help="outputs: .png grid, .npz, and/or a folder/ of PNGs (default: <run>/samples/"
                        "onestep_step<S>_seed<seed>.png, .npz for non-image data)")
    p.add_argument("--uint8", action="store_true", help=".npz: arr_0 uint8 (N, H, W, C) instead of float images")
    p.add_argument("--batch", type=int, default=500, help="samples generated at a time")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return add_debug_flag(p)


def write_samples(args: argparse.Namespace) -> None:
    """Sample the run's (EMA) generator and write the outputs ``args`` names."""
    kinds = [output_kind(path) for path in args.out or ()]
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    check_seed(args.seed)
    run, step, ckpt = load_run(args.run, args.device)
    distiller = run.distiller
    decode = getattr(run.problem, "decode", None)  # diffusers runs: latents -> images by the VAE
    if args.prompt is not None:
        if args.labels is not None or args.per_class is not None:
            raise ValueError("--prompt gives every sample's prompt: leave out --labels/--per-class")
        if not hasattr(run.problem, "add_prompts"):
            raise ValueError("--prompt needs a text-to-image run (a diffusers teacher with --prompts)")
        n, per_class = 16 if args.n is None else args.n, None
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        labels = run.problem.add_prompts([args.prompt]).expand(n)
    else:
        labels, n, per_class = choose_labels(args, distiller.num_classes)
    image = is_image_shape(distiller.shape) or decode is not None
    outs = args.out or [str(run_subdir(ckpt.parent.parent / "samples") / f"onestep_step{step}_seed{args.seed}"
                                                                         f"{'.png' if image else '.npz'}")]
    kinds = kinds or [output_kind(outs[0])]
    outs = [Path(p) for p in outs]
    if not image and any(k != "npz" for k in kinds):
        raise ValueError(f"PNG output needs 1- or 3-channel images; this run's samples have shape {distiller.shape}: "
                         f"use .npz")
    if args.uint8 and not image:
        raise ValueError(f"--uint8 writes images as 8-bit pixels; this run's samples have shape {distiller.shape}: "
                         f"leave it out")
    x, y = distiller.sample(n, torch.Generator(distiller.device).manual_seed(args.seed), labels, chunk=args.batch)
    x = x.cpu() if decode is None else decode(x)
    y = torch.full((n,), -1) if y is None or args.prompt is not None else y.cpu()
    for path, kind in zip(outs, kinds):
        if kind == "npz":
            make_dirs(path.parent)
            arrays = {"arr_0": to_uint8(x)} if args.uint8 else {"images": x.numpy()}
            with atomic_write(path) as f:
                np.savez(f, **arrays, labels=y.numpy())
        elif kind == "folder":
            for i in tqdm(range(0, n, 1000), desc="PNG", unit="k", disable=n <= 1000):
                save_png_folder(path, x[i:i + 1000], start=i)
        elif per_class:
            save_grid(path, class_rows(x, y, per_class, distiller.num_classes), per_class,
                      f"one-step samples, step {step}")
        else:
            save_grid(path, x, min(n, max(10, round(math.sqrt(n)))), f"one-step samples, step {step}")
        print(f"wrote {path} ({n} samples from {ckpt})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(write_samples, args, oom_hint="lower --batch (or --n)")


def console() -> None:
    """The ``emd-sample`` console script: ``python -m emd_fast.sample``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
