"""``benchmarks/fixed_points.py``: where the generator can represent the teacher, every K settles on it."""
import json

import pytest

import fixed_points


def test_every_K_settles_on_a_teacher_the_generator_can_represent(tmp_path):
    # sep 0: both modes at the origin, the teacher is N(0, 0.5^2), which g(z) = 0.5 z matches exactly
    fixed_points.main(["--sep", "0", "--width", "0.5", "--K", "1", "4", "--samples", "4096", "--out",
                       str(tmp_path / "fp")])
    res = json.loads((tmp_path / "fp.json").read_text())
    assert [(r["K"], r["variant"]) for r in res["rows"]] == [(1, "eps,z"), (4, "eps,z"), (1, "eps"), (4, "eps")]
    for r in res["rows"]:
        assert abs(r["s"] - 0.5) < 2e-3, r
    assert "| eps,z | 0.500 | 0.500 |" in (tmp_path / "fp.md").read_text()


@pytest.mark.parametrize("bad", [["--width", "0"], ["--sep", "-1"], ["--samples", "1"], ["--K", "0"]])
def test_bad_options_are_one_line_and_exit_2(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fixed_points.main([*bad, "--out", str(tmp_path / "fp")])
    assert e.value.code == 2 and "must be" in capsys.readouterr().err
