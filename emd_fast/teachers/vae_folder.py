"""A standalone diffusers VAE folder (``--vae DIR``): an ``AutoencoderKL``'s config.json and weights, e.g. a local copy
of stabilityai/sd-vae-ft-mse, which decodes the samples of a latent teacher (EDM2's ImageNet-512 models) into images.

Checked from its config.json before any weights are read, hashed into the run's config (a resume with another VAE is
refused), loaded from disk only (nothing is downloaded) in fp32 eval mode without gradients.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .diffusers_folder.folder import check_model_config, check_model_files, hash_files, read_folder_json, weight_files
from .diffusers_folder.loading import diffusers_module, load_model

VAE_CLASS = "AutoencoderKL"


def check_vae_folder(path) -> dict:
    """The folder's config.json; ValueError (one line) where ``path`` is not an AutoencoderKL folder with weights."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--vae {root}: not a directory (a diffusers {VAE_CLASS} folder: config.json and weights; "
                         f"emd_fast never downloads it)")
    check_model_files(root)  # regular files only: diffusers reads them all
    config = read_folder_json(root / "config.json", "VAE config")
    if config.get("_class_name") != VAE_CLASS:
        raise ValueError(f"--vae {root}: config.json describes a {config.get('_class_name')}, not an {VAE_CLASS}")
    check_model_config(root, config)
    weight_files(root)  # ValueError where there are none
    return config


def vae_folder_sha256(path) -> str:
    """SHA-256 over the config and the weight files the VAE is loaded from (name and content hash of each)."""
    root = Path(path)
    return hash_files(root, [root / "config.json", *weight_files(root)[1]])


def load_vae_folder(path, latent_channels: int) -> nn.Module:
    """The AutoencoderKL of the folder (fp32, eval mode, no gradients); ValueError (one line) for a broken folder or
    latents of another number of channels than ``latent_channels`` (the teacher's)."""
    config = check_vae_folder(path)
    if config.get("latent_channels") != latent_channels:
        raise ValueError(f"--vae {path}: its latents have {config.get('latent_channels')} channels, the teacher's "
                         f"samples {latent_channels}")
    return load_model(diffusers_module().AutoencoderKL, Path(path), "the VAE").requires_grad_(False)
