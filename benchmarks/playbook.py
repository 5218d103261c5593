"""The GPU playbook: prioritised stages of checks and measurements that fit the time a GPU is lent.

    benchmarks/run_gpu.sh                         # on a GPU machine: every stage within 600 s -> $OUT
    python benchmarks/playbook.py --budget 900    # the same, more time
    python benchmarks/playbook.py --cpu           # the CPU smoke run: each stage tiny (control flow, not figures)

A device session has 15 minutes in all, the machine's start-up included; the playbook's default budget is 10. The
stages run in priority order, each as its own process, and each may run at most its cap and never past the budget:
at its limit it gets SIGINT (pytest and the benchmark scripts then write what they have) and, GRACE_S later,
SIGKILL. A stage is not started with less than its minimum left; a stage whose feature is missing is skipped with
the reason. Every stage writes its results as it goes (a JSON file rewritten after each row, one line per test in
``tests.jsonl``); after the stage, its JSON files are moved into ``playbook.json`` (status, seconds and results of
every stage, the machine and versions), which is rewritten after each stage. So a run cut anywhere keeps what it
measured, and $OUT holds at most 4 files (a device call brings back 8): playbook.json, playbook.log (all output),
tests.jsonl and the JSON of a stage that was running.

Stages (``STAGES``): (a) the GPU tests of the kernels, the CUDA-graph loop, the fast path and compilation; (b) the
real-size ImageNet-64 ADM: eager bf16 against what ``--fast --precision bf16`` runs (compiled networks, triton
kernels, deferred checks, channels_last, one CUDA graph), K = 1 and 8, batch 64: images/s, MFU, x floor, peak
memory, compile time (throughput.py); (c) kernel bandwidth against the device copy at large sizes (the kernel
suite, triton rows); (d) SD v1.5 size, full and LoRA training (needs roofline.TRAINING["lora"]: skipped until
LoRA lands); (e) the CUDA-graph iteration under DDP with one NCCL process (ddp_graph.py); then, while time is
left, (f) the floors with this GPU's measured rates (roofline.py) and (g) the rest of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 20  # after SIGINT, the seconds a stage has to write its results before SIGKILL
GPU_TESTS = ["tests/test_kernels_langevin.py", "tests/test_kernels_losses.py", "tests/test_graphs.py",
             "tests/test_fast_loop.py", "tests/test_fast_path.py", "tests/test_compiled.py"]


@dataclass
class Stage:
    """One step of the playbook: a command run from the repository root with a time cap (seconds), the least time
    worth starting it with, the files it writes under $OUT, or the reason it is skipped."""

    name: str
    what: str
    command: list[str]
    cap_s: float
    min_s: float
    outputs: list[str] = field(default_factory=list)
    skip: str | None = None


def xdist(workers: int) -> list[str]:
    """pytest-xdist's options for ``workers`` processes, if it is installed (the device machines have it)."""
    try:
        import xdist as _  # noqa: F401
    except ImportError:
        return []
    return ["-n", str(workers)]


def lora_missing() -> str | None:
    """Why the LoRA stage cannot run yet, or None."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import roofline

    if "lora" not in roofline.TRAINING:
        return "LoRA has not landed (roofline.TRAINING has no 'lora'): the stage starts once it does"
    return None


def stages(out: Path, cpu: bool) -> list[Stage]:
    """The stages in priority order; ``cpu``: each made tiny (the smoke run on a machine without a GPU)."""
    py, bench = sys.executable, "benchmarks/"
    progress = ["-p", "pytest_progress", f"--progress-jsonl={out / 'tests.jsonl'}"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    adm = ["--problems", "imagenet64", "--impls", "eager-bf16", "graph-bf16", "--skip", "eager-bf16/triton",
           "graph-bf16/reference", "--quiet", "--out", str(out / "adm.json")]
    sd = ["--problems", "sd15", "--training", "full", "lora", "--impls", "eager-bf16", "graph-bf16", "--skip",
          "eager-bf16/triton", "graph-bf16/reference", "--quiet", "--out", str(out / "sd15.json")]
    bench_kernels = [py, "-m", "pytest", "-q", f"{bench}test_bench_kernels.py",
                     f"--benchmark-json={out / 'kernels.json'}", "--benchmark-columns=median,rounds"]
    if cpu:
        return [
            Stage("a-gpu-tests", "GPU tests (CPU smoke: two quick ones)", [py, "-m", "pytest", "-v", "-rfE", *progress,
                  "tests/test_fast_path.py::test_unknown_backend",
                  "tests/test_fast_loop.py::test_graphs_refused_with_reason_without_cuda"], 120, 5, ["tests.jsonl"]),
            Stage("b-adm-real-size", "ImageNet-64 ADM (CPU smoke: toy size, K 1)",
                  [py, f"{bench}throughput.py", "--smoke", "--K", "1", "--iters", "1", "--warmup", "0", *adm], 240, 5,
                  ["adm.json"]),
            Stage("c-kernel-bandwidth", "kernel bandwidth (CPU smoke: the z step, interpreted)",
                  [*bench_kernels, "-k", "langevin_z_step and triton"], 120, 5, ["kernels.json"]),
            Stage("d-sd15-lora", "SD v1.5 full vs LoRA (CPU smoke: toy size)",
                  [py, f"{bench}throughput.py", "--smoke", "--K", "1", "--iters", "1", "--warmup", "0", *sd], 240, 5,
                  ["sd15.json"], skip=lora_missing()),
            Stage("e-ddp-graph", "CUDA graph under DDP, one process (CPU smoke: eager DDP, gloo)",
                  [*torchrun, f"{bench}ddp_graph.py", "--iters", "1", "--K", "1", "--out", str(out / "ddp.json")],
                  240, 5, ["ddp.json"]),
            Stage("f-floors", "roofline floors with the device's rates (CPU smoke: without the real networks)",
                  [py, f"{bench}roofline.py", "--real", "--json", str(out / "roofline.json")], 120, 5,
                  ["roofline.json"]),
            Stage("g-other-tests", "the rest of the test suite (CPU smoke: one file)",
                  [py, "-m", "pytest", "-q", *progress, "tests/test_schedules.py"], 240, 5, ["tests.jsonl"]),
        ]
    return [
        Stage("a-gpu-tests", "GPU tests: kernels, CUDA-graph loop, fast path, compilation",
              [py, "-m", "pytest", "-v", "-rfE", *xdist(4), *progress, *GPU_TESTS], 150, 30, ["tests.jsonl"]),
        Stage("b-adm-real-size", "ImageNet-64 ADM, batch 64, K 1 and 8: eager bf16 vs --fast bf16",
              [py, f"{bench}throughput.py", "--K", "1", "8", "--iters", "5", "--warmup", "2", *adm], 240, 60,
              ["adm.json"]),
        Stage("c-kernel-bandwidth", "fused kernels' bandwidth vs the device copy, large sizes",
              [*bench_kernels, "-k", "triton and (img128x3x128x128 or lat64x4x64x64)"], 90, 20, ["kernels.json"]),
        Stage("d-sd15-lora", "SD v1.5 UNet, batch 8, K 1: full vs LoRA, eager bf16 vs --fast bf16",
              [py, f"{bench}throughput.py", "--K", "1", "--iters", "5", "--warmup", "2", *sd], 150, 60, ["sd15.json"],
              skip=lora_missing()),
        Stage("e-ddp-graph", "the CUDA-graph iteration under DDP, one NCCL process",
              [*torchrun, f"{bench}ddp_graph.py", "--out", str(out / "ddp.json")], 90, 30, ["ddp.json"]),
        Stage("f-floors", "roofline floors with this GPU's measured copy and matmul rates",
              [py, f"{bench}roofline.py", "--real", "edm-imagenet64", "--K", "1", "8", "--json",
               str(out / "roofline.json")], 60, 15, ["roofline.json"]),
        Stage("g-other-tests", "the rest of the test suite",
              [py, "-m", "pytest", "-q", "-rfE", *xdist(8), *progress, "tests",
               *(f"--ignore={t}" for t in GPU_TESTS)], 600, 60, ["tests.jsonl"]),
    ]


def default_sigint() -> None:
    """In a stage's process before it starts: SIGINT back to its default, which a playbook started with SIGINT
    ignored (nohup, a background job of a non-interactive shell, some job runners) would otherwise pass on, so
    that the stage cannot be asked to stop and write its results."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(stage: Stage, limit_s: float, log, grace_s: float = GRACE_S) -> tuple[str, int | None, float]:
    """Run one stage for at most ``limit_s`` seconds (then SIGINT, and SIGKILL ``grace_s`` later): (status, exit
    code, seconds). status: "ok", "failed" (a non-zero exit) or "cut" (stopped at its time limit)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                                        os.environ.get("PYTHONPATH")])))
    log.write(f"\n===== {stage.name}: {stage.what}\n$ {' '.join(stage.command)}\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(stage.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=default_sigint)
    cut = False
    try:
        rc = proc.wait(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        cut = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    seconds = time.perf_counter() - t0
    log.write(f"===== {stage.name}: exit {rc} after {seconds:.1f} s{' (cut at its time limit)' if cut else ''}\n")
    log.flush()
    return ("cut" if cut else "ok" if rc == 0 else "failed"), rc, seconds


def machine() -> dict:
    """GPU, driver and versions, as the results file records them."""
    facts = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch
        facts |= {"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        import triton
        facts["triton"] = triton.__version__
    except ImportError as e:
        facts["import_error"] = str(e)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if facts.get("gpu") else None
    facts["nvidia_smi"] = smi.stdout.strip() if smi and smi.returncode == 0 else None
    return facts


def collect(out: Path, names: list[str]) -> dict:
    """The JSON outputs among ``names`` (out/NAME), read and removed: playbook.json holds them from now on."""
    results = {}
    for name in names:
        if name.endswith(".json"):
            path = out / name
            try:
                results[name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:  # a stage killed while writing: kept as text
                results[name] = {"unreadable": str(e), "text": path.read_text()[:100_000]}
            path.unlink()
    return results


def run(plan: list[Stage], out: Path, budget_s: float, grace_s: float = GRACE_S) -> dict:
    """Run ``plan`` within ``budget_s`` seconds (a stage's SIGKILL ``grace_s`` after its SIGINT included);
    ``out``/playbook.json after every stage. Returns its content."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record = {"budget_s": budget_s, "machine": machine(), "stages": []}

    def save():
        record["elapsed_s"] = round(time.perf_counter() - t0, 1)
        tmp = out / "playbook.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(out / "playbook.json")

    with open(out / "playbook.log", "a") as log:
        for stage in plan:
            left = budget_s - (time.perf_counter() - t0) - grace_s
            entry = {"name": stage.name, "what": stage.what, "cap_s": stage.cap_s, "command": stage.command}
            if stage.skip:
                entry |= {"status": "skipped", "why": stage.skip}
            elif left < stage.min_s:
                entry |= {"status": "skipped", "why": f"budget: {max(left, 0):.0f} s left, the stage needs at least "
                                                      f"{stage.min_s:.0f} s"}
            else:
                status, rc, seconds = run_stage(stage, min(stage.cap_s, left), log, grace_s)
                entry |= {"status": status, "rc": rc, "seconds": round(seconds, 1)}
            entry["outputs"] = [name for name in stage.outputs if (out / name).is_file()]
            entry["results"] = collect(out, entry["outputs"])
            record["stages"].append(entry)
            print(f"{stage.name}: {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else
                                                       f": {entry['why']}"), flush=True)
            save()
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 600)),
                   help="seconds for all stages together (default $BUDGET_S or 600)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    p.add_argument("--cpu", action="store_true", help="the CPU smoke run: every stage tiny")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run these stages only (names or letters)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="a kernel suite JSON (pytest-benchmark): exit 1 if a kernel got >10%% slower (compare.py)")
    args = p.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA GPU visible: run the CPU smoke run with --cpu")
    plan = stages(args.out.resolve(), args.cpu)
    if args.only:
        plan = [s for s in plan if s.name in args.only or s.name.split("-")[0] in args.only]
    record = run(plan, args.out, args.budget)
    ok = all(s["status"] in ("ok", "skipped") for s in record["stages"])
    kernels = next((s["results"]["kernels.json"] for s in record["stages"] if "kernels.json" in s.get("results", {})),
                   None)
    if args.baseline and kernels and "benchmarks" in kernels:
        import compare
        lines, slower = compare.compare(compare.load_benchmarks(str(args.baseline)),
                                        {b["fullname"]: b for b in kernels["benchmarks"]}, 0.10)
        print("\n".join(lines))
        ok = ok and not slower
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
