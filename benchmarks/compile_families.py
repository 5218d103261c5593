"""Cold ``--compile`` set-up of the transformer teachers (SD3, FLUX.1) on the CPU: each network compiled whole against
block by block (regional, ``emd_fast.execution.compiled``), at the real networks' depth and a toy width.

    python benchmarks/compile_families.py                   # SD3-medium's 24 blocks, FLUX.1's 19 + 38
    python benchmarks/compile_families.py --families sd3 --sd3-layers 4 --flux-layers 2 4 --steps 12   # a quick look
    python benchmarks/compile_families.py --rows regional regional-warm frames-cold frames-warm \
        --out benchmarks/results/compile_families_cpu_warm.json                    # warm starts

Compile work grows with the graph (the number of operations), not with the widths, so the tests' tiny pipelines
(tests/tiny_pipelines.py: a transformer 16 wide, 16 x 16 images, 8 text tokens), built here with the real number of
transformer blocks, compile like the real networks while their iterations cost next to nothing. Each (family,
scope) is ``python -m emd_fast.train --compile`` in a fresh process with an empty compile cache (inductor, its C++
builds in waited-for children: their CPU time counted), batch 2, K 2, ``--steps`` iterations; ``eager`` is the same
run without --compile. Figures: the process's CPU seconds and wall seconds, summary.json's warm-up seconds and the
graphs compiled during the warm-up (its first 10 iterations) and after it, and the largest relative difference of
the per-iteration losses from the eager run's. Whole scope is ``compile_networks(..., scope="whole")`` in the same
command (the training command itself always compiles regionally). A warm row is a second process on the cold row's
``--compile-cache``: a resume, or another run of a sweep.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compile_families_cpu.json"
FAMILIES = ("sd3", "flux")
RUN = ["--resolution", "16", "--max-sequence-length", "8", "--batch", "2", "--K", "2", "--eval-every", "0",
       "--ckpt-every", "0", "--eval-samples", "4", "--quiet", "--device", "cpu", "--phase-every", "0"]


def teacher_args(family: str, tmp: Path, args) -> list[str]:
    """Build the tiny pipeline of ``family`` at the requested depth under ``tmp``; the train arguments naming it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_pipelines

    folder = (tiny_pipelines.sd3_pipeline(tmp / "sd3", layers=args.sd3_layers) if family == "sd3" else
              tiny_pipelines.flux_pipeline(tmp / "flux", layers=tuple(args.flux_layers)))
    extra = ["--guidance-scale", "2.5"] if family == "flux" else []
    return ["--teacher", str(folder), "--prompts", str(tiny_pipelines.prompts_file(tmp)), *extra]


def child(scope: str, argv: list[str]) -> int:
    """The training command, with the networks compiled in ``scope`` when it compiles them."""
    from emd_fast import train
    from emd_fast.execution import compiled

    compiled.compile_networks = functools.partial(compiled.compile_networks, scope=scope)
    return train.main(argv)


# row -> (compile scope or None: eager, the compile cache it shares with another row or None: its own, traced frames)
ROWS = {"eager": (None, None, False), "whole": ("whole", None, False), "regional": ("regional", "fx", False),
        "regional-warm": ("regional", "fx", False), "frames-cold": ("regional", "frames", True),
        "frames-warm": ("regional", "frames", True)}


def run(name: str, row: str, teacher: list[str], tmp: Path, args) -> dict:
    scope, cache, frames = ROWS[row]
    out = tmp / f"{name}-{row}"
    cmd = [sys.executable, __file__, "--child", scope or "eager", "--", "--out", str(out), *teacher, *RUN,
           "--steps", str(args.steps), *(["--compile"] if scope else []),
           *(["--compile-cache", str(tmp / f"{name}-cache-{cache}")] if cache else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", EMD_COMPILE_BACKEND=args.backend,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TORCH_CACHING_PRECOMPILE", None)
    if frames:
        env["TORCH_CACHING_PRECOMPILE"] = "1"
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    summary = json.loads((out / "summary.json").read_text())
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    losses = [[r["loss_g"], r["loss_s"]] for r in records if "loss_g" in r]
    return {"ok": True, "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "wall_s": round(wall, 1), "warmup_s": summary.get("warmup_s"), "graphs": summary.get("compiled_graphs"),
            "report": [line for line in proc.stderr.splitlines() if line.startswith("torch.compile (")],
            "losses": losses}


def measure(family: str, args, tmp: Path) -> dict:
    teacher = teacher_args(family, tmp / family, args)
    rows = {row: run(family, row, teacher, tmp, args) for row in ["eager", *args.rows]}
    eager = rows["eager"]
    for name, row in rows.items():
        if name != "eager" and row["ok"] and eager["ok"]:
            row["loss_diff_vs_eager"] = max(abs(c - e) / max(abs(e), 1e-6) for a, b in zip(row["losses"],
                                            eager["losses"]) for c, e in zip(a, b))
    for row in rows.values():
        row.pop("losses", None)
    if all(rows.get(k, {}).get("ok") for k in ("eager", "whole", "regional")):
        overhead = {k: rows[k]["cpu_s"] - eager["cpu_s"] for k in ("whole", "regional")}
        rows["compile_cpu_s_whole_over_regional"] = round(overhead["whole"] / overhead["regional"], 2)
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--sd3-layers", type=int, default=24, help="SD3's joint blocks (SD3-medium: 24)")
    p.add_argument("--flux-layers", type=int, nargs=2, default=[19, 38], help="FLUX's double and single blocks")
    p.add_argument("--rows", nargs="+", choices=[r for r in ROWS if r != "eager"], default=["whole", "regional"],
                   help="runs besides the eager one: whole, regional (cold), regional-warm (a second process on "
                        "regional's cache), frames-cold and frames-warm (the same with the traced-frame cache, "
                        "TORCH_CACHING_PRECOMPILE=1)")
    p.add_argument("--steps", type=int, default=12, help="iterations per run (the warm-up is the first 10)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the quick smoke test)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per process")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for warm, cold in (("regional-warm", "regional"), ("frames-warm", "frames-cold")):
        if warm in args.rows and (cold not in args.rows or args.rows.index(cold) > args.rows.index(warm)):
            p.error(f"--rows {warm} starts from {cold}'s cache: give {cold} before it")
    import torch

    res = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "load_avg_1min": os.getloadavg()[0]},
           "backend": args.backend, "sd3_layers": args.sd3_layers, "flux_layers": args.flux_layers,
           "steps": args.steps, "rows": args.rows, "families": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:  # the file is rewritten after each family: a cut run keeps what it measured
            res["families"][family] = measure(family, args, Path(tmp))
            print(family, json.dumps(res["families"][family], indent=1), flush=True)
            args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
