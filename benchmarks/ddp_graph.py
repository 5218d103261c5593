"""Probe: the whole EMD iteration as one CUDA graph under DistributedDataParallel, with one NCCL process.

    torchrun --standalone --nproc_per_node 1 benchmarks/ddp_graph.py --out ddp.json

Training refuses --cuda-graph under torch.distributed (``config.GRAPHS_NOT_DISTRIBUTED``: the gradient all-reduce
was never captured and tested). This probe tries it where a GPU is: the vector problem's networks (throughput.py)
wrapped for data-parallel training as a distributed run wraps them (``distributed.data_parallel``: DDP,
static_graph), deferred finite checks, the iteration captured by ``GraphedStep`` after its eager warm-up; the same
iterations run eagerly from the same seed alongside. Recorded: whether the capture succeeded (or its error's first
line), the largest relative loss difference between the graphed and the eager iterations over ``--iters`` (they
must agree to float rounding: < 1e-4, else exit 1), and the ms per iteration of both. One process keeps it cheap;
the all-reduce is then a copy, but it is captured like any other. Without CUDA: gloo, the eager DDP iterations
only, the graph reported unavailable (the CPU smoke run). The JSON is written at the end and, should the capture
fail, before it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # NCCL's watchdog must not query a capturing stream

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from emd_fast.emd import EMDConfig  # noqa: E402
from emd_fast.execution.distributed import data_parallel  # noqa: E402
from emd_fast.execution.graphs import GraphedStep, graphs_unavailable  # noqa: E402
from emd_fast.training.distiller import Distiller, Execution  # noqa: E402

import throughput  # noqa: E402

WARMUP = 3  # GraphedStep's eager iterations before the capture


def distiller(nets, device, batch: int, K: int):
    """A data-parallel Distiller over copies of ``nets``, deferred finite checks (no host sync: capturable)."""
    teacher, generator, student, sigma_data, num_classes = copy.deepcopy(nets)
    return Distiller(teacher, generator, student, EMDConfig(K=K), batch=batch, lr_g=1e-4, lr_s=1e-3, seed=0,
                     sigma_data=sigma_data, num_classes=num_classes, execution=Execution(finite_check="deferred"),
                     device=device, data_parallel=data_parallel(device))


def timed(step, iters: int, device) -> tuple[list[dict], float]:
    """(losses of each of ``iters`` calls as floats, ms per call); synchronised around the loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, losses = time.perf_counter(), [step() for _ in range(iters)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = 1e3 * (time.perf_counter() - t0) / iters
    return [{k: float(v) for k, v in ls.items()} for ls in losses], ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20, help="iterations compared (after the graph's warm-up + capture)")
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("runs/ddp_graph.json"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    spec = throughput.problem_spec("vector", smoke=not cuda)
    nets = throughput.build_networks(spec, device)
    res = {"world": tdist.get_world_size(), "backend": tdist.get_backend(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if cuda else None, "problem": spec["label"], "K": args.K,
           "iters": args.iters}
    try:
        eager = distiller(nets, device, spec["batch"], args.K)
        warm = WARMUP + 1  # the graphed twin's eager warm-up calls and its capturing call: iterations too
        timed(eager.step, warm, device)
        eager_losses, res["eager_ms"] = timed(eager.step, args.iters, device)
        graphed = distiller(nets, device, spec["batch"], args.K)
        why = graphs_unavailable(graphed)
        res["graph"] = {"captured": False, "why_not": why}
        if why is None:
            args.out.write_text(json.dumps(res, indent=1))  # kept if the capture kills the process
            try:
                step = GraphedStep(graphed, warmup=WARMUP)
                timed(step, warm, device)
                graph_losses, ms = timed(step, args.iters, device)
                diff = max(abs(a[k] - b[k]) / (1 + abs(b[k])) for a, b in zip(graph_losses, eager_losses)
                           for k in ("loss_g", "loss_s"))
                res["graph"] = {"captured": True, "ms": ms, "speedup": res["eager_ms"] / ms,
                                "max_rel_loss_diff": diff, "agree": diff < 1e-4}
            except Exception as e:  # noqa: BLE001 - what breaks under capture is the finding
                res["graph"] = {"captured": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        tdist.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    graph = res["graph"]
    return 0 if graph.get("agree") or graph.get("why_not") else 1


if __name__ == "__main__":
    sys.exit(main())
