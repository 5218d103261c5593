"""`python -m emd_fast.sample`: one-step samples from a run's checkpoint to PNG/npz, labels, clear errors."""
import re

import numpy as np
import pytest
import torch

from emd_fast import sample, train
from emd_fast.training.build import load_run
from emd_fast.training.checkpoint import list_checkpoints

COMMON = ["--steps", "2", "--batch", "8", "--K", "1", "--eval-every", "0", "--eval-samples", "20", "--quiet",
          "--device", "cpu", "--phase-every", "0", "--ckpt-every", "1", "--keep", "0"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert train.main(["--preset", "digits", "--out", str(out), *COMMON]) == 0
    return out


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ring"
    assert train.main(["--out", str(out), "--teacher-fit-steps", "5", "--hidden", "16", "--depth", "1", *COMMON]) == 0
    return out


def npz(path):
    with np.load(path) as f:
        return torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])


def test_labels_to_png_and_npz(digits_run, tmp_path):
    png, arrays = tmp_path / "a.png", tmp_path / "a.npz"
    assert sample.main([str(digits_run), "--labels", "3", "3", "7", "--out", str(png), str(arrays)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    x, y = npz(arrays)
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and y.tolist() == [3, 3, 7]


def test_samples_are_the_checkpointed_generator(digits_run, tmp_path):
    """The newest checkpoint of the run directory by default; the same z for the same seed; another step differs."""
    first, last = list_checkpoints(digits_run / "checkpoints")
    paths = {name: tmp_path / f"{name}.npz" for name in ("dir", "last", "first", "seed1")}
    assert sample.main([str(digits_run), "--per-class", "2", "--out", str(paths["dir"])]) == 0
    assert sample.main([str(last), "--per-class", "2", "--out", str(paths["last"])]) == 0
    assert sample.main([str(first), "--per-class", "2", "--out", str(paths["first"])]) == 0
    assert sample.main([str(digits_run), "--per-class", "2", "--seed", "1", "--out", str(paths["seed1"])]) == 0
    x, y = npz(paths["dir"])
    assert x.shape == (20, 1, 8, 8) and y.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(x, npz(paths["last"])[0])
    assert not torch.equal(x, npz(paths["first"])[0]) and not torch.equal(x, npz(paths["seed1"])[0])
    loaded, step, _ = load_run(digits_run, "cpu")
    z = torch.randn((20, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the run keeps an EMA: that is what samples come from
        assert loaded.distiller.ema is not None and loaded.distiller.sampler is loaded.distiller.ema
        assert step == 2 and torch.allclose(loaded.distiller.sampler(z, y), x, atol=1e-6)


def test_default_output_and_random_labels(digits_run, capsys):
    assert sample.main([str(digits_run)]) == 0
    assert (digits_run / "samples" / "onestep_step2_seed0.png").is_file()
    assert sample.main([str(digits_run), "--n", "7", "--out", str(digits_run / "r.npz")]) == 0
    x, y = npz(digits_run / "r.npz")
    assert x.shape == (7, 1, 8, 8) and y.min() >= 0 and y.max() < 10
    assert "wrote" in capsys.readouterr().out


def test_unconditional_run(ring_run, tmp_path):
    assert sample.main([str(ring_run), "--n", "50", "--out", str(tmp_path / "r.npz")]) == 0
    x, y = npz(tmp_path / "r.npz")
    assert x.shape == (50, 2) and bool((y == -1).all())


@pytest.mark.parametrize("args,message", [
    (["--labels", "3", "10"], r"labels must lie in \[0, 10\)"),
    (["--labels", "-1"], r"labels must lie in \[0, 10\)"),
    (["--per-class", "0"], "--per-class must be >= 1"),
    (["--out", "x.jpg"], r"give a .png \(grid\), a .npz, or a folder"),
])
def test_errors(digits_run, capsys, args, message):
    assert sample.main([str(digits_run), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_missing_checkpoint_and_unconditional_errors(ring_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "nowhere")], "does not exist"),
                          ([str(tmp_path / "empty")], "no checkpoint in"),
                          ([str(ring_run), "--labels", "1"], "need a class-conditional run"),
                          ([str(ring_run), "--out", str(tmp_path / "r.png")],
                           "PNG output needs 1- or 3-channel images")]:
        assert sample.main(argv) == 2
        assert message in capsys.readouterr().err
