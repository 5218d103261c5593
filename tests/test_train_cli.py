"""`python -m emd_fast.train`: smoke run, run directory, exact resume, clear errors."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from emd_fast import train
from emd_fast.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "3",
         "--eval-samples", "200", "--ckpt-every", "4", "--K", "2", "--quiet", "--device", "cpu"]


def run(out, *extra):
    return train.main(["--out", str(out), *SMALL, *extra])


def final_tensors(out):
    return load_file(str(list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")))


def losses(out):
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss_g"], r["loss_s"]) for r in records if r["step"] > 0]


def test_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "6", "--plot-every", "3") == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples/final.png", "samples/step_0000003.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000004.json", "step_0000006.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["iters_per_s"] > 0
    assert summary["phase_timed_iters"] == 0  # --phase-every 50 > 6 steps
    assert {"modes_covered", "mode_tv", "energy_distance", "mean_loglik", "off_mode"} <= set(summary["final"])
    assert len(losses(out)) == 6
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "mode_tv" in first  # the generator at initialisation
    assert "modes covered" in capsys.readouterr().out
    assert (out / "samples/final.png").read_bytes()[:4] == b"\x89PNG"


def test_phase_timing(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--steps", "4", "--phase-every", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phase_ms_per_iter"]
    assert summary["phase_timed_iters"] == 2
    for name in ("teacher forward", "student forward", "generator forward", "generator VJP", "langevin eps update",
                 "langevin z update", "M-step forward", "generator backward", "generator optimizer",
                 "student DSM forward", "student backward", "student optimizer"):
        assert phases[name] > 0, name


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, "--steps", "8") == 0
    assert run(split, "--steps", "5") == 0
    assert run(split, "--resume", "--steps", "8") == 0  # hyperparameters come from the saved config
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(split)


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(straight, "--steps", "7") == 0
    real_step = train.Distiller.step

    def flaky(self):
        if self.step_count == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(train.Distiller, "step", flaky)
    assert run(broken, "--steps", "7") == 130
    monkeypatch.setattr(train.Distiller, "step", real_step)
    assert list_checkpoints(broken / "checkpoints")[-1].name == "step_0000005.json"
    assert run(broken, "--resume", "--steps", "7") == 0
    a, b = final_tensors(straight), final_tensors(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "4") == 0
    assert run(out, "--steps", "8") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run(out, "--resume", "--steps", "8", "--K", "3") == 2
    assert "from another config (K: run has 2, asked 3)" in capsys.readouterr().err
    weights = list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert run(out, "--resume", "--steps", "8") == 2
    assert "is corrupt" in capsys.readouterr().err
    assert run(tmp_path / "empty", "--resume") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--K", "-1"], "K must be an integer >= 0"),
    (["--gamma-eps", "-0.5"], "gamma_eps must be > 0"),
    (["--lambda-star", "40"], "lambda*=40.0 is outside"),
    (["--lr-g", "0"], "--lr-g must be a positive number"),
    (["--betas-g", "0.9", "1.5"], "betas_g must lie in [0, 1)"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_hyperparameters_exit_cleanly(tmp_path, capsys, args, msg):
    assert run(tmp_path / "r", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    tensors = {"w": torch.randn(3, 3)}
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, tensors, {"config": {}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004.json", "step_0000005.json"]
    assert not list(tmp_path.glob("*.tmp"))
    loaded, state = load_checkpoint(tmp_path / "step_0000005.json")
    assert state["step"] == 5 and torch.equal(loaded["w"], tensors["w"])


def test_help_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "emd_fast.train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--K", "--gamma-eps", "--gamma-z", "--lambda-star", "--lr-g", "--lr-s", "--batch", "--betas-g",
                "--gen-weighting", "--variant", "--cancel-noise", "--seed", "--device", "--steps", "--out",
                "--resume"):
        assert opt in res.stdout
