"""The whole EMD iteration as one CUDA graph: ``GraphedStep(distiller)()`` replaces ``distiller.step()``.

An eager iteration launches hundreds of small kernels (K x (teacher, student, generator VJP, Langevin update),
two backward passes, two Adam steps); on small networks the GPU waits for the Python that launches them. The
graph records one iteration and replays it with a single launch. What makes the iteration capturable:
  * static shapes: the batch never changes, and every tensor the graph reads (parameters, optimizer state, the
    NoiseStream, the finite flag) is updated in place at a fixed address;
  * no host syncs: ``Execution(finite_check="deferred")`` (a device flag read by the fused Adam step) instead of
    checks that raise at once; capturable fused Adam (step counts on the device);
  * fresh randomness on every replay: the run's torch.Generator is registered with the graph, so each replay
    draws z, eps, t and the Langevin noise from the next positions of the same Philox stream (the offset advances
    on the host at every replay and is checkpointed as before); the in-kernel noise counter lives on the device.
The first ``warmup`` calls run eagerly on a side stream (they are real iterations: they initialise the optimizer
state, compile the torch.compile-d networks and the Triton kernels, pick the convolution algorithms); the next call
captures the iteration and replays it, and every later call replays it. Returned losses are copies, safe to keep.
A captured iteration cannot be timed by phase (it is one launch): per-phase times come from an eager run.
"""
from __future__ import annotations

import torch

from ..training.distiller import Distiller


def graphs_unavailable(distiller: Distiller) -> str | None:
    """Why the iteration of ``distiller`` cannot be captured, or None if it can."""
    if distiller.device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this run is on {distiller.device}"
    if not distiller.deferred:
        return "CUDA graphs need finite_check='deferred' (the 'sync' checks read values on the host every step)"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register a torch.Generator with a CUDA graph (needs >= 2.5)"
    return None


class GraphedStep:
    """Callable like ``distiller.step()``: one EMD iteration per call, captured in a CUDA graph after ``warmup``
    eager ones. distiller: a Distiller on a CUDA device with ``finite_check="deferred"``."""

    def __init__(self, distiller: Distiller, warmup: int = 3):
        why = graphs_unavailable(distiller)
        if why:
            raise ValueError(why)
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the optimizer state must exist before capture), got {warmup}")
        self.distiller, self.warmup, self.calls = distiller, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.side = torch.cuda.Stream(distiller.device)

    def __call__(self) -> dict[str, torch.Tensor]:
        distiller = self.distiller
        self.calls += 1
        if self.calls <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream(distiller.device))
            with torch.cuda.stream(self.side):
                losses = distiller.step()
            torch.cuda.current_stream(distiller.device).wait_stream(self.side)
            return losses
        if self.graph is None:
            self._capture()
        self.graph.replay()
        distiller.step_count += 1
        return {k: v.clone() for k, v in self.losses.items()}

    def _capture(self) -> None:
        distiller = self.distiller
        torch.cuda.synchronize(distiller.device)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(distiller.rng)
        # capture records the kernels without running them: the iteration's host-side counter must not move
        step_count = distiller.step_count
        with torch.cuda.graph(graph, stream=self.side):
            self.losses = distiller.step()
        distiller.step_count = step_count
        self.graph = graph
