"""Throughput of a full EMD training iteration (``Distiller.step``): iterations/s, samples/s, TFLOP/s and MFU.

    python benchmarks/throughput.py                      # GPU: realistic sizes; no GPU: the smoke sizes
    python benchmarks/throughput.py --smoke --out t.json
    python benchmarks/throughput.py --problems unet --K 1 16 --iters 20 --peak-tflops 800

Variants: backend reference | triton (fused elementwise kernels) x eager | compile (torch.compile of the generator,
the student and the teacher's network where it is one: ``emd_fast.compiled``) x K (Langevin steps per E-step).
Problems:
  vector  ring2d's exact GaussianMixtureTeacher with the CLI's default MLP generator / student (hidden 128,
          depth 3), batch 256 (the same on GPU and in the smoke mode);
  unet    a NetworkTeacher over a UNetDenoiser: on GPU batch 64 of 3x64x64 with a mid-sized ADM config
          (model_channels 64, channel_mult 1-2-3-4, 2 blocks, attention at 16 and 8; "adm64-mc64" below);
          in the smoke mode the "tiny" config (1x8x8, 10 classes) with batch 4.
Timing: warm-up iterations first (torch.compile compiles then), then ``--iters`` timed iterations; on GPU each
iteration is timed with CUDA events (median), on the CPU with the wall clock (median). The iteration is the one
training runs: with the finite checks (host syncs) unless --no-check-finite.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one eager reference iteration (forward and backward
matmul / conv / attention FLOPs of every network call, the generator VJPs included; elementwise work is not
counted). The FLOPs are the same for every backend and compile variant of a (problem, K). TFLOP/s = FLOPs / time;
MFU = that over --peak-tflops (default 800: the dense bf16 matmul rate measured on an H100 in DESIGN.md; the
networks here run in fp32, so MFU against the bf16 rate is a lower bound on what the hardware could give).
EMD-K/EMD-1 is each row's time over the K=1 row of the same problem, backend and compile variant.

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
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from emd_fast import problems  # noqa: E402
from emd_fast.compiled import compile_networks  # noqa: E402
from emd_fast.distiller import Distiller  # noqa: E402
from emd_fast.emd import EMDConfig  # noqa: E402
from emd_fast.networks import MLPDenoiser  # noqa: E402
from emd_fast.schedules import make_schedule  # noqa: E402
from emd_fast.teachers import NetworkTeacher  # noqa: E402
from emd_fast.unet import UNET_CONFIGS, UNetDenoiser  # noqa: E402

PROBLEMS = ("vector", "unet")
BACKENDS = ("reference", "triton")
IMPLS = ("eager", "compile")
LAMBDA_STAR = -4.0  # the CLI default
UNET_GPU = dict(img_channels=3, img_resolution=64, label_dim=0, model_channels=64, channel_mult=[1, 2, 3, 4],
                num_blocks=2, attn_resolutions=[16, 8], channels_per_head=64, dropout=0.0, sigma_data=0.5)


def problem_spec(name: str, smoke: bool) -> dict:
    """Sizes of a problem: batch, network config and a label for the table."""
    if name == "vector":
        return dict(name=name, batch=256, label="ring2d MLP h128 d3, batch 256")
    if name == "unet":
        if smoke:
            return dict(name=name, batch=4, config=UNET_CONFIGS["tiny"], label="U-Net tiny 1x8x8, batch 4")
        return dict(name=name, batch=64, config=UNET_GPU, label="U-Net adm64-mc64 3x64x64, batch 64")
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


def build_networks(spec: dict, device: torch.device, seed: int = 0):
    """(teacher, generator, student, sigma_data, num_classes), random weights (throughput does not need trained
    ones); generator and student start as copies of the teacher network, as in training."""
    torch.manual_seed(seed)
    if spec["name"] == "vector":
        schedule = make_schedule("vp_cosine")
        teacher = problems.ring2d(schedule)
        sigma_data = problems.data_std(teacher)
        net = MLPDenoiser(teacher.dim, schedule, hidden=128, depth=3, sigma_data=sigma_data).to(device)
        num_classes = 0
    else:
        schedule = make_schedule("edm")
        cfg = spec["config"]
        net = UNetDenoiser(schedule=schedule, **cfg).to(device)
        sigma_data, num_classes = cfg["sigma_data"], cfg["label_dim"]
        teacher = None
    generator, student = problems.init_networks(net, schedule.t_at_lambda(LAMBDA_STAR))
    if teacher is None:
        c, r = spec["config"]["img_channels"], spec["config"]["img_resolution"]
        teacher = NetworkTeacher(net, schedule, (c, r, r))
    return teacher, generator, student, sigma_data, num_classes


def make_distiller(nets, batch: int, K: int, backend: str, device, check_finite: bool = True) -> Distiller:
    teacher, generator, student, sigma_data, num_classes = nets
    cfg = EMDConfig(K=K, check_finite=check_finite)
    return Distiller(teacher, generator, student, cfg, batch=batch, lr_g=1e-4, lr_s=1e-3, seed=0,
                     sigma_data=sigma_data, num_classes=num_classes, backend=backend, device=device)


def compiled_copy(nets, device, backend: str | None):
    """Deep copies of the networks with torch.compile applied in place (the eager originals stay eager)."""
    teacher, generator, student, sigma_data, num_classes = copy.deepcopy(nets)
    probe = make_distiller((teacher, generator, student, sigma_data, num_classes), 2, 1, "reference", device)
    report = compile_networks(probe, backend=backend)
    return (teacher, generator, student, sigma_data, num_classes), report


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def time_steps(dist: Distiller, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` iterations after ``warmup`` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        dist.step()
    sync()
    times = []
    for _ in range(iters):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.step()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            dist.step()
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


def count_flops(dist: Distiller) -> int:
    """Model FLOPs of one iteration (forward + backward matmul/conv/attention of every network call)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        dist.step()
    return int(counter.get_total_flops())


def machine_facts() -> dict:
    return {"host": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if ON_GPU else None,
            "device": "cuda" if ON_GPU else "cpu", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "threads": torch.get_num_threads()}


def measure(args) -> dict:
    device = torch.device("cuda" if ON_GPU else "cpu")
    compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    rows, notes = [], []
    for pname in args.problems:
        spec = problem_spec(pname, args.smoke)
        nets = build_networks(spec, device)
        flops = {K: count_flops(make_distiller(copy.deepcopy(nets), spec["batch"], K, "reference", device,
                                               args.check_finite)) for K in args.K}
        variants = {"eager": nets}
        if "compile" in args.impls:
            variants["compile"], report = compiled_copy(nets, device, compile_backend)
            notes += [f"{pname}: {line}" for line in report.lines()]
        for impl in args.impls:
            for backend in args.backends:
                for K in args.K:
                    t0 = time.perf_counter()
                    dist = make_distiller(variants[impl], spec["batch"], K, backend, device, args.check_finite)
                    times = time_steps(dist, args.warmup, args.iters)
                    sec = statistics.median(times)
                    tflops = flops[K] / sec / 1e12
                    rows.append(dict(problem=pname, problem_label=spec["label"], backend=backend, impl=impl, K=K,
                                     batch=spec["batch"], ms_per_iter=1e3 * sec, iters_per_s=1 / sec,
                                     samples_per_s=spec["batch"] / sec, flops_per_iter=flops[K],
                                     tflops=tflops, mfu=tflops / args.peak_tflops,
                                     ms_all=[1e3 * t for t in times], wall_s=time.perf_counter() - t0))
                    if not args.quiet:
                        print(f"  {pname} {backend} {impl} K={K}: {1e3 * sec:.2f} ms/iter "
                              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for r in rows:
        base = next((b for b in rows if (b["problem"], b["backend"], b["impl"], b["K"]) ==
                     (r["problem"], r["backend"], r["impl"], 1)), None)
        r["time_vs_K1"] = r["ms_per_iter"] / base["ms_per_iter"] if base else None
    return {**machine_facts(), "smoke": args.smoke, "peak_tflops": args.peak_tflops,
            "peak_note": "measured dense bf16 matmul rate (H100, DESIGN.md); networks run in fp32",
            "compile_backend": compile_backend, "check_finite": args.check_finite, "iters": args.iters,
            "warmup": args.warmup, "notes": notes, "results": rows}


def table(res: dict) -> str:
    head = ["problem", "backend", "compile", "K", "ms/iter", "it/s", "samples/s", "GFLOP/iter", "TFLOP/s", "MFU %",
            "EMD-K/EMD-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["results"]:
        ratio = f"{r['time_vs_K1']:.2f}" if r["time_vs_K1"] is not None else "-"
        lines.append("| " + " | ".join([
            r["problem"], r["backend"], res["compile_backend"] if r["impl"] == "compile" else "eager", str(r["K"]),
            f"{r['ms_per_iter']:.2f}", f"{r['iters_per_s']:.2f}", f"{r['samples_per_s']:.0f}",
            f"{r['flops_per_iter'] / 1e9:.3g}", f"{r['tflops']:.3g}", f"{100 * r['mfu']:.3g}", ratio]) + " |")
    where = res["gpu"] or f"CPU ({res['threads']} threads): SMOKE, not a speed claim"
    labels = {r["problem"]: r["problem_label"] for r in res["results"]}
    return "\n".join([f"EMD iteration throughput on {where}; torch {res['torch']}, triton {res['triton']}; "
                      f"MFU vs {res['peak_tflops']} TFLOP/s ({res['peak_note']})",
                      *(f"  {k}: {v}" for k, v in labels.items()), *res["notes"], *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", default=not ON_GPU,
                   help="tiny sizes, few iterations (the default without a GPU)")
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    p.add_argument("--K", nargs="+", type=int, default=[1, 4, 16], help="Langevin steps per E-step")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="eager networks and/or torch.compile-d networks")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; aot_eager in the smoke mode)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per variant (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5; smoke 1)")
    p.add_argument("--peak-tflops", type=float, default=800.0,
                   help="peak for MFU: the measured dense bf16 matmul rate (H100: ~800, DESIGN.md)")
    p.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                   help="the per-network finite checks of training (host syncs)")
    p.add_argument("--out", type=Path, default=Path("runs/throughput.json"), help="JSON with every number")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if any(k < 0 for k in args.K):
        p.error("--K values must be >= 0")
    args.iters = args.iters or (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    res = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
