"""Throughput of a full EMD training iteration: iterations/s, samples/s, TFLOP/s, MFU and speed-ups.

    python benchmarks/throughput.py                      # GPU: realistic sizes; no GPU: the smoke sizes
    python benchmarks/throughput.py --smoke --out t.json
    python benchmarks/throughput.py --problems unet --K 1 16 --impls eager graph-bf16 --peak-tflops 800
    python benchmarks/throughput.py --skip compile/triton  # leave out variants (IMPL/BACKEND)
    python benchmarks/throughput.py --baseline old.json  # also exit 1 if a row is >10% slower than in old.json
    python benchmarks/throughput.py --problems imagenet64 --K 1 8 --impls eager-bf16 graph-bf16 \
        --skip eager-bf16/triton graph-bf16/reference     # EDM's ImageNet-64 ADM: eager bf16 vs what --fast runs

Variants: backend reference | triton (fused elementwise kernels) x impl x K (Langevin steps per E-step), impl one of
  eager       eager networks, finite checks "sync" (a host sync per update): the training default;
  eager-bf16  eager with every network call under bf16 autocast (fp32 master weights);
  compile     torch.compile of the generator, the student and the teacher's network where it is one
              (``emd_fast.execution.compiled``), finite checks "sync";
  graph       compile + finite checks "deferred" (no host sync) + the whole iteration replayed as one CUDA graph
              (``emd_fast.execution.graphs.GraphedStep``); the U-Net problem runs channels_last;
  graph-bf16  graph with every network call under bf16 autocast (fp32 master weights): with the triton
              backend, what ``--fast --precision bf16`` runs on a GPU.
The graph variants need CUDA: where they cannot run they are reported as skipped, with the reason, in a note.
Each compiled impl gets its own compiled copy of the networks, shared by its backends and K: compilation is paid
once per (problem, impl), in the first warm-up iteration.
Problems:
  vector  ring2d's exact GaussianMixtureTeacher with the CLI's default MLP generator / student (hidden 128,
          depth 3), batch 256 (the same on GPU and in the smoke mode);
  unet    a NetworkTeacher over a UNetDenoiser: on GPU batch 64 of 3x64x64 with a mid-sized ADM config
          (model_channels 64, channel_mult 1-2-3-4, 2 blocks, attention at 16 and 8; "adm64-mc64" below);
          in the smoke mode the "tiny" config (1x8x8, 10 classes) with batch 4;
  imagenet64, sd15  the real networks (``roofline.real_networks``, random weights): EDM's ImageNet-64 ADM
          (296 M, 1000 classes) at batch 64 and SD v1.5's UNet (860 M, 4x64x64 latents, a guided teacher: two
          UNet calls) at batch 8; in the smoke mode the same kinds at toy size, batch 2.
``--training``: how generator and student train (``roofline.TRAINING``: full, LoRA), an axis of its
own; each row says which.
Timing: ``--warmup`` untimed iterations (the graph variants run GraphedStep's eager warm-up and the capture before
these), then ``--iters`` timed ones, each timed with CUDA events on GPU, the wall clock on the CPU; the median is
reported. The iteration is the one training runs (``Distiller.step``, or the graph replay).
FLOPs: the model FLOPs of one iteration (``roofline.networks_cost``: every network call's forward and backward
matmul / conv / attention FLOPs, the generator VJPs included, counted by ``torch.utils.flop_counter`` on the meta
device; test_roofline.py checks they equal those FlopCounterMode sees in one eager reference iteration;
elementwise work is not counted), the same for every variant of a (problem, training, K). TFLOP/s = FLOPs / time;
MFU = that over --peak-tflops (default 800: the dense bf16 matmul rate measured on this workplace's H100): the
honest figure for the bf16 rows; for the fp32 variants (fp32 matmuls, TF32 convolutions by default) it is a lower
bound on what the hardware could give.
Columns: "vs eager ref" is the row's it/s over that of the eager reference row of the same problem and K, measured
in the same run; "vs eager same precision" over the eager reference row of the row's precision (eager-bf16 for
the bf16 rows); "set-up s": the variant's untimed calls (the first row of a compiled impl includes its
compilation; a graph variant its eager warm-up and capture); "peak GiB": torch.cuda.max_memory_allocated over the
variant; EMD-K/EMD-1 is the row's time over the K=1 row of the same problem, backend and impl. "x floor" is
ms/iter over the roofline floor of the iteration on this device (``roofline.networks_cost`` with the copy bandwidth
and bf16 matmul rate measured in the run; for the fp32 variants a lower bound too); "-" in the smoke mode, whose
floors ``roofline.py`` prints alone. The summary
gives, per problem at K=16, the fastest variant's speed-up over the eager reference against the project's targets
(vector >= 10x, U-Net >= 2x) and its MFU.

The JSON is rewritten after every row: a run cut short keeps the rows it measured.
Without a GPU (or with --smoke) sizes are tiny, the triton backend runs in the Triton interpreter and compile uses
the aot_eager backend by default (inductor's C++ build takes tens of seconds per network on a CPU): the smoke run
checks that everything runs; its numbers are not speed claims.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from emd_fast.emd import EMDConfig  # noqa: E402
from emd_fast.execution.compiled import compile_networks  # noqa: E402
from emd_fast.execution.graphs import GraphedStep, graphs_unavailable  # noqa: E402
from emd_fast.nets.mlp import MLPDenoiser  # noqa: E402
from emd_fast.nets.unet import UNET_CONFIGS, UNetDenoiser  # noqa: E402
from emd_fast.problems import init_networks  # noqa: E402
from emd_fast.schedules import make_schedule  # noqa: E402
from emd_fast.teachers import NetworkTeacher  # noqa: E402
from emd_fast.teachers.mixture import data_std, ring2d  # noqa: E402
from emd_fast.training.distiller import Distiller, Execution  # noqa: E402

import compare  # noqa: E402
import roofline  # noqa: E402

PROBLEMS = ("vector", "unet")
REAL_PROBLEMS = {"imagenet64": "edm-imagenet64", "sd15": "sd15"}  # problem: roofline.real_networks' name
BACKENDS = ("reference", "triton")
IMPLS = {  # impl: (torch.compile the networks, whole-iteration CUDA graph, precision of the network calls)
    "eager": (False, False, "fp32"), "eager-bf16": (False, False, "bf16"), "compile": (True, False, "fp32"),
    "graph": (True, True, "fp32"), "graph-bf16": (True, True, "bf16")}
DEFAULT_IMPLS = ("eager", "compile", "graph", "graph-bf16")
TARGETS = {"vector": 10.0, "unet": 2.0}  # EMD-16 it/s over the eager reference's, at least (the project's targets)
SUMMARY_K = 16
VERDICT = {True: "met", False: "NOT met", None: "not judged in the smoke mode"}
LAMBDA_STAR = -4.0  # the CLI default
UNET_GPU = dict(img_channels=3, img_resolution=64, label_dim=0, model_channels=64, channel_mult=[1, 2, 3, 4],
                num_blocks=2, attn_resolutions=[16, 8], channels_per_head=64, dropout=0.0, sigma_data=0.5)


def problem_spec(name: str, smoke: bool) -> dict:
    """Sizes of a problem: batch, network config and a label for the table."""
    if name == "vector":
        return dict(name=name, batch=256, label="ring2d MLP h128 d3, batch 256")
    if name == "unet":
        if smoke:
            spec = dict(name=name, batch=4, config=UNET_CONFIGS["tiny"], label="U-Net tiny 1x8x8, batch 4")
        else:
            spec = dict(name=name, batch=64, config=UNET_GPU, label="U-Net adm64-mc64 3x64x64, batch 64")
        return spec | dict(label=spec["label"] + "; graph variants channels_last")
    if name in REAL_PROBLEMS:
        batch = 2 if smoke else {"imagenet64": 64, "sd15": 8}[name]
        size = "toy size (smoke)" if smoke else "real size"
        return dict(name=name, batch=batch, real=REAL_PROBLEMS[name], tiny=smoke,
                    label=f"{roofline.REAL_NETWORKS[REAL_PROBLEMS[name]]}; {size}, batch {batch}")
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS + tuple(REAL_PROBLEMS)}")


def build_networks(spec: dict, device: torch.device, seed: int = 0):
    """(teacher, generator, student, sigma_data, num_classes), random weights (throughput does not need trained
    ones); generator and student start as copies of the teacher network, as in training."""
    torch.manual_seed(seed)
    if "real" in spec:  # built on the device (meta: no memory)
        teacher, _, num_classes, sigma_data = roofline.real_networks(spec["real"], device, spec["tiny"])
        generator, student = init_networks(teacher.net, teacher.schedule.t_at_lambda(LAMBDA_STAR))
        return teacher, generator, student, sigma_data, num_classes
    if spec["name"] == "vector":
        schedule = make_schedule("vp_cosine")
        teacher = ring2d(schedule)
        sigma_data = data_std(teacher)
        net = MLPDenoiser(teacher.dim, schedule, hidden=128, depth=3, sigma_data=sigma_data).to(device)
        num_classes = 0
    else:
        schedule = make_schedule("edm")
        cfg = spec["config"]
        net = UNetDenoiser(schedule=schedule, **cfg).to(device)
        sigma_data, num_classes = cfg["sigma_data"], cfg["label_dim"]
        teacher = None
    generator, student = init_networks(net, schedule.t_at_lambda(LAMBDA_STAR))
    if teacher is None:
        c, r = spec["config"]["img_channels"], spec["config"]["img_resolution"]
        teacher = NetworkTeacher(net, schedule, (c, r, r))
    return teacher, generator, student, sigma_data, num_classes


def variant_execution(impl: str, backend: str, problem: str) -> Execution:
    """How an iteration of the variant runs (the graph variants: deferred checks, channels_last for images)."""
    _, graph, precision = IMPLS[impl]
    return Execution(backend=backend, precision=precision, channels_last=graph and problem == "unet",
                     finite_check="deferred" if graph else "sync")


def make_distiller(nets, batch: int, K: int, execution: Execution, device) -> Distiller:
    teacher, generator, student, sigma_data, num_classes = nets
    return Distiller(teacher, generator, student, EMDConfig(K=K), batch=batch, lr_g=1e-4, lr_s=1e-3, seed=0,
                     sigma_data=sigma_data, num_classes=num_classes, execution=execution, device=device)


def impl_networks(nets, spec: dict, impl: str, device, compile_backend: str | None):
    """(networks, notes, why not) of an impl: the eager networks, or for a compiled impl a deep copy, in the impl's
    memory format, with torch.compile applied in place (the eager originals stay eager); why not: the reason the
    impl cannot run here (nothing compiled then), None if it can."""
    compiled, graph, _ = IMPLS[impl]
    if not compiled:
        return nets, [], None
    nets = copy.deepcopy(nets)
    probe = make_distiller(nets, 2, 1, variant_execution(impl, "reference", spec["name"]), device)
    if graph and (why := graphs_unavailable(probe)):
        return nets, [], why
    return nets, compile_networks(probe, backend=compile_backend).lines(), None


def variant_step(nets, spec: dict, impl: str, backend: str, K: int, device):
    """(one iteration of the variant as a callable, how many first calls are set-up to run before any timing: a
    GraphedStep's eager warm-up and its capture)."""
    distiller = make_distiller(nets, spec["batch"], K, variant_execution(impl, backend, spec["name"]), device)
    if IMPLS[impl][1]:
        step = GraphedStep(distiller)
        return step, step.warmup + 1
    return distiller.step, 0


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def time_steps(step, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step`` after ``warmup`` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(iters):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    sync()
    return [s.elapsed_time(e) / 1e3 for s, e in times] if ON_GPU else times


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose hooks break the E-step's autograd.grad on a leaf
    (z) ("A leaf node was passed to _will_engine_execute_node"): only the total is needed here."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(distiller: Distiller) -> int:
    """Model FLOPs of one iteration (forward + backward matmul/conv/attention of every network call)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        distiller.step()
    return int(counter.get_total_flops())


def machine_facts() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if ON_GPU else None,
            "device": "cuda" if ON_GPU else "cpu", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_conv": torch.backends.cudnn.allow_tf32, "threads": torch.get_num_threads()}


def find(rows: list[dict], **key) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def summary(rows: list[dict], smoke: bool) -> list[dict]:
    """Per problem at K=16: the fastest variant, its speed-up over the eager reference against the project's target (not
    judged in the smoke mode), and its MFU."""
    out = []
    for problem, target in TARGETS.items():
        rivals = [r for r in rows if (r["problem"], r["K"]) == (problem, SUMMARY_K) and r["speedup_vs_eager_ref"]]
        if rivals:
            best = max(rivals, key=lambda r: r["iters_per_s"])
            speedup = best["speedup_vs_eager_ref"]
            out.append(dict(problem=problem, K=SUMMARY_K, impl=best["impl"], backend=best["backend"],
                            speedup_vs_eager_ref=speedup, target=target,
                            target_met=None if smoke else speedup >= target, mfu=best["mfu"]))
    return out


def measure_row(nets, spec: dict, impl: str, backend: str, K: int, flops: int, device, args) -> dict:
    """Time one variant (set-up and warm-up first, then ``args.iters`` timed iterations): its row of the table.
    setup_s: the untimed calls (the first row of a compiled impl compiles its networks there: compile time)."""
    t0 = time.perf_counter()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    step, setup = variant_step(nets, spec, impl, backend, K, device)
    times = time_steps(step, setup + args.warmup, args.iters)
    sec = statistics.median(times)
    tflops = flops / sec / 1e12
    wall = time.perf_counter() - t0
    if not args.quiet:
        print(f"  {spec['name']} {backend} {impl} K={K}: {1e3 * sec:.2f} ms/iter ({wall:.1f} s)", file=sys.stderr)
    return dict(problem=spec["name"], problem_label=spec["label"], training=nets_training(nets), backend=backend,
                impl=impl, K=K, execution=asdict(variant_execution(impl, backend, spec["name"])), batch=spec["batch"],
                ms_per_iter=1e3 * sec, iters_per_s=1 / sec, samples_per_s=spec["batch"] / sec, flops_per_iter=flops,
                tflops=tflops, mfu=tflops / args.peak_tflops, ms_all=[1e3 * t for t in times], wall_s=wall,
                setup_s=wall - sum(times),
                peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None)


def training_networks(nets, mode: str):
    """The networks with generator and student trained as ``mode`` says (roofline.TRAINING: full, or e.g. LoRA):
    the same tuple for full training, else a copy with the mode applied to generator and student."""
    adapt = roofline.TRAINING[mode]
    if adapt is None:
        return nets
    teacher, generator, student, sigma_data, num_classes = nets
    generator, student = copy.deepcopy(generator), copy.deepcopy(student)
    adapt(generator)
    adapt(student)
    generator.training_mode = student.training_mode = mode
    return teacher, generator, student, sigma_data, num_classes


def nets_training(nets) -> str:
    return getattr(nets[1], "training_mode", "full")


def measure(args) -> dict:
    """Every variant's row; the result (``result``) is written to ``args.out`` after each row, so a run cut short
    keeps what it measured."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    rates = None if args.smoke else roofline.device_rates()
    rows, notes, floor, interrupted = [], [], {}, False
    save = lambda: write_json(args.out, result(rows, notes, floor, rates, compile_backend, args, True))  # noqa: E731
    try:
        for pname in args.problems:
            spec = problem_spec(pname, args.smoke)
            nets, meta = build_networks(spec, device), build_networks(spec, torch.device("meta"))
            for mode in args.training:
                floor[pname, mode] = {K: roofline.networks_cost(training_networks(meta, mode), spec["batch"], K)
                                      for K in args.K}
                mode_nets = training_networks(nets, mode)
                for impl in args.impls:
                    impl_nets, lines, why = impl_networks(mode_nets, spec, impl, device, compile_backend)
                    notes += [n for n in (f"{pname}: {line}" for line in lines) if n not in notes]
                    if why:
                        notes.append(f"{pname}: {impl} skipped: {why}")
                        continue
                    notes += [f"{pname}: {impl}/{b} left out (--skip)" for b in args.backends
                              if f"{impl}/{b}" in args.skip and f"{pname}: {impl}/{b} left out (--skip)" not in notes]
                    for backend in (b for b in args.backends if f"{impl}/{b}" not in args.skip):
                        for K in args.K:
                            rows.append(measure_row(impl_nets, spec, impl, backend, K,
                                                    floor[pname, mode][K]["flops"], device, args))
                            save()
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: keep and report the rows measured so far
        notes.append(f"interrupted after {len(rows)} rows: the variants after the last row were not measured")
        print(f"interrupted: reporting the {len(rows)} rows measured", file=sys.stderr)
        interrupted = True
    return result(rows, notes, floor, rates, compile_backend, args, interrupted)


def result(rows: list[dict], notes: list[str], floor: dict, rates: dict | None, compile_backend: str, args,
           interrupted: bool) -> dict:
    """The JSON of a run from its rows so far: speed-ups, EMD-K/EMD-1, floors on this device, the summary."""
    for r in rows:
        same = dict(problem=r["problem"], training=r["training"])
        k1 = find(rows, **same, backend=r["backend"], impl=r["impl"], K=1)
        ref = find(rows, **same, backend="reference", impl="eager", K=r["K"])
        eager_same = find(rows, **same, backend="reference", K=r["K"],
                          impl="eager-bf16" if r["execution"]["precision"] == "bf16" else "eager")
        r["time_vs_K1"] = r["ms_per_iter"] / k1["ms_per_iter"] if k1 else None
        r["speedup_vs_eager_ref"] = r["iters_per_s"] / ref["iters_per_s"] if ref else None
        r["speedup_vs_eager_same_precision"] = r["iters_per_s"] / eager_same["iters_per_s"] if eager_same else None
        cost = floor[r["problem"], r["training"]][r["K"]]  # the roofline floor on this device (roofline.py)
        r["floor_bytes"], r["floor_flops"] = cost["bytes"], cost["flops"]
        r["floor_ms"] = None if rates is None else 1e3 * roofline.floor_s(
            cost["bytes"], cost["flops"], rates["copy_gbps"], rates["matmul_tflops"])
        r["x_floor"] = None if rates is None else r["ms_per_iter"] / r["floor_ms"]
    return {**machine_facts(), "interrupted": interrupted, "device_rates": rates, "smoke": args.smoke,
            "peak_tflops": args.peak_tflops,
            "peak_note": "measured dense bf16 matmul rate (this workplace's H100): MFU of the bf16 rows; the fp32 "
                         "rows (fp32 matmuls, TF32 convolutions) get a lower bound",
            "compile_backend": compile_backend, "iters": args.iters, "warmup": args.warmup, "notes": notes,
            "results": rows, "summary": summary(rows, args.smoke)}


def write_json(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def ratio(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(res: dict) -> str:
    head = ["problem", "training", "backend", "impl", "K", "ms/iter", "it/s", "samples/s", "GFLOP/iter", "TFLOP/s",
            "MFU %", "vs eager ref", "vs eager same precision", "EMD-K/EMD-1", "x floor", "set-up s", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["results"]:
        lines.append("| " + " | ".join([
            r["problem"], r["training"], r["backend"], r["impl"], str(r["K"]), f"{r['ms_per_iter']:.2f}",
            f"{r['iters_per_s']:.2f}", f"{r['samples_per_s']:.0f}", f"{r['flops_per_iter'] / 1e9:.3g}",
            f"{r['tflops']:.3g}", f"{100 * r['mfu']:.3g}", ratio(r["speedup_vs_eager_ref"], "{:.2f}x"),
            ratio(r["speedup_vs_eager_same_precision"], "{:.2f}x"), ratio(r["time_vs_K1"]),
            ratio(r["x_floor"], "{:.3g}"), f"{r['setup_s']:.1f}", ratio(r["peak_gpu_memory_gib"], "{:.1f}")]) + " |")
    lines += [f"{s['problem']} EMD-{s['K']}: fastest {s['impl']} / {s['backend']}, {s['speedup_vs_eager_ref']:.2f}x "
              f"the eager reference's it/s (target >= {s['target']:g}x: "
              f"{VERDICT[s['target_met']]}), MFU {100 * s['mfu']:.3g}%" for s in res["summary"]]
    where = res["gpu"] or f"CPU ({res['threads']} threads): SMOKE, not a speed claim"
    labels = {r["problem"]: r["problem_label"] for r in res["results"]}
    return "\n".join([f"EMD iteration throughput on {where}; torch {res['torch']}, triton {res['triton']}; "
                      f"MFU vs {res['peak_tflops']} TFLOP/s ({res['peak_note']})",
                      *(f"  {k}: {v}" for k, v in labels.items()), *res["notes"], *lines])


def compare_rows(baseline: dict, new: dict, threshold: float) -> tuple[list[str], list[str]]:
    """compare.py's comparison of the ms/iter of each variant (problem/backend/impl/K) in two throughput JSONs."""
    def records(res):
        return {f"{r['problem']}/{r['backend']}/{r['impl']}/K{r['K']}": {"stats": {"median": r["ms_per_iter"] / 1e3}}
                for r in res["results"]}

    return compare.compare(records(baseline), records(new), threshold)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", default=not ON_GPU,
                   help="tiny sizes, few iterations (the default without a GPU)")
    p.add_argument("--problems", nargs="+", choices=PROBLEMS + tuple(REAL_PROBLEMS), default=list(PROBLEMS),
                   help="vector, unet (the project's throughput problems); imagenet64, sd15 (real networks, "
                        "random weights: EDM's ImageNet-64 ADM at batch 64, SD v1.5's UNet at batch 8)")
    p.add_argument("--training", nargs="+", choices=list(roofline.TRAINING), default=["full"],
                   help="how generator and student train (roofline.TRAINING)")
    p.add_argument("--K", nargs="+", type=int, default=[1, 4, 16], help="Langevin steps per E-step")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(DEFAULT_IMPLS),
                   help="eager (eager-bf16: under bf16 autocast); compile (torch.compile-d networks); graph (compile "
                        "+ deferred checks + CUDA graph); "
                        "graph-bf16 (graph with bf16 autocast)")
    p.add_argument("--skip", nargs="+", default=[], metavar="IMPL/BACKEND",
                   help="variants to leave out, e.g. compile/triton (noted in the output)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; aot_eager in the smoke mode)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations first, after a CUDA graph's own warm-up and capture (default 5; smoke 1)")
    p.add_argument("--peak-tflops", type=float, default=800.0,
                   help="peak for MFU: the measured dense bf16 matmul rate (H100: ~800, docs/design.md)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a saved throughput JSON: compare each variant's ms/iter with it, exit 1 on a slow-down")
    p.add_argument("--threshold", type=float, default=0.10, help="allowed slow-down against --baseline, a fraction")
    p.add_argument("--out", type=Path, default=Path("runs/throughput.json"), help="JSON with every number")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if any(k < 0 for k in args.K):
        p.error("--K values must be >= 0")
    if unknown := set(args.skip) - {f"{i}/{b}" for i in IMPLS for b in BACKENDS}:
        p.error(f"--skip takes IMPL/BACKEND pairs, e.g. compile/triton; got {sorted(unknown)}")
    args.iters = args.iters or (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    res = measure(args)
    write_json(args.out, res)
    print(table(res))
    print(f"written: {args.out}")
    if res["interrupted"]:
        return 1
    if args.baseline:
        print(f"against {args.baseline}:")
        return compare.verdict(*compare_rows(json.loads(args.baseline.read_text()), res, args.threshold),
                               args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
