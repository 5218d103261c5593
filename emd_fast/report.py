"""``python -m emd_fast.report RUN [RUN ...] [--out DIR]``: a report of run directories for a person to look at.

    python -m emd_fast.report runs/digits_K4_seed0                      # one run -> report/index.html
    python -m emd_fast.report runs/k_ablation/* --out k_report          # runs overlaid, a K sweep

It writes into --out: curves_steps.png and curves_time.png (losses and every evaluation metric against steps and
against wall time, the runs overlaid and labelled by what differs in their configs), sweep.png when the runs vary one
numeric option (besides the seed): the metrics against it at equal iterations and at equal training time and the
seconds per step, mean ± std over seeds; samples_<i>.png (each run's last sample grid); report.json (the numbers);
index.html, one self-contained page with all of it and tables of the final metrics and of the cost. Finished,
interrupted and still running directories are read as they are; a directory that is not a run's is one line, exit 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import add_debug_flag, path_arg, run_as_process, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emd_fast.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", type=path_arg, nargs="+", help="run directories (of python -m emd_fast.train)")
    p.add_argument("--out", type=path_arg, default=Path("report"), help="folder the report is written to")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="metrics.jsonl keys to draw (default: curves of the losses and of every evaluation metric "
                        "that changes; the sweep: FID or FD and recall, or the problem's main metrics)")
    p.add_argument("--sweep", default=None,
                   help="the option the runs sweep (default: the one numeric option besides --seed that differs)")
    return add_debug_flag(p)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def report(_):
        from .evaluation.report import make_report

        print(make_report(args.runs, args.out, args.metrics, args.sweep))

    return run_command(report, args, oom_hint="")


def console() -> None:
    """The ``emd-report`` console script: ``python -m emd_fast.report``."""
    run_as_process(main)


if __name__ == "__main__":
    console()
