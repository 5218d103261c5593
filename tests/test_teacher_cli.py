"""`python -m emd_fast.train --teacher FILE`: real-teacher runs end to end on the CPU with small random teachers of
every EDM architecture (our .safetensors files and EDM-format pickles), presets, labels, FID, and bad input."""
import json

import numpy as np
import pytest
import torch
from test_edm_import import edm_globals, write_edm_pickle  # noqa: F401 (a fixture)
from test_unet import NETS, random_unet

from emd_fast import sample, train
from emd_fast.evaluation.image_metrics import InceptionFeatures
from emd_fast.teachers.network_file import save_network
from emd_fast.training.build import load_run
from emd_fast.training.config import PRESET_DEFAULTS

from helpers import assert_resumes_exactly, fake_inception_file, final_tensors, train_cli

SMALL = ["--steps", "4", "--batch", "4", "--K", "1", "--eval-every", "2", "--eval-samples", "8", "--ckpt-every", "2",
         "--quiet", "--device", "cpu", "--phase-every", "0"]


def teacher_file(tmp_path, kind="adm", name="teacher", **overrides):
    path = tmp_path / f"{name}.safetensors"
    save_network(NETS[kind](**overrides), path)
    return path


train_main = train_cli(*SMALL)


@pytest.mark.parametrize("kind", ["adm", "song-ddpmpp", "song-ncsnpp"])
def test_teacher_file_trains_resumes_exactly_and_samples(kind, tmp_path):
    path = teacher_file(tmp_path, kind)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_resumes_exactly(train_main, straight, split, "--teacher", str(path), straight_args=("--plot-every", "2"))
    assert any(k.startswith("ema.") for k in final_tensors(straight))
    cfg = json.loads((split / "config.json").read_text())
    assert cfg["teacher"] == str(path) and len(cfg["teacher_sha256"]) == 64
    assert cfg["teacher_info"]["arch"]["network"] == kind.split("-")[0].replace("song", "song")
    summary = json.loads((split / "summary.json").read_text())
    assert {"pixel_mean", "pixel_std", "saturated"} <= set(summary["final"]) and summary["problem"] == "ImageProblem"
    for name in ("samples/final.png", "samples/step_0000002.png"):
        assert (straight / name).read_bytes()[:4] == b"\x89PNG"
    folder, arrays = tmp_path / "pngs", tmp_path / "s.npz"
    assert sample.main([str(split), "--n", "7", "--out", f"{folder}/", str(arrays), "--uint8"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(7)]
    with np.load(arrays) as f:
        assert f["arr_0"].shape == (7, 8, 8, 1) and f["arr_0"].dtype == np.uint8 and f["labels"].shape == (7,)


def test_edm_pickle_is_a_teacher_and_resume_refuses_another_teacher(edm_globals, tmp_path, capsys):  # noqa: F811
    pkl = write_edm_pickle(random_unet(channels_per_head=64), tmp_path / "edm-tiny.pkl")
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(pkl), "--steps", "2") == 0
    assert not edm_globals.exists()  # the pickle's embedded source was never executed
    write_edm_pickle(random_unet(channels_per_head=64, seed=5), pkl)
    capsys.readouterr()
    assert train.main(["--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the teacher file" in err and "is not the one this run started from" in err and err.count("\n") == 1


def test_preset_sets_the_documented_hyperparameters(tmp_path):
    out = tmp_path / "r"
    assert train_main(out, "--preset", "edm-cifar10", "--teacher", str(teacher_file(tmp_path)), "--steps", "1",
                      "--eval-every", "0", "--ckpt-every", "0") == 0
    cfg = json.loads((out / "config.json").read_text())
    want = PRESET_DEFAULTS["edm-cifar10"]
    for key in ("lambda_star", "lr_g", "lr_s", "ema", "gamma_eps", "gamma_z"):
        assert cfg[key] == want[key], key
    assert cfg["betas_g"] == [0.0, 0.999] and cfg["K"] == 1 and cfg["batch"] == 4  # the command line wins


def test_labels_restrict_the_classes(tmp_path, capsys):
    path = teacher_file(tmp_path)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(path), "--labels", "3", "7", "--steps", "2") == 0
    loaded, _, _ = load_run(out, "cpu")
    _, y = loaded.distiller.sample(40, torch.Generator().manual_seed(0))
    assert set(y.tolist()) == {3, 7}
    assert train_main(tmp_path / "r2", "--teacher", str(path), "--labels", "12") == 2
    assert "--labels must lie in [0, 10)" in capsys.readouterr().err
    uncond = teacher_file(tmp_path, "song-ddpmpp", "uncond", label_dim=0)
    assert train_main(tmp_path / "r3", "--teacher", str(uncond), "--labels", "1") == 2
    assert "is unconditional" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_fid_during_training_and_from_the_command(tmp_path):
    inception = fake_inception_file(tmp_path)
    real = torch.rand(64, 1, 8, 8) * 2 - 1
    feats = InceptionFeatures(inception, torchscript=True)(real)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=feats.mean(0).numpy(), sigma=np.cov(feats.numpy(), rowvar=False))
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(teacher_file(tmp_path)), "--inception", str(inception), "--fid-ref",
                      str(ref), "--fid-samples", "16", "--fid-every", "2", "--inception-torchscript") == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "fid" in r] == [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["fid"] > 0 and summary["final"]["fid_samples"] == 16
    from emd_fast import fid

    assert fid.main(["calc", str(out), "--inception", str(inception), "--ref", str(ref), "--n", "16",
                     "--device", "cpu", "--inception-torchscript"]) == 0
    record = json.loads((out / "fid_step4.json").read_text())
    assert record["samples"] == 16 and record["fid"] == pytest.approx(summary["final"]["fid"], rel=1e-6)
    folder = tmp_path / "real"
    from emd_fast.evaluation.images import save_png_folder

    save_png_folder(folder, real)
    assert fid.main(["ref", str(folder), str(tmp_path / "mine.npz"), "--inception", str(inception),
                     "--device", "cpu", "--inception-torchscript"]) == 0
    with np.load(tmp_path / "mine.npz") as f:
        np.testing.assert_allclose(f["mu"], feats.mean(0).numpy(), atol=0.6)  # PNGs round to 8 bits: close


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"garbage bytes", "cannot read"),
    ("truncated", "cannot read"),
    ("checkpoint", "is not an emd_fast U-Net file"),
])
def test_bad_teacher_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "t.safetensors"
    if content == "truncated":
        good = teacher_file(tmp_path, name="good").read_bytes()
        path.write_bytes(good[:len(good) // 2])
    elif content == "checkpoint":
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path), metadata={"format": "something else"})
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(path)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()


def test_teacher_runs_compose_with_the_speed_options(tmp_path):
    """bf16 autocast, deferred finite checks (fused Adam) and channels_last on a teacher file: a run, and a resume
    that continues it exactly (the same options both times)."""
    path = teacher_file(tmp_path, "song-ddpmpp")
    fast = ["--teacher", str(path), "--precision", "bf16", "--finite-check", "deferred", "--channels-last"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(straight, *fast) == 0
    assert train_main(split, *fast, "--steps", "2") == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet", "--finite-check", "deferred",
                       "--channels-last"]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["execution"]["precision"] == "bf16" and summary["execution"]["finite_check"] == "deferred"
