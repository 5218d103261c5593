"""LoRA runs and exports of the SDXL, SD3 / SD3.5 (with and without T5) and FLUX.1-dev families (tiny random pipelines).

Per family a ``--lora 2`` run trains with the architecture's default targets and resumes bit for bit; its export,
merged or as a LoRA file for ``load_lora_weights``, is the family's stock pipeline, and calling it with prompt strings
as the model card says (one step, no classifier-free guidance; SDXL: the run's height and width, which set its time
ids; SD3 / FLUX: ``sigmas=[s*]``, ``latents = s* z`` with s* = sigmoid(-lambda*/2), the transformer at timestep
1000 s*) reproduces ``python -m emd_fast.sample`` (fp32, 1e-5). At step 0 the LoRA networks of the three families
compute exactly what the full copies compute."""
import json
import math
import re

import pytest
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from test_export import relative_error, sampled  # noqa: E402

from emd_fast import export  # noqa: E402
from emd_fast.nets.lora import LoraSettings, lora_layers, lora_networks, target_layers  # noqa: E402
from emd_fast.problems import init_networks  # noqa: E402
from emd_fast.problems.diffusers_folder import DiffusersProblem  # noqa: E402
from emd_fast.teachers.diffusers_folder.denoisers import pack  # noqa: E402

from helpers import assert_resumes_exactly, final_tensors  # noqa: E402
from tiny_pipelines import (  # noqa: E402
    PIXELS,
    PROMPTS,
    T5_LENGTH,
    edit_json,
    flux_pipeline,
    prompts_file,
    run_config,
    sd3_pipeline,
    sdxl_pipeline,
    train_main,
)

TOL = 1e-5
MAX_LENGTH = ["--max-sequence-length", str(T5_LENGTH)]
FLUX_GUIDANCE = 2.5  # not FluxPipeline's default 3.5: the export's call must pass the run's
# family -> (pipeline folder maker, the export's pipeline class, the run's options)
FAMILIES = {
    "sdxl": (sdxl_pipeline, "StableDiffusionXLPipeline", []),
    "sd35": (lambda path: sd3_pipeline(path, sd35=True), "StableDiffusion3Pipeline", MAX_LENGTH),
    "sd3": (lambda path: sd3_pipeline(path, t5=False), "StableDiffusion3Pipeline", MAX_LENGTH),  # no T5: zeros
    "flux": (flux_pipeline, "FluxPipeline", [*MAX_LENGTH, "--guidance-scale", str(FLUX_GUIDANCE)]),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def lora_run(request, tmp_path_factory):
    """(family, the run directory): a --lora 2 run of 2 steps, and the same run stopped after 1 and resumed, which
    ends bit for bit equal. SDXL's UNet says sample_size 16 (32 px by default) while the run makes 16 px images: the
    pipeline's default time ids are not the run's."""
    family = request.param
    make, _, options = FAMILIES[family]
    tmp = tmp_path_factory.mktemp(f"{family}-lora")
    folder = make(tmp / "pipe")
    if family == "sdxl":
        edit_json(folder / "unet" / "config.json", sample_size=16)
    args = ["--teacher", str(folder), "--prompts", str(prompts_file(tmp)), "--resolution", str(PIXELS), "--lora", "2",
            *options]
    assert_resumes_exactly(train_main, tmp / "straight", tmp / "split", *args, steps=2, stop=1)
    return family, tmp / "straight"


def test_lora_run_adapts_the_default_targets_and_checkpoints_adapters_only(lora_run):
    family, run = lora_run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lora"] == 2 and cfg["lora_layers"] == {"sdxl": 85, "sd35": 25, "sd3": 21, "flux": 17}[family]
    nets = [k for k in final_tensors(run) if k.startswith(("generator.", "student.", "ema."))]
    assert len(nets) == 3 * 2 * cfg["lora_layers"] and all(".lora_A." in k or ".lora_B." in k for k in nets)


@pytest.mark.parametrize("lora_file", [False, True])
def test_export_is_the_stock_pipeline_whose_one_step_call_is_the_generator(lora_run, lora_file, tmp_path):
    family, run = lora_run
    out = tmp_path / "export"
    assert export.main([str(run), "--out", str(out), *(["--lora-file"] if lora_file else []), "--device", "cpu"]) == 0
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # as the card says
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True, **no_t5)
    assert type(pipe).__name__ == FAMILIES[family][1]
    card = (out / "README.md").read_text()
    assert ("text_encoder_3=None, tokenizer_3=None" in card) == bool(no_t5)
    network = pipe.unet if family == "sdxl" else pipe.transformer
    if lora_file:
        base = {k: v.clone() for k, v in network.state_dict().items()}
        pipe.load_lora_weights(out)
        assert not [k for k, v in network.state_dict().items() if k in base and not torch.equal(v, base[k])]
        assert any(".lora_B." in k and v.abs().max() > 0 for k, v in network.state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    seen = []
    network.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("timestep")), with_kwargs=True)
    images, labels = sampled(run, tmp_path, [1, 0])
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    call = dict(num_inference_steps=1, guidance_scale=1.0, height=PIXELS, width=PIXELS)
    s = 1 / (1 + math.exp(json.loads((run / "config.json").read_text())["lambda_star"] / 2))  # sigmoid(-lambda*/2)
    if family == "sdxl":
        latents = z
    else:
        call |= dict(sigmas=[s], max_sequence_length=T5_LENGTH)
        latents = pack(s * z) if family == "flux" else s * z
    if family == "flux":
        call["guidance_scale"] = FLUX_GUIDANCE
        assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    prompts = [PROMPTS[i] for i in labels]
    with torch.no_grad():
        got = pipe(prompts, **call, latents=latents, output_type="pt").images
    error = relative_error(got, (images / 2 + 0.5).clamp(0, 1))
    print(f"{family} export ({'LoRA file' if lora_file else 'merged'}): relative error {error:.1e}")
    assert error <= TOL, error
    if family != "sdxl":  # the transformer's timestep: SD3 takes 1000 s*, FLUX s* (it multiplies by 1000 itself)
        assert float(seen[-1].flatten()[0]) == pytest.approx(s * (1 if family == "flux" else 1000), rel=1e-6)
    assert "num_inference_steps=1" in card and "lora: 2" in card and f"height={PIXELS}" in card
    assert ("pipe.load_lora_weights(folder)" in card) == lora_file
    if family == "sdxl":  # without height and width the pipeline's time ids are (32, 32, 0, 0, 32, 32): not the run's
        with torch.no_grad():
            default = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images
        assert relative_error(default, got) > 1e-3
    else:
        assert float(re.search(r"sigmas=\[([0-9.]+)\]", card)[1]) == pytest.approx(s, rel=1e-6)
        assert "latents must be s* z" in card


@pytest.fixture(scope="module")
def denoisers(tmp_path_factory):
    """family -> the teacher's denoiser of a tiny pipeline of that family."""
    tmp = tmp_path_factory.mktemp("lora-targets")
    nets = {}
    for family, (make, _, options) in FAMILIES.items():
        out = tmp / family
        out.mkdir()
        cfg = run_config("--teacher", str(make(tmp / f"{family}-pipe")), "--prompts", str(prompts_file(out)),
                         "--resolution", str(PIXELS), *options, "--out", str(out))
        nets[family] = DiffusersProblem.from_config(cfg).teacher.net
    return nets


def test_default_lora_targets_of_the_transformer_families(denoisers):
    """Every block's attention projections (image and text tokens) and feed-forwards; not the embedders, the adaLN
    modulations or the final projection. SDXL's UNet: every Linear / Conv2d, its added-condition embedding too."""
    counts = {family: len(target_layers(net, LoraSettings(2))) for family, net in denoisers.items()}
    assert counts == {"sdxl": 85, "sd35": 25, "sd3": 21, "flux": 17}
    flux = set(target_layers(denoisers["flux"], LoraSettings(2)))
    assert {"transformer.transformer_blocks.0.attn.to_add_out", "transformer.transformer_blocks.0.ff_context.net.2",
            "transformer.single_transformer_blocks.0.proj_out", "transformer.single_transformer_blocks.0.proj_mlp",
            "transformer.single_transformer_blocks.0.attn.to_q"} <= flux
    sd35 = set(target_layers(denoisers["sd35"], LoraSettings(2)))
    assert "transformer.transformer_blocks.0.attn2.to_out.0" in sd35
    for names in (flux, sd35):
        assert not [n for n in names if any(part in n for part in ("embed", "norm", "transformer.proj_out"))]
    assert "unet.add_embedding.linear_1" in target_layers(denoisers["sdxl"], LoraSettings(2))


@pytest.mark.parametrize("family", ["sdxl", "sd35", "flux"])
def test_at_step_zero_the_lora_networks_of_the_family_are_the_full_copies(denoisers, family):
    net = denoisers[family]
    g = torch.Generator().manual_seed(1)
    x, z, y = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 0])
    t_star, t = (700.0, torch.tensor([300.0, 850.0])) if family == "sdxl" else (0.7, torch.tensor([0.3, 0.85]))
    full_g, full_s = init_networks(net, t_star)
    lora_g, lora_s, info = lora_networks(net, t_star, LoraSettings(2), (1, 2))
    with torch.no_grad():
        assert torch.equal(lora_g(z, y), full_g(z, y)) and torch.equal(lora_s(x, t, y), full_s(x, t, y))
    assert info["lora_layers"] == len(lora_layers(lora_g)) > 0
