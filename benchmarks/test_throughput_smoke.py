"""``benchmarks/throughput.py`` end to end at the smoke sizes: the JSON's rows, ratio columns, skip notes, K=16
summary and the --baseline regression check (the numbers themselves mean nothing on a CPU)."""
import json

import pytest
import torch

import throughput


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run: the graph variants are skipped there")
def test_smoke_run_reports_ratios_skips_and_regressions(tmp_path, capsys):
    """Vector problem, eager and graph, reference and triton, K 1 and 16, one timed iteration: the graph variants
    are a skip note (no row), ratios are against the eager reference / K=1 rows, --skip leaves a variant out, and a
    baseline that was faster fails the run."""
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"results": [
        dict(problem="vector", backend="reference", impl="eager", K=1, ms_per_iter=1e-6),
        dict(problem="vector", backend="reference", impl="compile", K=1, ms_per_iter=1.0)]}))
    out = tmp_path / "t.json"
    rc = throughput.main(["--smoke", "--problems", "vector", "--K", "1", "16", "--impls", "eager", "graph",
                          "--skip", "eager/triton", "--iters", "1", "--warmup", "0", "--quiet", "--out", str(out),
                          "--baseline", str(baseline)])
    res = json.loads(out.read_text())
    assert rc == 1  # the first baseline row was faster
    assert [(r["backend"], r["impl"], r["K"]) for r in res["results"]] == [("reference", "eager", 1),
                                                                           ("reference", "eager", 16)]
    assert [r["speedup_vs_eager_ref"] for r in res["results"]] == [1.0, 1.0]
    assert res["results"][0]["time_vs_K1"] == 1.0 and res["results"][1]["flops_per_iter"] > 0
    assert any("graph skipped: CUDA graphs need a CUDA device" in n for n in res["notes"])
    assert "vector: eager/triton left out (--skip)" in res["notes"]
    [s] = res["summary"]
    assert (s["problem"], s["K"], s["impl"], s["target_met"]) == ("vector", 16, "eager", None)
    text = capsys.readouterr().out
    assert "| vs eager ref |" in text and "vector EMD-16: fastest eager / reference" in text
    assert "SLOWER" in text and "only in baseline: vector/reference/compile/K1" in text


def test_interrupted_run_keeps_the_rows_measured(tmp_path, monkeypatch):
    """A SIGINT (a time limit's) during the third variant: the JSON holds the two rows measured, says it was
    interrupted, and the run exits 1."""
    measured = throughput.measure_row

    def row_or_interrupt(*args, **kwargs):
        if row_or_interrupt.calls == 2:
            raise KeyboardInterrupt
        row_or_interrupt.calls += 1
        return measured(*args, **kwargs)

    row_or_interrupt.calls = 0
    monkeypatch.setattr(throughput, "measure_row", row_or_interrupt)
    out = tmp_path / "t.json"
    rc = throughput.main(["--smoke", "--problems", "vector", "--K", "1", "4", "--impls", "eager",
                          "--iters", "1", "--warmup", "0", "--quiet", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 1 and res["interrupted"]
    assert [(r["backend"], r["K"]) for r in res["results"]] == [("reference", 1), ("reference", 4)]
    assert res["notes"][-1].startswith("interrupted after 2 rows")


def test_real_networks_at_toy_size_and_rows_written_as_they_come(tmp_path, monkeypatch):
    """The real-network problems (ADM, a guided SD-style UNet) at toy size, eager fp32 and bf16: rows with the
    same-precision ratio and FLOPs from the floor; and the JSON on disk holds every row measured before a crash
    (a kill leaves it as it was after the last row)."""
    measured = throughput.measure_row

    def row_or_crash(*args, **kwargs):
        if row_or_crash.calls == 3:
            raise RuntimeError("killed")
        row_or_crash.calls += 1
        return measured(*args, **kwargs)

    row_or_crash.calls = 0
    monkeypatch.setattr(throughput, "measure_row", row_or_crash)
    out = tmp_path / "t.json"
    with pytest.raises(RuntimeError, match="killed"):
        throughput.main(["--smoke", "--problems", "imagenet64", "sd15", "--K", "1", "--impls", "eager", "eager-bf16",
                         "--backends", "reference", "--iters", "1", "--warmup", "0", "--quiet", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["interrupted"]
    assert [(r["problem"], r["impl"]) for r in res["results"]] == [
        ("imagenet64", "eager"), ("imagenet64", "eager-bf16"), ("sd15", "eager")]
    adm, adm_bf16, sd = res["results"]
    assert adm_bf16["speedup_vs_eager_same_precision"] == 1.0 and adm_bf16["speedup_vs_eager_ref"] > 0
    assert adm["flops_per_iter"] == adm["floor_flops"] > 0 and adm["training"] == "full"
    assert sd["flops_per_iter"] > 0 and "guided" not in sd["problem_label"]
