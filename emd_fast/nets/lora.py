"""LoRA generator and student over the teacher's frozen network (``--lora RANK``), with peft's adapters.

Teacher, generator and student are three module trees over ONE set of base tensors, the teacher's network's
(``shared_copy`` copies a tree's modules, not its tensors). peft injects one adapter set into the generator's tree and
one into the student's; the teacher's tree stays the plain network. Only the adapters require grad, so the Distiller's
optimizers, EMA and checkpoints hold only them (it never copies or saves the teacher's tensors); ``--shard`` shards
them (their gradients, Adam moments and EMA too) and leaves the base whole on every process, still shared. Adapters
are fp32 whatever the base's dtype (bf16 for a diffusers teacher under ``--precision bf16``). B = 0 at initialisation
(peft's default), so generator and student start as exactly the functions of the full fine-tuning path.

Which layers: nn.Linear and nn.Conv2d modules of exactly those classes (peft builds a layer's factors with the
layer's own class: a Conv2d subclass with another constructor, like the U-Nets' ``ResampleConv2d``, cannot take
them) and EDM2's magnitude-preserving ``MPConv`` (peft's custom-layer API, ``edm2_lora``: the adapter updates the
weight before the layer normalises it), chosen by name patterns (``matches``): ``--lora-targets``, else the
architecture's ``TargetRule`` in ``LORA_TARGETS`` (a later architecture plugs in with one entry there), else every
such layer. A layer narrower than the rank (min(fan in, fan out) < rank) gets an adapter of its full width, with the
same scale alpha / rank as the others; a rank larger than every adapted layer is an error. One forward at start-up
(``check_adapters_run``) refuses adapters that never run, their B factor not called (a layer whose weight is read
directly, as ``embed_labels`` reads ``map_label``).
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..optional import require
from .edm2 import MPConv
from .generator import Generator

ADAPTABLE = (nn.Linear, nn.Conv2d, MPConv)
ADAPTER = "default"  # the adapter set's name in each tree (one per tree)


@dataclass(frozen=True)
class TargetRule:
    """The layers an architecture adapts by default: ADAPTABLE layers whose name matches a pattern of ``include``
    and none of ``exclude`` (patterns as in ``matches``)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()


# SD3 / FLUX transformers: the attention projections of image and text tokens and the feed-forwards in every block
# (diffusers' DreamBooth LoRA scripts' default, plus FLUX's single-block MLP and output projections), not the
# embedders (patches, timestep, guidance, pooled text, context), the adaLN modulations (norm*.linear: functions of the
# timestep and pooled prompt only) or the final projection (docs/lora.md)
TRANSFORMER_BLOCK_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

# the class name of a denoiser network, or of a module directly inside it (a diffusers UNet or transformer) -> its rule
LORA_TARGETS: dict[str, TargetRule] = {
    "MLPDenoiser": TargetRule(),
    # ADM and DDPM++/NCSN++ (EDM's): embed_labels reads map_label.weight's columns, an adapter there would never run
    "UNetDenoiser": TargetRule(exclude=("map_label",)),
    "SongUNetDenoiser": TargetRule(exclude=("map_label",)),
    "UNet2DModel": TargetRule(),
    "UNet2DConditionModel": TargetRule(),  # SD 1.x/2.x and SDXL (its added-condition embedding included)
    "SD3Transformer2DModel": TargetRule(include=TRANSFORMER_BLOCK_LAYERS),
    "FluxTransformer2DModel": TargetRule(include=(*TRANSFORMER_BLOCK_LAYERS, "single_transformer_blocks.*.proj_mlp",
                                                  "single_transformer_blocks.*.proj_out")),
    # EDM2: every MPConv; emb_label's weight is read through effective_weight, which carries its adapter
    "EDM2Denoiser": TargetRule(),
}


def matches(name: str, pattern: str) -> bool:
    """A module's full name matches a pattern (fnmatch: * ? [..]) as a whole or in its ending after a '.'."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def architecture(net: nn.Module) -> str:
    """The LORA_TARGETS key of a network (its own class or that of a module directly inside it), else its class."""
    names = [type(m).__name__ for m in (net, *net.children())]
    return next((name for name in names if name in LORA_TARGETS), names[0])


def width(layer: nn.Module) -> int:
    """min(fan in, fan out) of an ADAPTABLE layer: the largest useful LoRA rank."""
    if isinstance(layer, nn.Linear):
        return min(layer.in_features, layer.out_features)
    if isinstance(layer, MPConv):
        return min(layer.weight[0].numel(), layer.weight.shape[0])
    return min(layer.in_channels * math.prod(layer.kernel_size) // layer.groups, layer.out_channels)


@dataclass(frozen=True)
class LoraSettings:
    """rank: the adapters' rank; alpha: their scale is alpha / rank (None: alpha = rank, scale 1); dropout: on the
    adapters' input in training; targets: comma-separated name patterns of the layers to adapt (None: the
    architecture's default)."""

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> "LoraSettings | None":
        if cfg.get("lora") is None:
            return None
        return cls(cfg["lora"], cfg.get("lora_alpha"), cfg.get("lora_dropout") or 0.0, cfg.get("lora_targets"))

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def patterns(self) -> list[str] | None:
        return None if self.targets is None else [t.strip() for t in self.targets.split(",")]

    def validate(self) -> "LoraSettings":
        """ValueError (one line) for an impossible setting."""
        if self.rank < 1:
            raise ValueError(f"--lora {self.rank}: the adapters' rank must be >= 1")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"--lora-alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora-dropout must lie in [0, 1), got {self.dropout}")
        if self.patterns is not None and not all(self.patterns):
            raise ValueError(f"--lora-targets {self.targets!r}: an empty name; give comma-separated module names or "
                             f"patterns")
        return self


def check_lora_options(cfg: dict) -> None:
    """The LoRA options of a run fit together, and peft is installed (ValueError, one line), from the config alone."""
    settings = LoraSettings.from_config(cfg)
    if settings is None:
        given = [k for k, unset in (("lora_alpha", None), ("lora_dropout", 0.0), ("lora_targets", None))
                 if cfg.get(k, unset) != unset]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} sets the LoRA adapters: add --lora RANK")
        return
    settings.validate()
    require("peft", "LoRA adapters (--lora)", names=("LoraConfig", "inject_adapter_in_model"))


def target_layers(net: nn.Module, settings: LoraSettings) -> dict[str, int]:
    """{full module name: adapter rank} of the layers to adapt in ``net`` (see the module docstring); ValueError
    (one line) for patterns that match nothing or no adaptable layer, or a rank larger than every layer."""
    arch = architecture(net)
    modules = dict(net.named_modules())
    layers = {name: m for name, m in modules.items() if type(m) in ADAPTABLE}
    if settings.patterns is None:
        rule = LORA_TARGETS.get(arch, TargetRule())
        names = [n for n in layers if any(matches(n, p) for p in rule.include)
                 and not any(matches(n, p) for p in rule.exclude)]
    else:
        names = []
        for pattern in settings.patterns:
            hits = [n for n in modules if n and matches(n, pattern)]
            if not hits:
                raise ValueError(f"--lora-targets {pattern!r} matches no module of the {arch} network")
            if not any(n in layers for n in hits):
                kinds = sorted({type(modules[n]).__name__ for n in hits})
                raise ValueError(f"--lora-targets {pattern!r} matches {', '.join(kinds)} modules only: LoRA adapts "
                                 f"nn.Linear, nn.Conv2d and EDM2's MPConv layers")
            names += [n for n in hits if n in layers and n not in names]
    if not names:
        raise ValueError(f"the {arch} network has no nn.Linear / nn.Conv2d / MPConv layer to adapt")
    widest = max(names, key=lambda n: width(layers[n]))
    if settings.rank > width(layers[widest]):
        raise ValueError(f"--lora {settings.rank} is larger than the layers it adapts: the widest, {widest}, has "
                         f"min(fan in, fan out) = {width(layers[widest])}")
    return {n: min(settings.rank, width(layers[n])) for n in names}


def shared_copy(net: nn.Module, shared: Iterable[torch.Tensor]) -> nn.Module:
    """A deep copy of ``net``'s modules that holds the tensors ``shared`` (parameters or buffers of ``net``)
    themselves instead of copies."""
    return copy.deepcopy(net, {id(t): t for t in shared})


def lora_config(settings: LoraSettings, layers: dict[str, int]):
    """peft's LoraConfig of the adapters ``settings`` asks for on ``layers`` ({name: rank}, ``target_layers``)."""
    peft = require("peft", "LoRA adapters (--lora)", names=("LoraConfig", "inject_adapter_in_model"))
    from .edm2_lora import MPConvLora

    narrow = {n: r for n, r in layers.items() if r < settings.rank}
    pattern = {f"^{n.replace('.', '[.]')}": r for n, r in narrow.items()}  # peft matches (.*\.)?(key)$
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.rank * settings.scale,
                             lora_dropout=settings.dropout, target_modules=list(layers), rank_pattern=pattern,
                             alpha_pattern={k: r * settings.scale for k, r in pattern.items()})
    config._register_custom_module({MPConv: MPConvLora})  # peft's (experimental) API for other layer types
    return config


def add_adapters(tree: nn.Module, config, layers: dict[str, int], seed: int) -> nn.Module:
    """``tree`` (its base frozen) with peft's adapters of ``config`` on ``layers`` injected in place: fp32, A drawn
    from a generator seeded with ``seed``, B = 0; the only parameters that require grad."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU from torch's global generator
        torch.random.default_generator.manual_seed(seed)
        peft.inject_adapter_in_model(copy.deepcopy(config), tree, adapter_name=ADAPTER)
    for p in tree.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # peft gives the adapters the base layer's dtype
    got = {n: m.r[ADAPTER] for n, m in tree.named_modules() if isinstance(m, BaseTunerLayer)}
    if got != layers:
        raise RuntimeError(f"peft adapted {len(got)} layers, not the {len(layers)} asked (or other ranks)")
    return tree.train()


def adapt(net: nn.Module, settings: LoraSettings, seed: int = 0) -> nn.Module:
    """``net`` made, in place, what ``--lora`` makes of the generator's and student's copies: its base frozen, the
    architecture's adapters added (the only trainable parameters). For benchmarks and memory reports of one tree."""
    layers = target_layers(net, settings.validate())
    return add_adapters(net.requires_grad_(False), lora_config(settings, layers), layers, seed)


def lora_networks(base: nn.Module, t_star: float, settings: LoraSettings,
                  seeds: tuple[int, int]) -> tuple[Generator, nn.Module, dict]:
    """(generator, student, what to record in config.json) over ``base``, frozen here: each a tree sharing the base's
    tensors with its own adapters, whose A factors are drawn from a generator seeded with ``seeds[0]`` and
    ``seeds[1]``, and B = 0."""
    layers = target_layers(base, settings.validate())
    config = lora_config(settings, layers)
    base.requires_grad_(False)
    shared = [*base.parameters(), *base.buffers()]
    trees = [add_adapters(shared_copy(base, shared), config, layers, seed) for seed in seeds]
    info = {"lora_layers": len(layers), "lora_parameters": sum(p.numel() for p in trees[0].parameters()
                                                               if p.requires_grad),
            "lora_narrow_layers": {n: r for n, r in layers.items() if r < settings.rank}}
    return Generator(trees[0], t_star), trees[1], info


@torch.no_grad()
def check_adapters_run(net: nn.Module, forward: Callable[[], object]) -> None:
    """ValueError (one line) naming the LoRA layers of ``net`` whose adapter does not run in ``forward()`` (a call of
    ``net``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ran: set[str] = set()
    hooks = [m.lora_B[ADAPTER].register_forward_hook(lambda *_, name=name: ran.add(name))
             for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)]
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    dead = [name for name, m in net.named_modules() if isinstance(m, BaseTunerLayer) and name not in ran]
    if dead:
        raise ValueError(f"LoRA adapters of {len(dead)} layer(s) never run (their weight is read directly, not "
                         f"called): {', '.join(dead[:3])}; leave them out of --lora-targets")


def lora_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers of a tree by full name (none for a plain network)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    return {name: m for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_factors(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of ``net`` as a LoRA file holds them, in peft's key format ``<layer>.lora_A.weight``,
    ``<layer>.lora_B.weight``, fp32, each layer's scale folded into B: the file means W + B A."""
    out = {}
    for name, layer in lora_layers(net).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().float().contiguous()
        out[f"{name}.lora_B.weight"] = (layer.lora_B[ADAPTER].weight.detach().float()
                                        * layer.scaling[ADAPTER]).contiguous()
    return out


@torch.no_grad()
def merged_copy(net: nn.Module) -> nn.Module:
    """An fp32 copy of ``net`` (its own tensors: the shared base is never written) with every adapter merged into its
    layer's weight and the LoRA layers replaced by the plain layers: the state-dict keys of the base network. Merged in
    fp32: on a bf16 base the small update B A would round away."""
    merged = copy.deepcopy(net).float()
    for name, layer in lora_layers(merged).items():
        layer.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    merged.__dict__.pop("peft_config", None)
    return merged.requires_grad_(False)
