"""A full EMD training iteration (``Distiller.step``): reference vs triton backend, eager vs torch.compile-d networks,
K in {1, 4, 16}, on the vector problem (ring2d, MLP, batch 256) and a U-Net problem (GPU: batch 64 of 3x64x64; smoke:
the tiny U-Net, batch 4). Problems, FLOP counting and timing are those of ``benchmarks/throughput.py``.

    python -m pytest benchmarks/test_bench_train.py --benchmark-json=train.json

``extra_info``: ms per iteration (CUDA events on GPU, median), iterations/s, samples/s, model FLOPs per iteration
(FlopCounterMode over one eager reference iteration), TFLOP/s and MFU against PEAK_TFLOPS (the measured H100 dense
bf16 rate, DESIGN.md; override with EMD_PEAK_TFLOPS), the GPU name and versions. Without a GPU (or with
EMD_BENCH_SMOKE=1) the smoke sizes run, the triton backend in the interpreter, and the compile cases are skipped;
the smoke numbers mean nothing.
"""
import copy
import functools
import os

import pytest
import torch
from benchtools import ON_GPU, SMOKE, run_facts
from throughput import (build_networks, compiled_copy, count_flops, make_distiller, problem_spec,
                        time_steps)

PEAK_TFLOPS = float(os.environ.get("EMD_PEAK_TFLOPS", "800"))
ITERS, WARMUP = (2, 1) if SMOKE else (20, 5)


@functools.cache
def networks(problem: str, impl: str):
    """The problem's networks (eager, or a torch.compile-d copy), built once per session: shared by the K and
    backend cases, so a compiled case pays compilation once (in its warm-up)."""
    spec = problem_spec(problem, SMOKE)
    nets = build_networks(spec, run_facts()["device"])
    if impl == "compile":
        nets, _ = compiled_copy(nets, run_facts()["device"], "inductor")
    return spec, nets


@functools.cache
def flops(problem: str, K: int) -> int:
    spec, nets = networks(problem, "eager")
    return count_flops(make_distiller(copy.deepcopy(nets), spec["batch"], K, "reference", run_facts()["device"]))


@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("impl", ["eager", "compile"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("problem", ["vector", "unet"])
def test_bench_step(benchmark, problem, backend, impl, K):
    if impl == "compile" and not ON_GPU:
        pytest.skip("torch.compile cases run on the GPU only: on the CPU inductor builds C++ for ~20 s per network "
                    "pair, too slow for a smoke suite (tests/test_compiled.py checks compiled == eager on the CPU)")
    facts = run_facts()
    spec, nets = networks(problem, impl)
    dist = make_distiller(nets, spec["batch"], K, backend, facts["device"])
    times = time_steps(dist, WARMUP, ITERS)  # warm-up (and compilation) first, then CUDA-event / wall-clock times
    sec = sorted(times)[len(times) // 2]

    def step_and_sync():
        out = dist.step()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"train-{problem}-K{K}"
    benchmark.pedantic(step_and_sync, rounds=2 if SMOKE else 10, warmup_rounds=0)
    n_flops = flops(problem, K)
    tflops = n_flops / sec / 1e12
    benchmark.extra_info.update(
        problem=problem, problem_label=spec["label"], backend=backend, impl=impl, K=K, batch=spec["batch"],
        ms_per_iter=1e3 * sec, gpu_ms=1e3 * sec if ON_GPU else None, iters_per_s=1 / sec,
        samples_per_s=spec["batch"] / sec, flops_per_iter=n_flops, tflops=tflops, mfu=tflops / PEAK_TFLOPS,
        peak_tflops=PEAK_TFLOPS, gpu=facts["gpu"], torch=facts["torch"], triton=facts["triton"], smoke=SMOKE)
