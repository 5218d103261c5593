"""Host work per EMD iteration: the operators Python dispatches, the host syncs, the launches (GPU) and the time
outside the operators, for the eager reference, the deferred path and the graphed path, counted with the profiler.

    python benchmarks/overhead.py --out runs/overhead.json           # CPU: eager, deferred, compiled
    python benchmarks/overhead.py --baseline old.json                # exit 1 if a path dispatches >2% more ops

What a GPU run also pays in Python, measured where no GPU is: every operator the iteration dispatches is host work
(Python, the dispatcher, on a GPU one launch or more), and counting them is deterministic, so a change that adds
work per iteration shows in CI as a count, not as a noisy time. Per problem (the ``vector`` MLP problem and the
``tiny`` U-Net problem of throughput.py's smoke sizes), K and path, over ``--iters`` iterations after two warm-up
ones, ``torch.profiler`` (CPU activity; on a GPU also CUDA) gives per iteration:
  ops         every aten operator call (nested ones included);
  top_ops     the calls made from Python (no operator parent): what the eager code dispatches;
  syncs       host reads of tensor values (aten::_local_scalar_dense: ``.item()``, ``bool(t)``), each a device
              sync on a GPU; not counted: the CPU fused Adam's reads of its step count (the GPU's capturable Adam
              keeps it on the device) and ``.tolist()`` of a CPU tensor (no operator);
  launches    kernel and graph launches (GPU only: cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernel,
              cudaGraphLaunch);
  ms, op_ms   wall ms per iteration (median, without the profiler) and the operators' own CPU ms (profiled);
  host_ms     profiled wall ms minus the top-level operators' CPU ms: Python and framework time outside any
              operator (on a CPU the operators' time includes their arithmetic, so it is read at tiny sizes).
Paths: ``eager`` (the training default: sync finite checks), ``deferred`` (device-side finite flag, no host sync),
``compiled`` (deferred + torch.compile of the networks, regional where they have blocks; ``--compile-backend``,
inductor by default), ``graphed`` (compiled + the iteration replayed as one CUDA graph: GPU only; on a CPU it is a
note: a replay is one cudaGraphLaunch, the Philox offset advance and one copy per returned loss on the host).
The elementwise backend is the reference one: the Triton kernels run only interpreted on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from emd_fast.execution.compiled import compile_networks
from emd_fast.execution.graphs import GraphedStep, graphs_unavailable
from emd_fast.training.distiller import Execution

import throughput

ON_GPU = torch.cuda.is_available()
PATHS = ("eager", "deferred", "compiled", "graphed")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cudaGraphLaunch")
SYNC = "aten::_local_scalar_dense"
WARMUP = 2


def path_step(nets, spec: dict, path: str, K: int, device, compile_backend: str):
    """(one iteration of ``path`` as a callable, or None, why not)."""
    execution = Execution(finite_check="sync" if path == "eager" else "deferred")
    distiller = throughput.make_distiller(copy.deepcopy(nets), spec["batch"], K, execution, device)
    if path in ("compiled", "graphed"):
        if path == "graphed" and (why := graphs_unavailable(distiller)):
            return None, why
        compile_networks(distiller, backend=compile_backend)
    return (GraphedStep(distiller) if path == "graphed" else distiller.step), None


def inside_optimizer(event) -> bool:
    """Whether a profiler event runs inside a fused optimizer step (aten::_fused_adam_ and the like)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::_fused_"):
            return True
        parent = parent.cpu_parent
    return False


def counts(step, iters: int) -> dict:
    """Per-iteration operator, sync and launch counts and CPU times of ``iters`` profiled calls of ``step``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    if ON_GPU:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if ON_GPU:
            torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / iters
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None]
    op_ms = sum(e.cpu_time_total for e in top) / 1e3 / iters
    return {"ops": len(ops) / iters, "top_ops": len(top) / iters,
            "syncs": sum(e.name == SYNC and not inside_optimizer(e) for e in ops) / iters,
            "launches": sum(e.name in LAUNCHES for e in events) / iters if ON_GPU else None,
            "op_ms": op_ms, "host_ms": wall_ms - op_ms}


def measure_path(nets, spec: dict, path: str, K: int, device, args) -> dict:
    """One row: counts and times of ``path`` (warm-up first: compilation, graph capture), or why it cannot run."""
    step, why = path_step(nets, spec, path, K, device, args.compile_backend)
    row = {"problem": spec["name"], "K": K, "path": path, "batch": spec["batch"]}
    if step is None:
        return row | {"skipped": why}
    for _ in range(WARMUP + (step.warmup if isinstance(step, GraphedStep) else 0)):
        step()
    times = []
    for _ in range(args.iters):
        if ON_GPU:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if ON_GPU:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return row | {"ms": statistics.median(times), **counts(step, args.iters)}


def compare_counts(baseline: dict, new: dict, threshold: float) -> list[str]:
    """The rows of ``new`` that dispatch more than (1 + threshold) x the ops of the same row in ``baseline``."""
    key = lambda r: (r["problem"], r["K"], r["path"])  # noqa: E731
    old = {key(r): r for r in baseline["results"] if "ops" in r}
    return [f"{'/'.join(map(str, key(r)))}: {old[key(r)]['ops']:.0f} -> {r['ops']:.0f} ops per iteration"
            for r in new["results"] if "ops" in r and key(r) in old and r["ops"] > (1 + threshold) * old[key(r)]["ops"]]


def table(res: dict) -> str:
    lines = ["| problem | K | path | ops/iter | top-level ops | host syncs | launches | ms/iter | op ms | host ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        if "skipped" in r:
            lines.append(f"| {r['problem']} | {r['K']} | {r['path']} | not run: {r['skipped']} | | | | | | |")
            continue
        launches = "-" if r["launches"] is None else f"{r['launches']:.0f}"
        lines.append(f"| {r['problem']} | {r['K']} | {r['path']} | {r['ops']:.0f} | {r['top_ops']:.0f} | "
                     f"{r['syncs']:.0f} | {launches} | {r['ms']:.2f} | {r['op_ms']:.2f} | {r['host_ms']:.2f} |")
    return "\n".join([f"Host work per EMD iteration on {res['device']}; torch {res['torch']}", *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", choices=["vector", "unet"], default=["vector", "unet"])
    p.add_argument("--K", nargs="+", type=int, default=[1, 4])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--iters", type=int, default=3, help="profiled (and timed) iterations per row")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled paths")
    p.add_argument("--baseline", type=Path, default=None, help="a saved JSON: exit 1 if a row dispatches more ops")
    p.add_argument("--threshold", type=float, default=0.02, help="allowed growth of ops per iteration")
    p.add_argument("--out", type=Path, default=Path("runs/overhead.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if ON_GPU else "cpu")
    res = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "iters": args.iters, "compile_backend": args.compile_backend,
           "results": []}
    for name in args.problems:
        spec = throughput.problem_spec(name, smoke=True)
        nets = throughput.build_networks(spec, device)
        for K in args.K:
            for path in args.paths:
                res["results"].append(measure_path(nets, spec, path, K, device, args))
                throughput.write_json(args.out, res)
    print(table(res))
    if args.baseline:
        grown = compare_counts(json.loads(args.baseline.read_text()), res, args.threshold)
        print("\n".join(grown) or f"no row dispatches more than {100 * args.threshold:g}% more ops than the baseline")
        return 1 if grown else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
