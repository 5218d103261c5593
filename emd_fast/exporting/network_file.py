"""A U-Net generator (EDM's networks, the digits U-Net) as a safetensors network file, and samples for FID tools.

``generator.safetensors`` is an emd_fast U-Net file (``teachers.network_file``: the weights in fp32, a LoRA run's
adapters merged, with the arch and schedule as metadata, and ``generator`` = {"t_star", "sigma_star", "lambda_star"}).
Sampling it is g(z, y) = D(sigma* z, t*, y): ``Generator(load_network(file), t_star)``. In EDM's own terms (an EDM
teacher's schedule is EDM's: alpha = 1, sigma = t) that is the preconditioned network at noise level sigma* = t*
applied to sigma* z, and the tensors carry EDM's names, without EDM's ``model.`` prefix. An EDM2 teacher's generator
keeps EDM2's names (without ``unet.``); a latent EDM2 generator's samples are latents, which its ``latents``
(``nets.edm2.VAELatents``, in the file's arch) decode with the VAE the run names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..evaluation.images import is_image_shape
from ..nets.generator import Generator
from ..nets.lora import merged_copy
from ..teachers.network_file import load_network, save_network

GENERATOR_FILE = "generator.safetensors"


def write_generator(run, out: Path) -> dict:
    """Write the run's sampling generator (the EMA if there is one) to ``out``/generator.safetensors; returns what
    the model card says of it."""
    sampler = run.distiller.sampler
    level = {"t_star": run.t_star, "sigma_star": sampler.sigma_star, "lambda_star": run.cfg["lambda_star"]}
    save_network(merged_copy(sampler.denoiser), out / GENERATOR_FILE, name="emd_generator",
                 extra={"generator": json.dumps(level)})
    return level


@torch.no_grad()
def generator_error(run, out: Path, n: int = 3, seed: int = 0) -> float:
    """max |g_file(z, y) - g(z, y)| / max |g(z, y)| on n inputs drawn as ``emd_fast.sample`` draws them (fp32)."""
    distiller = run.distiller
    z, y = distiller.sample_inputs(n, torch.Generator(distiller.device).manual_seed(seed))
    want = distiller.generate(z, y)
    got = Generator(load_network(out / GENERATOR_FILE, distiller.device), run.t_star)(z, y)
    return float((got - want).abs().max() / want.abs().max())


def check_samples(run) -> None:
    """ValueError (one line) where ``--samples`` cannot give images for FID tools: samples that are not images (an
    EDM2 latent teacher's) in a run without a VAE to decode them."""
    shape = tuple(run.distiller.shape)
    if not is_image_shape(shape) and getattr(run.problem, "decode", None) is None:
        raise ValueError(f"--samples: this run's samples are {'x'.join(map(str, shape))} latents and it was trained "
                         f"without --vae, so nothing decodes them into images for FID tools; export without "
                         f"--samples: the generator file, whose latents the model card shows how to decode")


def sample_kind(run) -> str:
    """What the exported generator's g(z, y) gives (the model card's comment)."""
    latents = getattr(run.problem, "latents", None)
    if latents is None:
        return "images in about [-1, 1]"
    return (f"latents of {latents.vae}; images (about [-1, 1]) = g.denoiser.latents.decode(vae, x), vae: that "
            f"AutoencoderKL (diffusers)")
