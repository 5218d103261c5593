"""Roofline floor: the bytes that must move and the FLOPs that must run, per kernel and per EMD iteration, turned
into lower-bound times on an H100 and on the device at hand. Nothing of EMD is timed here.

    python benchmarks/roofline.py                 # the floor table (the CPU smoke run prints only this)
    python benchmarks/roofline.py --json floor.json

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
H100 rates (docs/design.md): 3.0 TB/s device copy, 800 TFLOP/s dense bf16, 60 TFLOP/s fp32 non-tensor; the device at
hand: its copy bandwidth and matmul rate measured here (GPU: bf16, CPU: fp32). Benchmark tables report measured /
floor ("x floor") against these.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

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
    """FLOPs per example of one network call: forward, forward + input gradient (VJP), forward + weight gradients."""
    forward: float
    vjp: float
    train: float


def network_flops(net: torch.nn.Module, shape: tuple[int, ...], num_classes: int = 0) -> NetFlops:
    """Counted with a batch of 2 (shape: one example's) on the meta device, or on the CPU for a class-conditional
    network (its label check reads the labels)."""
    from throughput import _GlobalOnly
    device = "cpu" if num_classes else "meta"
    net = copy.deepcopy(net).to(device)
    y = torch.zeros(2, dtype=torch.long, device=device) if num_classes else None

    def count(inputs_grad: bool, weights_grad: bool) -> float:
        net.requires_grad_(weights_grad)
        x = torch.randn((2, *shape), device=device, requires_grad=inputs_grad)
        t = torch.full((2,), 0.5, device=device)
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _GlobalOnly()
        with counter:
            out = net(x, t, y)
            wrt = ([x] if inputs_grad else []) + ([p for p in net.parameters()] if weights_grad else [])
            if wrt:
                torch.autograd.grad(out, wrt, torch.ones_like(out))
        return counter.get_total_flops() / 2

    return NetFlops(count(False, False), count(True, False), count(False, True))


def iteration_cost(batch: int, shape: tuple[int, ...], K: int, student: torch.nn.Module,
                   teacher_net: torch.nn.Module | None, num_classes: int = 0) -> dict:
    """(bytes, FLOPs) of one EMD iteration's floor: generator and student share the student's architecture, the
    teacher is ``teacher_net`` (None: an exact teacher, counted as nothing)."""
    net = network_flops(student, shape, num_classes)
    teacher = network_flops(teacher_net, shape, num_classes).forward if teacher_net is not None else 0.0
    flops = batch * (K * (teacher + net.forward + net.vjp) + 2 * net.train)
    numel = batch * torch.Size(shape).numel()
    elementwise = (K * (KERNELS["langevin_eps_step"][0] + KERNELS["langevin_z_step"][0])
                   + KERNELS["generator_loss"][0] + KERNELS["dsm_loss"][0]) * numel * CHAIN_BYTES
    p = sum(q.numel() for q in student.parameters())
    p_teacher = sum(q.numel() for q in teacher_net.parameters()) if teacher_net is not None else 0
    params = PARAM_BYTES * (K * p_teacher + (K + 3) * p + (2 * K + 3) * p + 7 * 2 * p)
    return {"flops": flops, "bytes": elementwise + params, "elementwise_bytes": elementwise, "param_bytes": params}


def networks_cost(nets, batch: int, K: int) -> dict:
    """iteration_cost of throughput.build_networks' (teacher, generator, student, sigma_data, num_classes)."""
    teacher, _, student, _, num_classes = nets
    if hasattr(teacher, "net"):  # a NetworkTeacher
        return iteration_cost(batch, teacher.data_shape, K, student, teacher.net, num_classes)
    return iteration_cost(batch, (teacher.dim,), K, student, None, num_classes)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write every row here")
    args = p.parse_args(argv)
    res = floors()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
