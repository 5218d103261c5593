"""``benchmarks/logging_overhead.py`` end to end at a tiny size: every logger is timed and the JSON holds it (the
numbers of a smoke run mean nothing)."""
import json

import logging_overhead


def test_logging_overhead_runs_and_records_every_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "lo.json"
    logging_overhead.main(["--iters", "2", "--windows", "2", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["loggers"]) == {"none", "tensorboard", "wandb", "both"} and res["iteration_ms"] > 0
    assert res["loggers"]["none"]["ms_per_iter"] < res["loggers"]["tensorboard"]["ms_per_iter"]
    assert res["versions"]["tensorboard"] and res["versions"]["wandb"]
