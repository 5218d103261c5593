"""``benchmarks/real_size.py`` at its toy sizes on the CPU: random ADM and EDM2 teacher files and a random SD-style
pipeline folder distil through real train processes, the figures land in the JSON, and a failing variant is reported
as one (the numbers themselves mean nothing here)."""
import json

import pytest

import real_size

pytest.importorskip("diffusers")


def test_toy_teachers_run_and_failures_are_reported(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = real_size.main(["tiny-adm", "tiny-sd", "tiny-edm2", "--device", "cpu", "--steps", "2", "--batch", "2",
                         "--K", "1", "--variants", "eager-fp32", "checkpointed-bf16", "--workdir", str(tmp_path),
                         "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["batch"] == 2
    assert [r["variant"] for r in res["results"]["tiny-adm"]] == ["eager-fp32"]  # checkpointing: diffusers only
    assert [r["variant"] for r in res["results"]["tiny-sd"]] == ["eager-fp32", "checkpointed-bf16"]
    assert [r["variant"] for r in res["results"]["tiny-edm2"]] == ["eager-fp32"]
    for rows in res["results"].values():
        for r in rows:
            assert r["ok"] and r["iters_per_s"] > 0 and r["peak_gpu_memory_gib"] is None  # CPU: no GPU figure
    assert res["results"]["tiny-sd"][1]["execution"]["precision"] == "bf16"
    assert list(tmp_path.glob("real_size_*")) == []  # teachers and runs removed

    rc = real_size.main(["tiny-adm", "--device", "cpu", "--steps", "2", "--batch", "0", "--variants", "eager-fp32",
                         "--workdir", str(tmp_path), "--out", str(out)])
    [row] = json.loads(out.read_text())["results"]["tiny-adm"]
    assert rc == 1 and not row["ok"] and row["rc"] == 2 and "--batch" in row["error"]
    assert "failed: " in capsys.readouterr().out
