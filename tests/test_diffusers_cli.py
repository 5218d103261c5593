"""diffusers teachers through ``python -m emd_fast.train`` and ``emd_fast.sample``, end to end on the CPU: pixel
and latent text-to-image runs, exact resumes, labels, odd image shapes, bf16 and gradient checkpointing, the sync-free
step."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emd_fast import sample, train

from diffusers_models import diffusers, pixel_folder, prompts_file, tiny_unet, train_main
from helpers import NoHostRead, assert_resumes_exactly, final_tensors, one_line_error


@pytest.mark.parametrize("prediction_type,beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2"),
                                                           ("sample", "scaled_linear")])
def test_pixel_folder_trains_resumes_exactly_and_samples(prediction_type, beta_schedule, tmp_path):
    folder = pixel_folder(tmp_path / "ddpm", prediction_type, beta_schedule)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_resumes_exactly(train_main, straight, split, "--teacher", str(folder), straight_args=("--plot-every", "2"))
    a = final_tensors(straight)
    assert any(k.startswith("ema.") for k in a)
    assert not torch.equal(a["generator.denoiser.unet.conv_in.weight"],
                           tiny_unet().state_dict()["conv_in.weight"])  # trained
    cfg = json.loads((split / "config.json").read_text())
    assert len(cfg["teacher_sha256"]) == 64 and cfg["teacher_info"]["arch"]["prediction_type"] == prediction_type
    assert cfg["teacher_info"]["schedule"] == {"name": "diffusers_discrete", "t_min": 0.0, "t_max": 999.0,
                                               "num_train_timesteps": 1000}
    summary = json.loads((split / "summary.json").read_text())
    assert summary["problem"] == "DiffusersProblem" and {"pixel_mean", "pixel_std"} <= set(summary["final"])
    for name in ("samples/final.png", "samples/step_0000002.png"):
        assert (straight / name).read_bytes()[:4] == b"\x89PNG"
    arrays = tmp_path / "s.npz"
    assert sample.main([str(split), "--n", "5", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (5, 3, 8, 8) and np.isfinite(f["images"]).all()


def test_generator_starts_as_the_teachers_denoiser_at_lambda_star(tmp_path):
    """Generator and student start from the teacher's UNet: at step 0 g(z) = D_T(sigma* z, t*)."""
    from emd_fast.training.build import Run

    folder = pixel_folder(tmp_path / "ddpm", "v_prediction")
    cfg = vars(train.build_parser().parse_args(["--teacher", str(folder), "--batch", "2", "--device", "cpu"]))
    cfg["out"] = str(tmp_path)
    run = Run(cfg, torch.device("cpu"), fit_teacher=False)
    z = torch.randn(2, 3, 8, 8)
    t_star = torch.full((2,), run.t_star)
    sigma_star = run.teacher.schedule.sigma(t_star)[0]
    want = run.teacher.denoise(sigma_star * z, t_star)
    assert torch.allclose(run.distiller.generator(z), want, atol=1e-5)
    assert torch.allclose(run.distiller.student(z, t_star), run.teacher.denoise(z, t_star), atol=1e-5)
    # the nearest training timestep: the UNet is trained at integer ones (and exports call it there)
    assert run.t_star == round(float(run.teacher.schedule.t_from_lambda(torch.tensor(-4.0, dtype=torch.float64))))


def test_class_conditional_pixel_unet_takes_labels(tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m", num_class_embeds=3)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--labels", "0", "2", "--steps", "2") == 0
    arrays = tmp_path / "s.npz"
    assert sample.main([str(out), "--labels", "2", "1", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (2, 3, 8, 8) and f["labels"].tolist() == [2, 1]
    err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder), "--labels", "3"))
    assert "--labels must lie in [0, 3)" in err


def test_grayscale_non_square_pixel_unet_trains_and_samples(tmp_path):
    """MNIST-style: 1 channel, 28 x 20 (not a power of two, not square), 6 and 10 channels (groups of 2)."""
    folder = pixel_folder(tmp_path / "m", in_channels=1, out_channels=1, sample_size=(28, 20),
                          block_out_channels=(6, 10), norm_num_groups=2, attention_head_dim=5)
    out, arrays = tmp_path / "r", tmp_path / "s.npz"
    assert train_main(out, "--teacher", str(folder), "--steps", "2") == 0
    assert sample.main([str(out), "--n", "3", "--out", str(arrays), str(tmp_path / "g.png")]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (3, 1, 28, 20) and np.isfinite(f["images"]).all()


def test_zero_terminal_snr_teacher_trains_on_the_timesteps_before_the_last(tmp_path):
    """rescale_betas_zero_snr: alphas_cumprod[-1] = 0 (infinite noise) is not a noise level the EMD iteration can
    use (sigma/alpha = inf); the run's t range ends one timestep before, and every loss stays finite."""
    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder)
    diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                            timestep_spacing="trailing").save_pretrained(folder)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--steps", "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher_info"]["schedule"]["t_max"] == 998.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss_g" in row]
    assert len(steps) == 2 and all(np.isfinite([row["loss_g"], row["loss_s"], row["grad_g"]]).all() for row in steps)


def test_latent_text_pipeline_trains_in_latent_space_resumes_from_cached_embeddings_and_samples(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    prompts = prompts_file(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--teacher", str(folder), "--prompts", str(prompts), "--guidance-scale", "2.5"]

    def without_the_text_encoder():
        meta_tensors = load_file(str(split / "prompt_embeddings.safetensors"))
        assert meta_tensors["cond"].shape == (2, 8, 16) and meta_tensors["uncond"].shape == (1, 8, 16)
        (folder / "text_encoder").rename(tmp_path / "away")  # the training loop never needs the text encoder again

    assert_resumes_exactly(train_main, straight, split, *args, straight_args=("--plot-every", "2"),
                           before_resume=without_the_text_encoder)
    assert sample.main([str(split), "--prompt", "a cat"]) == 2  # a new prompt does
    (tmp_path / "away").rename(folder / "text_encoder")
    a = final_tensors(straight)
    assert not any("embeddings" in k or "vae" in k for k in a)  # neither the prompts nor the VAE are checkpointed
    cfg = json.loads((split / "config.json").read_text())
    assert cfg["teacher_info"]["guidance_scale"] == 2.5 and len(cfg["prompts_sha256"]) == 64
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["problem"] == "DiffusersProblem" and np.isfinite(summary["final"]["pixel_std"])
    assert (straight / "samples" / "step_0000002.png").read_bytes()[:4] == b"\x89PNG"
    # the cached prompts (one row each), decoded by the VAE to 3x16x16 images
    arrays = tmp_path / "s.npz"
    assert sample.main([str(straight), "--per-class", "3", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (6, 3, 16, 16) and f["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    grid = tmp_path / "cat.png"
    assert sample.main([str(straight), "--prompt", "a cat", "--n", "4", "--out", str(grid), str(arrays)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    with np.load(arrays) as f:
        assert f["images"].shape == (4, 3, 16, 16) and f["labels"].tolist() == [-1] * 4


def test_bf16_teacher_and_gradient_checkpointing(sd_folder, tmp_path):
    """--precision bf16 keeps the frozen teacher in bf16 (generator and student fp32); --grad-checkpoint changes
    nothing that is computed."""
    from emd_fast.training.build import Run

    prompts = prompts_file(tmp_path)
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    args = ["--teacher", str(sd_folder), "--prompts", str(prompts), "--steps", "2", "--eval-every", "0"]
    assert train_main(plain, *args) == 0
    assert train_main(ckpt, *args, "--grad-checkpoint") == 0
    a, b = final_tensors(plain), final_tensors(ckpt)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    cfg = vars(train.build_parser().parse_args([*args, "--precision", "bf16", "--grad-checkpoint"]))
    cfg["out"] = str(plain)
    run = Run(cfg, torch.device("cpu"), fit_teacher=False)
    dtypes = {name: {p.dtype for p in net.parameters()} for name, net in
              (("teacher", run.teacher.net), ("generator", run.distiller.generator),
               ("student", run.distiller.student))}
    assert dtypes == {"teacher": {torch.bfloat16}, "generator": {torch.float32}, "student": {torch.float32}}
    assert not any(p.requires_grad for p in run.teacher.net.parameters())
    assert run.distiller.generator.denoiser.unet.is_gradient_checkpointing
    assert run.distiller.student.unet.is_gradient_checkpointing
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.full((2,), 400.0), torch.tensor([0, 1])
    assert run.teacher.denoise(x, t, y).dtype == torch.float32
    assert torch.isfinite(run.distiller.step()["loss_g"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deferred_step_of_a_text_to_image_teacher_makes_no_host_sync(sd_folder, tmp_path, precision):
    """The latent, prompt-conditioned, guided path of a --fast run (deferred checks, channels_last) reads no tensor
    value on the host in an iteration: it can be captured in a CUDA graph."""
    from emd_fast.training.build import Run

    args = ["--teacher", str(sd_folder), "--prompts", str(prompts_file(tmp_path)), "--finite-check", "deferred",
            "--channels-last", "--precision", precision, "--batch", "3", "--out", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()  # the run directory the command would make: the prompt embeddings are cached there
    run = Run(vars(train.build_parser().parse_args(args)), torch.device("cpu"), fit_teacher=False)
    assert run.distiller.deferred
    run.distiller.step()  # lazy state (optimizer moments) first
    with NoHostRead():
        run.distiller.step()
