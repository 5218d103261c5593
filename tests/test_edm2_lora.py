"""EDM2 teachers with ``--lora`` (peft's adapters on the magnitude-preserving MPConv layers, nets/edm2_lora.py) and
the export of EDM2 runs: the adapted layer against its reference (the applied weight of W + s B A), step 0 equal to
the full-copy path bit for bit, the merge the export uses, the base stored once and never written, a LoRA run of an
EDM2 pickle that checkpoints adapters only and resumes bit for bit, and exports of pixel and latent runs (full and
LoRA) that compute the run's generator and write decoded images for FID tools."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from test_distributed import resumes_exactly_on_two_processes  # noqa: E402
from test_edm2 import (  # noqa: E402
    SMALL,
    final_tensors,
    fixture_network,
    fixture_pickle,
    guide_pickle,
    read_fixture,
    tiny_vae,
    vae_folder,
)
from test_edm_import import assert_matches, edm_globals  # noqa: E402,F401 (a fixture)
from test_lora import perturb, run_of, storages  # noqa: E402

from emd_fast import export, sample, train  # noqa: E402
from emd_fast.nets.edm2 import MPConv, mp_weight  # noqa: E402
from emd_fast.nets.generator import Generator  # noqa: E402
from emd_fast.nets.lora import (  # noqa: E402
    LoraSettings,
    adapt,
    check_adapters_run,
    lora_layers,
    lora_networks,
    merged_copy,
    target_layers,
)
from emd_fast.problems import init_networks  # noqa: E402
from emd_fast.teachers.network_file import load_network, load_teacher_network  # noqa: E402
from emd_fast.training.config import resolve  # noqa: E402

from helpers import assert_resumes_exactly, one_line_error  # noqa: E402

RUN = [*SMALL, "--eval-samples", "2"]  # the Heun reference of 2 samples: the slow part of these runs


def conditional_pickle(path):
    """An EDM2 pickle of a small random class-conditional pixel network: 3x8x8, 10 classes."""
    return guide_pickle(path, label_dim=10, img_resolution=8)


class Holder(nn.Module):
    """One MPConv, called as EDM2 calls its layers (x, gain)."""

    def __init__(self, kernel):
        super().__init__()
        self.layer = MPConv(5, 7, kernel)  # odd sizes; rank 3 < 5

    def forward(self, x, gain):
        return self.layer(x, gain=gain)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_adapted_mp_layer_applies_the_normalised_update_of_its_stored_weight(kernel):
    """B = 0: the plain layer bit for bit; B != 0: gain n(W + s B A) / sqrt(fan_in) applied to x (the reference: B A
    as a matrix product of the flattened factors), fp32; merged: a plain MPConv computing the same; a layer whose
    adapter never runs is refused."""
    torch.manual_seed(0)
    net = Holder(kernel)
    plain = MPConv(5, 7, kernel)
    plain.load_state_dict(net.layer.state_dict())
    adapt(net, LoraSettings(3, alpha=1.5))
    x, gain = torch.randn(4, 5, *((9, 11) if kernel else ())), torch.tensor(1.7)
    with torch.no_grad():
        assert torch.equal(net(x, gain), plain(x, gain=gain))
        perturb(net, 1)
        a, b = net.layer.lora_A["default"].weight, net.layer.lora_B["default"].weight
        assert a.shape[:2] == (3, 5) and b.shape[:2] == (7, 3) and b.shape[2:] == (1, 1)[:len(kernel)]
        w = mp_weight(plain.weight + (b.flatten(1) @ a.flatten(1)).reshape(plain.weight.shape) * 0.5, gain)
        want = F.conv2d(x, w, padding=kernel[0] // 2) if kernel else x @ w.t()
        got = net(x, gain)
        assert_matches(got, want, rtol=1e-6)
        assert not torch.allclose(got, plain(x, gain=gain), rtol=1e-2)
        merged = merged_copy(net)
        assert type(merged.layer) is MPConv and merged.state_dict().keys() == {"layer.weight"}
        assert_matches(merged(x, gain), got, rtol=1e-6)
        assert torch.equal(net.layer.get_base_layer().weight, plain.weight)  # the base is not written
    with pytest.raises(ValueError, match="never run"):
        check_adapters_run(net, lambda: net.layer.get_base_layer()(x, gain=gain))


@pytest.mark.parametrize("case", ["pix_cond", "latent_uncond_clip"])
def test_edm2_lora_networks_start_as_the_full_copies_and_merge_exactly(case):
    """Every MPConv adapted (the label embedding too: its adapter runs through effective_weight), generator and
    student equal to the full-copy path bit for bit at step 0; with trained adapters the merged copy export writes
    computes the adapted network (fp32 rounding) under the base's own keys, the base untouched."""
    net = fixture_network(case)
    t = read_fixture(case)[4]
    x, sigma, y = t["x"], t["sigma"], t.get("labels")
    full_g, full_s = init_networks(net, 2.0)
    g, s, info = lora_networks(net, 2.0, LoraSettings(4), (1, 2))
    assert info["lora_layers"] == len(lora_layers(s)) == sum(isinstance(m, MPConv) for m in net.modules())
    assert ("emb_label" in target_layers(net, LoraSettings(4))) == (y is not None)
    z = torch.randn_like(x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(g(z, y), full_g(z, y)) and torch.equal(s(x, sigma, y), full_s(x, sigma, y))
        check_adapters_run(s, lambda: s(x, sigma, y))
        perturb(s, 3)
        adapted = s(x, sigma, y)
        assert not torch.allclose(adapted, full_s(x, sigma, y), rtol=1e-3)
        merged = merged_copy(s)
        assert merged.state_dict().keys() == net.state_dict().keys() and not lora_layers(merged)
        assert_matches(merged(x, sigma, y), adapted, rtol=1e-6)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_edm2_base_is_stored_once_and_never_changes(edm_globals, tmp_path):  # noqa: F811
    teacher = conditional_pickle(tmp_path / "edm2.pkl")
    argv = ["--teacher", str(teacher), "--out", str(tmp_path / "r"), *RUN, "--lora", "2"]
    d = run_of(argv).distiller
    base = {k: v.clone() for k, v in d.teacher.net.state_dict().items()}
    adapters = [p for p in d.generator.parameters() if p.requires_grad]
    assert len(storages(d.teacher, d.generator, d.student, d.ema)) == len(storages(d.teacher)) + 3 * len(adapters)
    for _ in range(3):
        d.step()
        d.update_ema()
    assert all(torch.equal(v, d.teacher.net.state_dict()[k]) for k, v in base.items())
    moved = [p for n, p in d.generator.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert len(moved) == len(adapters) // 2  # every B moved: every adapter takes part


def sample_npz(run, tmp_path, *args):
    """``python -m emd_fast.sample run --n 3 --seed 5 ...``'s .npz: (images or latents, labels)."""
    out = tmp_path / f"sampled-{run.name}.npz"
    assert sample.main([str(run), "--n", "3", "--seed", "5", "--out", str(out), "--device", "cpu", *args]) == 0
    with np.load(out) as f:
        return torch.from_numpy(f["images"]), f["labels"]


def exported(run, out, *args):
    """The exported generator (file), its generator level and model card."""
    assert export.main([str(run), "--out", str(out), "--seed", "5", "--device", "cpu", *args]) == 0
    net = load_network(out / "generator.safetensors")
    assert not any("lora_" in k for k in net.state_dict())
    return net, (out / "README.md").read_text()


def exported_samples(net, labels, t_star):
    """The exported generator on the noise ``emd_fast.sample --seed 5`` draws for 3 samples (labels as it gave)."""
    z = torch.randn((3, net.img_channels, net.img_resolution, net.img_resolution),
                    generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return Generator(net, t_star)(z, None if labels[0] < 0 else torch.from_numpy(labels))


def test_pixel_lora_run_checkpoints_adapters_resumes_and_exports(edm_globals, tmp_path):  # noqa: F811
    """--lora 2 on an EDM2 pickle: adapters only in the checkpoints, a resume that continues bit for bit; the export:
    a merged generator file that computes what emd_fast.sample draws, and samples for FID tools."""
    pkl = conditional_pickle(tmp_path / "edm2-img64-tiny.pkl")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_resumes_exactly(lambda out, *a: train.main(["--out", str(out), *a]), straight, split,
                           *RUN, "--teacher", str(pkl), "--lora", "2")
    nets = [k for k in final_tensors(straight) if k.startswith(("generator.", "student.", "ema."))]
    assert nets and all(".lora_A." in k or ".lora_B." in k for k in nets)
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["lora_layers"] == sum(isinstance(m, MPConv) for m in load_teacher_network(pkl).modules()) == 47
    net, card = exported(straight, tmp_path / "export", "--samples", "3", "--batch", "2")
    images, labels = sample_npz(straight, tmp_path)
    assert_matches(exported_samples(net, labels, cfg["t_star"]), images)
    assert "images in about [-1, 1]" in card and "lora: 2" in card
    with np.load(tmp_path / "export" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8


def test_latent_run_with_vae_exports_a_generator_and_decoded_samples(edm_globals, tmp_path):  # noqa: F811
    """A latent (ImageNet-512-style) run with --vae, full copies: the exported generator's latents decoded by the
    VAE as the model card says are emd_fast.sample's images; --samples writes decoded 8x images."""
    pkl, vae = fixture_pickle("latent_uncond_clip", tmp_path / "latent.pkl"), vae_folder(tmp_path / "vae")
    run = tmp_path / "run"
    assert train.main(["--out", str(run), *RUN, "--steps", "2", "--teacher", str(pkl), "--vae", str(vae)]) == 0
    net, card = exported(run, tmp_path / "export", "--samples", "2")
    images, labels = sample_npz(run, tmp_path)
    latents = exported_samples(net, labels, json.loads((run / "config.json").read_text())["t_star"])
    assert latents.shape == (3, 4, 8, 8)
    assert_matches(net.latents.decode(tiny_vae(), latents), images)
    assert "g.denoiser.latents.decode(vae, x)" in card and "stabilityai/sd-vae-ft-mse" in card
    with np.load(tmp_path / "export" / "samples.npz") as f:
        assert f["arr_0"].shape == (2, 64, 64, 3)


def test_latent_lora_run_without_vae_exports_its_generator_and_refuses_samples(edm_globals, tmp_path, capsys):  # noqa: F811,E501
    pkl, run = fixture_pickle("latent_uncond_clip", tmp_path / "latent.pkl"), tmp_path / "run"
    assert train.main(["--out", str(run), *RUN, "--steps", "2", "--teacher", str(pkl), "--lora", "2"]) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert export.main([str(run), "--out", str(out), "--samples", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.splitlines()  # the run's note that its latents are not decoded, then the error
    assert len(err) == 2 and err[1].startswith("error: --samples: this run's samples are 4x8x8 latents and it was "
                                               "trained without --vae")
    assert not out.exists() and not list(tmp_path.glob(".export.partial-*"))
    net, _ = exported(run, out)
    latents, labels = sample_npz(run, tmp_path)
    assert_matches(exported_samples(net, labels, json.loads((run / "config.json").read_text())["t_star"]), latents)


def test_lora_dropout_is_refused_for_edm2(edm_globals, tmp_path, capsys):  # noqa: F811
    pkl = fixture_pickle("pix_uncond_opts", tmp_path / "t.pkl")
    err = one_line_error(capsys, train.main(["--out", str(tmp_path / "r"), *RUN, "--teacher", str(pkl),
                                             "--lora", "2", "--lora-dropout", "0.1"]))
    assert "--lora-dropout: EDM2's adapters change the weight of a layer" in err
    argv = ["--out", str(tmp_path / "r"), "--teacher", str(pkl), "--lora", "2", "--lora-dropout", "0.1"]
    parser = train.build_parser()
    with pytest.raises(ValueError, match="--lora-dropout: EDM2"):  # with the options, before any network is built
        resolve(vars(parser.parse_args(argv)), train._explicit(parser, argv))


# the resume is given the flags again: --compile is not saved with the run, and compiled code need not compute eager's
# bits (tests/test_compile_resume.py)
@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--compile"], ["--precision", "bf16", "--compile"]])
def test_lora_run_in_bf16_or_compiled_keeps_fp32_adapters_and_resumes_bit_for_bit(flags, edm_globals, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    """--lora 2 on an EDM2 pickle in bf16, or its networks compiled (aot_eager: the compiled path, quickly): fp32
    adapters on the teacher's base, finite losses, a resume given the same flags that continues bit for bit."""
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    pkl = conditional_pickle(tmp_path / "edm2-img64-tiny.pkl")
    straight, split = tmp_path / "straight", tmp_path / "split"
    argv = [*RUN, "--teacher", str(pkl), "--lora", "2", *flags]
    assert_resumes_exactly(lambda out, *a: train.main(["--out", str(out), *a]), straight, split, *argv,
                           resume_args=("--quiet", "--device", "cpu", *flags))
    adapters = {k: v for k, v in final_tensors(straight).items() if ".lora_" in k}
    assert adapters and all(v.dtype == torch.float32 and v.isfinite().all() for v in adapters.values())
    losses = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_g"]) and np.isfinite(r["loss_s"]) for r in losses if "loss_g" in r)


@pytest.mark.parametrize("how", [[], ["--shard"]])
def test_lora_on_two_processes_checkpoints_adapters_and_resumes_bit_for_bit(how, edm_globals, tmp_path):  # noqa: F811
    """--lora 2 on an EDM2 pickle under torchrun, 2 processes, DDP and --shard (FSDP2 shards the adapters of EDM2's
    MPConv layers): finite fp32 adapters of generator, student and EMA only in the checkpoints, and a resume on 2
    processes that continues bit for bit."""
    pkl = conditional_pickle(tmp_path / "edm2-img64-tiny.pkl")
    argv = [*RUN, "--teacher", str(pkl), "--lora", "2", "--ema", "0.01", *how]
    _, a = resumes_exactly_on_two_processes(tmp_path, argv, stop=2, end=4)
    nets = {k: v for k, v in a.items() if k.startswith(("generator.", "student.", "ema."))}
    assert nets and all(".lora_A." in k or ".lora_B." in k for k in nets)
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in nets.values())
    assert {k.split(".", 1)[1] for k in nets if k.startswith("generator.")} == \
        {k.split(".", 1)[1] for k in nets if k.startswith("ema.")}
