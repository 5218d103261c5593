"""Phases of an EMD iteration: NVTX ranges for Nsight Systems and optional per-phase wall-clock timing.

NVTX ranges are emitted only when EMD_NVTX=1 (set it when recording a trace: see the README); otherwise
``phase`` returns one shared no-op context manager, so instrumented code costs a dict lookup per phase.
Per-phase timing (``PhaseTimer``) synchronises the device at every boundary, so it is for reports, not for speed.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict

import torch

NVTX = os.environ.get("EMD_NVTX", "0") == "1"
_NULL = contextlib.nullcontext()
_timer: "PhaseTimer | None" = None

if NVTX:
    import nvtx


class PhaseTimer:
    """Accumulates seconds per phase while active (``with timer:``); synchronises ``device`` at each boundary."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.calls = torch.device(device), defaultdict(float), defaultdict(int)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def __enter__(self):
        global _timer
        _timer = self
        return self

    def __exit__(self, *exc):
        global _timer
        _timer = None

    def summary(self, iterations: int) -> dict[str, float]:
        """Milliseconds per iteration for each phase."""
        return {k: round(1000 * v / max(iterations, 1), 3) for k, v in self.seconds.items()}


def phase(name: str):
    """Context manager marking one phase: an NVTX range if EMD_NVTX=1, timed if a PhaseTimer is active."""
    if _timer is not None:
        if NVTX:
            return _stacked(nvtx.annotate(name, domain="emd_fast"), _timer.measure(name))
        return _timer.measure(name)
    if NVTX:
        return nvtx.annotate(name, domain="emd_fast")
    return _NULL


@contextlib.contextmanager
def _stacked(a, b):
    with a, b:
        yield
