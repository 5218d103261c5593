"""FLUX.1 teachers (FluxPipeline folders, FluxTransformer2DModel): packing and position ids, the prompt conditioning,
the denoiser (dev: the guidance embedding, one call, no classifier-free guidance; schnell: none) and the decoding
are the pipeline's own computations; generator and student take the teacher's guidance; a run trains, resumes bit for
bit without its text encoders and samples; bf16 with activation checkpointing makes no host sync."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from emd_fast import train  # noqa: E402
from emd_fast.problems.diffusers_folder import DiffusersProblem  # noqa: E402
from emd_fast.teachers.diffusers_folder import encode_with_unconditional, inspect_folder  # noqa: E402
from emd_fast.teachers.diffusers_folder.denoisers import image_ids, pack, unpack  # noqa: E402

from tiny_pipelines import (  # noqa: E402
    PIXELS,
    PROMPTS,
    SMALL,
    T5_LENGTH,
    bf16_checkpointed_step_makes_no_host_sync,
    compiles_regionally_as_eager,
    flux_pipeline,
    one_line_error,
    prompts_file,
    run_config,
    trains_resumes_and_samples,
)

MAX_LENGTH = ["--max-sequence-length", str(T5_LENGTH)]


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return flux_pipeline(tmp_path_factory.mktemp("dev") / "pipe")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return flux_pipeline(tmp_path_factory.mktemp("schnell") / "pipe", dev=False, seed=1)


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_packing_and_image_ids_are_the_pipelines(h, w):
    x = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(0))
    tokens = pack(x)
    assert tokens.shape == (3, h * w // 4, 16) and torch.equal(unpack(tokens, h, w), x)
    assert torch.equal(tokens, diffusers.FluxPipeline._pack_latents(x, 3, 4, h, w))
    assert torch.equal(unpack(tokens, h, w), diffusers.FluxPipeline._unpack_latents(tokens, 2 * h, 2 * w, 2))
    assert torch.equal(image_ids(h, w, "cpu", torch.float32),
                       diffusers.FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32))


def test_prompts_are_encoded_as_the_pipeline_does(dev):
    """(T5's last hidden state, the CLIP's pooled output): encode_prompt's; no unconditional input (FLUX is not
    guided classifier-free by default)."""
    cond, uncond = encode_with_unconditional(inspect_folder(dev), PROMPTS, T5_LENGTH)
    pipe = diffusers.FluxPipeline.from_pretrained(dev, local_files_only=True)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LENGTH)
    assert uncond is None and cond.embeds.shape == (2, T5_LENGTH, 40) and cond.pooled.shape == (2, 12)
    assert torch.allclose(cond.embeds, embeds, rtol=0, atol=1e-5) and torch.allclose(cond.pooled, pooled, rtol=0,
                                                                                     atol=1e-5)
    assert not text_ids.any()


@pytest.mark.parametrize("name,guidance", [("dev", 2.0), ("dev", None), ("schnell", None)])
def test_denoiser_and_decoding_are_one_pipeline_step(name, guidance, request, tmp_path):
    """D at noise level s equals one pipeline step from our (packed) latents to 0 (sigmas=[t]: the pipeline's
    resolution-dependent shift of t is our schedule's), with dev's guidance scale embedded (default 3.5, the
    pipeline's); generator and student take the same guidance; decoded images are the pipeline's "pt" output."""
    folder = request.getfixturevalue(name)
    args = ["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS),
            *MAX_LENGTH, "--out", str(tmp_path)] + ([] if guidance is None else ["--guidance-scale", str(guidance)])
    problem = DiffusersProblem.from_config(run_config(*args))
    teacher, pipe = problem.teacher, diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)
    scale = {"dev": guidance or 3.5, "schnell": None}[name]
    assert teacher.guidance_scale == scale and teacher.net.guidance == scale
    assert teacher.to_config()["arch"]["guidance"] == scale
    g = torch.Generator().manual_seed(1)
    x, y, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0, 1]), torch.full((2,), 0.6)
    call = dict(prompt=PROMPTS, num_inference_steps=1, sigmas=[0.6], latents=pack(x), guidance_scale=scale or 0.0,
                height=PIXELS, width=PIXELS, max_sequence_length=T5_LENGTH)
    out = unpack(pipe(**call, output_type="latent").images, 8, 8)
    assert float(pipe.scheduler.sigmas[0]) == pytest.approx(float(teacher.schedule.sigma(t)[0]), rel=1e-6)
    ours = teacher.denoise(x, t, y)
    images = pipe(**call, output_type="pt").images
    errors = {"D": float((out - ours).abs().max()),
              "decode": float((images - (problem.decode(ours) / 2 + 0.5).clamp(0, 1)).abs().max())}
    print(f"FLUX {name}, guidance {scale}: max |pipeline - ours|: {errors}")
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_dev_trains_resumes_exactly_without_its_text_encoders_and_samples(dev, tmp_path):
    summary = trains_resumes_and_samples(dev, tmp_path, *MAX_LENGTH, "--guidance-scale", "2.5")
    print(f"FLUX.1-dev tiny: {summary['iters_per_s']} it/s on the CPU (batch 2, K 1)")
    info = json.loads((tmp_path / "straight" / "config.json").read_text())["teacher_info"]
    assert info["guidance_scale"] == 2.5 and info["arch"]["guidance"] == 2.5
    assert info["schedule"]["shift"] == pytest.approx(1.5830842, rel=1e-6)  # e^mu at 16 image tokens


def test_schnell_takes_no_guidance(schnell, tmp_path, capsys):
    args = ["--teacher", str(schnell), "--prompts", str(prompts_file(tmp_path)), "--resolution", str(PIXELS),
            *MAX_LENGTH]
    err = one_line_error(capsys, train.main(["--out", str(tmp_path / "r"), *SMALL, *args, "--guidance-scale", "3"]))
    assert "take no guidance; leave it out" in err and not (tmp_path / "r").exists()


def test_bf16_checkpointed_step_makes_no_host_sync(dev, tmp_path):
    run = bf16_checkpointed_step_makes_no_host_sync(dev, tmp_path, *MAX_LENGTH)
    assert run.distiller.generator.denoiser.guidance == run.distiller.student.guidance == run.teacher.net.guidance


def test_compiles_block_by_block_as_eager(dev, tmp_path, monkeypatch, capsys):
    compiles_regionally_as_eager(dev, tmp_path, monkeypatch, capsys, 2, *MAX_LENGTH, "--guidance-scale", "2.5")
