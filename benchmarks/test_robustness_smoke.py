"""``benchmarks/robustness.py`` end to end at tiny sizes: every run and each mixture's network floor land in the JSON
and the tables (the numbers themselves mean nothing at 3 steps)."""
import json

import robustness


def test_sweep_writes_runs_network_floors_and_tables(tmp_path):
    out = tmp_path / "sweep"
    robustness.main(["--out", str(out), "--mixtures", "2", "--K", "1", "2", "--seeds", "0", "--workers", "1", "--",
                     "--steps", "3", "--teacher-fit-steps", "5", "--eval-samples", "200", "--hidden", "16"])
    res = json.loads((out / "robustness.json").read_text())
    assert sorted((r["mixture"], r["K"]) for r in res["results"]) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert not any(r["diverged"] for r in res["results"])
    assert sorted(res["network_floors"]) == ["0", "1"]
    assert all(0 <= f["mode_tv"] <= 1 for f in res["network_floors"].values())
    assert res["extra"][:2] == ["--steps", "3"]
    table = (out / "robustness.md").read_text()
    assert "| network floor (exact-sample fit, same steps) | 2 |" in table
    paired = table.split("## Paired with EMD-1")[1].split("## Per mixture")[0]
    for name in robustness.PAIRED.values():  # every measure, compared on both mixtures
        row = next(line for line in paired.splitlines() if line.startswith(f"| 2 | {name} | "))
        assert row.split(" | ")[2].endswith("/2")
    for i, spec in enumerate(robustness.family(2)):  # one row per mixture
        assert table.count(f"\n| {i} | {spec['dim']} | {spec['modes']} | ") == 1


def test_only_runs_the_chosen_mixtures(tmp_path):
    out = tmp_path / "sweep"
    robustness.main(["--out", str(out), "--mixtures", "3", "--only", "2", "--K", "1", "--seeds", "0",
                     "--workers", "1", "--", "--steps", "2", "--teacher-fit-steps", "5", "--eval-samples", "200",
                     "--hidden", "16"])
    res = json.loads((out / "robustness.json").read_text())
    assert [r["mixture"] for r in res["results"]] == [2] and list(res["network_floors"]) == ["2"]
    assert "\n| 0 | " not in (out / "robustness.md").read_text()


def test_weight_tv_ignores_the_off_mode_mass():
    assert robustness.weight_tv({"mode_weights": [0.3, 0.3]}, [0.5, 0.5]) == 0  # 40% off-mode, split right
    assert abs(robustness.weight_tv({"mode_weights": [0.6, 0.0]}, [0.5, 0.5]) - 0.5) < 1e-12
    assert robustness.weight_tv({"mode_weights": [0.0, 0.0]}, [0.5, 0.5]) == 1
