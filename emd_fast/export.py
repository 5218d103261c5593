"""``python -m emd_fast.export``: a finished run's one-step generator in the format of the tools its teacher came from.

    python -m emd_fast.export runs/sd --out sd-onestep/                # diffusers teacher: a stock pipeline folder
    python -m emd_fast.export runs/sd --out sd-onestep-lora/ --lora-file   # LoRA run: the teacher + a LoRA file
    python -m emd_fast.export runs/imagenet --out imagenet-onestep/ --samples 50000   # EDM teacher: file + samples

A diffusers teacher's run becomes a pipeline folder that ``DiffusionPipeline.from_pretrained(folder)`` loads with
stock diffusers; its call with ``num_inference_steps=1`` (and ``guidance_scale=1.0``) is the generator. An EDM or
emd_fast U-Net teacher's run becomes ``generator.safetensors`` and the recipe to sample it; ``--samples N`` adds N
samples as samples.zip (EDM's fid.py) and samples.npz. Every export is checked against the run's generator before it
is kept, and carries a model card (README.md). docs/export.md says more.
"""
from __future__ import annotations

import argparse

from .cli import add_debug_flag, path_arg, run_as_process, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", type=path_arg, help="a finished run directory (its last checkpoint), or a checkpoint .json")
    p.add_argument("--out", type=path_arg, required=True, help="the folder to write (new, or empty)")
    p.add_argument("--lora-file", action="store_true",
                   help="LoRA run of a text-to-image diffusers teacher: the teacher's UNet and a LoRA file "
                        "(pipe.load_lora_weights) instead of merged weights")
    p.add_argument("--samples", type=int, default=0, help="also write this many samples (samples.zip, samples.npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' z and labels, and of the export check")
    p.add_argument("--batch", type=int, default=250, help="samples generated at a time")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    return add_debug_flag(p)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def export(a):
        from .exporting import export_run

        print("\n".join(export_run(a.run, a.out, a.lora_file, a.samples, a.seed, a.batch, a.device)))

    return run_command(export, args, oom_hint="lower --batch")


def console() -> None:
    """The ``emd-export`` console script: ``python -m emd_fast.export``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
