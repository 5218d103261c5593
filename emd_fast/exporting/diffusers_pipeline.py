"""A diffusers teacher's one-step generator as a stock diffusers pipeline folder (docs/export.md).

The generator is g(z, y) = D(sigma* z, t*, y) at an integer timestep t* (``DiscreteSchedule.generator_t``). One step
of diffusers' ``EulerDiscreteScheduler`` computes exactly that when its training schedule is the teacher's betas cut
after t* (``one_step_scheduler``: num_train_timesteps = t* + 1, the same alphas_cumprod on 0..t*) with "trailing"
timestep spacing and a final sigma of 0: its one timestep is t*, its initial noise sigma is s* = sigma*/alpha*
(Euler's variable), the UNet sees latents / sqrt(s*^2 + 1) = sigma* z at timestep t*, and the step to sigma 0 returns
Euler's x0 prediction, which is D (epsilon: x - s* eps; v and sample predictions likewise). The pipelines:
``StableDiffusionPipeline`` for a latent text-to-image teacher (the teacher's VAE, text encoder and tokenizer; no
safety checker) and ``ConsistencyModelPipeline`` for a pixel ``UNet2DModel`` (the stock pipeline of that UNet that
scales its initial noise and calls ``scale_model_input``; DDPMPipeline and DDIMPipeline do neither). The call must
ask for one step and no classifier-free guidance: ``num_inference_steps=1`` and ``guidance_scale=1.0`` (stock
defaults are 50 and 7.5).

A LoRA run's adapters are merged into the UNet's weights (an fp32 copy), or with ``lora_file`` written as a LoRA
file (``pytorch_lora_weights.safetensors``, peft's keys, each layer's scale folded into B, its ranks as metadata)
beside the teacher's own UNet, for ``pipe.load_lora_weights(folder)``; UNet2DModel pipelines have no LoRA loader.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..nets.generator import Generator
from ..nets.lora import adapter_factors, merged_copy
from ..optional import require
from ..teachers.diffusers_folder import load_network, load_text_encoder, load_vae, noise_scheduler

LORA_FILE = "pytorch_lora_weights.safetensors"


def _diffusers():
    return require("diffusers", "exported diffusers pipelines", names=("EulerDiscreteScheduler", "DiffusionPipeline"))


def one_step_scheduler(folder, t_star: float):
    """The EulerDiscreteScheduler whose one step from pure noise is the generator at the integer timestep t*."""
    if t_star != int(t_star):
        raise ValueError(f"the run's generator runs at the fractional timestep t* = {t_star} (a run made before t* "
                         f"was rounded to a timestep): no stock diffusers scheduler calls the UNet there")
    t = int(t_star)
    betas = noise_scheduler(folder).betas[:t + 1]
    return _diffusers().EulerDiscreteScheduler(
        num_train_timesteps=t + 1, trained_betas=betas.tolist(), timestep_spacing="trailing",
        final_sigmas_type="zero", use_karras_sigmas=False, timestep_type="discrete", interpolation_type="linear",
        steps_offset=1, prediction_type=folder.prediction_type)  # steps_offset: unused with "trailing"


def write_pipeline(run, out: Path, lora_file: bool) -> dict:
    """Write the run's sampling generator (the EMA if there is one) as a pipeline folder ``out``; returns what the
    model card says of it: {"pipeline", "weights", "call"}."""
    diffusers, folder = _diffusers(), run.problem.folder
    if folder.family not in ("pixel", "sd"):
        raise ValueError(f"export of {folder.family} teachers ({folder.model_class}) is not implemented yet: pixel "
                         f"UNets and Stable Diffusion 1.x/2.x pipelines export; sample this run with emd_fast.sample")
    unet = run.distiller.sampler.denoiser.unet
    if unet.config.out_channels != unet.config.in_channels:
        raise ValueError(f"{folder.unet}: a UNet with a learned variance ({unet.config.out_channels} output channels): "
                         f"a stock pipeline would take both halves of its output for the prediction")
    if lora_file and run.cfg.get("lora") is None:
        raise ValueError("--lora-file: this run trained full copies (no --lora): its generator is exported as weights")
    scheduler = one_step_scheduler(folder, run.t_star)
    if folder.latent:
        tokenizer, text_encoder = load_text_encoder(folder, folder.text_encoders[0], "cpu")
        pipe = diffusers.StableDiffusionPipeline(
            vae=load_vae(folder), text_encoder=text_encoder, tokenizer=tokenizer,
            unet=load_network(folder) if lora_file else merged_copy(unet), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        call = "pipe(prompt, num_inference_steps=1, guidance_scale=1.0)"
    elif lora_file:
        raise ValueError("--lora-file: diffusers has no LoRA loader for UNet2DModel pipelines; export the merged "
                         "weights (leave out --lora-file)")
    else:
        pipe = diffusers.ConsistencyModelPipeline(unet=merged_copy(unet), scheduler=scheduler)
        call = ("pipe(batch_size=n" + (", class_labels=labels" if unet.config.num_class_embeds else "")
                + ", num_inference_steps=1)")
    pipe.save_pretrained(out)
    if lora_file:
        factors = adapter_factors(unet)
        ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in factors.items()
                 if k.endswith(".lora_A.weight")}
        narrow = {k: r for k, r in ranks.items() if r != run.cfg["lora"]}  # scale folded into B: alpha = r everywhere
        type(pipe).save_lora_weights(out, unet_lora_layers=factors, unet_lora_adapter_metadata={
            "r": run.cfg["lora"], "lora_alpha": run.cfg["lora"], "target_modules": sorted(ranks),
            "rank_pattern": narrow, "alpha_pattern": narrow})
    return {"pipeline": type(pipe).__name__, "weights": "LoRA file " + LORA_FILE if lora_file else "merged UNet",
            "call": call}


@torch.no_grad()
def pipeline_error(run, out: Path, lora_file: bool, n: int = 3, seed: int = 0) -> float:
    """max |pipeline's one-step output - g(z, y)| / max |g(z, y)| on n inputs drawn as ``emd_fast.sample`` draws
    them, in fp32 on the run's device. g is the run's generator, or for a bf16 base (which the pipeline's fp32 UNet
    does not round) its fp32 merged copy."""
    distiller = run.distiller
    pipe = _diffusers().DiffusionPipeline.from_pretrained(out, local_files_only=True).to(distiller.device)
    pipe.set_progress_bar_config(disable=True)
    if lora_file:
        pipe.load_lora_weights(out)
    z, y = distiller.sample_inputs(n, torch.Generator(distiller.device).manual_seed(seed))
    generator = distiller.sampler
    if any(p.dtype != torch.float32 for p in generator.parameters()):
        generator = Generator(merged_copy(generator.denoiser), run.t_star)
    want = generator(z, y).float()
    if run.problem.folder.latent:
        prompts = generator.denoiser.prompts.lookup(y, torch.float32)  # SD 1.x/2.x: embeddings only, no pooled
        got = pipe(prompt_embeds=prompts.embeds, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(),
                   output_type="latent").images
    else:
        raw = {}
        pipe(batch_size=n, class_labels=y, num_inference_steps=1, latents=z.clone(), output_type="pt",
             callback=lambda i, t, sample: raw.update(x=sample))
        got = raw["x"]
    return float((got.float() - want).abs().max() / want.abs().max())
