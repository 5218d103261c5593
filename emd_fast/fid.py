"""``python -m emd_fast.fid``: FID of a run's one-step generator, or reference statistics from real images.

    python -m emd_fast.fid calc runs/imagenet --inception inception-2015-12-05.pt --ref imagenet-64x64.npz
    python -m emd_fast.fid ref real_images/ my-ref.npz --inception inception-2015-12-05.pt

``calc`` generates --n images (EDM reports FID on 50,000) with the run's EMA generator (the newest checkpoint, or the
checkpoint JSON given) and compares their Inception-v3 pool features with the reference statistics (EDM's format: an
.npz with ``mu`` and ``sigma``); it prints the FID and writes it to ``<run>/fid_step<S>.json``. ``ref`` computes such
statistics from a folder of PNG/JPEG images or an .npz (``arr_0`` uint8 (N, H, W, C) or ``images`` float in [-1, 1]).
The Inception network is the TorchScript file ``inception-2015-12-05.pt`` that StyleGAN2-ADA's and EDM's metrics use;
nothing is downloaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cli import add_debug_flag, run_as_process, run_command
from .evaluation.image_metrics import FID, FeatureStats, InceptionFeatures
from .evaluation.images import read_images
from .files import write_json_atomic
from .training.build import load_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    calc = sub.add_parser("calc", help="FID of a run's generator against reference statistics")
    calc.add_argument("run", type=Path, help="run directory (its newest checkpoint) or a checkpoint .json")
    calc.add_argument("--ref", type=Path, required=True, help="reference statistics .npz (mu, sigma)")
    calc.add_argument("--n", type=int, default=50_000, help="generated images")
    calc.add_argument("--seed", type=int, default=None,
                      help="seed of z and of the labels (default: the one of the FID the run reports)")
    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of real images")
    ref.add_argument("images", type=Path, help="folder of images, or an .npz")
    ref.add_argument("out", type=Path, help="output .npz")
    for s in (calc, ref):
        s.add_argument("--inception", type=Path, required=True, help="Inception-v3 TorchScript file")
        s.add_argument("--batch", type=int, default=250, help="images per batch")
        s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
        add_debug_flag(s)
    return p


def calc(args) -> str:
    run, step, ckpt = load_run(args.run, args.device)
    if args.n < 2 or args.batch < 1:
        raise ValueError(f"--n must be >= 2 and --batch >= 1, got {args.n} and {args.batch}")
    fid = FID(args.inception, args.ref, run.distiller.device)
    seed = run.fid_seed if args.seed is None else args.seed
    batches = tqdm(run.sample_batches(args.n, seed, args.batch), total=-(-args.n // args.batch), unit="batch",
                   desc="FID")
    value, n = fid(batches)
    write_json_atomic(ckpt.parent.parent / f"fid_step{step}.json",
                      {"fid": value, "samples": n, "checkpoint": str(ckpt), "reference": str(args.ref),
                       "inception": str(args.inception), "seed": seed})
    return f"FID {value:.4f} ({n} samples, step {step}, {ckpt})"


def ref(args) -> str:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    features, acc = InceptionFeatures(args.inception, device), FeatureStats()
    for images in tqdm(read_images(args.images, args.batch), unit="batch", desc="features"):
        acc.add(features(images))
    mu, sigma = acc.stats()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, mu=mu.numpy(), sigma=sigma.numpy())
    return f"wrote {args.out} (statistics of {acc.n} images)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda a: print((calc if a.command == "calc" else ref)(a)), args, oom_hint="lower --batch")


def console() -> None:
    """The ``emd-fid`` console script: ``python -m emd_fast.fid``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
