"""A markdown table of a kernel benchmark JSON (benchmarks/test_bench_kernels.py).

    python benchmarks/report.py bench.json > bench.md

One row per (kernel, size, dtype, implementation): time, achieved GB/s over the bytes a fused pass moves,
% of the run's copy bandwidth, measured / roofline floor (``x floor``, benchmarks/roofline.py; "-" in the smoke
mode) and the speed-up over the eager reference chain.
"""
from __future__ import annotations

import sys

from compare import load_benchmarks


def render(benchmarks: dict[str, dict]) -> str:
    infos = [b["extra_info"] for b in benchmarks.values() if "kernel" in b.get("extra_info", {})]
    if not infos:
        return "no kernel benchmarks in this file\n"
    first = infos[0]
    lines = [f"Device: {first['gpu']}; torch {first['torch']}, triton {first['triton']}; "
             f"copy bandwidth {first['copy_gbps']:.0f} GB/s (read + write)"
             + ("; SMOKE MODE (tiny sizes, numbers mean nothing)" if first["smoke"] else ""), "",
             "| kernel | size | dtype | impl | time (ms) | GB/s | % copy BW | x floor | vs eager |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    eager = {(i["kernel"], i["size"], i["dtype"]): i["time_ms"] for i in infos if i["impl"] == "eager"}
    for i in sorted(infos, key=lambda i: (i["kernel"], i["size"], i["dtype"], i["impl"])):
        base = eager.get((i["kernel"], i["size"], i["dtype"]))
        speedup = f"{base / i['time_ms']:.2f}x" if base else "-"
        x_floor = f"{i['x_floor']:.2f}" if i.get("x_floor") is not None else "-"
        lines.append(f"| {i['kernel']} | {i['size']} | {i['dtype'].removeprefix('torch.')} | {i['impl']} | "
                     f"{i['time_ms']:.4f} | {i['gbps']:.4g} | {i['pct_copy_bw']:.0f}% | {x_floor} | {speedup} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.stdout.write(render(load_benchmarks(sys.argv[1])))
