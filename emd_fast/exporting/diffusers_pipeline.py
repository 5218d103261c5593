"""A diffusers teacher's one-step generator as a stock diffusers pipeline folder (docs/export.md).

UNet families (pixel, SD 1.x/2.x, SDXL). The generator is g(z, y) = D(sigma* z, t*, y) at an integer timestep t*
(``DiscreteSchedule.generator_t``). One step of diffusers' ``EulerDiscreteScheduler`` computes exactly that when its
training schedule is the teacher's betas cut after t* (``one_step_scheduler``: num_train_timesteps = t* + 1, the same
alphas_cumprod on 0..t*) with "trailing" timestep spacing and a final sigma of 0: its one timestep is t*, its initial
noise sigma is s* = sigma*/alpha* (Euler's variable), the UNet sees latents / sqrt(s*^2 + 1) = sigma* z at timestep
t*, and the step to sigma 0 returns Euler's x0 prediction, which is D (epsilon: x - s* eps; v and sample predictions
likewise). The pipelines: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` for a latent text-to-image
teacher (the teacher's VAE, text encoders and tokenizers; no safety checker) and ``ConsistencyModelPipeline`` for a
pixel ``UNet2DModel`` (the stock pipeline of that UNet that scales its initial noise and calls
``scale_model_input``; DDPMPipeline and DDIMPipeline do neither). SDXL's added time ids are the run's (original and
target size = the run's resolution, crop (0, 0)): the pipeline's defaults once height and width are passed.

Flow families (SD3 / SD3.5, FLUX.1). The generator is g(z, y) = D(s* z, t*, y) = s* z - s* v(s* z, N s*, y) at the
noise level s* = s(t*). One step of ``FlowMatchEulerDiscreteScheduler`` from latents L at its first sigma s1 to sigma
0 is L - s1 v(L, N s1): with no time shift (shift 1, no dynamic shifting, ``flow_scheduler``) custom ``sigmas=[s*]``
pass through unchanged, so ``latents = s* z`` gives g(z) exactly (the transformer sees timestep N s*, FluxPipeline
N s* / 1000, as the denoisers call it). No scheduler setting makes the pipeline's own noise (unscaled z, first sigma
1) the generator unless s* = 1: the call must pass the scaled latents. ``StableDiffusion3Pipeline`` with
``guidance_scale=1.0`` (no classifier-free guidance), ``FluxPipeline`` with FLUX.1-dev's embedded guidance at the
run's scale (true_cfg_scale stays 1: off) and packed latents.

The call must ask for one step and no classifier-free guidance (``num_inference_steps=1``, ``guidance_scale=1.0``;
stock defaults are 28 to 50 steps and guidance 3.5 to 7.5). A LoRA run's adapters are merged into the network's
weights (an fp32 copy), or with ``lora_file`` written as a LoRA file (``pytorch_lora_weights.safetensors``, peft's
keys, each layer's scale folded into B, its ranks as metadata) beside the teacher's own UNet or transformer, for
``pipe.load_lora_weights(folder)``; UNet2DModel pipelines have no LoRA loader.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..nets.generator import Generator
from ..nets.lora import adapter_factors, merged_copy
from ..optional import require
from ..teachers.diffusers_folder import (
    load_network,
    load_text_encoder,
    load_vae,
    max_sequence_length,
    noise_scheduler,
)
from ..teachers.diffusers_folder.denoisers import pack, unpack
from ..teachers.diffusers_folder.folder import OPTIONAL_TEXT_ENCODERS

LORA_FILE = "pytorch_lora_weights.safetensors"
# family -> (the stock pipeline of the export, its component that holds the denoising network)
PIPELINES = {"pixel": ("ConsistencyModelPipeline", "unet"), "sd": ("StableDiffusionPipeline", "unet"),
             "sdxl": ("StableDiffusionXLPipeline", "unet"), "sd3": ("StableDiffusion3Pipeline", "transformer"),
             "flux": ("FluxPipeline", "transformer")}


def _diffusers():
    return require("diffusers", "exported diffusers pipelines",
                   names=("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "DiffusionPipeline"))


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


def flow_scheduler(folder):
    """The FlowMatchEulerDiscreteScheduler that takes custom sigmas as given (no time shift), one step to 0."""
    return _diffusers().FlowMatchEulerDiscreteScheduler(num_train_timesteps=folder.num_train_timesteps, shift=1.0,
                                                        use_dynamic_shifting=False)


def flow_sigma(run) -> float:
    """s*: the noise level at which the generator's flow transformer runs, in fp32 as its denoiser computes it."""
    return float(run.distiller.sampler.denoiser.schedule.sigma(torch.tensor([run.t_star])))


def call_options(run) -> dict:
    """The keyword arguments, besides the prompts and the latents, of the pipeline call that is the run's generator:
    one step, no classifier-free guidance, the run's resolution (SDXL's time ids, FLUX's position ids), and for the
    flow families the noise level s* and the run's T5 length (its padding is part of the condition)."""
    folder, (_, h, w) = run.problem.folder, run.distiller.shape
    if not folder.latent:
        return {"num_inference_steps": 1}
    options = {"num_inference_steps": 1, "guidance_scale": 1.0, "height": h * folder.vae_scale,
               "width": w * folder.vae_scale}
    if folder.flow:
        options |= {"sigmas": [flow_sigma(run)],
                    "max_sequence_length": max_sequence_length(folder, run.cfg.get("max_sequence_length"))}
    if folder.family == "flux":  # dev: its embedded guidance at the run's scale; schnell takes none
        guidance = run.distiller.sampler.denoiser.guidance
        options.pop("guidance_scale") if guidance is None else options.update(guidance_scale=guidance)
    return options


def start_latents(run, z: torch.Tensor) -> torch.Tensor:
    """The pipeline's starting latents for noise z (N, C, H, W): z for the UNets (the scheduler scales it), s* z for
    the flow transformers (FLUX: packed into its tokens)."""
    folder = run.problem.folder
    if not folder.flow:
        return z.clone()
    latents = flow_sigma(run) * z
    return pack(latents) if folder.family == "flux" else latents


def usage(run, options: dict) -> tuple[list[str], str]:
    """(the model card's lines of code that sample the export, what they compute and why) for ``options``."""
    folder, (c, h, w) = run.problem.folder, run.distiller.shape
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    if not folder.latent:
        labels = ", class_labels=labels" if run.distiller.num_classes else ""
        return ([f"z = torch.randn(n, {c}, {h}, {w})",
                 f"images = pipe(batch_size=n{labels}, {args}, latents=z).images"],
                f"whose scheduler is EulerDiscreteScheduler over the teacher's betas cut after timestep "
                f"t* = {run.t_star:g}: one step from pure noise is the generator; `latents=z` gives the samples of "
                f"`python -m emd_fast.sample` for the same z.")
    code = [f"z = torch.randn(len(prompt), {c}, {h}, {w})"]
    if not folder.flow:
        return (code + [f"images = pipe(prompt, {args}, latents=z).images"],
                f"whose scheduler is EulerDiscreteScheduler over the teacher's betas cut after timestep "
                f"t* = {run.t_star:g}: one step from pure noise is the generator. `num_inference_steps=1` and no "
                f"classifier-free guidance (`guidance_scale=1.0`) are required: more steps run Euler steps below t*, "
                f"guidance a second, unconditional call; neither is the generator. `latents=z` gives the samples of "
                f"`python -m emd_fast.sample` for the same z; height and width set "
                + ("SDXL's time ids (original and target size) to the run's." if folder.family == "sdxl" else
                   "the size of the images."))
    s = options["sigmas"][0]
    latents = (f"pipe._pack_latents({s!r} * z, len(prompt), {c}, {h}, {w})" if folder.family == "flux"
               else f"{s!r} * z")
    return (code + [f"images = pipe(prompt, {args}, latents={latents}).images"],
            f"whose scheduler is FlowMatchEulerDiscreteScheduler without time shift (shift 1, no dynamic shifting), "
            f"so that `sigmas=[s*]` is the noise level of the one step (s* = {s!r}): from latents s* z it computes "
            f"s* z - s* v(s* z, {folder.num_train_timesteps} s*), the generator. The latents must be s* z: the "
            f"pipeline's own starting noise (z unscaled, at sigma 1) is not the generator. `num_inference_steps=1`, "
            + ("FLUX.1-dev's embedded guidance at the run's scale" if "guidance_scale" in options and
               folder.family == "flux" else "no guidance" if folder.family == "flux" else
               "no classifier-free guidance (`guidance_scale=1.0`)")
            + " and the run's `max_sequence_length` are required; the same z gives the samples of "
              "`python -m emd_fast.sample`.")


def absent_components(folder) -> dict:
    """{component: None} of the pipeline's text encoders and tokenizers the teacher's folder does not have (SD3
    without T5): the export has none either, and ``from_pretrained`` must be told so."""
    return {key: None for text in folder.text_encoders if text.key in OPTIONAL_TEXT_ENCODERS and text.encoder is None
            for key in (text.key, text.key.replace("text_encoder", "tokenizer"))}


def text_components(folder) -> dict:
    """The pipeline's text encoders and tokenizers by component name, from the teacher's folder."""
    parts = absent_components(folder)
    for text in folder.text_encoders:
        if text.key not in parts:
            tokenizer, parts[text.key] = load_text_encoder(folder, text, "cpu")
            parts[text.key.replace("text_encoder", "tokenizer")] = tokenizer
    return parts


def write_pipeline(run, out: Path, lora_file: bool) -> dict:
    """Write the run's sampling generator (the EMA if there is one) as a pipeline folder ``out``; returns what the
    model card says of it: {"pipeline", "weights", "code": the lines that load and call it, "how"}."""
    diffusers, folder = _diffusers(), run.problem.folder
    name, component = PIPELINES[folder.family]
    net = run.distiller.sampler.denoiser.model
    if not folder.flow and net.config.out_channels != net.config.in_channels:
        raise ValueError(f"{folder.unet}: a UNet with a learned variance ({net.config.out_channels} output channels): "
                         f"a stock pipeline would take both halves of its output for the prediction")
    if lora_file and run.cfg.get("lora") is None:
        raise ValueError("--lora-file: this run trained full copies (no --lora): its generator is exported as weights")
    if lora_file:  # save_lora_weights takes the adapters' ranks and targets as metadata from diffusers 0.34 on
        require("diffusers", "--lora-file exports", minimum="0.34")
    if lora_file and not folder.latent:
        raise ValueError("--lora-file: diffusers has no LoRA loader for UNet2DModel pipelines; export the merged "
                         "weights (leave out --lora-file)")
    scheduler = flow_scheduler(folder) if folder.flow else one_step_scheduler(folder, run.t_star)
    parts = {component: load_network(folder) if lora_file else merged_copy(net), "scheduler": scheduler}
    if folder.latent:
        parts |= {"vae": load_vae(folder), **text_components(folder)}
    if folder.family == "sd":
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if folder.family == "sdxl":
        parts |= {"force_zeros_for_empty_prompt": folder.force_zeros_for_empty_prompt, "add_watermarker": False}
    pipe = getattr(diffusers, name)(**parts)
    pipe.save_pretrained(out)
    if lora_file:
        factors = adapter_factors(net)
        ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in factors.items()
                 if k.endswith(".lora_A.weight")}
        narrow = {k: r for k, r in ranks.items() if r != run.cfg["lora"]}  # scale folded into B: alpha = r everywhere
        metadata = {"r": run.cfg["lora"], "lora_alpha": run.cfg["lora"], "target_modules": sorted(ranks),
                    "rank_pattern": narrow, "alpha_pattern": narrow}
        type(pipe).save_lora_weights(out, **{f"{component}_lora_layers": factors,
                                             f"{component}_lora_adapter_metadata": metadata})
    code, how = usage(run, call_options(run))
    absent = "".join(f", {key}=None" for key in absent_components(folder))
    load = [f"pipe = DiffusionPipeline.from_pretrained(folder{absent})",
            *(["pipe.load_lora_weights(folder)"] if lora_file else [])]
    return {"pipeline": name, "weights": f"LoRA file {LORA_FILE}" if lora_file else f"merged {component}",
            "code": load + code, "how": how}


@torch.no_grad()
def pipeline_error(run, out: Path, lora_file: bool, n: int = 3, seed: int = 0) -> float:
    """max |pipeline's one-step output - g(z, y)| / max |g(z, y)| on n inputs drawn as ``emd_fast.sample`` draws
    them, in fp32 on the run's device, the pipeline called as the model card says (``call_options``, with the
    prompts' cached conditioning). g is the run's generator, or for a bf16 base (which the pipeline's fp32 network
    does not round) its fp32 merged copy."""
    distiller, folder = run.distiller, run.problem.folder
    pipe = _diffusers().DiffusionPipeline.from_pretrained(out, local_files_only=True,
                                                          **absent_components(folder)).to(distiller.device)
    pipe.set_progress_bar_config(disable=True)
    if lora_file:
        pipe.load_lora_weights(out)
    z, y = distiller.sample_inputs(n, torch.Generator(distiller.device).manual_seed(seed))
    generator = distiller.sampler
    if any(p.dtype != torch.float32 for p in generator.parameters()):
        generator = Generator(merged_copy(generator.denoiser), run.t_star)
    want = generator(z, y).float()
    options, latents = call_options(run), start_latents(run, z)
    if folder.latent:
        prompts = generator.denoiser.prompts.lookup(y, torch.float32)  # pooled: None for SD 1.x/2.x
        text = {"prompt_embeds": prompts.embeds, **({} if prompts.pooled is None else
                                                    {"pooled_prompt_embeds": prompts.pooled})}
        got = pipe(**text, **options, latents=latents, output_type="latent").images
        got = unpack(got, *z.shape[2:]) if folder.family == "flux" else got
    else:
        raw = {}
        pipe(batch_size=n, class_labels=y, **options, latents=latents, output_type="pt",
             callback=lambda i, t, sample: raw.update(x=sample))
        got = raw["x"]
    return float((got.float() - want).abs().max() / want.abs().max())
