"""A full EMD training iteration: reference vs triton backend x the impls of ``benchmarks/throughput.py`` (eager,
compile, graph = compile + deferred checks + CUDA graph, graph-bf16) x K in {1, 4, 16}, on the vector problem
(ring2d, MLP, batch 256) and a U-Net problem (GPU: batch 64 of 3x64x64; smoke: the tiny U-Net, batch 4). Problems,
variants, FLOP counting and timing are those of ``benchmarks/throughput.py``.

    python -m pytest benchmarks/test_bench_train.py --benchmark-json=train.json

``extra_info``: ms per iteration (CUDA events on GPU, median; a graph variant after its warm-up and capture),
iterations/s, samples/s, model FLOPs per iteration (FlopCounterMode over one eager reference iteration), TFLOP/s
and MFU against PEAK_TFLOPS (the measured H100 dense bf16 rate, docs/design.md; override with EMD_PEAK_TFLOPS), the
execution options, the GPU name and versions. Without a GPU (or with EMD_BENCH_SMOKE=1) the smoke sizes run, the
triton backend in the interpreter; without a GPU the compile and graph cases are skipped. The smoke numbers mean
nothing.
"""
import copy
import functools
import os
from dataclasses import asdict

import pytest

from emd_fast.training.distiller import Execution

from benchtools import ON_GPU, SMOKE, run_facts, synced
from throughput import (
    IMPLS,
    build_networks,
    count_flops,
    impl_networks,
    make_distiller,
    problem_spec,
    time_steps,
    variant_execution,
    variant_step,
)

PEAK_TFLOPS = float(os.environ.get("EMD_PEAK_TFLOPS", "800"))
ITERS, WARMUP = (2, 1) if SMOKE else (20, 5)


@functools.cache
def networks(problem: str, impl: str):
    """(spec, the impl's networks, why the impl cannot run here or None), built once per session: shared by the K
    and backend cases, so a compiled impl pays compilation once (in its first warm-up)."""
    spec = problem_spec(problem, SMOKE)
    device = run_facts()["device"]
    nets, _, why = impl_networks(build_networks(spec, device), spec, impl, device, "inductor")
    return spec, nets, why


@functools.cache
def flops(problem: str, K: int) -> int:
    spec, nets, _ = networks(problem, "eager")
    return count_flops(make_distiller(copy.deepcopy(nets), spec["batch"], K, Execution(), run_facts()["device"]))


@pytest.mark.parametrize("K", [1, 4, 16])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("problem", ["vector", "unet"])
def test_bench_step(benchmark, problem, backend, impl, K):
    if impl == "compile" and not ON_GPU:
        pytest.skip("torch.compile cases run on the GPU only: on the CPU inductor builds C++ for ~20 s per network "
                    "pair, too slow for a smoke suite (tests/test_compiled.py checks compiled == eager on the CPU)")
    facts = run_facts()
    spec, nets, why = networks(problem, impl)
    if why:
        pytest.skip(why)
    step, setup = variant_step(nets, spec, impl, backend, K, facts["device"])
    times = time_steps(step, setup + WARMUP, ITERS)  # set-up, warm-up (compilation) first, then timed iterations
    sec = sorted(times)[len(times) // 2]

    benchmark.group = f"train-{problem}-K{K}"
    benchmark.pedantic(synced(step), rounds=2 if SMOKE else 10, warmup_rounds=0)
    n_flops = flops(problem, K)
    tflops = n_flops / sec / 1e12
    benchmark.extra_info.update(
        problem=problem, problem_label=spec["label"], backend=backend, impl=impl, K=K,
        execution=asdict(variant_execution(impl, backend, problem)), batch=spec["batch"], ms_per_iter=1e3 * sec,
        gpu_ms=1e3 * sec if ON_GPU else None, iters_per_s=1 / sec, samples_per_s=spec["batch"] / sec,
        flops_per_iter=n_flops, tflops=tflops, mfu=tflops / PEAK_TFLOPS, peak_tflops=PEAK_TFLOPS, gpu=facts["gpu"],
        torch=facts["torch"], triton=facts["triton"], smoke=SMOKE)
