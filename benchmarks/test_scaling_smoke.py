"""``benchmarks/scaling.py`` end to end on CPU processes (gloo) at a tiny size: one torchrun run per process count,
the table and the JSON rows (the numbers themselves mean nothing here)."""
import json

import pytest

import scaling

TINY = ["--device", "cpu", "--teacher-fit-steps", "5", "--hidden", "8", "--depth", "1", "--K", "1",
        "--eval-samples", "50"]


def test_scaling_runs_each_process_count(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert scaling.main(["--procs", "1", "2", "--global-batch", "8", "--steps", "12", "--no-baseline",
                         "--workdir", str(tmp_path), "--out", str(out), "--", *TINY]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["launcher"], r["processes"], r["global_batch"]) for r in rows] == [("torchrun", 1, 8),
                                                                                 ("torchrun", 2, 8)]
    assert rows[0]["efficiency"] == 1.0 and all(r["iters_per_s"] > 0 for r in rows)
    assert rows[1]["samples_per_s_per_process"] == pytest.approx(rows[1]["samples_per_s"] / 2, abs=0.1)
    assert "| torchrun | 2 | 8 |" in capsys.readouterr().out


def test_bad_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        scaling.main(["--procs", "3", "--global-batch", "8"])
    assert "--global-batch 8 does not divide across 3 processes" in capsys.readouterr().err
