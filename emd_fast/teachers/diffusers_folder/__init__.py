"""Teachers from Hugging Face ``diffusers`` folders: pixel UNets (``UNet2DModel``), Stable Diffusion 1.x/2.x and SDXL
UNets, and the flow-matching transformers of SD3 / SD3.5 and FLUX.1 (docs/teachers.md).

What the EMD iteration sees is this project's denoiser ``D(x_t, t, y) ~ E[x | x_t]`` and a ``Schedule``:

    folder      which family a folder holds, its parts and every refusal, from its JSON files alone
    schedules   the scheduler's noise levels: DiscreteSchedule (DDPM family), FlowMatching with the folder's shift
    prompts     text conditioning as each pipeline encodes it, cached per run (PromptTable)
    denoisers   D per family from the network's prediction, and GuidedTeacher (classifier-free guidance)
    loading     diffusers / transformers models read from disk (never downloaded)

Folders are read with ``local_files_only``: nothing is downloaded. ``inspect_folder`` checks a folder from its JSON
files (one-line ``ValueError`` naming what is missing or unsupported) before any weights are read; diffusers and
transformers are imported only when weights are loaded (``pip install -e ".[diffusers]"``).
"""
from __future__ import annotations

from .denoisers import (
    DEFAULT_GUIDANCE,
    FLUX_GUIDANCE,
    DiffusersDenoiser,
    FluxDenoiser,
    GuidedTeacher,
    SD3Denoiser,
    check_guidance,
    make_denoiser,
)
from .folder import (
    TeacherFolder,
    check_model_files,
    check_not_a_folders_file,
    folder_sha256,
    inspect_folder,
    is_diffusers_folder,
    text_encoder_sha256,
    weight_files,
)
from .loading import load_network, load_text_encoder, load_vae
from .prompts import (
    Prompts,
    PromptTable,
    check_prompt_budget,
    encode_prompts,
    encode_with_unconditional,
    max_sequence_length,
    prompt_encoding,
    read_prompts,
)
from .schedules import DiscreteSchedule, load_schedule, noise_scheduler

__all__ = ["check_guidance", "check_model_files", "check_not_a_folders_file", "check_prompt_budget",
           "DEFAULT_GUIDANCE", "DiffusersDenoiser", "DiscreteSchedule", "encode_prompts",
           "encode_with_unconditional", "FLUX_GUIDANCE", "FluxDenoiser", "folder_sha256", "GuidedTeacher",
           "inspect_folder", "is_diffusers_folder", "load_network", "load_schedule", "load_text_encoder", "load_vae",
           "make_denoiser", "max_sequence_length", "noise_scheduler", "prompt_encoding", "Prompts", "PromptTable",
           "read_prompts", "SD3Denoiser", "TeacherFolder", "text_encoder_sha256", "weight_files"]
