"""Fused Triton kernels vs the eager PyTorch reference chain (emd_fast.ops) vs torch.compile of that chain.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-json=out.json

Each case times one call (the losses: forward + backward). ``extra_info`` records the bytes a fused pass must
move and the FLOPs its formula runs (``roofline.kernel_cost``), the floor time at the copy bandwidth measured in
the same run and measured / floor (``x_floor``; None in the smoke mode), the achieved GB/s and % of that copy
bandwidth, the CUDA-event median
(``gpu_ms``) on the GPU, the device and the versions. Without a GPU (or with EMD_BENCH_SMOKE=1) it runs a smoke
mode on tiny sizes, so CI exercises the suite quickly; its numbers mean nothing.
"""
import pytest
import torch

from emd_fast import ops
from emd_fast.kernels import langevin, losses

import roofline
from benchtools import ON_GPU, SMOKE, run_facts, synced, time_ms

GAMMA = 0.05
SIZES = {"smoke8x16": (8, 16)} if SMOKE else {
    "vec4096x64": (4096, 64), "img64x3x64x64": (64, 3, 64, 64), "img128x3x128x128": (128, 3, 128, 128),
    "lat64x4x64x64": (64, 4, 64, 64)}
DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]


def _eps_step(shape, dtype, device):
    """(triton fn, reference fn, args); a fused pass reads eps, eta, D_T, D_psi, g and writes 4 (roofline.KERNELS)."""
    eps, eta, d_t, d_s, g = (torch.randn(shape, device=device, dtype=dtype) for _ in range(5))
    alpha, sigma = torch.rand(shape[0], device=device) * 0.5 + 0.5, torch.rand(shape[0], device=device) * 0.8 + 0.2
    stream = langevin.NoiseStream(0, device)

    def fused(*a):
        return langevin.langevin_eps_step(*a[:6], GAMMA, g=a[6], stream=stream)

    def reference(*a):
        return ops.langevin_eps_step(*a[:6], GAMMA, torch.randn_like(a[0]), g=a[6])

    return fused, reference, (eps, eta, d_t, d_s, alpha, sigma, g)


def _z_step(shape, dtype, device):
    """Read z, J^T v; write z'."""
    z, jtv = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    stream = langevin.NoiseStream(0, device)

    def fused(z, jtv):
        return langevin.langevin_z_step(z, jtv, GAMMA, stream=stream)

    def reference(z, jtv):
        return ops.langevin_z_step(z, jtv, GAMMA, torch.randn_like(z))

    return fused, reference, (z, jtv)


def _generator_loss(shape, dtype, device):
    """Forward reads eps, eta; backward reads them again and writes dL/dg."""
    g, eps, eta = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    per_example = [torch.rand(shape[0], device=device) * 0.5 + 0.5 for _ in range(3)]
    return losses.generator_loss, ops.generator_loss, (g.requires_grad_(True), eps, eta, *per_example)


def _dsm_loss(shape, dtype, device):
    """Forward reads d, x; backward reads them again and writes dL/dd."""
    d, x = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    weight = torch.rand(shape[0], device=device) + 0.1
    return losses.dsm_loss, ops.dsm_loss, (d.requires_grad_(True), x, weight)


CASES = {"langevin_eps_step": _eps_step, "langevin_z_step": _z_step, "generator_loss": _generator_loss,
         "dsm_loss": _dsm_loss}
LOSSES = ("generator_loss", "dsm_loss")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", ["triton", "eager", "compile"])
@pytest.mark.parametrize("kernel", CASES)
def test_bench(benchmark, kernel, impl, size, dtype):
    if impl == "compile" and not ON_GPU:
        pytest.skip("torch.compile cases run on the GPU only: on the CPU each compiles C++ for tens of seconds")
    facts, shape = run_facts(), SIZES[size]
    fused, reference, args = CASES[kernel](shape, dtype, facts["device"])
    if impl == "compile":
        torch._dynamo.reset()  # a fresh compile per case: never the recompile limit's silent eager fallback
    fn = {"triton": fused, "eager": reference, "compile": torch.compile(reference) if impl == "compile" else None}[impl]
    call = (lambda: torch.autograd.grad(fn(*args), args[0])) if kernel in LOSSES else (lambda: fn(*args))

    benchmark.group = f"{kernel}-{size}-{str(dtype).removeprefix('torch.')}"
    nbytes, flops = roofline.kernel_cost(kernel, args[0].numel(), args[0].element_size())
    ms = time_ms(call)  # also the warm-up (and torch.compile's compilation) before pytest-benchmark's rounds
    benchmark.pedantic(synced(call), rounds=3 if SMOKE else 30, warmup_rounds=1)
    gbps = nbytes / ms / 1e6
    floor_ms = 1e3 * roofline.floor_s(nbytes, flops, facts["copy_gbps"], roofline.H100["fp32_tflops"])
    benchmark.extra_info.update(
        kernel=kernel, impl=impl, size=size, shape=list(shape), dtype=str(dtype), bytes=nbytes, flops=flops,
        floor_ms=floor_ms, x_floor=None if SMOKE else ms / floor_ms,
        gpu_ms=ms if ON_GPU else None, time_ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / facts["copy_gbps"],
        copy_gbps=facts["copy_gbps"], gpu=facts["gpu"], torch=facts["torch"], triton=facts["triton"], smoke=SMOKE)
