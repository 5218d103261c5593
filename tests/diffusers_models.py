"""Tiny diffusers teachers for the tests, built from configs with random weights and saved with ``save_pretrained``
(nothing is downloaded; the CLIP tokenizer is written from a tiny vocabulary), and a quick run's options. The SD-style
pipeline folder is the ``sd_folder`` fixture (conftest.py), made once."""
import json

import pytest
import torch

from helpers import train_cli

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SMALL = ["--steps", "4", "--batch", "3", "--K", "1", "--eval-every", "2", "--eval-samples", "6", "--ckpt-every", "2",
         "--quiet", "--device", "cpu", "--phase-every", "0"]
train_main = train_cli(*SMALL)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def scheduler(**kw):
    return diffusers.DDPMScheduler(num_train_timesteps=kw.pop("num_train_timesteps", 1000), **kw)


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                           attention_head_dim=8), **kw})


def pixel_folder(path, prediction_type="epsilon", beta_schedule="linear", seed=0, **unet_kw):
    """A UNet2DModel folder: config.json, weights and scheduler_config.json side by side."""
    tiny_unet(seed, **unet_kw).save_pretrained(path)
    scheduler(prediction_type=prediction_type, beta_schedule=beta_schedule).save_pretrained(path)
    return path


VOCAB = ["<|startoftext|>", "<|endoftext|>", "a</w>", "cat</w>", "dog</w>", "red</w>", "c", "a", "t", "d", "o", "g",
         "r", "e", "t</w>", "g</w>", "d</w>", "e</w>"]


def tiny_tokenizer(directory):
    """A CLIP tokenizer over a tiny vocabulary (words and letters, no merges), written here: never downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(VOCAB)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                      model_max_length=8)


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)


def latent_pipeline(path, prediction_type="epsilon", seed=0):
    """A Stable-Diffusion-style pipeline folder: 4x8x8 latents, a VAE decoding them to 3x16x16, a CLIP text encoder
    (16 wide, 8 tokens)."""
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(path.parent / f"{path.name}-vocab"),
        unet=tiny_cond_unet(seed), scheduler=scheduler(prediction_type=prediction_type, **SD_BETAS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def prompts_file(tmp_path, text="a cat\n\na red dog\n"):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
