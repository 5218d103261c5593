"""The denoising networks of the text-to-image teachers people distil, at real size, built from their published
configurations (the configs of the Hub folders, as public code copies them; nothing downloaded) on the ``meta``
device or under a FakeTensorMode: shapes and dtypes only, no memory. For memory reports (benchmarks/memory.py)
and anything else that needs the real networks' sizes and the inputs of one forward.

    python benchmarks/real_size_configs.py          # each network's weight count beside the published one

    sdxl          StableDiffusionXLPipeline's UNet (stabilityai/stable-diffusion-xl-base-1.0)       2.57 B
    sd3-medium    SD3Transformer2DModel of stabilityai/stable-diffusion-3-medium                      2.08 B
    sd3.5-medium  SD3Transformer2DModel (MMDiT-X) of stabilityai/stable-diffusion-3.5-medium          2.47 B
    sd3.5-large   SD3Transformer2DModel of stabilityai/stable-diffusion-3.5-large                     8.15 B
    flux.1-dev    FluxTransformer2DModel of black-forest-labs/FLUX.1-dev                             11.90 B

Weight counts are what a checkpoint stores: parameters and persistent buffers (SD3's positional embedding is a
buffer of 56.6 M, 226.5 M and 89.7 M values in the three SD3 transformers). The published counts they are checked
against (benchmarks/test_real_size_configs.py): the Hub's totals of the SDXL UNet and FLUX.1-dev transformer files,
and Keras Hub's preset totals of SD3-medium, SD3.5-medium and SD3.5-large (CLIP-L + CLIP-G + transformer + VAE,
``TEXT_AND_VAE`` builds those shared parts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Keras Hub's SD3 preset totals count CLIP-L, CLIP-G and the VAE besides the transformer
KERAS_SHARED = ("clip-l", "clip-g", "sd3-vae")
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                       joint_attention_dim=4096, pooled_projection_dim=2048)


@dataclass(frozen=True)
class RealSize:
    """A real-size denoising network: its diffusers class and config, its image size in pixels and a published
    weight count (``published``, where it comes from: ``source``), which counts the networks ``counted_with`` too
    (TEXT_AND_VAE keys)."""

    cls: str
    config: dict
    pixels: int
    published: int
    source: str
    counted_with: tuple[str, ...] = ()


REAL_SIZE = {
    "sdxl": RealSize("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816), 1024, 2_567_463_684,
        "the Hub's parameter total of stable-diffusion-xl-base-1.0/unet (SDXL paper: 2.6 B)"),
    "sd3-medium": RealSize("SD3Transformer2DModel", dict(
        SD3_TRANSFORMER, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
        1024, 2_987_080_931, "Keras Hub's stable_diffusion_3_medium total", KERAS_SHARED),
    "sd3.5-medium": RealSize("SD3Transformer2DModel", dict(
        SD3_TRANSFORMER, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"), 1024, 3_371_793_763,
        "Keras Hub's stable_diffusion_3.5_medium total (model card: 2.5 B)", KERAS_SHARED),
    "sd3.5-large": RealSize("SD3Transformer2DModel", dict(
        SD3_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
        qk_norm="rms_norm"), 1024, 9_048_410_595,
        "Keras Hub's stable_diffusion_3.5_large total (model card: 8.1 B)", KERAS_SHARED),
    "flux.1-dev": RealSize("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)), 1024, 11_901_408_320,
        "the Hub's parameter total of FLUX.1-dev/transformer (model card: 12 B)"),
}
# CLIP-L and CLIP-G with projections, SD3's 16-channel VAE
TEXT_AND_VAE = {
    "clip-l": ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                   num_hidden_layers=12, num_attention_heads=12,
                                                   max_position_embeddings=77, projection_dim=768)),
    "clip-g": ("CLIPTextModelWithProjection", dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                   num_hidden_layers=32, num_attention_heads=20,
                                                   max_position_embeddings=77, projection_dim=1280)),
    "sd3-vae": ("AutoencoderKL", dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                                      block_out_channels=(128, 256, 512, 512), use_quant_conv=False,
                                      use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)),
}
TEXT_TOKENS = {"sdxl": 77, "sd3-medium": 77 + 256, "sd3.5-medium": 77 + 256, "sd3.5-large": 77 + 256,
               "flux.1-dev": 512}  # prompt tokens of one forward at the pipelines' defaults


def build(name: str) -> torch.nn.Module:
    """The network ``name`` (a REAL_SIZE or TEXT_AND_VAE key) in the current device context: call it under
    ``with torch.device("meta"):`` or a FakeTensorMode (it never allocates real memory there)."""
    if name in TEXT_AND_VAE:
        cls, config = TEXT_AND_VAE[name]
        if cls.startswith("CLIP"):
            import transformers

            return getattr(transformers, cls)(transformers.CLIPTextConfig(**config))
    else:
        cls, config = REAL_SIZE[name].cls, REAL_SIZE[name].config
    import diffusers

    return getattr(diffusers, cls)(**config)


def weight_count(module: torch.nn.Module) -> int:
    """The values a checkpoint of ``module`` stores: parameters and persistent buffers."""
    return sum(v.numel() for v in module.state_dict().values())


def forward_inputs(name: str, batch: int) -> dict:
    """Keyword arguments of one forward of the network ``name`` at ``batch`` images of its size and the pipelines'
    default prompt length, fp32, made in the current device context (as ``build``)."""
    size = REAL_SIZE[name]
    latent = size.pixels // 8
    tokens, t = TEXT_TOKENS[name], torch.full((batch,), 500.0)
    if size.cls == "UNet2DConditionModel":
        return dict(sample=torch.randn(batch, 4, latent, latent), timestep=t,
                    encoder_hidden_states=torch.randn(batch, tokens, 2048),
                    added_cond_kwargs={"text_embeds": torch.randn(batch, 1280),
                                       "time_ids": torch.tensor([size.pixels, size.pixels, 0, 0, size.pixels,
                                                                 size.pixels], dtype=torch.float32).repeat(batch, 1)})
    if size.cls == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(batch, 16, latent, latent), timestep=t,
                    encoder_hidden_states=torch.randn(batch, tokens, 4096),
                    pooled_projections=torch.randn(batch, 2048))
    image_tokens = (latent // 2) ** 2  # FLUX: 2x2-packed latent tokens
    return dict(hidden_states=torch.randn(batch, image_tokens, 64), timestep=t / 1000,
                guidance=torch.full((batch,), 3.5), pooled_projections=torch.randn(batch, 768),
                encoder_hidden_states=torch.randn(batch, tokens, 4096), txt_ids=torch.zeros(tokens, 3),
                img_ids=torch.zeros(image_tokens, 3))


def published_weights(name: str) -> int:
    """The published weight count of the network ``name`` alone: its published count less the networks counted
    with it (built on the meta device)."""
    size = REAL_SIZE[name]
    with torch.device("meta"):
        return size.published - sum(weight_count(build(other)) for other in size.counted_with)


def main() -> None:
    for name, size in REAL_SIZE.items():
        with torch.device("meta"):
            count = weight_count(build(name))
        published = published_weights(name)
        print(f"{name:13s} {count / 1e9:6.3f} B weights   published {published / 1e9:6.3f} B ({count - published:+d}): "
              f"{size.source}")


if __name__ == "__main__":
    main()
