"""The problem of a diffusers teacher folder (``--teacher DIR``, see ``emd_fast.teachers.diffusers_folder``).

Pixel UNets distil in pixel space. Latent UNets distil in the VAE's latent space (4 x 64 x 64 for Stable
Diffusion v1.5); the VAE is loaded only to decode latents for the metrics, the grids and ``emd_fast.sample``.
Text-conditioned UNets: the prompts of ``--prompts FILE`` and the empty prompt are encoded once by the pipeline's
text encoder and cached in ``<run>/prompt_embeddings.safetensors``; the training loop never runs the text encoder.
y is then a prompt index (N,) (``num_classes`` = the number of prompts, ``--labels`` picks some), the teacher
applies classifier-free guidance (``--guidance-scale``), generator and student see the same embeddings unguided.

Memory: under ``--precision bf16`` the frozen teacher is kept in bf16 (generator and student keep fp32 master
weights); ``--grad-checkpoint`` turns on diffusers' activation checkpointing in the generator's and student's UNets.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from ..files import read_safetensors, save_safetensors_atomic, sha256_file
from ..teachers.diffusers_folder import (
    DEFAULT_GUIDANCE,
    DiffusersDenoiser,
    GuidedTeacher,
    PromptTable,
    check_options,
    encode_prompts,
    folder_sha256,
    load_schedule,
    load_unet,
    load_vae,
    read_prompts,
    text_encoder_sha256,
)
from .image import ImageProblem

EMBEDDINGS_FILE = "prompt_embeddings.safetensors"
EMBEDDINGS_FORMAT = "emd_fast.prompt_embeddings"
DECODE_CHUNK = 16  # latents decoded by the VAE at a time


def prompt_embeddings(cfg: dict, folder) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts (P, L, E), empty prompt (1, L, E)) fp32 from the run's cache; computed and cached when there is none,
    or when the prompts or the text encoder (where it is present) are not those it was made with."""
    path = Path(cfg["out"]) / EMBEDDINGS_FILE
    prompts = read_prompts(cfg["prompts"]) if Path(cfg["prompts"]).is_file() else None
    encoder = text_encoder_sha256(folder)
    if path.is_file():
        meta, tensors = read_safetensors(path, EMBEDDINGS_FORMAT, "prompt embeddings", "a prompt embeddings")
        if prompts in (None, json.loads(meta["prompts"])) and encoder in (None, meta["text_encoder_sha256"]):
            return tensors["cond"], tensors["uncond"]
    if prompts is None:
        raise ValueError(f"--prompts {cfg['prompts']}: no such file, and no prompt embeddings in {path.parent}")
    emb = encode_prompts(folder, prompts + [""])
    cond, uncond = emb[:-1], emb[-1:]
    save_safetensors_atomic({"cond": cond, "uncond": uncond}, path,
                            {"format": EMBEDDINGS_FORMAT, "prompts": json.dumps(prompts),
                             "text_encoder_sha256": str(encoder)})
    return cond, uncond


class DiffusersProblem(ImageProblem):
    """cfg: the run's options (teacher = the folder, prompts, guidance_scale, precision, grad_checkpoint, labels,
    seed, eval_samples, out = the run directory, where the prompt embeddings are cached)."""

    options = frozenset({"prompts", "grad_checkpoint"})

    def __init__(self, teacher: GuidedTeacher, cfg: dict, sigma_data: float, num_classes: int, folder):
        super().__init__(teacher, cfg, sigma_data, num_classes)
        self.folder = folder

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_dir()

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        check_options(cfg)

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        return {"teacher_sha256": folder_sha256(cfg["teacher"]),
                **({"prompts_sha256": sha256_file(Path(cfg["prompts"]))} if cfg.get("prompts") else {})}

    @classmethod
    def from_config(cls, cfg: dict) -> "DiffusersProblem":
        folder = check_options(cfg)
        schedule = load_schedule(folder)  # before the weights: a bad scheduler config fails fast
        unet = load_unet(folder)
        prompts = uncond = None
        if folder.latent:
            cond, uncond = prompt_embeddings(cfg, folder)
            prompts = PromptTable(cond)
        net = DiffusersDenoiser(unet, schedule, folder.prediction_type, prompts)
        size = unet.config.sample_size
        shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        teacher = GuidedTeacher(net, shape, cfg.get("guidance_scale", DEFAULT_GUIDANCE), uncond, source=folder.path)
        num_classes = len(prompts) if prompts is not None else (unet.config.get("num_class_embeds") or 0)
        sigma_data = 1.0 if folder.latent else 0.5  # scaled SD latents ~ unit variance; images in [-1, 1]
        return cls(teacher, cfg, sigma_data, num_classes, folder)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embeddings (P, L, E) of new prompts (``emd_fast.sample --prompt``), by the pipeline's text encoder."""
        if not self.folder.latent:
            raise ValueError(f"--prompt: the teacher {self.folder.unet_class} is not text-conditioned")
        return encode_prompts(self.folder, prompts)

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """The fp32 network that generator and student start from (with activation checkpointing if asked). Under
        bf16 the teacher keeps a frozen bf16 copy of it instead. ``fit`` is moot."""
        net = self.teacher.to(device).net
        if self.cfg.get("grad_checkpoint"):
            net.unet.enable_gradient_checkpointing()  # active only where gradients flow: generator and student
        if self.cfg["precision"] == "bf16":
            self.teacher.net = copy.deepcopy(net).to(torch.bfloat16).requires_grad_(False).eval()
        return net, {}

    @functools.cached_property
    def vae(self) -> nn.Module:
        return load_vae(self.folder).to(next(self.teacher.net.parameters()).device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in about [-1, 1] from samples (N, *data_shape): the VAE's decoding of latents, pixel
        samples as they are."""
        if not self.folder.latent:
            return x
        cfg, device = self.vae.config, next(self.vae.parameters()).device
        shift = cfg.get("shift_factor") or 0.0
        return torch.cat([self.vae.decode(c.to(device).float() / cfg.scaling_factor + shift).sample.cpu()
                          for c in x.split(DECODE_CHUNK)])
