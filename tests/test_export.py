"""``python -m emd_fast.export``: a finished run's generator loaded by the tools its teacher came from reproduces
``python -m emd_fast.sample`` for the same noise (fp32, 1e-5): a diffusers teacher's run as a stock pipeline folder
(merged, or a LoRA file for ``load_lora_weights``), an EDM-style U-Net teacher's as generator.safetensors with samples
for FID tools; bad runs and output folders are one-line errors (exit 2) that write nothing."""
import importlib
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from test_lora import IMAGES, MIXTURE, teacher_file  # noqa: E402

from emd_fast import export, optional, sample, train  # noqa: E402
from emd_fast.exporting.diffusers_pipeline import LORA_FILE  # noqa: E402
from emd_fast.nets.generator import Generator  # noqa: E402
from emd_fast.teachers.network_file import load_network  # noqa: E402
from emd_fast.training.checkpoint import list_checkpoints  # noqa: E402

from diffusers_models import latent_pipeline, pixel_folder, prompts_file  # noqa: E402
from helpers import one_line_error  # noqa: E402

TOL = 1e-5
EDM_ROOT = os.environ.get("EDM_ROOT")
PROMPTS = ["a cat", "a red dog"]  # prompts_file's non-blank lines: labels 0 and 1


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def sampled(run, tmp_path, labels, seed=5):
    """``python -m emd_fast.sample run --labels ... --seed seed --out .npz``: (images, labels) as it writes them."""
    out = tmp_path / f"sampled-{run.name}.npz"
    assert sample.main([str(run), "--labels", *map(str, labels), "--seed", str(seed), "--out", str(out),
                        "--device", "cpu"]) == 0
    data = np.load(out)
    return torch.from_numpy(data["images"]), data["labels"]


def trained(out, *args):
    assert train.main(["--out", str(out), *IMAGES, "--steps", "2", *args]) == 0
    return out


@pytest.fixture(scope="module")
def sd_lora_run(tmp_path_factory):
    """A LoRA run (rank 2, two steps) over a tiny Stable-Diffusion-style pipeline with two prompts."""
    tmp = tmp_path_factory.mktemp("sd-export")
    folder = latent_pipeline(tmp / "pipe")
    return trained(tmp / "run", "--teacher", str(folder), "--prompts", str(prompts_file(tmp)), "--lora", "2")


@pytest.mark.parametrize("lora_file", [False, True])
def test_text_to_image_lora_run_is_a_stock_pipeline_that_samples_as_emd_fast_sample(sd_lora_run, lora_file, tmp_path):
    out = tmp_path / "export"
    assert export.main([str(sd_lora_run), "--out", str(out), *(["--lora-file"] if lora_file else []),
                        "--device", "cpu"]) == 0
    assert not list(tmp_path.glob(".export.partial-*"))
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    if lora_file:
        factors = load_file(str(out / LORA_FILE))
        assert factors and all(".lora_A." in k or ".lora_B." in k for k in factors)
        base = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True).unet.state_dict()
        pipe.load_lora_weights(out)
        moved = [k for k, v in pipe.unet.state_dict().items() if k in base and not torch.equal(v, base[k])]
        assert not moved  # the LoRA layers run beside the teacher's own weights
    pipe.set_progress_bar_config(disable=True)
    images, labels = sampled(sd_lora_run, tmp_path, [1, 0])
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe([PROMPTS[i] for i in labels], num_inference_steps=1, guidance_scale=1.0, latents=z,
                   output_type="pt").images
    error = relative_error(got, ((images / 2 + 0.5).clamp(0, 1)))
    assert error <= TOL, error
    card = (out / "README.md").read_text()
    assert "pipe.load_lora_weights(folder)" in card if lora_file else "load_lora_weights" not in card
    assert "num_inference_steps=1" in card and "lora: 2" in card


def test_lora_file_needs_the_diffusers_that_saves_adapter_metadata(sd_lora_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(optional, "installed_version", lambda package: "0.33.1" if package == "diffusers" else "9")
    out = tmp_path / "export"
    assert export.main([str(sd_lora_run), "--out", str(out), "--lora-file", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora-file exports need diffusers >= 0.34, 0.33.1 is installed" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".export.partial-*"))


def test_pixel_class_conditional_run_is_a_consistency_model_pipeline(tmp_path):
    run = trained(tmp_path / "run", "--teacher", str(pixel_folder(tmp_path / "pipe", num_class_embeds=10)))
    out = tmp_path / "export"
    assert export.main([str(run), "--out", str(out), "--device", "cpu"]) == 0
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == "ConsistencyModelPipeline"
    pipe.set_progress_bar_config(disable=True)
    images, labels = sampled(run, tmp_path, [3, 7, 7])
    z = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pipe(batch_size=3, class_labels=torch.from_numpy(labels), num_inference_steps=1, latents=z,
                   output_type="pt").images
    error = relative_error(got, (images / 2 + 0.5).clamp(0, 1))
    assert error <= TOL, error


def test_unet_teacher_lora_run_is_a_merged_generator_file_with_samples_for_fid_tools(tmp_path):
    run = trained(tmp_path / "run", "--teacher", str(teacher_file(tmp_path)), "--lora", "2")
    out = tmp_path / "export"
    assert export.main([str(run), "--out", str(out), "--samples", "5", "--batch", "2", "--seed", "5",
                        "--device", "cpu"]) == 0
    net = load_network(out / "generator.safetensors")
    assert not any("lora_" in k for k in net.state_dict())  # merged into the base's own keys
    with safe_open(str(out / "generator.safetensors"), "pt") as f:
        level = json.loads(f.metadata()["generator"])  # t*, sigma*, lambda*
    images, labels = sampled(run, tmp_path, [1, 4, 9])
    z = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = Generator(net, level["t_star"])(z, torch.from_numpy(labels))
    error = relative_error(got, images)
    assert error <= TOL, error
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (5, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].shape == (5,) and ((0 <= npz["labels"]) & (npz["labels"] < 10)).all()
    with zipfile.ZipFile(out / "samples.zip") as archive:
        names = set(archive.namelist())
        assert {f"00000/img{i:08d}.png" for i in range(5)} | {"dataset.json"} == names
        assert [c for _, c in json.loads(archive.read("dataset.json"))["labels"]] == npz["labels"].tolist()
    assert "generator.safetensors" in (out / "README.md").read_text()


@pytest.mark.skipif(not EDM_ROOT, reason="set EDM_ROOT to a clone of NVlabs/edm to read the samples with its code")
def test_exported_samples_read_by_edms_own_dataset_class(tmp_path, monkeypatch):
    """EDM's ImageFolderDataset (what its ``fid.py calc --images=...`` reads) finds the exported samples.zip's images
    and labels: the same pixels and classes as samples.npz."""
    run = trained(tmp_path / "run", "--teacher", str(teacher_file(tmp_path)))
    out = tmp_path / "export"
    assert export.main([str(run), "--out", str(out), "--samples", "6", "--batch", "4", "--device", "cpu"]) == 0
    monkeypatch.setattr(sys, "path", [EDM_ROOT, *sys.path])
    dataset = importlib.import_module("training.dataset").ImageFolderDataset(str(out / "samples.zip"),
                                                                             use_labels=True)
    npz = np.load(out / "samples.npz")
    assert len(dataset) == 6 and dataset.has_labels
    images, onehots = zip(*(dataset[i] for i in range(len(dataset))))
    assert np.array_equal(np.stack(images).transpose(0, 2, 3, 1), npz["arr_0"])
    assert np.argmax(np.stack(onehots), axis=1).tolist() == npz["labels"].tolist()


def test_bad_exports_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    run = trained(tmp_path / "run", "--teacher", str(teacher_file(tmp_path)), "--ckpt-every", "1")
    out = tmp_path / "export"

    def error(*args):
        message = one_line_error(capsys, export.main([*map(str, args), "--device", "cpu"]))
        assert not out.exists() and not list(tmp_path.glob(".export.partial-*"))
        return message

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    assert "is not an emd_fast run directory" in error(foreign, "--out", out)
    assert "--lora-file applies to diffusers teachers" in error(run, "--out", out, "--lora-file")
    assert "--samples must be >= 0" in error(run, "--out", out, "--samples", "-1")
    assert "exists and is not an empty folder" in one_line_error(capsys, export.main([str(run), "--out", str(foreign)]))
    assert (foreign / "notes.txt").read_text() == "hello"
    mixture = tmp_path / "mixture"
    assert train.main(["--out", str(mixture), *MIXTURE, "--steps", "2"]) == 0
    assert "no other tool reads" in error(mixture, "--out", out)
    last = list_checkpoints(run / "checkpoints")[-1]
    for f in (last, last.with_suffix(".safetensors")):
        f.unlink()  # the run stopped before its last step's checkpoint
    assert "the run has not finished" in error(run, "--out", out)
    assert export.main([str(list_checkpoints(run / "checkpoints")[-1]), "--out", str(out), "--device", "cpu"]) == 0
