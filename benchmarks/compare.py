"""Compare a pytest-benchmark JSON against a saved baseline; exit 1 if any benchmark got slower than allowed.

    python benchmarks/compare.py BASELINE.json NEW.json [--threshold 0.10]

Benchmarks are matched by name. The time compared is the CUDA-event median (``extra_info["gpu_ms"]``) when both
runs recorded one, else pytest-benchmark's wall-clock median. A benchmark regresses when new > (1 + threshold)
x baseline. Benchmarks present in only one file are listed but do not fail the comparison.
"""
from __future__ import annotations

import argparse
import json
import sys


def load_benchmarks(path: str) -> dict[str, dict]:
    """{fullname: benchmark record} of a pytest-benchmark JSON file."""
    with open(path) as f:
        return {b["fullname"]: b for b in json.load(f)["benchmarks"]}


def times_ms(old: dict, new: dict) -> tuple[float, float, str]:
    """(old ms, new ms, which time) for one benchmark in both runs."""
    old_gpu, new_gpu = old.get("extra_info", {}).get("gpu_ms"), new.get("extra_info", {}).get("gpu_ms")
    if old_gpu is not None and new_gpu is not None:
        return old_gpu, new_gpu, "gpu_ms"
    return 1e3 * old["stats"]["median"], 1e3 * new["stats"]["median"], "median"


def compare(baseline: dict[str, dict], new: dict[str, dict], threshold: float) -> tuple[list[str], list[str]]:
    """(report lines, names of the benchmarks slower than (1 + threshold) x baseline)."""
    lines, slower = [], []
    for name in sorted(baseline.keys() & new.keys()):
        old_ms, new_ms, which = times_ms(baseline[name], new[name])
        ratio = new_ms / old_ms
        flag = "SLOWER" if ratio > 1 + threshold else "ok"
        if flag == "SLOWER":
            slower.append(name)
        lines.append(f"{flag:6} {ratio:6.3f}x  {old_ms:10.4f} -> {new_ms:10.4f} ms ({which})  {name}")
    lines += [f"only in baseline: {name}" for name in sorted(baseline.keys() - new.keys())]
    lines += [f"only in new run:  {name}" for name in sorted(new.keys() - baseline.keys())]
    return lines, slower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("new")
    parser.add_argument("--threshold", type=float, default=0.10, help="allowed slow-down, a fraction (default 0.10)")
    args = parser.parse_args(argv)
    return verdict(*compare(load_benchmarks(args.baseline), load_benchmarks(args.new), args.threshold),
                   args.threshold)


def verdict(lines: list[str], slower: list[str], threshold: float) -> int:
    """Print a comparison's report; exit status 1 if anything got slower than allowed, else 0."""
    print("\n".join(lines))
    if slower:
        print(f"{len(slower)} benchmark(s) more than {100 * threshold:g}% slower than the baseline")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
