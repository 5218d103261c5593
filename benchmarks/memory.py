"""Computed GPU memory of an EMD run (teacher, generator, student) for every supported teacher at its real size, with
full copies, LoRA, --grad-checkpoint and --shard, and the largest batch that fits a card. No GPU needed.

    python benchmarks/memory.py                        # every network; writes benchmarks/results/memory_report.json
    python benchmarks/memory.py --networks sd15 edm-imagenet64 --no-json
    python benchmarks/memory.py --networks edm2-img512-s     # replaces that network's rows in the JSON, keeps others

Networks (``NETWORKS``): EDM's ImageNet-64 ADM (roofline.real_networks' config), EDM2-S and EDM2-XXL for ImageNet-512
(nets.edm2.EDM2_CONFIGS, the published presets: 280 M and 1.5 B parameters), SD v1.5's UNet and the text-to-image
families of real_size_configs.py (SDXL, SD3-medium, SD3.5-medium, SD3.5-large, FLUX.1-dev), built on the meta device
from their configs; LoRA adapters injected there by peft exactly as ``--lora RANK`` does (emd_fast.nets.lora.adapt:
the architecture's LORA_TARGETS rule), so their parameter counts are exact. The networks are then turned into fake
tensors (FakeTensorMode: shapes and dtypes only, nothing allocated or computed) for one training forward.

Counted, in bytes, all under ``--precision bf16`` (autocast bf16; fp32 master weights and optimizer state):

* static, full copies: generator and student fp32 weights, gradients and two Adam moments (16 bytes a parameter
  each), the generator's fp32 EMA (4), the frozen teacher (2 for a diffusers teacher, kept in bf16; 4 for EDM's and
  EDM2's, which stay fp32);
* static, ``--lora RANK``: one frozen base (the teacher's tensors, shared by the three networks; bf16 / fp32 as the
  teacher) + two fp32 adapter sets with gradients and Adam (16 bytes an adapter parameter each) + the generator's EMA
  of its adapters (4);
* static, ``--shard`` over SHARDS processes (FSDP2): generator, student, their gradients, Adam moments and the EMA
  split SHARDS ways, the teacher whole on every process (per-process bytes; the one block FSDP2 gathers at a time is
  not counted). With ``--lora`` only the adapters are split (their gradients, Adam moments and EMA too): the frozen
  base stays whole on every process (the adapters FSDP2 gathers for a forward or backward, and their unsharded
  gradients, are not counted);
* activations: the bytes of every distinct tensor one training forward of the network saves for its backward
  (weights excluded, the bf16 weight copies autocast makes included), with and without diffusers' activation
  checkpointing (``--grad-checkpoint``: diffusers teachers only). One network's are alive at a time (the E-step's
  generator VJP, the M-step and the student update run one after another; the E-step's teacher and student forwards
  keep nothing). Counted at batch 1 and 2: a constant (autocast's weight copies) plus a per-image part; exact for
  these networks (tests/test_memory_report.py checks the line at batch 3). EDM2's LoRA layers build W + s B A for
  the forward (nets/edm2_lora.py): those weight-sized tensors are in the constant.

Largest batch on a card: usable = (1 - MARGIN) x the card's memory (nvidia-smi's total) - CONTEXT for what is not
counted (CUDA context, caching-allocator slack, cuDNN/cuBLAS workspaces, the transient buffers of a backward and of
the optimizer step, the E-step's chain tensors); batch = floor((usable - static - constant) / per image).
Checked against real CPU allocations of small networks (tests/test_memory_report.py): saved bytes of a real forward,
and the static bytes after one real optimizer step, full and LoRA. Read the figures as a lower bound of
nvidia-smi's.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

from emd_fast.checks import trusted_values

sys.path.insert(0, str(Path(__file__).parent))
import real_size_configs  # noqa: E402

GIB = 2**30
RANKS = (16, 64, 128)
SHARDS = 8
# nvidia-smi's total memory of a representative card of each class (MiB)
CARDS = {"24 GB": ("RTX 4090", 24564), "48 GB": ("RTX A6000", 49140), "80 GB": ("H100 80GB", 81559),
         "141 GB": ("H200", 143771)}
MARGIN, CONTEXT = 0.10, 1 * GIB  # assumed overhead: 10% of the card + 1 GiB
NETWORKS = {"edm-imagenet64": "EDM ImageNet-64 ADM, 3x64x64, 1000 classes",
            "edm2-img512-s": "EDM2-S ImageNet-512, 4x64x64 latents, 1000 classes",
            "edm2-img512-xxl": "EDM2-XXL ImageNet-512, 4x64x64 latents, 1000 classes",
            "sd15": "SD v1.5 UNet, 4x64x64 latents (512 px), 77x768 text",
            **{n: f"{s.cls}, {s.pixels} px, {real_size_configs.TEXT_TOKENS[n]} text tokens"
               for n, s in real_size_configs.REAL_SIZE.items()}}
RESULTS = Path(__file__).parent / "results" / "memory_report.json"


def network(name: str):
    """(network on the meta device, inputs(batch) -> (args, kwargs) of one forward made in the current device
    context, diffusers: whether it is a diffusers teacher)."""
    if name.startswith("edm"):  # EDM's ADM, EDM2's U-Nets: emd_fast networks, fp32 teachers
        from emd_fast.nets.edm2 import EDM2_CONFIGS
        from emd_fast.nets.unet import UNET_CONFIGS, build_network
        with torch.device("meta"):
            net = build_network(dict({"edm-imagenet64": UNET_CONFIGS["edm-imagenet64-adm"], **EDM2_CONFIGS}[name]))
        r = net.img_resolution
        return net, lambda b: ((torch.randn(b, net.img_channels, r, r), torch.full((b,), 0.5),
                                torch.zeros(b, dtype=torch.long)), {}), False
    if name == "sd15":
        from diffusers import UNet2DConditionModel
        with torch.device("meta"):
            net = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD v1.5's
        return net, lambda b: ((torch.randn(b, 4, 64, 64), torch.full((b,), 500.0), torch.randn(b, 77, 768)),
                               {}), True
    with torch.device("meta"):
        net = real_size_configs.build(name)
    return net, lambda b: ((), real_size_configs.forward_inputs(name, b)), True


def trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def saved_bytes(net, mode, inputs, batch: int, bf16: bool = True) -> int:
    """Bytes of the distinct tensors one training forward of ``net`` (its tensors made in ``mode``, a FakeTensorMode
    or a null context for real tensors) at ``batch`` saves for backward; ``inputs(batch)`` -> (args, kwargs)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    net.train()
    with mode, trusted_values():  # fake labels have no values to check
        args, kwargs = inputs(batch)
        args = (args[0].requires_grad_(),) + args[1:] if args else args  # the generator VJP's input gradient
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(*args, **kwargs)
    return sum(seen.values())


def to_fake(net: torch.nn.Module, mode) -> torch.nn.Module:
    """``net`` (meta tensors) with fake tensors of the same shapes and dtypes, in place."""
    with mode:
        return net._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))


def activations(net, mode, inputs, checkpoint: bool | None) -> tuple[int, int]:
    """(constant, per image) saved bytes of ``net`` (fake), with diffusers' checkpointing on or off (None: not a
    diffusers network)."""
    if checkpoint is not None:
        (net.enable_gradient_checkpointing if checkpoint else net.disable_gradient_checkpointing)()
    one, two = (saved_bytes(net, mode, inputs, b) for b in (1, 2))
    return 2 * one - two, two - one


def static_bytes(params: int, teacher_bytes: int, adapters: int | None = None, shards: int = 1) -> int:
    """Static bytes per process: full copies (adapters None) or one frozen base + LoRA adapters, the trained part
    split ``shards`` ways (the teacher / base whole on each); see the docstring."""
    trained = params if adapters is None else adapters
    return trained * (2 * 16 + 4) // shards + params * teacher_bytes


def largest_batch(total_mib: int, static: int, act: tuple[int, int]) -> int:
    """The largest batch whose static + activations fit the usable part of a card of ``total_mib`` (0: none)."""
    usable = (1 - MARGIN) * total_mib * 2**20 - CONTEXT
    return max(0, math.floor((usable - static - act[0]) / act[1]))


def report(name: str) -> list[dict]:
    """Every row of one network: full and LoRA at each of RANKS, each with and without checkpointing and
    sharding."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from emd_fast.nets.lora import LoraSettings, adapt

    base, inputs, is_diffusers = network(name)
    params, teacher_bytes = sum(p.numel() for p in base.parameters()), 2 if is_diffusers else 4
    checkpoints = (False, True) if is_diffusers else (None,)
    setups = []  # (training, adapters, the network to count)
    setups.append(("full", None, base))
    for rank in RANKS:
        net, _, _ = network(name)
        if is_diffusers:
            net.to(torch.bfloat16)  # a diffusers teacher's base is kept in bf16
        adapt(net, LoraSettings(rank))
        setups.append((f"lora{rank}", trainable(net), net))
    rows = []
    for training, adapters, net in setups:
        mode = FakeTensorMode()
        to_fake(net, mode)
        for ckpt in checkpoints:
            act = activations(net, mode, inputs, ckpt)
            for shards in (1, SHARDS):
                static = static_bytes(params, teacher_bytes, adapters, shards)
                row = dict(network=name, training=training, grad_checkpoint=bool(ckpt), shards=shards,
                           params=params, adapters=adapters, static_bytes=static, act_constant_bytes=act[0],
                           act_per_image_bytes=act[1])
                row["largest_batch"] = {card: largest_batch(mib, static, act) for card, (_, mib) in CARDS.items()}
                rows.append(row)
                print(line(row), flush=True)
    return rows


def setup_name(r: dict) -> str:
    flags = (["--grad-checkpoint"] if r["grad_checkpoint"] else []) + ([f"--shard x{r['shards']}"]
                                                                       if r["shards"] > 1 else [])
    lora = f"LoRA r{r['training'][4:]} ({r['adapters'] / 1e6:.1f} M)" if r["adapters"] else "full"
    return " ".join([lora, *flags])


def line(r: dict) -> str:
    return (f"| {r['network']} | {r['params'] / 1e6:.0f} M | {setup_name(r)} | {r['static_bytes'] / GIB:.1f} | "
            f"{r['act_per_image_bytes'] / GIB:.3f} | {r['act_constant_bytes'] / GIB:.2f} | "
            + " | ".join(str(b) for b in r["largest_batch"].values()) + " |")


def table(rows: list[dict]) -> str:
    head = ("| network | params | training | static GiB | activations GiB / image | + constant GiB | "
            + " | ".join(f"batch on {c}" for c in CARDS) + " |")
    return "\n".join([head, "|---|---:|---|---:|---:|---:|" + "---:|" * len(CARDS), *map(line, rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=list(NETWORKS))
    p.add_argument("--json", type=Path, default=RESULTS, help="where the rows go (default: %(default)s)")
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    from diffusers.utils import logging
    logging.set_verbosity_error()  # casting a meta UNet to bf16 warns about from_pretrained's torch_dtype
    print(table([]))
    rows = [row for name in args.networks for row in report(name)]
    if not args.no_json:
        args.json.write_text(json.dumps(merged_report(args.json, rows), indent=1))
    return 0


def merged_report(path: Path, rows: list[dict]) -> dict:
    """The report of ``rows`` plus the rows of other networks kept from the report at ``path`` (if any): a partial
    run adds or replaces its own networks' rows. ``machine``: the versions each network was counted with."""
    import diffusers
    import peft

    old = json.loads(path.read_text()) if path.is_file() else {}
    names = {r["network"] for r in rows}
    machine = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "peft": peft.__version__, "platform": platform.platform()}
    order = [*NETWORKS, *old.get("networks", {})]
    rows = sorted([r for r in old.get("rows", []) if r["network"] not in names] + rows,
                  key=lambda r: order.index(r["network"]))
    covered = dict.fromkeys(r["network"] for r in rows)
    machines = old.get("machine", {}) | {n: machine for n in names}
    networks = old.get("networks", {}) | {n: NETWORKS[n] for n in names}
    return {"machine": {n: machines[n] for n in covered}, "precision": "bf16", "shards": SHARDS, "ranks": RANKS,
            "margin": MARGIN, "context_bytes": CONTEXT, "cards": CARDS,
            "networks": {n: networks[n] for n in covered}, "rows": rows}

if __name__ == "__main__":
    sys.exit(main())
