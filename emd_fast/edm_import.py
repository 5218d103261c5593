"""Convert an NVlabs/EDM or EDM2 network pickle to our safetensors file (no EDM or EDM2 code needed; the readers:
``emd_fast.teachers.edm_pickle`` and ``emd_fast.teachers.edm2_pickle``).

    python -m emd_fast.edm_import edm-imagenet-64x64-cond-adm.pkl imagenet64.safetensors
    python -m emd_fast.edm_import edm2-img512-s-2147483-0.130.pkl edm2-img512-s.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import add_debug_flag, run_as_process, run_command
from .files import refuse_same_file
from .teachers.network_file import load_nvlabs_pickle, save_network


def convert(args: argparse.Namespace) -> None:
    refuse_same_file(args.src, args.dst)
    net = load_nvlabs_pickle(args.src, dropout=None if args.keep_dropout else 0.0)
    save_network(net, args.dst, Path(args.src).stem)
    a, sch = net.arch, net.schedule
    print(f"wrote {args.dst}: {a['network']} network, {a['precond']['type']} preconditioning, "
          f"{a['img_channels']}x{a['img_resolution']}x{a['img_resolution']}, {a['label_dim']} classes, "
          f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, sigma in [{sch.t_min}, {sch.t_max}]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emd_fast.edm_import", description=__doc__.split("\n")[0])
    p.add_argument("src", help="EDM or EDM2 network pickle (.pkl)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--keep-dropout", action="store_true", help="keep the checkpoint's dropout (default: 0)")
    return run_command(convert, add_debug_flag(p).parse_args(argv), oom_hint="free memory (the network is read "
                                                                             "into CPU memory)")


def console() -> None:
    """The ``emd-edm-import`` console script: ``python -m emd_fast.edm_import``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
