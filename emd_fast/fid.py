"""``python -m emd_fast.fid``: FID of a run's one-step generator, or reference statistics from real images.

    python -m emd_fast.fid calc runs/imagenet --inception inception-2015-12-05.pt --ref imagenet-64x64.npz
    python -m emd_fast.fid ref real_images/ my-ref.npz --inception inception-2015-12-05.pt
    python -m emd_fast.fid convert inception-2015-12-05.pt inception.safetensors

``calc`` generates --n images (EDM reports FID on 50,000) with the run's EMA generator (the newest checkpoint, or the
checkpoint JSON given) and compares their Inception-v3 pool features with the reference statistics (EDM's format: an
.npz with ``mu`` and ``sigma``); it prints the FID and writes it to ``<run>/fid_step<S>.json``. ``ref`` computes such
statistics from a folder of PNG/JPEG images or an .npz (``arr_0`` uint8 (N, H, W, C) or ``images`` float in [-1, 1]).
The Inception network is Inception-v3 as NVlabs' ``inception-2015-12-05.pt`` (StyleGAN2-ADA's, EDM's metrics)
computes it, defined in ``emd_fast.evaluation.inception``; --inception gives its weights: that file (its tensors are
read as data, its code never runs) or the safetensors ``convert`` writes from it. ``--inception-torchscript`` runs
the file as TorchScript instead (code: only for a file you trust). Nothing is downloaded.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from .cli import INCEPTION_TORCHSCRIPT_HELP, add_debug_flag, one_line_errors, path_arg, run_as_process, run_command
from .evaluation.image_metrics import FID, FeatureStats, InceptionFeatures
from .evaluation.images import read_images
from .evaluation.inception import convert_inception
from .files import atomic_write, make_dirs, refuse_same_file, write_json_atomic
from .training.build import load_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    calc = sub.add_parser("calc", help="FID of a run's generator against reference statistics")
    calc.add_argument("run", type=path_arg, help="run directory (its newest checkpoint) or a checkpoint .json")
    calc.add_argument("--ref", type=path_arg, required=True, help="reference statistics .npz (mu, sigma)")
    calc.add_argument("--n", type=int, default=50_000, help="generated images")
    calc.add_argument("--seed", type=int, default=None,
                      help="seed of z and of the labels (default: the one of the FID the run reports)")
    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of real images")
    ref.add_argument("images", type=path_arg, help="folder of images, or an .npz")
    ref.add_argument("out", type=path_arg, help="output .npz")
    for s in (calc, ref):
        s.add_argument("--inception", type=path_arg, required=True,
                       help="Inception-v3 weights: inception-2015-12-05.pt (read as data) or its .safetensors")
        s.add_argument("--inception-torchscript", action="store_true", help=INCEPTION_TORCHSCRIPT_HELP)
        s.add_argument("--batch", type=int, default=250, help="images per batch")
        s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    convert = sub.add_parser("convert", help="Inception-v3 weights to safetensors, read as data (no code runs)")
    convert.add_argument("src", type=path_arg,
                         help="inception-2015-12-05.pt (TorchScript archive) or a state dict file")
    convert.add_argument("dst", type=path_arg, help="output .safetensors")
    for s in (calc, ref, convert):
        add_debug_flag(s)
    return one_line_errors(p)


def calc(args) -> str:
    run, step, ckpt = load_run(args.run, args.device)
    if args.n < 2 or args.batch < 1:
        raise ValueError(f"--n must be >= 2 and --batch >= 1, got {args.n} and {args.batch}")
    fid = FID(args.inception, args.ref, run.distiller.device, args.inception_torchscript)
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
    features, acc = InceptionFeatures(args.inception, device, args.inception_torchscript), FeatureStats()
    for images in tqdm(read_images(args.images, args.batch), unit="batch", desc="features"):
        acc.add(features(images))
    mu, sigma = acc.stats()
    make_dirs(args.out.parent)
    with atomic_write(args.out) as f:
        np.savez(f, mu=mu.numpy(), sigma=sigma.numpy())
    return f"wrote {args.out} (statistics of {acc.n} images)"


def convert(args) -> str:
    if args.dst.suffix != ".safetensors":
        raise ValueError(f"{args.dst}: the converted weights are a .safetensors file")
    refuse_same_file(args.src, args.dst)
    convert_inception(args.src, args.dst)
    return f"wrote {args.dst} (Inception-v3 weights of {args.src}, read as data)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    command = {"calc": calc, "ref": ref, "convert": convert}[args.command]
    return run_command(lambda a: print(command(a)), args, oom_hint="lower --batch")


def console() -> None:
    """The ``emd-fid`` console script: ``python -m emd_fast.fid``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
