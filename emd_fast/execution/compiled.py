"""torch.compile for the networks of a distillation run: generator, student, the teacher's network and its guide.

``compile_networks(distiller)`` compiles *in place* (``compile_in_place``): the modules stay the same objects with
the same parameters, so the optimizers, ``state_dict`` keys and checkpoints are exactly those of an eager run (a
checkpoint written with ``--compile`` loads into an eager run and back). The EMD iteration itself (control flow,
Langevin updates, losses, optimizers) stays eager; only the network calls are compiled, which is where the FLOPs of
an image-sized problem are. Results equal the eager run up to float rounding.

Regional compilation (the default, ``scope="regional"``): a network built of repeated blocks (the residual blocks of
our ADM / DDPM++ and EDM2 U-Nets, diffusers' ResNet and transformer blocks, SD3's and FLUX's transformer blocks:
``REGION_CLASSES``; a diffusers model's ``_repeated_blocks``) has each block
compiled, not the whole network. Blocks of one class share their code, so the compiler traces and builds each
distinct block (its channels, resolution and attention) once, and the generator, student and teacher, copies of one
architecture, share those builds (an EDM2 teacher's guide network, ``--guide``, is compiled the same way: its blocks
share the teacher's code and add the builds of their own sizes); the glue between blocks (embeddings,
concatenations, the output layer) stays eager. A whole
ImageNet-64 ADM compiles as one graph per network and call mode (forwards without gradients, the generator's VJP,
training forwards with their backward graphs); regionally, as one small graph per distinct block and mode (3 modes:
the no-grad calls of all three networks share one, see ``emd.frozen``; benchmarks/compile_time.py measures both).
Regions compile with static shapes (``dynamic=False``): one code object serves blocks of different sizes, and
torch's automatic dynamic shapes would otherwise turn them into dynamic-shape graphs. A network without such
blocks (the MLPs) is compiled whole.

Compiled artefacts are kept (``use_compile_cache``): inductor's FX-graph and AOTAutograd caches, its compiled C++
and Triton kernels, all under one directory (``TORCHINDUCTOR_CACHE_DIR``; by default ``<run>/compile_cache``), so a
resume, another process of the same job, or a sweep pointed at one directory (``--compile-cache``) starts warm: its
compiler finds every graph built before and only re-traces. With $TORCH_CACHING_PRECOMPILE=1 (opt in, see
``cache_traced_frames``) Dynamo's traced frames are kept too and a warm start traces nothing; for regional
compilation only (a run with a network compiled whole turns it off, with a note). That cache is keyed by function, so
each class's forward is compiled once per process (``compile_in_place``) and every module of the class calls that one
wrapper.

Not compiled, and reported as skipped: an analytic teacher (``GaussianMixtureTeacher`` has closed-form scores, no
network); every network when the chosen backend cannot run here (inductor on the CPU without a C++ compiler).
CUDA-graph modes ("reduce-overhead", "max-autotune") are refused: they would capture each network call on its own;
``emd_fast.execution.graphs.GraphedStep`` captures the whole iteration (compiled networks included) in one graph
instead.

The backend defaults to inductor; ``EMD_COMPILE_BACKEND=aot_eager`` (or ``backend=``) selects another torch.compile
backend, e.g. to tell a compiler bug from a model bug, or to exercise the compiled path quickly on the CPU.
"""
from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
from torch import nn

MODES = ("default", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
SCOPES = ("regional", "whole")
# the repeated blocks compiled one by one, by class name: ours (ADM and DDPM++/NCSN++ U-Nets; EDM2's, whose class
# keeps EDM2's name ``Block`` and is named by its module), diffusers' UNets' and SD3's and FLUX's transformer blocks;
# and, below a diffusers model, the classes it names in ``_repeated_blocks`` (what its compile_repeated_blocks compiles)
REGION_CLASSES = ("UNetBlock", "emd_fast.nets.edm2.Block", "ResnetBlock2D", "Transformer2DModel",
                  "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
# Dynamo keeps at most recompile_limit compiled versions per code object; the blocks of one class share theirs
# (one version per distinct block and call mode: 72 for an ImageNet-64 ADM run), so regions raise the limits
RECOMPILE_LIMIT, ACCUMULATED_RECOMPILE_LIMIT = 512, 2048
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


@dataclass
class CompileReport:
    """What ``compile_networks`` did: compiled network names (with their regions), skipped names with the reason,
    backend, mode and scope."""

    backend: str
    mode: str
    scope: str = "regional"
    compiled: list[str] = field(default_factory=list)
    regions: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        names = [f"{n} ({self.regions[n]} blocks)" if self.regions.get(n) else n for n in self.compiled]
        out = [f"torch.compile ({self.backend}, mode {self.mode}, {self.scope}): compiled "
               + (", ".join(names) if names else "nothing")]
        out += [f"torch.compile: skipped {name}: {why}" for name, why in self.skipped.items()]
        return out


def networks(distiller) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The networks of a Distiller that can be compiled (name -> module): generator, student, the teacher's network
    and its guide network (EDM2's guidance) where it has them; and the parts that are not networks."""
    found = {"generator": distiller.generator, "student": distiller.student}
    teacher = distiller.teacher
    net = getattr(teacher, "net", None)
    if isinstance(net, nn.Module):
        found["teacher network"] = net
        if isinstance(getattr(teacher, "guide", None), nn.Module):
            found["guide network"] = teacher.guide
        return found, {}
    return found, {"teacher": f"{type(teacher).__name__} is analytic (closed-form scores), not a network: "
                              "it stays eager"}


def regions(module: nn.Module, classes: tuple[str, ...] = REGION_CLASSES) -> list[nn.Module]:
    """The outermost submodules of ``module`` whose class is one of ``classes`` (its name, or its module and name) or
    is named by the ``_repeated_blocks`` of a diffusers model above it, in order ([]: none)."""
    cls = type(module)
    if cls.__name__ in classes or f"{cls.__module__}.{cls.__name__}" in classes:
        return [module]
    repeated = getattr(type(module), "_repeated_blocks", None)
    if isinstance(repeated, (list, tuple)) and all(isinstance(name, str) for name in repeated):
        classes = (*classes, *repeated)
    return [r for child in module.children() for r in regions(child, classes)]


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
    """Whether ``module`` or one of its regions was compiled in place (``compile_in_place`` or nn.Module.compile)."""
    return any("forward" in vars(m) or getattr(m, "_compiled_call_impl", None) is not None
               for m in (module, *regions(module)))


def compile_networks(distiller, mode: str = "default", backend: str | None = None, dynamic: bool | None = None,
                     scope: str = "regional") -> CompileReport:
    """Apply torch.compile in place to the generator, the student and the teacher's network and guide network (where
    it has them).

    distiller: a ``training.distiller.Distiller``; mode: one of MODES; backend: a torch.compile backend (default
    $EMD_COMPILE_BACKEND or "inductor"); scope: "regional" (each repeated block, see the module docstring; a network
    without any is compiled whole) or "whole" (each network as one graph); dynamic: passed to torch.compile for
    whole networks (None: torch's automatic dynamic shapes, so the evaluation batch recompiles once and then shares
    a dynamic graph); regions are always static.
    Compilation itself happens lazily at the first call. Never raises for a missing GPU: what cannot be compiled
    is listed in the report's ``skipped`` with the reason, and stays eager.
    """
    if mode in CUDAGRAPH_MODES:
        raise ValueError(f"torch.compile mode {mode!r} captures CUDA graphs per network call; use one of {MODES} "
                         f"and --cuda-graph (emd_fast.execution.graphs), which captures the whole iteration")
    if mode not in MODES:
        raise ValueError(f"torch.compile mode must be one of {MODES}, got {mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"compile scope must be one of {SCOPES}, got {scope!r}")
    backend = backend or default_backend()
    report = CompileReport(backend=backend, mode=mode, scope=scope)
    found, report.skipped = networks(distiller)
    why = backend_unavailable(backend, distiller.device)
    kwargs = {"backend": backend}
    if backend == "inductor":
        kwargs["mode"] = mode
    elif mode != "default":
        report.skipped["mode"] = f"mode {mode!r} applies to inductor only; backend {backend} ignores it"
    backward_without_autocast()
    blocks = {name: regions(module) if scope == "regional" else [] for name, module in found.items()}
    whole = [name for name, found_blocks in blocks.items() if not found_blocks]
    if torch._dynamo.config.caching_precompile and whole and not why:
        torch._dynamo.config.caching_precompile = False  # process-wide, read when a frame is traced
        report.skipped["traced-frame cache"] = (f"turned off: {', '.join(whole)} compiled whole (torch 2.13 fails to "
                                                f"load such frames warm, e.g. SD3's and FLUX's whole transformers)")
    for name, module in found.items():
        if why:
            report.skipped[name] = why + ": it stays eager"
            continue
        if is_compiled(module):
            report.skipped[name] = "already compiled"
            continue
        drop_inert_dropout(module)
        report.compiled.append(name)
        if blocks[name]:
            raise_recompile_limits()
            for block in blocks[name]:
                compile_in_place(block, **kwargs, dynamic=False)
            report.regions[name] = len(blocks[name])
        else:
            compile_in_place(module, **kwargs, dynamic=dynamic)
    return report


def drop_inert_dropout(module: nn.Module) -> int:
    """Replace each ``nn.Dropout`` of rate 0 in ``module`` (diffusers' blocks hold them whatever their rate) by
    ``nn.Identity``, the same function in train and eval mode, so that compiled code does not read ``training`` for
    it: the no-grad calls of the train-mode student and of the eval-mode teacher then share a graph. Returns how
    many were replaced; parameters and state_dict are unchanged (a dropout has none)."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p == 0:
                setattr(parent, name, nn.Identity())
                replaced += 1
    return replaced


def default_backend() -> str:
    """The backend ``compile_networks`` uses when given none: $EMD_COMPILE_BACKEND, else inductor."""
    return os.environ.get("EMD_COMPILE_BACKEND") or "inductor"


def backward_without_autocast() -> None:
    """Trace the backward graphs of compiled code without the forward's autocast, as eager autograd runs them: a
    run's backward passes run outside autocast (``NetworkCall`` wraps the forward calls only). torch's default
    ("same_as_forward", torch 2.13) traces them under the forward's autocast instead, so under bf16 backward matrix
    products that eager runs in fp32 (on the CPU those of attention's math path, which runs below autocast) ran in
    bf16 (pytorch/pytorch#179804; #177287 changes torch's default). Process-wide, read when a graph is traced."""
    functorch_config.backward_pass_autocast = "off"


# (forward function, torch.compile options, whether traced frames are cached) -> its one compiled wrapper
_compiled_forwards: dict = {}


def compile_in_place(module: nn.Module, **options) -> None:
    """Compile ``module``'s forward in place: its class's forward function is compiled once per process and options,
    and every module of the class calls that one wrapper (as ``module.forward``). One wrapper per function is what
    Dynamo's on-disk cache of traced frames (``use_compile_cache``) keys on: a warm process loads all the function's
    graphs (every block size and call mode) and traces none."""
    function = type(module).forward
    key = (function, tuple(sorted(options.items())), torch._dynamo.config.caching_precompile)
    if key not in _compiled_forwards:
        _compiled_forwards[key] = torch.compile(function, **options)
    module.forward = types.MethodType(_compiled_forwards[key], module)


def raise_recompile_limits() -> None:
    """Let Dynamo keep a compiled version of every distinct block and call mode (never lowers a limit)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT)


_cache_set: str | None = None  # the directory use_compile_cache put into the environment, if it did


def use_compile_cache(directory: Path | str) -> str:
    """Keep this process's compiled artefacts in ``directory`` (inductor's FX-graph and AOTAutograd caches, C++ and
    Triton kernels; Dynamo's traced frames if opted in: ``cache_traced_frames``), unless $TORCHINDUCTOR_CACHE_DIR names
    one the user chose; call it before the first compilation. Returns a line saying which directory holds them. Safe for
    concurrent processes (torch writes its cache entries atomically)."""
    global _cache_set
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache_traced_frames()
    given = os.environ.get(CACHE_ENV)
    # importing torch._dynamo puts torch's default into the environment: that one is not the user's choice
    if given and given not in (_cache_set, os.path.abspath(default_cache_dir())):
        return f"torch.compile cache: {given} (from ${CACHE_ENV})"
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = _cache_set = str(path)
    return f"torch.compile cache: {path} (a resume, or a run given --compile-cache {path}, starts warm)"


class _DroppedGuardNotes(logging.Filter):
    """Hides Dynamo's warning, once per guard of every graph, that the traced-frame cache drops the guards on the
    identity of global functions (``F.silu``, ``torch.addcmul``: they only change if a program patches torch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is dropped with caching_precompile" not in record.getMessage()


def cache_traced_frames() -> None:
    """With torch's ``caching_precompile`` (opt in: $TORCH_CACHING_PRECOMPILE=1), Dynamo's traced frames are kept with
    the compiled graphs (in ``<cache>/dynamo``, written by ``save_traced_frames``) and a warm process loads them, so it
    neither traces nor builds guards. Not the default: torch 2.13 marks it experimental, its bundled AOTAutograd
    cache fails on a graph that only returns an input (a graph break made one in EDM2's blocks, mended), and a warm
    process fails to load the frames of a network compiled whole (SD3's and FLUX's transformers: "Name
    '__builtins_dict___0' already exists in scope"; block by block they load), so ``compile_networks`` turns it off
    where a network is compiled whole. Here: hides
    its warning, once per guard of every graph, that it drops the guards on the identity of global functions."""
    if torch._dynamo.config.caching_precompile:
        guards = logging.getLogger("torch._dynamo.guards")
        if not any(isinstance(f, _DroppedGuardNotes) for f in guards.filters):
            guards.addFilter(_DroppedGuardNotes())


def save_traced_frames() -> None:
    """Write the frames Dynamo traced so far to the compile cache (with ``cache_traced_frames``; else a no-op): after
    the warm-up, and again when a later call compiled more."""
    if torch._dynamo.config.caching_precompile:
        from torch._dynamo.precompile_context import PrecompileContext

        PrecompileContext.save_to_dynamo_cache()


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process so far, first compilations and recompilations together (a
    difference of two readings is the compilations in between); 0 if nothing was ever compiled."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing compiled (and no import cost for eager runs)
    return int(utils.counters["frames"]["ok"]) if utils else 0
