"""Timing and run facts shared by the benchmark suites: the mode (GPU, or the CPU smoke mode), a timer, and
the device-to-device copy bandwidth measured in the same run."""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import triton

ON_GPU = torch.cuda.is_available()
SMOKE = os.environ.get("EMD_BENCH_SMOKE") == "1" or not ON_GPU


def time_ms(fn) -> float:
    """Median time of one call in ms: CUDA events through triton.testing.do_bench on the GPU (which flushes
    the L2 cache before every call, so small inputs are not timed from cache), wall clock on the CPU."""
    if ON_GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def synced(fn):
    """fn followed by a device synchronisation (pytest-benchmark's wall clock then covers the GPU work)."""
    def call():
        out = fn()
        if ON_GPU:
            torch.cuda.synchronize()
        return out

    return call


@functools.cache
def run_facts() -> dict:
    """Device, versions and the copy bandwidth (GB/s, read + write) of a 1 GiB (CPU: 16 MiB) fp32 copy."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    src = torch.randn((1 << 28) if ON_GPU else (1 << 22), device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    return {"device": device, "copy_gbps": 2 * src.nbytes / copy_ms / 1e6,
            "gpu": torch.cuda.get_device_name() if ON_GPU else "none (CPU, Triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__}
