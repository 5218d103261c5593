"""``benchmarks/estep_effect.py`` on a tiny run: EMD-1 against itself is the identity, EMD-4 gives numbers."""
import math

import pytest

from emd_fast import train

import estep_effect


def test_compares_the_m_step_gradients_per_noise_level(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--K", "2", "--steps", "3", "--teacher-fit-steps", "5", "--hidden", "16", "--eval-samples",
                       "200", "--eval-every", "0", "--quiet", "--out", str(run)]) == 0
    res = estep_effect.main([str(run), "--K", "1", "4", "--samples", "300", "--bins", "3", "--batches", "3",
                             "--out", str(tmp_path / "effect.json")])
    assert set(res["snr"]) == {1, 4} and all(math.isfinite(v) for v in res["snr"].values())
    for b in res["per_noise_level"][1]:  # the same chain twice
        assert abs(b["cosine"] - 1) < 1e-5 and abs(b["gradient_ratio"] - 1) < 1e-5 and b["residual_ratio"] == 1
    bins = res["per_noise_level"][4]
    assert len(bins) == 4 and bins[0]["t_to"] <= bins[1]["t_from"]  # 3 bins in order of t, then all
    assert all(-1 <= b["cosine"] < 1 - 1e-6 and b["gradient_ratio"] > 0 for b in bins)
    assert (tmp_path / "effect.json").is_file()


def test_a_missing_run_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        estep_effect.main([str(tmp_path / "nothing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
