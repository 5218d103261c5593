"""benchmarks/compare.py (regression gate) and benchmarks/report.py (markdown table) on hand-made JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH_DIR))  # report.py imports compare.py as a sibling
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH_DIR))


compare, report = _load("compare"), _load("report")


def _record(name, median_s, gpu_ms=None, impl="triton"):
    info = {"kernel": "dsm_loss", "impl": impl, "size": "s", "dtype": "torch.float32", "time_ms": 1e3 * median_s,
            "gbps": 1.0, "pct_copy_bw": 50.0, "copy_gbps": 2.0, "gpu": "G", "torch": "t", "triton": "tr",
            "smoke": False, "gpu_ms": gpu_ms, "x_floor": 2.0 if impl == "triton" else None}
    return {"fullname": name, "stats": {"median": median_s}, "extra_info": info}


def _write(path, records):
    path.write_text(json.dumps({"benchmarks": records}))
    return str(path)


def test_compare_flags_slowdowns_beyond_threshold(tmp_path, capsys):
    base = _write(tmp_path / "base.json", [_record("a", 1.0), _record("b", 1.0), _record("gone", 1.0)])
    new = _write(tmp_path / "new.json", [_record("a", 1.05), _record("b", 1.2), _record("added", 1.0)])
    assert compare.main([base, new]) == 1
    out = capsys.readouterr().out
    assert "SLOWER  1.200x" in out and "ok      1.050x" in out
    assert "only in baseline: gone" in out and "only in new run:  added" in out
    assert compare.main([base, new, "--threshold", "0.25"]) == 0


def test_compare_prefers_cuda_event_times(tmp_path):
    """Wall-clock medians got slower but the CUDA-event medians did not: no regression."""
    base = _write(tmp_path / "base.json", [_record("a", 1.0, gpu_ms=2.0)])
    new = _write(tmp_path / "new.json", [_record("a", 3.0, gpu_ms=2.1)])
    assert compare.main([base, new]) == 0
    assert compare.main([base, new, "--threshold", "0.01"]) == 1


def test_report_table(tmp_path):
    records = [_record("e", 0.004, impl="eager"), _record("t", 0.001)]
    table = report.render(compare.load_benchmarks(_write(tmp_path / "r.json", records)))
    assert "| dsm_loss | s | float32 | triton | 1.0000 | 1 | 50% | 2.00 | 4.00x |" in table
    assert "| dsm_loss | s | float32 | eager | 4.0000 | 1 | 50% | - | 1.00x |" in table
    assert table.startswith("Device: G; torch t, triton tr")


def test_compare_missing_file_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        compare.main([str(tmp_path / "nope.json"), str(tmp_path / "nope.json")])
