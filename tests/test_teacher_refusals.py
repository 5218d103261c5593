"""What emd_fast does not distil is refused from the folder's JSON files before any weights are read (every case
runs with the denoiser's weights corrupted): one line naming what is unsupported, exit 2, no run directory. Video
pipelines, ControlNet / adapters / image-conditioned pipelines, IP-adapter image inputs, unknown transformer classes,
flow schedulers and options whose noise levels are not reproduced, the SDXL refiner, LCM and inpainting UNets, text
encoders of another model, and options a family does not take."""
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from emd_fast import train  # noqa: E402

from tiny_pipelines import (  # noqa: E402
    PIXELS,
    SMALL,
    copy_folder,
    edit_json,
    flux_pipeline,
    one_line_error,
    prompts_file,
    sd3_pipeline,
    sdxl_pipeline,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sd3": sd3_pipeline(root / "sd3"), "flux": flux_pipeline(root / "flux"),
            "sdxl": sdxl_pipeline(root / "sdxl")}


def index(**changes):
    return lambda f: edit_json(f / "model_index.json", **changes)


def model(**changes):
    return lambda f: edit_json(next(f / part for part in ("transformer", "unet") if (f / part).is_dir()) /
                               "config.json", **changes)


def scheduler(**changes):
    return lambda f: edit_json(f / "scheduler" / "scheduler_config.json", **changes)


CASES = [
    ("sd3", index(_class_name="WanPipeline"), [], "pipeline WanPipeline is a video pipeline"),
    ("sdxl", index(_class_name="AnimateDiffSDXLPipeline"), [], "is a video pipeline"),
    ("sd3", index(_class_name="StableDiffusion3ControlNetPipeline"), [], "needs control images (ControlNet"),
    ("sdxl", index(_class_name="StableDiffusionXLAdapterPipeline"), [], "needs control images"),
    ("flux", index(_class_name="FluxFillPipeline"), [], "FluxFillPipeline conditions on input images"),
    ("flux", index(_class_name="FluxKontextPipeline"), [], "FluxKontextPipeline conditions on input images"),
    ("sdxl", index(controlnet=["diffusers", "ControlNetModel"]), [], "has a controlnet (ControlNetModel): ControlNet"),
    ("sd3", index(image_encoder=["transformers", "SiglipVisionModel"]), [], "IP-adapter image inputs are not"),
    ("sd3", model(_class_name="SanaTransformer2DModel"), [], "model class 'SanaTransformer2DModel' is not supported"),
    ("sd3", model(_class_name="WanTransformer3DModel"), [], "model class 'WanTransformer3DModel' is not supported"),
    ("sd3", model(_class_name="FluxTransformer2DModel"), [], "FluxTransformer2DModel in a StableDiffusion3Pipeline"),
    ("flux", model(in_channels=32), [], "in_channels 32 is not 4 x the VAE's latent_channels 4 (FLUX Fill"),
    ("sd3", model(in_channels=8), [], "in/out_channels 8/4 differ from the VAE's latent_channels 4"),
    ("sd3", scheduler(_class_name="DDIMScheduler"), [], "scheduler 'DDIMScheduler' with a SD3Transformer2DModel"),
    ("flux", scheduler(_class_name="FlowMatchHeunDiscreteScheduler"), [], "'FlowMatchHeunDiscreteScheduler' with"),
    ("sd3", scheduler(invert_sigmas=True), [], "invert_sigmas (time running backwards"),
    ("sd3", scheduler(shift=-2.0), [], "shift -2.0 in scheduler_config.json: need a number > 0"),
    ("flux", scheduler(time_shift_type="cosine"), [], "time_shift_type 'cosine' is not supported"),
    ("flux", scheduler(max_image_seq_len=256), [], "dynamic shifting needs numbers"),
    ("sdxl", scheduler(_class_name="FlowMatchEulerDiscreteScheduler"), [], "'FlowMatchEulerDiscreteScheduler' is not"),
    ("sdxl", index(_class_name="StableDiffusionXLImg2ImgPipeline"), [], "addition_embed_type 'text_time' needs extra"),
    ("sdxl", model(projection_class_embeddings_input_dim=5 * 4 + 20), [], "the refiner's 5 include an aesthetic"),
    ("sdxl", model(time_cond_proj_dim=8), [], "time_cond_proj_dim 8 needs extra conditioning inputs"),
    ("sdxl", model(encoder_hid_dim_type="ip_image_proj"), [], "encoder_hid_dim_type 'ip_image_proj' needs image"),
    ("sdxl", model(in_channels=9), [], "in_channels 9 differs from the VAE's latent_channels 4 (an inpainting"),
    ("sdxl", index(text_encoder_2=[None, None]), [], "StableDiffusionXLPipeline without text_encoder_2"),
    ("sdxl", index(text_encoder_2=["transformers", "CLIPTextModel"]), [], "text_encoder_2 is CLIPTextModel, not the"),
    ("flux", lambda f: edit_json(f / "text_encoder_2" / "config.json", d_model=48), [],
     "joint_attention_dim 40 is not T5's d_model (48): text encoders of another model?"),
    ("sd3", None, ["--resolution", "15"], "--resolution [15]: the SD3Transformer2DModel"),
    ("sd3", None, ["--resolution", "80"], "at most 64 pixels a side for this SD3 transformer"),
    ("flux", None, ["--resolution", "16", "18"], "positive multiples of 4 pixels (VAE factor 2 x patch 2)"),
    ("sd3", None, ["--max-sequence-length", "600"], "--max-sequence-length must lie in [1, 512], got 600"),
    ("sdxl", None, ["--max-sequence-length", "8"], "takes CLIP embeddings only"),
    ("sdxl", None, ["--schedule", "flow"], "leave --schedule out"),
]


@pytest.mark.parametrize("family,breakage,args,message", CASES, ids=[c[3][:40] for c in CASES])
def test_refused_from_the_json_before_any_weights_are_read(family, breakage, args, message, folders, tmp_path, capsys):
    folder = copy_folder(folders[family], tmp_path / "pipe")
    for weights in folder.glob("*/diffusion_pytorch_model*.safetensors"):
        weights.write_bytes(b"not read")  # a refusal never gets as far as the weights
    if breakage is not None:
        breakage(folder)
    rc = train.main(["--out", str(tmp_path / "r"), *SMALL, "--teacher", str(folder), "--prompts",
                     str(prompts_file(tmp_path)), *(args or ["--resolution", str(PIXELS)])])
    err = one_line_error(capsys, rc)
    assert message in err and not (tmp_path / "r").exists(), err


def test_options_of_latent_teachers_need_one(tmp_path, capsys):
    err = one_line_error(capsys, train.main(["--out", str(tmp_path / "r"), *SMALL, "--resolution", "16"]))
    assert "--resolution applies to latent diffusers teachers" in err
    err = one_line_error(capsys, train.main(["--out", str(tmp_path / "r"), *SMALL, "--max-sequence-length", "8"]))
    assert "--max-sequence-length applies to SD3 / FLUX teachers" in err
