"""Compile time of a compiled (`--fast`) ADM distillation's set-up on the CPU: whole networks against regional
compilation (``emd_fast.execution.compiled``), cold (an empty compile cache) and warm (a second process on the same
cache: a resume, another process of the job, a sweep), by phase, with the compilations after warm-up.

    python benchmarks/compile_time.py                                     # adm-structure, both scopes, cold + warm
    python benchmarks/compile_time.py --config edm-imagenet64-adm --batch 2 --out full.json   # the real 296 M ADM
    python benchmarks/compile_time.py --config tiny --iters 2             # the CI smoke size

Each (scope, cold | warm) runs in its own process (``--child``): it builds the generator, student and teacher of
an ADM config (random weights), a Distiller as ``--fast`` sets one up on the CPU (deferred finite checks), applies
``compile_networks`` with the scope, and runs ``--iters`` EMD iterations; compilation happens in the first (the
warm-up), so set-up = compile_networks + the first iteration. Measured per process: wall and CPU seconds of the
set-up (CPU: the process and its waited-for children, inductor's compile workers off so every C++ build is
counted: on a shared machine wall time measures the neighbours), the eager iteration's time (the same iteration
without compilation, measured first in the same process), the phases of torch's compile-time metrics (Dynamo's
tracing and guards; AOTAutograd; Inductor's lowering and code generation and the kernel build (C++ on the CPU,
Triton on a GPU), forward graphs at the first call and backward graphs at the first backward), the graphs compiled
during the warm-up and after it (must be 0), inductor's FX-graph cache hits and misses, Dynamo's traced-frame cache
hits (a warm start that loads its frames traces nothing), and how far the compiled iterations' losses are from the
eager ones (the first ``--eager-iters`` iterations, same seeds).
Configs: ``edm-imagenet64-adm`` (EDM's 296 M network); ``adm-structure``: the same blocks, levels, resolutions and
attention (64x64 images, channel_mult 1-2-3-4, 3 blocks, attention at 32/16/8, 1000 classes) at 32 base channels
(1/36 of the FLOPs: compile work depends on the graph, not on the widths, while the iterations that carry it get
36x cheaper); ``tiny`` for CI.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"edm-imagenet64-adm": None, "tiny": None,  # UNET_CONFIGS' own
           "adm-structure": dict(img_channels=3, img_resolution=64, label_dim=1000, model_channels=32,
                                 channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                                 channels_per_head=32, channel_mult_emb=4, dropout=0.0, sigma_data=0.5)}
# torch's compile-time metrics (torch._dynamo.utils.compilation_time_metrics) read as phases
DYNAMO_TOTAL, BACKEND = "_compile.compile_inner", "OutputGraph.call_user_compiler"
BACKWARD_TOTAL = "backward._backward_impl"
INDUCTOR = ("compile_fx.<locals>.fw_compiler_base", "compile_fx.<locals>.bw_compiler")
KERNEL_BUILD = "PyCodeCache.load_by_key_path"


def cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the C++ compiler runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def phases(metrics: dict[str, list[float]]) -> dict[str, float]:
    """Seconds by phase from torch's compile-time metrics: Dynamo (tracing, guards: its compile minus the backend),
    AOTAutograd (the backend and the lazy backward compile minus Inductor), Inductor (of which kernel build)."""
    total = lambda key: sum(metrics.get(key, []))  # noqa: E731
    inductor = sum(total(k) for k in INDUCTOR)
    return {"dynamo_s": total(DYNAMO_TOTAL) - total(BACKEND),
            "aot_autograd_s": total(BACKEND) + total(BACKWARD_TOTAL) - inductor,
            "inductor_s": inductor, "inductor_kernel_build_s": total(KERNEL_BUILD),
            "compile_total_s": total(DYNAMO_TOTAL) + total(BACKWARD_TOTAL)}


def child(args) -> dict:
    """One process: set-up, warm-up and iterations of one scope on one cache directory."""
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    from emd_fast.execution.compiled import compile_count, compile_networks, save_traced_frames, use_compile_cache
    from emd_fast.nets.unet import UNET_CONFIGS
    from emd_fast.training.distiller import Execution

    import throughput

    use_compile_cache(args.cache)
    torch.manual_seed(0)
    config = CONFIGS[args.config] or UNET_CONFIGS[args.config]
    spec = dict(name="unet", batch=args.batch, config=dict(config), label=args.config)
    device = torch.device("cpu")
    nets = throughput.build_networks(spec, device)
    execution = Execution(finite_check="deferred")  # what --fast sets on a CPU
    eager = throughput.make_distiller(copy.deepcopy(nets), args.batch, args.K, execution, device)
    eager_s, eager_losses = [], []
    for _ in range(args.eager_iters):
        t = time.perf_counter()
        out = eager.step()
        eager_s.append(time.perf_counter() - t)
        eager_losses.append([float(out["loss_g"]), float(out["loss_s"])])
    del eager
    distiller = throughput.make_distiller(nets, args.batch, args.K, execution, device)
    wall0, cpu0, graphs0 = time.perf_counter(), cpu_s(), compile_count()
    report = compile_networks(distiller, backend=args.backend, scope=args.scope)
    iters = []
    for i in range(args.iters):
        t, c, g = time.perf_counter(), cpu_s(), compile_count()
        out = distiller.step()
        iters.append({"wall_s": time.perf_counter() - t, "cpu_s": cpu_s() - c, "graphs": compile_count() - g,
                      "losses": [float(out["loss_g"]), float(out["loss_s"])]})
        if i == 0:
            save_traced_frames()  # as the training loop does after its warm-up
            setup = {"setup_wall_s": time.perf_counter() - wall0, "setup_cpu_s": cpu_s() - cpu0,
                     "graphs_warmup": compile_count() - graphs0}
    inductor = counters["inductor"]
    pairs = [(c, e) for it, losses in zip(iters, eager_losses) for c, e in zip(it["losses"], losses)]
    return {**setup, "eager_iter_s": statistics.median(eager_s) if eager_s else None,
            # the same iterations compiled and eager (same seeds): their losses' largest difference, relative
            # (to at least 1e-6: the first generator loss is ~0, its generator a copy of the teacher)
            "loss_diff_vs_eager": max((abs(c - e) / max(abs(e), 1e-6) for c, e in pairs), default=None),
            "dynamo_cache": dict(counters["dynamo_cache"]),
            "graphs_after_warmup": sum(it["graphs"] for it in iters[1:]), "iterations": iters,
            "phases": phases(compilation_time_metrics), "report": report.lines(),
            "fxgraph_cache_hit": inductor["fxgraph_cache_hit"], "fxgraph_cache_miss": inductor["fxgraph_cache_miss"],
            "aot_autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "metrics": {k: [len(v), round(sum(v), 3)] for k, v in compilation_time_metrics.items()}}


def run_child(args, scope: str, cache: Path) -> dict:
    """``child`` in a fresh process (so nothing compiled stays in memory); its result, or how it failed."""
    out = cache.parent / f"{scope}_{time.time_ns()}.json"
    cmd = [sys.executable, __file__, "--child", "--scope", scope, "--cache", str(cache), "--result", str(out),
           "--config", args.config, "--batch", str(args.batch), "--K", str(args.K), "--iters", str(args.iters),
           "--eager-iters", str(args.eager_iters), "--backend", args.backend]
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1",  # every C++ build in a waited-for child: CPU counted
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within --timeout {args.timeout} s"}
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return {"ok": True, **json.loads(out.read_text())}


def table(res: dict) -> str:
    lines = ["| scope | cache | set-up wall s | set-up CPU s | eager iter s | Dynamo s | AOTAutograd s | Inductor s "
             "(kernel build) | graphs in warm-up | graphs after | FX cache hit/miss | losses vs eager |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for row in res["rows"]:
        if not row["ok"]:
            lines.append(f"| {row['scope']} | {row['cache']} | failed: {row['error']} |")
            continue
        ph = row["phases"]
        eager = "-" if row["eager_iter_s"] is None else f"{row['eager_iter_s']:.2f}"
        diff = "-" if row.get("loss_diff_vs_eager") is None else f"{row['loss_diff_vs_eager']:.1e}"
        lines.append(f"| {row['scope']} | {row['cache']} | {row['setup_wall_s']:.1f} | {row['setup_cpu_s']:.1f} | "
                     f"{eager} | {ph['dynamo_s']:.1f} | {ph['aot_autograd_s']:.1f} | {ph['inductor_s']:.1f} "
                     f"({ph['inductor_kernel_build_s']:.1f}) | {row['graphs_warmup']} | {row['graphs_after_warmup']} | "
                     f"{row['fxgraph_cache_hit']}/{row['fxgraph_cache_miss']} | {diff} |")
    lines += [f"{k}: {v}" for k, v in res.get("speedups", {}).items()]
    return "\n".join([f"{res['config']}, batch {res['batch']}, K {res['K']}, {res['iters']} iterations; "
                      f"torch {res['torch']}, {res['cpu_count']} CPUs", *lines])


def speedups(rows: list[dict]) -> dict:
    """Cold whole over cold regional, by set-up CPU and wall seconds; the warm regional set-up."""
    get = {(r["scope"], r["cache"]): r for r in rows if r["ok"]}
    out = {}
    whole, regional, warm = get.get(("whole", "cold")), get.get(("regional", "cold")), get.get(("regional", "warm"))
    if whole and regional:
        out["cold set-up, whole / regional (CPU s)"] = round(whole["setup_cpu_s"] / regional["setup_cpu_s"], 2)
        out["cold set-up, whole / regional (wall s)"] = round(whole["setup_wall_s"] / regional["setup_wall_s"], 2)
    if warm:
        out["warm regional set-up (wall s, CPU s)"] = (round(warm["setup_wall_s"], 1), round(warm["setup_cpu_s"], 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="adm-structure")
    p.add_argument("--scopes", nargs="+", choices=["whole", "regional"], default=["whole", "regional"])
    p.add_argument("--caches", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--K", type=int, default=2, help="Langevin steps (K > 1: the second step must reuse the graphs)")
    p.add_argument("--iters", type=int, default=3, help="iterations: the first is the warm-up")
    p.add_argument("--eager-iters", type=int, default=1, help="eager iterations timed first (0: none)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--out", type=Path, default=Path("runs/compile_time.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scope", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(child(args)))
        return 0
    import torch
    res = {"config": args.config, "batch": args.batch, "K": args.K, "iters": args.iters, "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "rows": []}
    work = Path(tempfile.mkdtemp(prefix="compile_time_"))
    try:
        for scope in args.scopes:
            cache = work / f"cache_{scope}"
            for state in args.caches:
                if state == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                row = {"scope": scope, "cache": state, **run_child(args, scope, cache)}
                res["rows"].append(row)
                res["speedups"] = speedups(res["rows"])
                print(f"{scope} {state}: " + (f"set-up {row['setup_wall_s']:.1f} s wall, {row['setup_cpu_s']:.1f} s "
                                              f"CPU" if row["ok"] else f"failed: {row['error']}"), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    return 0 if all(r["ok"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
