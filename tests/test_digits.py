"""The digits preset: shipped assets, teacher initialisation, metrics, a smoke run, pretrain's training functions."""
import json

import pytest
import torch

from emd_fast import pretrain, train
from emd_fast.errors import CheckpointError
from emd_fast.problems import digits
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.training.build import Run
from emd_fast.training.config import PRESET_DEFAULTS, with_preset_defaults

from helpers import assert_resumes_exactly, fake_inception_file, train_cli

SMALL = ["--preset", "digits", "--steps", "2", "--batch", "8", "--K", "2", "--eval-every", "1", "--eval-samples", "40",
         "--quiet", "--device", "cpu", "--phase-every", "0"]


def digits_cfg(*argv):
    parser = train.build_parser()
    argv = ["--preset", "digits", *argv]
    return with_preset_defaults(vars(parser.parse_args(argv)), train._explicit(parser, argv))


def test_data():
    x, y = digits.load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == -1 and float(x.max()) == 1 and sorted(y.unique().tolist()) == list(range(10))


def test_shipped_assets():
    net = digits.load_teacher_unet()
    assert net.arch == {**pretrain.DIGITS_UNET, "channel_mult_emb": 4} and net.schedule.name == "edm"
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 1.0, 50.0]), torch.tensor([0, 5, 9])
    with torch.no_grad():
        d = net(x, t, y)
    assert d.shape == (3, 1, 8, 8) and bool(torch.isfinite(d).all())
    classifier = digits.load_classifier()
    assert classifier(x).shape == (3, 10) and classifier.features(x).shape == (3, 128)
    info = json.loads(digits.INFO_FILE.read_text())
    assert info["classifier"]["held_out_accuracy"] > 0.95
    assert sum(p.stat().st_size for p in digits.ASSETS.iterdir()) < 4e6


def test_missing_assets(tmp_path):
    with pytest.raises(CheckpointError, match="python -m emd_fast.pretrain"):
        digits.load_teacher_unet(path=tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="not a digits classifier"):
        digits.load_classifier(digits.TEACHER_FILE)


def test_generator_starts_as_teacher_denoiser_at_lambda_star():
    cfg = digits_cfg("--eval-samples", "20")
    built = Run(cfg, torch.device("cpu"), fit_teacher=True)
    g, z, y = torch.Generator().manual_seed(0), None, torch.arange(10)
    z = torch.randn(10, 1, 8, 8, generator=g)
    sigma_star = torch.tensor(-cfg["lambda_star"] / 2).exp()
    t = torch.full((10,), built.t_star)
    assert built.t_star == pytest.approx(float(sigma_star))  # EDM: alpha = 1, t = sigma
    with torch.no_grad():
        expected = built.teacher.denoise(sigma_star * z, t, y)
        assert torch.allclose(built.distiller.generator(z, y), expected, atol=1e-6)
        x_t = torch.randn(10, 1, 8, 8, generator=g)
        assert torch.equal(built.distiller.student(x_t, t, y), built.teacher.denoise(x_t, t, y))
    assert all(p.requires_grad for p in built.distiller.generator.parameters())
    assert not any(p.requires_grad for p in built.teacher.parameters())


def test_metrics_rank_real_digits_above_noise():
    problem = digits.DigitsProblem(digits.load_teacher_unet().schedule, {"seed": 0, "eval_samples": 30})
    x, y = digits.load_digits_data()
    real = problem.metrics(x[:300], y[:300])
    noise = problem.metrics(torch.rand(300, 1, 8, 8) * 2 - 1, y[:300])
    assert real["class_accuracy"] > 0.95 and real["classes_covered"] == 10 and real["precision"] > 0.9
    assert noise["fd_real"] > 10 * real["fd_real"] and noise["class_accuracy"] < 0.3
    assert set(problem.floor()) == set(real)


def test_smoke_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *SMALL]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples/final.png", "checkpoints/step_0000002.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    defaults = PRESET_DEFAULTS["digits"]
    assert cfg["schedule"] == "edm" and cfg["K"] == 2 and cfg["lambda_star"] == defaults["lambda_star"]
    assert cfg["teacher_info"]["sha256"] and cfg["preset"] == "digits"
    summary = json.loads((out / "summary.json").read_text())
    assert {"class_accuracy", "fd_real", "fd_teacher", "recall"} <= set(summary["final"])
    assert "FD to real" in capsys.readouterr().out
    # resuming without --preset takes the run's preset, and its defaults for the runtime options
    assert train.main(["--out", str(out), "--resume", "--steps", "3", "--quiet", "--eval-every", "0"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_resume_continues_exactly(tmp_path):
    assert_resumes_exactly(train_cli(*SMALL), tmp_path / "straight", tmp_path / "split", steps=3, stop=2)


def test_inception_fid_when_weights_are_supplied(tmp_path, capsys):
    out = tmp_path / "run"
    inception = fake_inception_file(tmp_path)
    assert train.main(["--out", str(out), *SMALL, "--inception", str(inception), "--inception-torchscript"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["fid_inception"] > 0 and "fid_inception" in summary["exact_sample_floor"]
    assert "FID (Inception)" in capsys.readouterr().out
    assert train.main(["--out", str(tmp_path / "r2"), *SMALL, "--inception", str(tmp_path / "none.pt")]) == 2
    assert "never downloads it" in capsys.readouterr().err


def test_pretrain_training_functions():
    x, y = digits.load_digits_data()
    x, y = x[:60], y[:60]
    net, losses = pretrain.train_teacher(x, y, steps=2, batch=8, lr=1e-3, ema=0.9, seed=0, quiet=True)
    assert net.arch["model_channels"] == pretrain.DIGITS_UNET["model_channels"]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    classifier, info = pretrain.train_classifier(x, y, steps=2, batch=8, lr=1e-3, seed=0, quiet=True)
    assert info["n_train"] + info["n_held_out"] == 60 and 0 <= info["held_out_accuracy"] <= 1
    shifted = pretrain.shift(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and float(shifted.min()) == -1


def test_edm_loss_is_zero_for_the_exact_denoiser_of_one_image():
    """A single image x0: E[x | x_t] = x0, so the EDM loss of a denoiser returning x0 vanishes."""
    class Constant(torch.nn.Module):
        schedule, sigma_data = EDMSchedule(), 0.5

        def forward(self, x_t, t, y):
            return x0.expand_as(x_t)

    x0 = torch.rand(1, 1, 8, 8)
    assert float(pretrain.edm_loss(Constant(), x0.repeat(4, 1, 1, 1), None, torch.Generator().manual_seed(0))) == 0


def test_pretrain_cli_writes_loadable_assets(tmp_path, monkeypatch):
    x, y = digits.load_digits_data()
    monkeypatch.setattr(digits, "load_digits_data", lambda: (x[::18], y[::18]))  # 100 digits
    assert pretrain.main(["--teacher-steps", "2", "--classifier-steps", "2", "--eval-samples", "20", "--out",
                          str(tmp_path), "--quiet", "--device", "cpu"]) == 0
    net = digits.load_teacher_unet(path=tmp_path / digits.TEACHER_FILE.name)
    assert net.arch["img_resolution"] == 8 and net.label_dim == 10
    digits.load_classifier(tmp_path / digits.CLASSIFIER_FILE.name)
    info = json.loads((tmp_path / digits.INFO_FILE.name).read_text())
    assert info["teacher"]["steps"] == 2 and "held_out_accuracy" in info["classifier"]
    assert (tmp_path / "digits_teacher_samples.png").read_bytes()[:4] == b"\x89PNG"


def test_teacher_in_another_schedule_is_the_same_denoiser():
    """VP cosine: x_t = alpha x + sigma eps is the EDM image x_t / alpha at noise level s = sigma / alpha."""
    edm, vp = digits.load_teacher_unet(), digits.load_teacher_unet(VPCosine())
    t = torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = vp.schedule.alpha_sigma(t)
    x_e, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    with torch.no_grad():
        d_vp = vp(alpha[:, None, None, None] * x_e, t, y)
        assert torch.allclose(d_vp, edm(x_e, sigma / alpha, y), atol=1e-5)
