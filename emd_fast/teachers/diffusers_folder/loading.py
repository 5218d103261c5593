"""Loading a folder's models with diffusers / transformers: from disk only (``local_files_only``), in fp32, eval mode,
with the variant its weights are saved in; a broken file is a one-line ``ValueError``. diffusers and transformers
are imported here, when weights are loaded (``pip install -e ".[diffusers]"``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import out_of_memory
from ...optional import require
from .folder import TEXT_STEMS, TOKENIZERS, WEIGHT_STEM, TeacherFolder, TextEncoder, weight_files

MODELS = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel", "AutoencoderKL",
          "DDPMScheduler")


def diffusers_module():
    diffusers = require("diffusers", "diffusers teachers", names=MODELS)
    diffusers.utils.logging.disable_progress_bar()  # a bar per sharded weight file read; the run has its own
    return diffusers


def transformers_module(classes: tuple[str, ...]):
    transformers = require("transformers", "text-to-image diffusers teachers", names=(*TOKENIZERS, *classes))
    transformers.utils.logging.disable_progress_bar()  # a bar per weight file read; the run has its own
    return transformers


def first_lines(e: Exception) -> str:
    """The first line of a loading error (and the next where the first only announces a list)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def load_model(cls, directory: Path, what: str, stems=(WEIGHT_STEM,)) -> nn.Module:
    """``cls.from_pretrained`` of a model folder in fp32, eval mode, from disk only, with the variant of its weights;
    ValueError (one line) for a broken file."""
    variant, files = weight_files(directory, stems)
    try:  # use_safetensors: no error logged for the .safetensors file a .bin-only folder lacks
        return cls.from_pretrained(directory, local_files_only=True, torch_dtype=torch.float32, variant=variant,
                                   use_safetensors=".safetensors" in files[0].name, low_cpu_mem_usage=False).eval()
    except Exception as e:  # noqa: BLE001 - a config or weight file no model is built from (0 groups, a hostile
        if out_of_memory(e):  # .bin, ...) is the folder's problem, said in one line; running out of memory is not
            raise
        raise ValueError(f"{directory}: cannot load {what}: {first_lines(e)}") from None


def load_network(folder: TeacherFolder) -> nn.Module:
    """The denoising network (UNet or transformer) in fp32, eval mode."""
    return load_model(getattr(diffusers_module(), folder.model_class), folder.model, folder.model_class)


def load_vae(folder: TeacherFolder) -> nn.Module:
    return load_model(diffusers_module().AutoencoderKL, folder.vae, "the VAE").requires_grad_(False)


def load_text_encoder(folder: TeacherFolder, text: TextEncoder, device) -> tuple[object, nn.Module]:
    """(tokenizer, text encoder on ``device``) of one of the pipeline's text encoders."""
    if not text.present:
        raise ValueError(f"{folder.path}: no {text.key}/ or {text.key.replace('text_encoder', 'tokenizer')}/ in the "
                         f"pipeline folder: prompts cannot be encoded")
    transformers = transformers_module((text.cls,))
    # the class the pipeline loads (model_index.json), never Auto*: an auto_map would name code in the folder to run
    name = text.tokenizer_cls or ("T5TokenizerFast" if text.cls == "T5EncoderModel" else "CLIPTokenizer")
    if name not in TOKENIZERS:
        raise ValueError(f"{text.tokenizer}: a {name}: not supported (emd_fast reads {', '.join(TOKENIZERS)})")
    try:
        tokenizer = getattr(transformers, name).from_pretrained(text.tokenizer, local_files_only=True,
                                                                trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever a broken or hostile tokenizer folder makes transformers raise
        raise ValueError(f"{text.tokenizer}: cannot load the tokenizer: {first_lines(e)}") from None
    encoder = load_model(getattr(transformers, text.cls), text.encoder, "the text encoder", TEXT_STEMS)
    return tokenizer, encoder.requires_grad_(False).to(device)
