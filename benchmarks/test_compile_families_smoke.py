"""``compile_families.py`` at one block and with aot_eager (seconds, not the inductor minutes of its real run): every
row runs, whole networks against their blocks, a warm row on its cold row's cache, losses as the eager run's."""
import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import compile_families  # noqa: E402


def test_whole_regional_and_warm_rows_run(tmp_path):
    out = tmp_path / "families.json"
    assert compile_families.main(["--families", "sd3", "--sd3-layers", "1", "--steps", "11", "--backend", "aot_eager",
                                  "--rows", "whole", "regional", "regional-warm", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["families"]["sd3"]
    assert all(rows[r]["ok"] for r in ("eager", "whole", "regional", "regional-warm")), rows
    assert rows["whole"]["report"] == ["torch.compile (aot_eager, mode default, whole): compiled generator, student, "
                                       "teacher network"]
    assert "compiled generator (1 blocks)" in rows["regional"]["report"][0]
    for r in ("whole", "regional", "regional-warm"):
        assert rows[r]["graphs"]["warmup"] > 0 and rows[r]["graphs"]["after_warmup"] == 0, (r, rows[r])
        assert rows[r]["loss_diff_vs_eager"] < 1e-4, (r, rows[r])


def test_a_warm_row_needs_its_cold_row_first(capsys):
    with pytest.raises(SystemExit):
        compile_families.main(["--rows", "regional-warm", "regional"])
    assert "starts from regional's cache" in capsys.readouterr().err
