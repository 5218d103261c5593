"""Data-parallel scaling of distillation: iterations/s and samples/s per number of GPUs (or CPU processes).

    python benchmarks/scaling.py --procs 1 2 4 8                       # ring2d, 256 samples per GPU per iteration
    python benchmarks/scaling.py --procs 1 2 4 8 --out scaling.json -- --preset digits --steps 300
    python benchmarks/scaling.py --procs 1 2 --global-batch 512 -- --device cpu     # fixed global batch

Each count N is one ``torchrun --standalone --nproc-per-node N -m emd_fast.train`` run in a fresh directory under
--workdir; with --baseline (the default) one more run without torchrun (one process, no torch.distributed) shows
the cost of DistributedDataParallel with a single rank. Arguments after ``--`` go to every run (the problem, K,
--fast, --device, ...); --quiet, --out, --batch, --eval-every 0 and --ckpt-every 0 are set here.
Batch: by default every process runs --batch-per-process examples (weak scaling: the global batch grows with N);
--global-batch B keeps B fixed (strong scaling: each process runs B / N).
Figures come from each run's summary.json: steady it/s (after the first iterations, evaluation and checkpoints
excluded), samples/s = it/s x global batch, samples/s per process, and efficiency = samples/s over N times the
samples/s of the one-process torchrun row (1.0 = perfect linear scaling).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def parse(argv=None):
    own, train_args = list(sys.argv[1:] if argv is None else argv), []
    if "--" in own:
        i = own.index("--")
        own, train_args = own[:i], own[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process (GPU) counts to run")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch-per-process", type=int, default=256, help="examples per process per iteration")
    batch.add_argument("--global-batch", type=int, default=None, help="a fixed global batch, split across processes")
    p.add_argument("--steps", type=int, default=200, help="iterations per run")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also one run without torchrun (no torch.distributed)")
    p.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(own)
    if any(n < 1 for n in args.procs):
        p.error(f"--procs must be >= 1, got {args.procs}")
    for n in args.procs if args.global_batch else ():
        if args.global_batch % n:
            p.error(f"--global-batch {args.global_batch} does not divide across {n} processes")
    return args, train_args


def run_one(procs: int | None, batch: int, steps: int, train_args: list[str], out: Path) -> dict:
    """One training run (``procs`` None: plain python, no torchrun); its summary.json."""
    launcher = [sys.executable, "-m", "emd_fast.train"] if procs is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
         "-m", "emd_fast.train"]
    cmd = [*launcher, *train_args, "--out", str(out), "--batch", str(batch), "--steps", str(steps), "--quiet",
           "--eval-every", "0", "--ckpt-every", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    args, train_args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        rows = []
        for procs in ([None] if args.baseline else []) + args.procs:
            batch = args.global_batch or args.batch_per_process * (procs or 1)
            s = run_one(procs, batch, args.steps, train_args, workdir / f"procs_{procs or 'plain'}")
            its = s["steady_iters_per_s"] or s["iters_per_s"]
            rows.append({"launcher": "python" if procs is None else "torchrun", "processes": procs or 1,
                         "global_batch": batch, "iters_per_s": its, "samples_per_s": round(its * batch, 1),
                         "device": s["device"], "execution": s["execution"]})
    base = next((r for r in rows if r["launcher"] == "torchrun" and r["processes"] == 1), None)
    for r in rows:
        r["samples_per_s_per_process"] = round(r["samples_per_s"] / r["processes"], 1)
        r["efficiency"] = round(r["samples_per_s"] / (r["processes"] * base["samples_per_s"]), 3) if base else None
    print("| launcher | processes | global batch | it/s | samples/s | samples/s per process | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['launcher']} | {r['processes']} | {r['global_batch']} | {r['iters_per_s']:.2f} | "
              f"{r['samples_per_s']:.0f} | {r['samples_per_s_per_process']:.0f} | {r['efficiency'] or '-'} |")
    if args.out:
        args.out.write_text(json.dumps({"train_args": train_args, "steps": args.steps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
