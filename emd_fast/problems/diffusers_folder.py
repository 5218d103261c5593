"""The problem of a diffusers teacher folder (``--teacher DIR``, see ``emd_fast.teachers.diffusers_folder`` and
docs/teachers.md).

Pixel UNets distil in pixel space. Latent models (SD 1.x/2.x, SDXL, SD3 / SD3.5, FLUX.1) distil in the VAE's latent
space (4 x 64 x 64 for Stable Diffusion v1.5, 16 x 128 x 128 for SD3 and FLUX at 1024 px; ``--resolution`` picks
another image size); the VAE is loaded only to decode latents for the metrics, the grids and ``emd_fast.sample``.
The prompts of ``--prompts FILE`` (and the unconditional input of classifier-free guidance) are encoded once by the
pipeline's text encoders and cached in ``<run>/prompt_embeddings.safetensors``; the training loop and a resume never
load a text encoder (T5 included). y is a prompt index (N,) (``num_classes`` = the number of prompts, ``--labels``
picks some); the teacher is guided (``--guidance-scale``: classifier-free for SD, SDXL and SD3; FLUX.1-dev's
embedded guidance, given to generator and student too), generator and student see the same conditioning unguided.

Memory: under ``--precision bf16`` the frozen teacher is kept in bf16 (generator and student keep fp32 master
weights); ``--grad-checkpoint`` turns on diffusers' activation checkpointing in the generator's and student's networks.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
from torch import nn

from ..files import read_safetensors, save_safetensors_atomic, sha256_file
from ..schedules import NOISE_PREDICTION_WEIGHTINGS
from ..teachers.diffusers_folder import (
    DEFAULT_GUIDANCE,
    FLUX_GUIDANCE,
    GuidedTeacher,
    Prompts,
    PromptTable,
    TeacherFolder,
    check_guidance,
    check_prompt_budget,
    encode_prompts,
    encode_with_unconditional,
    folder_sha256,
    inspect_folder,
    load_network,
    load_schedule,
    load_vae,
    make_denoiser,
    max_sequence_length,
    prompt_encoding,
    read_prompts,
    text_encoder_sha256,
)
from .image import ImageProblem

EMBEDDINGS_FILE = "prompt_embeddings.safetensors"
EMBEDDINGS_FORMAT = "emd_fast.prompt_embeddings"
DECODE_CHUNK = 16  # latents decoded by the VAE at a time


def guidance_scale(folder: TeacherFolder, asked: float | None) -> float | None:
    """The teacher's guidance scale: ``asked`` (--guidance-scale), else the family's default (classifier-free
    DEFAULT_GUIDANCE; FLUX.1-dev's embedded FLUX_GUIDANCE); None for FLUX.1-schnell, which takes none."""
    if folder.family == "flux" and not folder.guidance_embedded:
        if asked is not None:
            raise ValueError(f"--guidance-scale: FLUX.1-schnell-style transformers ({folder.model}: guidance_embeds "
                             f"false) take no guidance; leave it out")
        return None
    scale = (FLUX_GUIDANCE if folder.family == "flux" else DEFAULT_GUIDANCE) if asked is None else asked
    check_guidance(scale)
    return scale


def check_options(cfg: dict) -> TeacherFolder:
    """The diffusers options of a run fit its teacher folder (ValueError, one line); returns the folder."""
    folder = inspect_folder(cfg["teacher"])
    guidance_scale(folder, cfg.get("guidance_scale"))
    if cfg.get("schedule"):
        raise ValueError("--schedule: a diffusers teacher's noise levels are its scheduler's; leave --schedule out")
    shape = folder.data_shape(cfg.get("resolution"))
    if folder.flow:
        load_schedule(folder, shape)  # a time shift the resolution makes impossible
    length = max_sequence_length(folder, cfg.get("max_sequence_length"))
    if folder.latent:
        if not cfg.get("prompts"):
            raise ValueError(f"{folder.path}: {folder.model_class} is text-conditioned: pass --prompts FILE")
        check_prompt_budget(folder, len(read_prompts(cfg["prompts"])), length, cfg.get("out"))
    elif cfg.get("prompts"):
        raise ValueError(f"--prompts: the teacher {folder.model_class} in {folder.path} is not text-conditioned")
    return folder


def _device(cfg: dict) -> torch.device:
    """Where the text encoders run: the run's device."""
    return torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def prompt_embeddings(cfg: dict, folder: TeacherFolder) -> tuple[Prompts, Prompts | None]:
    """(the prompts' conditioning (P rows), the unconditional input (1 row) or None) fp32 from the run's cache;
    computed and cached when there is none, or when the prompts, the text encoders (where they are present) or what
    else decides the encoding (family, max_sequence_length, the unconditional input) are not those it was made with."""
    path = Path(cfg["out"]) / EMBEDDINGS_FILE
    prompts = read_prompts(cfg["prompts"]) if Path(cfg["prompts"]).is_file() else None
    encoder = text_encoder_sha256(folder)
    length = max_sequence_length(folder, cfg.get("max_sequence_length"))
    how = prompt_encoding(folder, length)
    if path.is_file():
        meta, tensors = read_safetensors(path, EMBEDDINGS_FORMAT, "prompt embeddings", "a prompt embeddings")
        if prompts in (None, json.loads(meta["prompts"])) and encoder in (None, meta["text_encoder_sha256"]) and \
                json.loads(meta.get("encoding", "{}")) == how:
            uncond = Prompts(tensors["uncond"], tensors.get("uncond_pooled")) if "uncond" in tensors else None
            return Prompts(tensors["cond"], tensors.get("pooled")), uncond
    if prompts is None:
        raise ValueError(f"--prompts {cfg['prompts']}: no such file, and no prompt embeddings in {path.parent}")
    cond, uncond = encode_with_unconditional(folder, prompts, length, _device(cfg))
    tensors = {"cond": cond.embeds, "pooled": cond.pooled,
               **({} if uncond is None else {"uncond": uncond.embeds, "uncond_pooled": uncond.pooled})}
    save_safetensors_atomic({k: v for k, v in tensors.items() if v is not None}, path,
                            {"format": EMBEDDINGS_FORMAT, "prompts": json.dumps(prompts),
                             "text_encoder_sha256": str(encoder), "encoding": json.dumps(how)})
    return cond, uncond


class DiffusersProblem(ImageProblem):
    """cfg: the run's options (teacher = the folder, prompts, guidance_scale, resolution, max_sequence_length,
    precision, grad_checkpoint, labels, seed, eval_samples, out = the run directory, where the prompt embeddings are
    cached)."""

    reads = "diffusers teachers (--teacher DIR: a diffusers model or pipeline folder)"
    options = frozenset({"prompts", "grad_checkpoint", "resolution", "max_sequence_length", "guidance_scale"})
    option_notes = {"guidance_scale": "text-to-image diffusers teachers (--teacher DIR: SD, SDXL, SD3, FLUX)",
                    "resolution": "latent diffusers teachers (--teacher DIR: SD, SDXL, SD3 / FLUX pipelines)",
                    "max_sequence_length": "SD3 / FLUX teachers (--teacher DIR: their pipeline folders)"}

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
    def option_defaults(cls, cfg: dict) -> dict:
        """NOISE_PREDICTION_WEIGHTINGS for an epsilon-prediction teacher; nothing for the others (v, sample,
        velocity), whose denoiser errors are bounded by the network's own."""
        return dict(NOISE_PREDICTION_WEIGHTINGS) if inspect_folder(cfg["teacher"]).prediction_type == "epsilon" else {}

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        return {"teacher_sha256": folder_sha256(cfg["teacher"]),
                **({"prompts_sha256": sha256_file(Path(cfg["prompts"]))} if cfg.get("prompts") else {})}

    @classmethod
    def from_config(cls, cfg: dict) -> "DiffusersProblem":
        folder = check_options(cfg)
        shape = folder.data_shape(cfg.get("resolution"))
        schedule = load_schedule(folder, shape)  # before the weights: a bad scheduler config fails fast
        network = load_network(folder)
        prompts = uncond = None
        if folder.latent:
            cond, uncond = prompt_embeddings(cfg, folder)
            prompts = PromptTable(*cond)
        guidance = guidance_scale(folder, cfg.get("guidance_scale"))
        net = make_denoiser(folder, network, schedule, shape, prompts, guidance)
        teacher = GuidedTeacher(net, shape, guidance, uncond, source=folder.path)
        num_classes = len(prompts) if prompts is not None else (network.config.get("num_class_embeds") or 0)
        sigma_data = 1.0 if folder.latent else 0.5  # scaled latents ~ unit variance; images in [-1, 1]
        return cls(teacher, cfg, sigma_data, num_classes, folder)

    def add_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Indices (P,) of new prompts (``emd_fast.sample --prompt``), encoded by the pipeline's text encoders and
        added to the run's prompt table."""
        if not self.folder.latent:
            raise ValueError(f"--prompt: the teacher {self.folder.model_class} is not text-conditioned")
        length = max_sequence_length(self.folder, self.cfg.get("max_sequence_length"))
        return self.teacher.net.prompts.add(encode_prompts(self.folder, prompts, length, _device(self.cfg)))

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """The fp32 network that generator and student start from (with activation checkpointing if asked). Under
        bf16 the teacher keeps a frozen bf16 copy of it instead. ``fit`` is moot."""
        net = self.teacher.to(device).net
        if self.cfg.get("grad_checkpoint"):
            net.model.enable_gradient_checkpointing()  # active only where gradients flow: generator and student
        if self.cfg["precision"] == "bf16":
            self.teacher.net = copy.deepcopy(net).to(torch.bfloat16).requires_grad_(False).eval()
        return net, {}

    @functools.cached_property
    def vae(self) -> nn.Module:
        return load_vae(self.folder).to(next(self.teacher.net.parameters()).device)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in about [-1, 1] from samples (N, *data_shape): the VAE's decoding of latents (scaled
        back as the pipelines do: x / scaling_factor + shift_factor, or x * latents_std / scaling_factor +
        latents_mean where the VAE has them), pixel samples as they are."""
        if not self.folder.latent:
            return x
        cfg, device = self.vae.config, next(self.vae.parameters()).device
        std, shift = 1.0, cfg.get("shift_factor") or 0.0
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            std, shift = (torch.tensor(v, device=device).view(-1, 1, 1) for v in (cfg.latents_std, cfg.latents_mean))
        return torch.cat([self.vae.decode(c.to(device).float() * std / cfg.scaling_factor + shift).sample.cpu()
                          for c in x.split(DECODE_CHUNK)])
