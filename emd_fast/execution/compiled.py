"""torch.compile for the networks of a distillation run: generator, student and the teacher's network.

``compile_networks(distiller)`` compiles each network's forward *in place* (``nn.Module.compile``): the modules stay
the same objects with the same parameters, so the optimizers, ``state_dict`` keys and checkpoints are exactly those
of an eager run (a checkpoint written with ``--compile`` loads into an eager run and back). The EMD iteration
itself (control flow, Langevin updates, losses, optimizers) stays eager; only the network calls are compiled, which
is where the FLOPs of an image-sized problem are. Results equal the eager run up to float rounding.

Not compiled, and reported as skipped: an analytic teacher (``GaussianMixtureTeacher`` has closed-form scores, no
network); every network when the chosen backend cannot run here (inductor on the CPU without a C++ compiler).
CUDA-graph modes ("reduce-overhead", "max-autotune") are refused: they would capture each network call on its own;
``emd_fast.execution.graphs.GraphedStep`` captures the whole iteration (compiled networks included) in one graph
instead.

The backend defaults to inductor; ``EMD_COMPILE_BACKEND=aot_eager`` (or ``backend=``) selects another torch.compile
backend, e.g. to tell a compiler bug from a model bug, or to exercise the compiled path quickly on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

MODES = ("default", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class CompileReport:
    """What ``compile_networks`` did: compiled network names, skipped names with the reason, backend and mode."""

    backend: str
    mode: str
    compiled: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"torch.compile ({self.backend}, mode {self.mode}): compiled "
               + (", ".join(self.compiled) if self.compiled else "nothing")]
        out += [f"torch.compile: skipped {name}: {why}" for name, why in self.skipped.items()]
        return out


def networks(distiller) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The networks of a Distiller that can be compiled (name -> module), and the parts that are not networks."""
    found = {"generator": distiller.generator, "student": distiller.student}
    teacher = distiller.teacher
    net = getattr(teacher, "net", None)
    if isinstance(net, nn.Module):
        found["teacher network"] = net
        return found, {}
    return found, {"teacher": f"{type(teacher).__name__} is analytic (closed-form scores), not a network: "
                              "it stays eager"}


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot compile for ``device`` here, or None if it can."""
    if backend != "inductor":
        return None
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure means inductor cannot build CPU code here
            return f"inductor needs a C++ compiler for CPU code and found none ({type(e).__name__}: {e})"
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs triton for GPU code and it is not installed"
    return None


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_networks(distiller, mode: str = "default", backend: str | None = None,
                     dynamic: bool | None = None) -> CompileReport:
    """Apply torch.compile in place to the generator, the student and the teacher's network (where it is one).

    distiller: a ``training.distiller.Distiller``; mode: one of MODES; backend: a torch.compile backend (default
    $EMD_COMPILE_BACKEND or "inductor"); dynamic: passed to torch.compile (None: torch's automatic dynamic shapes,
    so the evaluation batch recompiles once and then shares a dynamic graph).
    Compilation itself happens lazily at the first call. Never raises for a missing GPU: what cannot be compiled
    is listed in the report's ``skipped`` with the reason, and stays eager.
    """
    if mode in CUDAGRAPH_MODES:
        raise ValueError(f"torch.compile mode {mode!r} captures CUDA graphs per network call; use one of {MODES} "
                         f"and --cuda-graph (emd_fast.execution.graphs), which captures the whole iteration")
    if mode not in MODES:
        raise ValueError(f"torch.compile mode must be one of {MODES}, got {mode!r}")
    backend = backend or os.environ.get("EMD_COMPILE_BACKEND") or "inductor"
    report = CompileReport(backend=backend, mode=mode)
    found, report.skipped = networks(distiller)
    why = backend_unavailable(backend, distiller.device)
    kwargs = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        kwargs["mode"] = mode
    elif mode != "default":
        report.skipped["mode"] = f"mode {mode!r} applies to inductor only; backend {backend} ignores it"
    for name, module in found.items():
        if why:
            report.skipped[name] = why + ": it stays eager"
        elif is_compiled(module):
            report.skipped[name] = "already compiled"
        else:
            module.compile(**kwargs)
            report.compiled.append(name)
    return report
