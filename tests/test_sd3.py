"""SD3 / SD3.5 teachers (StableDiffusion3Pipeline folders, SD3Transformer2DModel): the prompt conditioning, the
guided denoiser and the decoding are the pipeline's own computations; a run trains, resumes bit for bit without its
text encoders and samples; bf16 with activation checkpointing makes no host sync."""
import json

import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from emd_fast.problems.diffusers_folder import DiffusersProblem  # noqa: E402
from emd_fast.teachers.diffusers_folder import encode_with_unconditional, inspect_folder  # noqa: E402

from tiny_pipelines import (  # noqa: E402
    PIXELS,
    PROMPTS,
    T5_LENGTH,
    bf16_checkpointed_step_makes_no_host_sync,
    compiles_regionally_as_eager,
    copy_folder,
    edit_json,
    prompts_file,
    run_config,
    sd3_pipeline,
    trains_resumes_and_samples,
)

MAX_LENGTH = ["--max-sequence-length", str(T5_LENGTH)]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory):
    return sd3_pipeline(tmp_path_factory.mktemp("sd35") / "pipe", sd35=True, seed=1)


def without_t5(folder, tmp_path):
    """The folder without its T5 text encoder: SD3 pipelines then condition on zeros in its place."""
    folder = copy_folder(folder, tmp_path / "no-t5")
    edit_json(folder / "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    return folder


@pytest.mark.parametrize("t5", [True, False])
def test_prompts_are_encoded_as_the_pipeline_does(sd3, tmp_path, t5):
    """(embeds, pooled) of the prompts and the empty prompt (the unconditional input) == encode_prompt's: both
    CLIPs' penultimate states padded to T5's width and followed by T5's (or zeros), the projections side by side."""
    folder = sd3 if t5 else without_t5(sd3, tmp_path)
    cond, uncond = encode_with_unconditional(inspect_folder(folder), PROMPTS, T5_LENGTH)
    no_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **no_t5)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=T5_LENGTH)
    assert cond.embeds.shape == (2, 8 + T5_LENGTH, 40) and cond.pooled.shape == (2, 12 + 20)
    for ours, theirs in ((cond.embeds, embeds), (cond.pooled, pooled), (uncond.embeds, negative[:1]),
                         (uncond.pooled, negative_pooled[:1])):
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)
    assert bool(cond.embeds[:, 8:].any()) == t5  # T5's part: zeros without it


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_guided_denoiser_and_decoding_are_one_pipeline_step(name, request, tmp_path):
    """D_u + w (D_c - D_u) at noise level s (w = 4.5), and the conditional D (w = 1), equal one step of the pipeline
    from our latents to noise level 0 (sigmas=[t]: the scheduler shifts t as our schedule does), and the decoded
    images its "pt" output."""
    folder = request.getfixturevalue(name)
    cfg = run_config("--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--guidance-scale", "4.5",
                     "--resolution", str(PIXELS), *MAX_LENGTH, "--out", str(tmp_path))
    problem = DiffusersProblem.from_config(cfg)
    teacher, pipe = problem.teacher, diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    assert teacher.schedule.config() == {"name": "flow", "t_min": 0.001, "t_max": 0.999, "shift": 3.0}
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 1]), torch.full((2,), 0.6)
    errors = {}
    for w, ours in ((4.5, teacher.denoise(x, t, y)), (1.0, teacher.net(x, t, y).detach())):
        out = pipe(prompt=PROMPTS, num_inference_steps=1, sigmas=[0.6], latents=x, guidance_scale=w, height=PIXELS,
                   width=PIXELS, max_sequence_length=T5_LENGTH, output_type="latent").images
        assert float(pipe.scheduler.sigmas[0]) == pytest.approx(float(teacher.schedule.sigma(t)[0]), rel=1e-6)
        errors[w] = float((out - ours).abs().max())
    images = pipe(prompt=PROMPTS, num_inference_steps=1, sigmas=[0.6], latents=x, guidance_scale=4.5, height=PIXELS,
                  width=PIXELS, max_sequence_length=T5_LENGTH, output_type="pt").images
    errors["decode"] = float((images - (problem.decode(teacher.denoise(x, t, y)) / 2 + 0.5).clamp(0, 1)).abs().max())
    print(f"{name}: max |pipeline - ours|: {errors}")
    assert all(e <= 1e-5 for e in errors.values()), errors
    assert (teacher.denoise(x, t, y) - teacher.net(x, t, y)).abs().max() > 1e-3  # the guidance matters


def test_dynamic_shift_of_a_config_without_its_keys_is_the_pipelines(sd3, tmp_path):
    """A hand-written scheduler config with dynamic shifting and none of its other keys: the pipeline reads the
    loaded scheduler's defaults (max_shift 1.15; StableDiffusion3Pipeline's own fallback, 1.16, is never reached),
    and so does our noise level: the pipeline's shifted sigma of t = 0.6 is our s(0.6)."""
    folder = copy_folder(sd3, tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    config = {key: value for key, value in json.loads(path.read_text()).items()
              if key not in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")}
    path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    cfg = run_config("--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS),
                     *MAX_LENGTH, "--out", str(tmp_path))
    schedule = DiffusersProblem.from_config(cfg).teacher.schedule
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)
    pipe(prompt=PROMPTS[:1], num_inference_steps=1, sigmas=[0.6], height=PIXELS, width=PIXELS,
         max_sequence_length=T5_LENGTH, output_type="latent")
    assert float(pipe.scheduler.sigmas[0]) == pytest.approx(float(schedule.sigma(torch.tensor([0.6]))[0]), rel=1e-6)


def test_sd35_trains_resumes_exactly_without_its_text_encoders_and_samples(sd35, tmp_path):
    summary = trains_resumes_and_samples(sd35, tmp_path, *MAX_LENGTH, "--guidance-scale", "2.0")
    print(f"SD3.5 tiny: {summary['iters_per_s']} it/s on the CPU (batch 2, K 1)")
    cached = load_file(str(tmp_path / "straight" / "prompt_embeddings.safetensors"))
    assert {k: tuple(v.shape) for k, v in cached.items()} == {
        "cond": (2, 16, 40), "pooled": (2, 32), "uncond": (1, 16, 40), "uncond_pooled": (1, 32)}
    cfg = json.loads((tmp_path / "straight" / "config.json").read_text())
    info = cfg["teacher_info"]
    assert info["arch"] == {"class": "SD3Transformer2DModel", "prediction_type": "velocity"}
    assert info["guidance_scale"] == 2.0 and info["schedule"]["shift"] == 3.0
    assert cfg["max_sequence_length"] == T5_LENGTH and cfg["resolution"] == [PIXELS]


def test_another_max_sequence_length_is_another_cached_conditioning(sd3, tmp_path):
    """max_sequence_length is part of the condition (no T5 attention mask): the cache of a run made with another
    length is encoded anew, not reused."""
    cfg = run_config("--teacher", str(sd3), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS),
                     *MAX_LENGTH, "--out", str(tmp_path))
    short = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    longer = DiffusersProblem.from_config({**cfg, "max_sequence_length": 12}).teacher.net.prompts.embeddings
    assert short.shape == (2, 16, 40) and longer.shape == (2, 20, 40)
    assert load_file(str(tmp_path / "prompt_embeddings.safetensors"))["cond"].shape == (2, 20, 40)


def test_bf16_checkpointed_step_makes_no_host_sync(sd3, tmp_path):
    bf16_checkpointed_step_makes_no_host_sync(sd3, tmp_path, *MAX_LENGTH)


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_compiles_block_by_block_as_eager(name, request, tmp_path, monkeypatch, capsys):
    compiles_regionally_as_eager(request.getfixturevalue(name), tmp_path, monkeypatch, capsys, 2, *MAX_LENGTH)
