"""Roofline floor: the bytes that must move and the FLOPs that must run, per kernel and per EMD iteration, turned
into lower-bound times on an H100 (and H200) and on the device at hand. Nothing of EMD is timed here.

    python benchmarks/roofline.py                 # the floor tables (the CPU smoke run prints only these)
    python benchmarks/roofline.py --json floor.json
    python benchmarks/roofline.py --real edm-imagenet64 --K 1 8    # real networks: only these

Kernels (``KERNELS``): bytes = tensors a fused pass reads and writes x numel x element size (the eps step reads
eps, eta, D_T, D_psi, g and writes eps', eta', v, x_t': 9; the z step 3; a loss forward + backward 5); FLOPs = the
fp32 operations of its formula per element (the integer Philox work of in-kernel noise not counted); floor =
max(bytes / copy bandwidth, FLOPs / fp32 non-tensor rate).
EMD iteration (``iteration_cost``): FLOPs = batch x [K (teacher forward + student forward + generator VJP) +
generator training step + student training step], each network call's FLOPs counted by FlopCounterMode on the
meta device (matmul, conv, attention; the exact mixture teacher of the vector problem counted as 0); bytes = the
fused elementwise passes (K eps and z steps, two losses) + parameter traffic: every network call reads its
weights once (fp32), a backward reads them again and writes the gradient, Adam reads parameter, gradient and two
moments and writes three. Activations are not counted (small MLPs could keep them on chip), so this is a lower
bound; floor = max(bytes / bandwidth, FLOPs / matmul rate) with the bf16 tensor rate and the fp32 non-tensor rate.
Every byte is counted at HBM bandwidth. The kernel benchmarks flush the L2 cache before each call, so the kernel
floors bound what they measure; inside an iteration, data that stays in the H100's 50 MB L2 (all of the vector
problem: 0.6 MB of weights per network) can move faster, so there the iteration floor is a reference scale, not a
strict bound.
H100 rates: 3.0 TB/s device copy, 800 TFLOP/s dense bf16 (both measured on this workplace's H100), 60 TFLOP/s fp32
non-tensor; the device at hand: its copy bandwidth and matmul rate measured here (GPU: bf16, CPU: fp32). Benchmark
tables report measured / floor ("x floor") against these.
Real networks (``real_rows``, ``--real``): EDM's ImageNet-64 ADM, SD v1.5's UNet, EDM2-S and -XXL, SDXL,
SD3-medium, SD3.5-medium and -large and FLUX.1-dev (``REAL_NETWORKS``), built on the meta device, for
EMD-1/4/8/16 and each way of training them (``TRAINING``: full, LoRA at rank ``LORA_RANK``), at batch 64: FLOPs
per sample, bytes, the bf16 floors on an H100 and an H200, the EMD-K/EMD-1 FLOP ratio, and the goal each GPU row is
measured against: DMD2's MFU on ImageNet-64 carried over to the same GPU (``dmd2_anchor``), next to FastGen's 1.55x
from torch.compile. The ADM and SD v1.5 are counted through our teachers; the later families from their own
networks (``real_counts``; the teacher as its classifier-free-guided calls). docs/performance.md holds the table.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from emd_fast.checks import trusted_values

H100 = {"name": "H100 (docs/design.md)", "copy_gbps": 3000.0, "bf16_tflops": 800.0, "fp32_tflops": 60.0}
# kernel: (tensors read + written, fp32 FLOPs per element of its formula)
KERNELS = {"langevin_eps_step": (9, 16), "langevin_z_step": (3, 5), "generator_loss": (5, 8), "dsm_loss": (5, 6)}
KERNEL_SIZES = {"4096x64": (4096, 64), "128x3x128x128": (128, 3, 128, 128)}
PROBLEMS = {"vector": "ring2d MLP h128 d3, batch 256", "unet": "U-Net adm64-mc64 3x64x64, batch 64"}
KS = (1, 4, 16)
CHAIN_BYTES = 4  # the Langevin chain and the fused passes in fp32
PARAM_BYTES = 4  # fp32 master weights


def floor_s(nbytes: float, flops: float, gbps: float, tflops: float) -> float:
    """Lower-bound seconds: the slower of moving nbytes at gbps and running flops at tflops."""
    return max(nbytes / (gbps * 1e9), flops / (tflops * 1e12))


def kernel_cost(kernel: str, numel: int, element_size: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one fused pass of a kernel (losses: forward + backward) over numel elements."""
    tensors, flops = KERNELS[kernel]
    return tensors * numel * element_size, flops * numel


@dataclass
class NetFlops:
    """FLOPs per example of one network call: forward, forward + input gradient (VJP, weights frozen), forward +
    gradients of the trainable weights (a training step's forward and backward)."""
    forward: float
    vjp: float
    train: float


def counted_flops(fn) -> float:
    """FLOPs of everything ``fn()`` runs (matmul, conv, attention; forward and backward), by FlopCounterMode."""
    from throughput import _GlobalOnly
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter, trusted_values():  # labels on the meta device have no values to check
        fn()
    return counter.get_total_flops()


def call_flops(net: torch.nn.Module, inputs) -> NetFlops:
    """NetFlops of ``net(*args, **kwargs)`` per example, counted with a batch of 2 on the meta device.
    inputs(n) -> (args, kwargs) for n examples, made in the current device context; the image (the first positional
    argument, else the first tensor keyword) takes the VJP's gradient. ``train`` differentiates the parameters that
    require grad in ``net`` (all of a full network; of a LoRA-adapted one, the adapters), or all of them if none
    does (a frozen teacher's network counted as a student)."""
    net = copy.deepcopy(net).to("meta")
    params = list(net.parameters())
    trainable = [p for p in params if p.requires_grad] or params
    trained = {id(p) for p in trainable}

    def count(inputs_grad: bool, weights_grad: bool) -> float:
        for p in params:
            p.requires_grad_(weights_grad and id(p) in trained)
        with torch.device("meta"):
            args, kwargs = inputs(2)
        image = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        image.requires_grad_(inputs_grad)

        def call():
            out = net(*args, **kwargs)
            out = out if torch.is_tensor(out) else out[0]  # diffusers' output classes index as tuples
            wrt = ([image] if inputs_grad else []) + (trainable if weights_grad else [])
            if wrt:
                torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)

        return counted_flops(call) / 2

    return NetFlops(count(False, False), count(True, False), count(False, True))


def xty_inputs(shape: tuple[int, ...], condition=None):
    """inputs(n) for call_flops of a network called as net(x, t, y) (ours, and the wrapped denoisers of our
    teachers): shape is one example's; condition(n): y for n examples on the meta device (labels, text
    embeddings), or None."""
    return lambda n: ((torch.randn((n, *shape)), torch.full((n,), 0.5), condition(n) if condition else None), {})


def network_flops(net: torch.nn.Module, shape: tuple[int, ...], condition=None) -> NetFlops:
    """call_flops of a network called as net(x, t, y) (``xty_inputs``)."""
    return call_flops(net, xty_inputs(shape, condition))


def teacher_flops(teacher, shape: tuple[int, ...], condition=None) -> float:
    """FLOPs per example of one ``teacher.denoise`` (a guided teacher: both of its UNet calls), counted on a meta
    copy."""
    teacher = copy.deepcopy(teacher).to("meta")
    x, t = torch.randn((2, *shape), device="meta"), torch.full((2,), 0.5, device="meta")
    return counted_flops(lambda: teacher.denoise(x, t, condition(2) if condition else None)) / 2


def param_bytes(K: int, params: int, teacher_params: int, trainable: int | None = None) -> int:
    """Weight and optimizer traffic of one EMD iteration (fp32): every network call reads its weights once, a
    backward reads them again and writes the gradients of the ``trainable`` parameters (default: all ``params``),
    Adam reads parameter, gradient and two moments and writes three, per trainable parameter of generator and
    student. Teacher: K forwards; student: K forwards + a training step; generator: K VJPs (forward + backward) + a
    training step. A LoRA row passes the adapters' count as ``trainable``."""
    trainable = params if trainable is None else trainable
    reads = K * teacher_params + (K + 2) * params + (2 * K + 2) * params
    return PARAM_BYTES * (reads + 2 * trainable + 7 * 2 * trainable)


def iteration_cost(batch: int, shape: tuple[int, ...], K: int, net: NetFlops, teacher: float, params: int,
                   teacher_params: int, trainable: int | None = None) -> dict:
    """(bytes, FLOPs) of one EMD iteration's floor. Generator and student share one architecture (``net``: its
    NetFlops per example, ``params`` parameters, ``trainable`` of them trained); ``teacher``: FLOPs per example of
    one teacher evaluation (0 for an exact teacher). FLOPs = batch x [K (teacher + student forward + generator VJP)
    + generator training step + student training step]."""
    flops = batch * (K * (teacher + net.forward + net.vjp) + 2 * net.train)
    numel = batch * torch.Size(shape).numel()
    elementwise = (K * (KERNELS["langevin_eps_step"][0] + KERNELS["langevin_z_step"][0])
                   + KERNELS["generator_loss"][0] + KERNELS["dsm_loss"][0]) * numel * CHAIN_BYTES
    weights = param_bytes(K, params, teacher_params, trainable)
    return {"flops": flops, "bytes": elementwise + weights, "elementwise_bytes": elementwise, "param_bytes": weights}


def labels(num_classes: int):
    """condition(n) for network_flops: n labels (class or prompt indices) on the meta device, or None."""
    return (lambda n: torch.zeros(n, dtype=torch.long, device="meta")) if num_classes else None


def networks_cost(nets, batch: int, K: int) -> dict:
    """iteration_cost of throughput.build_networks' (teacher, generator, student, sigma_data, num_classes)."""
    teacher, _, student, _, num_classes = nets
    count = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    if hasattr(teacher, "net"):  # a NetworkTeacher (guided or not)
        shape = teacher.data_shape
        teacher_cost, teacher_params = teacher_flops(teacher, shape, labels(num_classes)), count(teacher.net)
    else:  # an exact teacher: closed-form scores, counted as nothing
        shape, teacher_cost, teacher_params = (teacher.dim,), 0.0, 0
    return iteration_cost(batch, shape, K, network_flops(student, shape, labels(num_classes)), teacher_cost,
                          count(student), teacher_params, sum(q.numel() for q in student.parameters()
                                                              if q.requires_grad) or None)


# --- the real networks users distil ------------------------------------------------------------------------------
# Hardware rates (this workplace's device machines, .library/device/KINDS.md): H100 80GB HBM3 (2026-11-13) and
# H200 (2026-10-28/11-04), each a 1 GiB-class device-to-device copy (read + write) and an 8192^3 bf16 matmul on
# random data. A100: no A100 was measured here; its datasheet dense bf16 rate stands in (see ``dmd2_anchor``).
H200 = {"name": "H200 (measured here)", "copy_gbps": 4300.0, "bf16_tflops": 788.0, "fp32_tflops": 60.0}
A100_BF16_TFLOPS = 312.0  # NVIDIA A100 SXM datasheet, dense bf16
REAL_NETWORKS = {
    "edm-imagenet64": "EDM ImageNet-64 ADM (UNET_CONFIGS['edm-imagenet64-adm']), 3x64x64, 1000 classes",
    "sd15": "Stable Diffusion v1.5 UNet, 4x64x64 latents, 77x768 text; teacher with CFG (2 UNet calls)",
    "edm2-img512-s": "EDM2-S ImageNet-512, 4x64x64 latents, 1000 classes; teacher without a guide network",
    "edm2-img512-xxl": "EDM2-XXL ImageNet-512, 4x64x64 latents, 1000 classes; teacher without a guide network",
    "sdxl": "SDXL UNet, 4x128x128 latents (1024 px), 77x2048 text; teacher with CFG (2 UNet calls)",
    "sd3-medium": "SD3-medium MMDiT, 16x128x128 latents, 333 text tokens; teacher with CFG (2 calls)",
    "sd3.5-medium": "SD3.5-medium MMDiT-X, 16x128x128 latents, 333 text tokens; teacher with CFG (2 calls)",
    "sd3.5-large": "SD3.5-large MMDiT, 16x128x128 latents, 333 text tokens; teacher with CFG (2 calls)",
    "flux.1-dev": "FLUX.1-dev, 16x128x128 latents (4096 tokens), 512 text tokens; guidance-distilled teacher (1 call)",
}
# the families counted from their own networks (benchmarks/memory.py builds them): teacher calls per denoising
TEACHER_CALLS = {"edm2-img512-s": 1, "edm2-img512-xxl": 1, "sdxl": 2, "sd3-medium": 2, "sd3.5-medium": 2,
                 "sd3.5-large": 2, "flux.1-dev": 1}
REAL_KS = (1, 4, 8, 16)
REAL_BATCH = 64  # the GPU playbook's batch (the edm-imagenet64 preset trains at 256; floors per sample do not care)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # diffusers' UNet2DConditionModel defaults are SD v1.5's
SD_TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
LORA_RANK = 16  # the LoRA rows' rank (benchmarks/memory.py reports 16, 64 and 128)


def lora_training(net: torch.nn.Module) -> None:
    """``net`` adapted in place as ``--lora LORA_RANK`` adapts the generator's and student's copies (the
    architecture's default targets, base frozen): only the adapters are trainable."""
    from emd_fast.nets.lora import LoraSettings, adapt
    adapt(net, LoraSettings(LORA_RANK))


# How generator and student train: a function marking the trainable parameters of a network copy (None: all).
TRAINING = {"full": None, "lora": lora_training}
# DMD2 on ImageNet-64 with EDM's ADM (tianweiy/DMD2, experiments/imagenet/README.md and the *_scratch.sh config):
# 200k iterations in 53 h on 7 A100s (0.95 s/iteration) at batch 40 per GPU, bf16, generator updated every 5th
# iteration (dfake_gen_update_ratio 5), GAN classifier on the fake score's bottleneck.
DMD2 = dict(batch_per_gpu=40, s_per_iter=0.95, gen_every=5)
FASTGEN_COMPILE_SPEEDUP = 1.55  # NVIDIA FastGen: torch.compile (max-autotune) over eager


def real_networks(name: str, device="meta", tiny: bool = False):
    """(teacher, data shape, num_classes, sigma_data) of a real network with random weights, built on ``device``
    (meta: no memory, nothing computed; what the floors count). The teacher's ``net`` is the architecture generator
    and student copy; y: class labels, or for SD prompt indices into a table of 2 random text embeddings.
    tiny: the same kind of network at toy size (the CPU smoke runs)."""
    from emd_fast.teachers import NetworkTeacher
    if name == "edm-imagenet64":
        from emd_fast.nets.unet import UNET_CONFIGS, build_network
        with torch.device(device):
            net = build_network(dict(UNET_CONFIGS["tiny" if tiny else "edm-imagenet64-adm"]))
        shape = (net.img_channels, net.img_resolution, net.img_resolution)
        return NetworkTeacher(net, net.schedule, shape), shape, net.label_dim, net.sigma_data
    if name == "sd15":
        from emd_fast.optional import require
        from emd_fast.teachers import diffusers_folder as df
        diffusers = require("diffusers", "the SD v1.5 networks")
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
        schedule = df.DiscreteSchedule(torch.cumprod(1 - betas, 0))
        width = 16 if tiny else 768
        with torch.device(device):
            unet = diffusers.UNet2DConditionModel(**(SD_TINY if tiny else SD15_UNET))
            uncond = torch.zeros(1, 77, width)
        prompts = df.PromptTable(torch.randn(2, 77, width))
        shape = (4, unet.config.sample_size, unet.config.sample_size)
        net = df.DiffusersDenoiser(unet, schedule, "epsilon", prompts)
        return df.GuidedTeacher(net, shape, df.DEFAULT_GUIDANCE, uncond), shape, len(prompts), 1.0
    raise ValueError(f"unknown network {name!r}; choose from {tuple(REAL_NETWORKS)}")


def dmd2_anchor(net: NetFlops, encoder: NetFlops) -> dict:
    """DMD2's ImageNet-64 iteration in the same FLOP units as ours, and what its published speed means on our GPUs.

    FLOPs per image (net: the ADM per example; encoder: its encoder up to the 8x8 bottleneck, which the GAN
    classifier reads), from DMD2's released code: every iteration the generator's forward, the fake score's DSM
    step (train) and the GAN classifier on a real and a fake image (2 encoder train steps); every 5th iteration
    additionally the generator's backward (train - forward), the real and fake scores' forwards (2 forward) and the
    classifier's generator loss (an encoder VJP). Its MFU: 42 images/s per A100 x those FLOPs over the A100's
    datasheet 312 TFLOP/s (a measured A100 rate would be ~10% lower, its MFU that much higher). Scaled to an H100 or
    H200 at the same MFU (the honest transfer: the same software efficiency on another chip), with our measured bf16
    rates."""
    every = net.forward + net.train + 2 * encoder.train
    extra = (net.train - net.forward) + 2 * net.forward + encoder.vjp
    flops = every + extra / DMD2["gen_every"]
    images = DMD2["batch_per_gpu"] / DMD2["s_per_iter"]
    mfu = images * flops / (A100_BF16_TFLOPS * 1e12)
    return {"flops_per_image": flops, "images_per_s_a100": images, "mfu": mfu,
            "images_per_s_h100": mfu * H100["bf16_tflops"] * 1e12 / flops,
            "images_per_s_h200": mfu * H200["bf16_tflops"] * 1e12 / flops}


def adm_encoder_flops(net: torch.nn.Module, shape, condition) -> NetFlops:
    """NetFlops of the ADM's embedding and encoder alone (what DMD2's classifier runs: up to the 8x8 bottleneck)."""
    class Encoder(torch.nn.Module):
        def __init__(self, adm):
            super().__init__()
            self.adm = adm

        def forward(self, x, t, y):
            return self.adm.encode(x, t, y)[0]

    return network_flops(Encoder(net), shape, condition)


def student_of(teacher) -> torch.nn.Module:
    """A trainable copy of the teacher's network (generator and student start as such copies)."""
    return copy.deepcopy(teacher.net).requires_grad_(True)


def real_counts(name: str):
    """(make() -> a trainable generator/student copy on the meta device, inputs(n) -> (args, kwargs) of one call,
    one example's data shape, teacher FLOPs per example and denoising, teacher parameters) of a real network.
    EDM's ADM and SD v1.5 through our teachers (``real_networks``); the later families from their own networks
    (benchmarks/memory.py builds them), the teacher as TEACHER_CALLS forwards."""
    if name not in TEACHER_CALLS:
        teacher, shape, num_classes, _ = real_networks(name)
        condition = labels(num_classes)
        return (lambda: student_of(teacher)), xty_inputs(shape, condition), shape, \
            teacher_flops(teacher, shape, condition), sum(q.numel() for q in teacher.net.parameters())
    import memory
    base, inputs, _ = memory.network(name)
    with torch.device("meta"):
        args, kwargs = inputs(1)
    image = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
    return (lambda: memory.network(name)[0]), inputs, tuple(image.shape[1:]), \
        TEACHER_CALLS[name] * call_flops(base, inputs).forward, sum(q.numel() for q in base.parameters())


def real_rows(names=tuple(REAL_NETWORKS), ks=REAL_KS, training=tuple(TRAINING), batch: int = REAL_BATCH) -> dict:
    """Floor rows of the real networks: per network, training mode and K, FLOPs per sample, bytes per iteration at
    ``batch``, the bf16 time floors on an H100 and an H200, the images/s ceiling (100% of the bf16 rate), the goal
    (DMD2's ImageNet-64 MFU on the same GPU: ``dmd2_anchor``) and the EMD-K/EMD-1 FLOP ratio."""
    teacher, shape, num_classes, _ = real_networks("edm-imagenet64")
    adm = student_of(teacher)
    dmd2 = dmd2_anchor(network_flops(adm, shape, labels(num_classes)),
                       adm_encoder_flops(adm, shape, labels(num_classes)))
    rows = []
    for name in names:
        make, inputs, shape, t_flops, t_params = real_counts(name)
        for mode in training:
            net = make()
            if TRAINING[mode] is not None:
                TRAINING[mode](net)
            flops = call_flops(net, inputs)
            params = sum(q.numel() for q in net.parameters())
            trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
            cost = functools.partial(iteration_cost, batch, shape, net=flops, teacher=t_flops, params=params,
                                     teacher_params=t_params, trainable=trainable)
            k1 = cost(K=1)["flops"] / batch
            for K in ks:
                c = cost(K=K)
                per_sample = c["flops"] / batch
                row = dict(network=name, training=mode, K=K, batch=batch, params=params, trainable=trainable,
                           flops_per_sample=per_sample, **c, ratio_vs_K1=per_sample / k1, goal_mfu=dmd2["mfu"])
                for gpu, rates in (("h100", H100), ("h200", H200)):
                    floor = floor_s(c["bytes"], c["flops"], rates["copy_gbps"], rates["bf16_tflops"])
                    row[f"{gpu}_floor_ms"] = 1e3 * floor
                    row[f"{gpu}_ceiling_images_s"] = batch / floor
                    row[f"{gpu}_goal_images_s"] = dmd2["mfu"] * rates["bf16_tflops"] * 1e12 / per_sample
                rows.append(row)
    return {"networks": {n: REAL_NETWORKS[n] for n in names}, "rows": rows, "dmd2": dmd2,
            "fastgen_compile_speedup": FASTGEN_COMPILE_SPEEDUP, "h200": H200, "a100_bf16_tflops": A100_BF16_TFLOPS}


def real_table(res: dict) -> str:
    """The real-size floors as markdown, with the anchors under them."""
    d = res["dmd2"]
    lines = ["| network | training | K | params (trainable) | GFLOP/sample | EMD-K/EMD-1 | GB/iter | "
             "H100 floor ms/iter | H200 floor ms/iter | ceiling img/s H100 / H200 | goal img/s H100 / H200 |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['network']} | {r['training']} | {r['K']} | {r['params'] / 1e6:.1f} M "
              f"({r['trainable'] / 1e6:.1f} M) | {r['flops_per_sample'] / 1e9:.4g} | {r['ratio_vs_K1']:.2f} | "
              f"{r['bytes'] / 1e9:.3g} | "
              f"{r['h100_floor_ms']:.4g} | {r['h200_floor_ms']:.4g} | {r['h100_ceiling_images_s']:.3g} / "
              f"{r['h200_ceiling_images_s']:.3g} | {r['h100_goal_images_s']:.3g} / {r['h200_goal_images_s']:.3g} |"
              for r in res["rows"]]
    batch = res["rows"][0]["batch"] if res["rows"] else REAL_BATCH
    return "\n".join([
        *(f"{n}: {label}" for n, label in res["networks"].items()), "", *lines, "",
        f"Batch {batch}; bf16 floors = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate): H100 "
        f"{H100['copy_gbps']:.0f} GB/s, {H100['bf16_tflops']:.0f} TFLOP/s; H200 {H200['copy_gbps']:.0f} GB/s, "
        f"{H200['bf16_tflops']:.0f} TFLOP/s (measured on this workplace's machines). Ceiling: images/s at the floor "
        "(100% MFU). Goal: DMD2's MFU on the same GPU.",
        f"Anchor DMD2 (ImageNet-64, EDM ADM, bf16): {d['images_per_s_a100']:.1f} images/s per A100 at "
        f"{d['flops_per_image'] / 1e9:.0f} GFLOP/image (its iteration, our FLOP count) = {100 * d['mfu']:.1f}% MFU of "
        f"the A100's {A100_BF16_TFLOPS:.0f} TFLOP/s; at that MFU {d['images_per_s_h100']:.0f} images/s of its "
        f"iteration per H100, {d['images_per_s_h200']:.0f} per H200.",
        f"Anchor FastGen: torch.compile gives {FASTGEN_COMPILE_SPEEDUP}x over eager: the goal of --fast over eager "
        "at the same precision."])


def device_rates() -> dict:
    """Copy bandwidth and matmul rate of the device at hand, measured (GPU: bf16 8192^3, CPU: fp32 512^3)."""
    from benchtools import ON_GPU, run_facts, time_ms
    facts = run_facts()
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (512, torch.float32)
    a = torch.randn(n, n, device=facts["device"], dtype=dtype)
    tflops = 2 * n**3 / time_ms(lambda: a @ a) / 1e9
    return {"name": facts["gpu"], "copy_gbps": facts["copy_gbps"], "matmul_tflops": tflops,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def floors(device: dict | None = None) -> dict:
    """Every floor row: kernels at KERNEL_SIZES in fp32 and bf16, iterations of PROBLEMS at KS."""
    device = device or device_rates()
    kernels = []
    for kernel in KERNELS:
        for size, shape in KERNEL_SIZES.items():
            for dtype, esize in (("fp32", 4), ("bf16", 2)):
                nbytes, flops = kernel_cost(kernel, torch.Size(shape).numel(), esize)
                kernels.append(dict(kernel=kernel, size=size, dtype=dtype, bytes=nbytes, flops=flops,
                                    h100_us=1e6 * floor_s(nbytes, flops, H100["copy_gbps"], H100["fp32_tflops"]),
                                    device_us=1e6 * floor_s(nbytes, flops, device["copy_gbps"],
                                                            device["matmul_tflops"])))
    iterations = []
    import throughput
    for problem in PROBLEMS:
        spec = throughput.problem_spec(problem, smoke=False)  # the GPU sizes (random weights: costs do not care)
        nets = throughput.build_networks(spec, torch.device("cpu"))
        for K in KS:
            c = networks_cost(nets, spec["batch"], K)
            iterations.append(dict(problem=problem, K=K, **c,
                                   h100_bf16_us=1e6 * floor_s(c["bytes"], c["flops"], H100["copy_gbps"],
                                                              H100["bf16_tflops"]),
                                   h100_fp32_us=1e6 * floor_s(c["bytes"], c["flops"], H100["copy_gbps"],
                                                              H100["fp32_tflops"]),
                                   device_us=1e6 * floor_s(c["bytes"], c["flops"], device["copy_gbps"],
                                                           device["matmul_tflops"])))
    return {"h100": H100, "device": device, "problems": PROBLEMS, "kernels": kernels, "iterations": iterations}


def table(res: dict) -> str:
    d = res["device"]
    lines = [f"Roofline floor. H100: {H100['copy_gbps']:.0f} GB/s copy, {H100['bf16_tflops']:.0f} TFLOP/s bf16, "
             f"{H100['fp32_tflops']:.0f} TFLOP/s fp32 non-tensor. Device at hand ({d['name']}): "
             f"{d['copy_gbps']:.0f} GB/s copy, {d['matmul_tflops']:.3g} TFLOP/s {d['matmul_dtype']} matmul "
             "(measured).", "",
             "| kernel | size | dtype | MB moved | MFLOP | H100 floor (us) | device floor (us) |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {k['kernel']} | {k['size']} | {k['dtype']} | {k['bytes'] / 1e6:.3g} | {k['flops'] / 1e6:.3g} | "
              f"{k['h100_us']:.3g} | {k['device_us']:.3g} |" for k in res["kernels"]]
    lines += ["", *(f"{p}: {label}" for p, label in res["problems"].items()), "",
              "| problem | K | GFLOP/iter | MB/iter (elementwise + weights) | H100 floor bf16 (us) | "
              "H100 floor fp32 (us) | device floor (us) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {i['problem']} | {i['K']} | {i['flops'] / 1e9:.4g} | {i['bytes'] / 1e6:.4g} "
              f"({i['elementwise_bytes'] / 1e6:.3g} + {i['param_bytes'] / 1e6:.3g}) | {i['h100_bf16_us']:.4g} | "
              f"{i['h100_fp32_us']:.4g} | {i['device_us']:.4g} |" for i in res["iterations"]]
    return "\n".join(lines)


def versions() -> dict:
    """torch's and diffusers' versions (diffusers builds the later families' networks; None if absent)."""
    try:
        import diffusers
    except ImportError:
        diffusers = None
    return {"torch": torch.__version__, "diffusers": getattr(diffusers, "__version__", None)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--real", nargs="*", choices=list(REAL_NETWORKS), default=list(REAL_NETWORKS),
                   help="the real networks to floor (default: all; --real alone: none)")
    p.add_argument("--K", nargs="+", type=int, default=list(REAL_KS), help="Langevin steps of the real rows")
    args = p.parse_args(argv)
    res = floors()
    print(table(res))
    if args.real:
        res["real"] = real_rows(args.real, args.K)
        print("\n" + real_table(res["real"]))
    if args.json:
        res["command"] = " ".join(["python benchmarks/roofline.py", *(argv if argv is not None else sys.argv[1:])])
        res["versions"] = versions()
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
