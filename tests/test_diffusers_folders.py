"""diffusers folders (``--teacher DIR``): the layouts and weight files that are read, and every folder or option
that is refused, as a one-line error before any weights are read (or when they are unreadable)."""

import pytest
import torch

from emd_fast.teachers.diffusers_folder import inspect_folder

from diffusers_models import (
    diffusers,
    edit_json,
    pixel_folder,
    prompts_file,
    scheduler,
    tiny_unet,
    train_main,
    truncate,
)
from helpers import final_tensors, one_line_error


def test_pipeline_with_the_unet_and_scheduler_at_the_top(tmp_path):
    """The layout of google/ddpm-cifar10-32: model_index.json beside the UNet's config, weights and scheduler config."""
    import shutil

    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(folder)
    for part in ("unet", "scheduler"):
        for f in (folder / part).iterdir():
            f.rename(folder / f.name)
        shutil.rmtree(folder / part)
    assert inspect_folder(folder).unet == folder
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2", "--eval-every", "0") == 0


def test_pipeline_folder_with_a_pixel_unet(tmp_path, capsys):
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(folder)
    assert inspect_folder(folder).unet == folder / "unet"
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2") == 0
    err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder / "unet")))
    assert f"unet/ folder of a pipeline? give the pipeline folder, --teacher {folder}" in err
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder / name)))
        assert f"a file of the diffusers folder {folder}: give the folder" in err, name


@pytest.mark.parametrize("save", [dict(variant="fp16"), dict(safe_serialization=False), dict(max_shard_size="50KB")])
def test_weights_as_a_variant_bin_or_shards_load_and_define_the_teacher(save, tmp_path):
    """fp16-variant-only, .bin-only and sharded weights: the run trains; the teacher's SHA-256 covers the files that
    are loaded (a changed shard or variant file is another teacher)."""
    from emd_fast.teachers.diffusers_folder import folder_sha256, weight_files

    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder, **save)
    scheduler().save_pretrained(folder)
    variant, files = weight_files(folder)
    assert variant == save.get("variant") and all(f.is_file() for f in files) and len(files) >= 1
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2", "--eval-every", "0") == 0
    before = folder_sha256(folder)
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert folder_sha256(folder) != before


def test_pipeline_of_fp16_variant_weights_only(sd_folder, tmp_path):
    """A pipeline saved with variant="fp16" (UNet, VAE and text encoder: *.fp16.safetensors only) trains, with the
    same embeddings as the plain pipeline."""
    folder = tmp_path / "fp16"
    diffusers.StableDiffusionPipeline.from_pretrained(sd_folder).save_pretrained(folder, variant="fp16")
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors"))
    args = ["--prompts", str(prompts_file(tmp_path)), "--steps", "2", "--eval-every", "2"]
    assert train_main(tmp_path / "a", "--teacher", str(folder), *args) == 0
    assert train_main(tmp_path / "b", "--teacher", str(sd_folder), *args) == 0
    a, b = final_tensors(tmp_path / "a"), final_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def replace_scheduler(folder, cls, **options):
    (folder / "scheduler_config.json").unlink()
    getattr(diffusers, cls)(**options).save_pretrained(folder)


def two_variants(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    (folder / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")


@pytest.mark.parametrize("breakage,message", [
    (lambda f: edit_json(f / "config.json", _class_name="UNet1DModel"), "model class 'UNet1DModel' is not supported"),
    (lambda f: edit_json(f / "scheduler_config.json", prediction_type="flow"), "prediction type 'flow' is not"),
    (lambda f: edit_json(f / "scheduler_config.json", beta_schedule="exp"), "beta schedule 'exp' is not"),
    (lambda f: (f / "diffusion_pytorch_model.safetensors").unlink(), "incomplete diffusers folder, no weights"),
    (lambda f: (f / "scheduler_config.json").unlink(), "no scheduler_config.json"),
    (lambda f: (f / "config.json").unlink(), "without model_index.json or config.json"),
    (lambda f: edit_json(f / "config.json", time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    (lambda f: (f / "config.json").write_text('{"_class_name": "UNet2DModel", '), "unreadable UNet config"),
    (lambda f: (f / "scheduler_config.json").write_text("{"), "unreadable scheduler config"),
    (lambda f: truncate(f / "diffusion_pytorch_model.safetensors"), "cannot load UNet2DModel: Unable to load weights"),
    (lambda f: truncate(f / "diffusion_pytorch_model.safetensors", 0), "cannot load UNet2DModel"),
    (lambda f: edit_json(f / "config.json", block_out_channels=[8, 32]), "cannot load UNet2DModel: Error(s) in "
                                                                          "loading state_dict for UNet2DModel: size"),
    (two_variants, "weights in several variants (ema, fp16) and none plain"),
    (lambda f: edit_json(f / "config.json", sample_size=None), "sample_size None in config.json"),
    (lambda f: edit_json(f / "config.json", out_channels=5), "out_channels 5 differs from in_channels 3"),
    (lambda f: edit_json(f / "config.json", in_channels=4, out_channels=4), "UNet2DModel with in_channels 4: a pixel"),
    (lambda f: edit_json(f / "config.json", class_embed_type="timestep"), "class_embed_type 'timestep' needs class"),
    (lambda f: replace_scheduler(f, "EDMEulerScheduler"), "scheduler 'EDMEulerScheduler' is not supported"),
    (lambda f: replace_scheduler(f, "FlowMatchEulerDiscreteScheduler"), "'FlowMatchEulerDiscreteScheduler' is not"),
    (lambda f: replace_scheduler(f, "EulerDiscreteScheduler", timestep_type="continuous"),
     "EulerDiscreteScheduler with timestep_type 'continuous' is not supported"),
    (lambda f: replace_scheduler(f, "DPMSolverMultistepScheduler", use_flow_sigmas=True), "use_flow_sigmas True"),
    (lambda f: replace_scheduler(f, "DDPMScheduler", num_train_timesteps=20000),  # fp32 alphas_cumprod underflow
     "scheduler_config.json: alphas_cumprod must be"),
    (lambda f: edit_json(f / "scheduler_config.json", num_train_timesteps="1000"),
     "num_train_timesteps '1000' in scheduler_config.json: need an int in [2, 100000]"),
    (lambda f: edit_json(f / "scheduler_config.json", trained_betas="0.1"), "scheduler_config.json: no noise levels"),
    (lambda f: edit_json(f / "scheduler_config.json", num_train_timesteps=-3), "num_train_timesteps -3 in scheduler"),
])
def test_bad_folders_are_one_line_errors(breakage, message, tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m")
    breakage(folder)
    err = one_line_error(capsys, train_main(tmp_path / "r", "--teacher", str(folder)))
    assert message in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--guidance-scale", "-1"], "--guidance-scale must be finite and >= 0"),
    (["--guidance-scale", "inf"], "--guidance-scale must be finite and >= 0, got inf"),
    (["--guidance-scale", "nan"], "--guidance-scale must be finite and >= 0, got nan"),
    (["--schedule", "edm"], "leave --schedule out"),
    (["--prompts", "PROMPTS"], "is not text-conditioned"),
    (["--labels", "1"], "is unconditional"),
])
def test_bad_options_for_a_pixel_teacher_are_one_line_errors(args, message, tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m")
    (tmp_path / "p.txt").write_text("a cat\n")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in args]
    err = one_line_error(capsys, train_main(tmp_path / "r", "--teacher", str(folder), *args))
    assert message in err


def test_diffusers_options_need_a_diffusers_teacher(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    err = one_line_error(capsys, train_main(tmp_path / "r", "--prompts", str(tmp_path / "p.txt")))
    assert "--prompts applies to diffusers teachers" in err
    err = one_line_error(capsys, train_main(tmp_path / "r", "--grad-checkpoint"))
    assert "--grad-checkpoint applies to diffusers teachers" in err


@pytest.mark.parametrize("case,message", [
    ("no_vae", "needs a VAE to decode samples"),
    ("unet_only", "needs a VAE to decode samples"),
    ("empty_prompts", "no prompts (one per line)"),
    ("no_prompts", "is text-conditioned: pass --prompts FILE"),
    ("negative_guidance", "--guidance-scale must be finite and >= 0"),
    ("no_text_encoder", "no text_encoder/ or tokenizer/"),
    ("sdxl", "with addition_embed_type 'text_time' needs extra conditioning inputs"),
    ("inpainting", "in_channels 9 differs from the VAE's latent_channels 4"),
    ("class_labels", "UNet2DConditionModel with num_class_embeds 10 needs class labels"),
    ("image_proj", "encoder_hid_dim_type 'image_proj' needs image embeddings"),
    ("truncated_text_encoder", "text_encoder: cannot load the text encoder: Error while deserializing header"),
    ("no_vae_weights", "vae: incomplete diffusers folder, no weights (diffusion_pytorch_model.safetensors / .bin)"),
    ("no_text_encoder_weights", "text_encoder: incomplete diffusers folder, no weights (model.safetensors / .bin or "
                                "pytorch_model.safetensors / .bin)"),
    ("text_width", "the text encoder's hidden_size 16 is not the width of the text embeddings the UNet takes (24)"),
    ("vq_vae", "VAE class 'VQModel' is not supported; emd_fast decodes with AutoencoderKL"),
    ("vae_4_channels", "vae: out_channels 4: the VAE must decode images of 1 or 3 channels"),
])
def test_bad_latent_input_is_a_one_line_error(case, message, sd_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    prompts = prompts_file(tmp_path, "\n  \n" if case == "empty_prompts" else "a cat\n")
    teacher = folder / "unet" if case == "unet_only" else folder
    if case == "no_vae":
        edit_json(folder / "model_index.json", vae=[None, None])
    if case == "no_text_encoder":
        shutil.rmtree(folder / "text_encoder")
        edit_json(folder / "model_index.json", text_encoder=[None, None])
    if case == "sdxl":
        edit_json(folder / "unet" / "config.json", addition_embed_type="text_time")
    if case == "inpainting":
        edit_json(folder / "unet" / "config.json", in_channels=9)
    if case == "class_labels":
        edit_json(folder / "unet" / "config.json", num_class_embeds=10)
    if case == "image_proj":
        edit_json(folder / "unet" / "config.json", encoder_hid_dim_type="image_proj", encoder_hid_dim=16)
    if case == "truncated_text_encoder":
        truncate(folder / "text_encoder" / "model.safetensors", 0.001)
    if case == "text_width":
        edit_json(folder / "unet" / "config.json", cross_attention_dim=24)
    if case == "vq_vae":
        edit_json(folder / "vae" / "config.json", _class_name="VQModel")
    if case == "vae_4_channels":
        edit_json(folder / "vae" / "config.json", out_channels=4)
    if case == "no_text_encoder_weights":
        (folder / "text_encoder" / "model.safetensors").unlink()
    if case == "no_vae_weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    args = ["--teacher", str(teacher)] + ([] if case == "no_prompts" else ["--prompts", str(prompts)])
    args += ["--guidance-scale", "-0.1"] if case == "negative_guidance" else []
    err = one_line_error(capsys, train_main(tmp_path / "r", *args))
    assert message in err and not (tmp_path / "r").exists()
