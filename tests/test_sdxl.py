"""SDXL teachers (StableDiffusionXLPipeline folders: a UNet with text_time added conditions, two CLIP text encoders):
the prompt conditioning (force_zeros_for_empty_prompt's zeros or the empty prompt's encoding as the unconditional
input), the time ids, the classifier-free guided denoiser at a fractional timestep and the decoding are the
pipeline's own computations; a run trains, resumes bit for bit without its text encoders and samples; bf16 with
activation checkpointing makes no host sync."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from emd_fast.problems.diffusers_folder import DiffusersProblem  # noqa: E402
from emd_fast.teachers.diffusers_folder import encode_with_unconditional, inspect_folder  # noqa: E402

from tiny_pipelines import (  # noqa: E402
    PIXELS,
    PROMPTS,
    bf16_checkpointed_step_makes_no_host_sync,
    prompts_file,
    run_config,
    sdxl_pipeline,
    trains_resumes_and_samples,
)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sdxl_v(tmp_path_factory):
    """v-prediction, and the empty prompt's encoding as the unconditional input."""
    return sdxl_pipeline(tmp_path_factory.mktemp("sdxl-v") / "pipe", force_zeros=False,
                         prediction_type="v_prediction", seed=1)


@pytest.mark.parametrize("name", ["sdxl", "sdxl_v"])
def test_prompts_are_encoded_as_the_pipeline_does(name, request):
    """embeds: both CLIPs' penultimate states side by side; pooled: the second CLIP's projection; the unconditional
    input: zeros under force_zeros_for_empty_prompt, else the empty prompt's (encode_prompt's, negative_prompt
    None)."""
    folder = request.getfixturevalue(name)
    cond, uncond = encode_with_unconditional(inspect_folder(folder), PROMPTS)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    assert cond.embeds.shape == (2, 8, 12 + 20) and cond.pooled.shape == (2, 20)
    for ours, theirs in ((cond.embeds, embeds), (cond.pooled, pooled), (uncond.embeds, negative[:1]),
                         (uncond.pooled, negative_pooled[:1])):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    assert bool(uncond.embeds.any()) == (name == "sdxl_v")


@pytest.mark.parametrize("name", ["sdxl", "sdxl_v"])
def test_guided_denoiser_and_decoding_are_one_euler_step(name, request, tmp_path):
    """D_u + w (D_c - D_u) (w = 5) and the conditional D (w = 1) at a fractional timestep equal one step of the
    pipeline's EulerDiscreteScheduler to noise level 0 (sigmas=[sigma/alpha, 0]; "leading" spacing: the UNet sees our
    latents as given), with the default time ids (16, 16, 0, 0, 16, 16); relative to |D| (D ~ x_t / alpha)."""
    folder = request.getfixturevalue(name)
    cfg = run_config("--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--guidance-scale", "5",
                     "--out", str(tmp_path))
    problem = DiffusersProblem.from_config(cfg)
    teacher, pipe = problem.teacher, diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert teacher.net.time_ids.tolist() == [PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 1]), torch.full((2,), 613.37)
    alpha, sigma = (float(v[0]) for v in teacher.schedule.alpha_sigma(t.double()))
    errors = {}
    for w, ours in ((5.0, teacher.denoise(x, t, y)), (1.0, teacher.net(x, t, y).detach())):
        out = pipe(prompt=PROMPTS, sigmas=[sigma / alpha, 0.0], latents=x, guidance_scale=w, height=PIXELS,
                   width=PIXELS, output_type="latent").images
        assert float(pipe.scheduler.timesteps[0]) == pytest.approx(613.37, abs=2e-3)  # log-sigma interpolation
        errors[w] = float((out - ours).abs().max() / ours.abs().max())
    images = pipe(prompt=PROMPTS, sigmas=[sigma / alpha, 0.0], latents=x, guidance_scale=5.0, height=PIXELS,
                  width=PIXELS, output_type="pt").images
    errors["decode"] = float((images - (problem.decode(teacher.denoise(x, t, y)) / 2 + 0.5).clamp(0, 1)).abs().max())
    print(f"{name}: max |pipeline - ours| (D relative): {errors}")
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_sdxl_trains_resumes_exactly_without_its_text_encoders_and_samples(sdxl, tmp_path):
    summary = trains_resumes_and_samples(sdxl, tmp_path, "--guidance-scale", "4")
    print(f"SDXL tiny: {summary['iters_per_s']} it/s on the CPU (batch 2, K 1)")
    info = json.loads((tmp_path / "straight" / "config.json").read_text())["teacher_info"]
    assert info["arch"]["time_ids"] == [PIXELS, PIXELS, 0, 0, PIXELS, PIXELS] and info["guidance_scale"] == 4.0
    assert info["schedule"]["name"] == "diffusers_discrete"


def test_resolution_sets_the_latents_and_the_time_ids(sdxl, tmp_path):
    cfg = run_config("--teacher", str(sdxl), "--prompts", str(prompts_file(tmp_path)), "--resolution", "24", "32",
                     "--out", str(tmp_path))
    teacher = DiffusersProblem.from_config(cfg).teacher
    assert teacher.data_shape == (4, 12, 16) and teacher.net.time_ids.tolist() == [24, 32, 0, 0, 24, 32]
    x = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(teacher.denoise(x, torch.tensor([100.0, 900.0]), torch.tensor([0, 1]))).all()


def test_bf16_checkpointed_step_makes_no_host_sync(sdxl, tmp_path):
    bf16_checkpointed_step_makes_no_host_sync(sdxl, tmp_path)
