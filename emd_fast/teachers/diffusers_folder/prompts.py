"""Text conditioning: the prompts of a run encoded once by the pipeline's text encoders, as each pipeline's own
``encode_prompt`` does, and kept in a ``PromptTable`` that the networks look prompt indices up in.

Per family (what a prompt becomes; P prompts, L tokens):

    sd    embeds (P, L, E): the CLIP text encoder's last hidden state; no pooled embedding
    sdxl  embeds (P, 77, E1 + E2): both CLIPs' penultimate hidden states side by side; pooled (P, proj2): the second
          CLIP's projected text embedding. Unconditional: zeros where force_zeros_for_empty_prompt (the default)
    sd3   embeds (P, 77 + T, D): both CLIPs' penultimate states side by side, zero-padded to T5's width D, then T5's
          last hidden state (T = max_sequence_length tokens; zeros where the folder has no T5); pooled (P, p1 + p2):
          both CLIPs' projected text embeddings. Both CLIPs are padded to the first tokenizer's length
    flux  embeds (P, T, D): T5's last hidden state; pooled (P, E): the CLIP's pooled output (not projected)

Every tokenizer pads to its length with no attention mask, as the pipelines do: the padding is part of the
condition. T5 is loaded only to encode, then freed: never during training or a resume (they read the run's cache).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn import functional as F

from ...files import read_text
from .folder import TeacherFolder
from .loading import load_text_encoder

T5_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' default max_sequence_length
T5_MAX_LENGTH = 512  # the largest the pipelines accept
CHUNK = 64  # prompts encoded at a time
PROMPTS_BYTES = 4 << 20  # a --prompts file
CLIP_LENGTH = 77  # the CLIP tokenizers' length where a config does not say
OUTPUTS = {"last": "last_hidden_state", "text_embeds": "text_embeds", "pooler": "pooler_output"}  # + "penultimate"


class Prompts(NamedTuple):
    """The conditioning of P prompts: sequence embeddings (P, L, E) and pooled embeddings (P, E') or None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, index) -> "Prompts":
        return Prompts(*(None if v is None else v[index] for v in self))


class PromptTable:
    """Cached prompt conditioning (embeddings (P, L, E), pooled (P, E') or None), shared (not copied) by every
    network that looks prompts up, and copied to each device once. Not part of any state dict: a run's prompts live
    in its prompt_embeddings.safetensors."""

    def __init__(self, embeddings: torch.Tensor, pooled: torch.Tensor | None = None):
        if pooled is not None and pooled.shape[0] != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} prompt embeddings but {pooled.shape[0]} pooled embeddings")
        self.embeddings, self.pooled = embeddings, pooled
        self._on_device: dict[tuple, Prompts] = {}

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __deepcopy__(self, memo) -> "PromptTable":
        return self  # read-only: the generator and student copies share the teacher's table

    def lookup(self, index: torch.Tensor, dtype: torch.dtype) -> Prompts:
        """The conditioning of the prompt indices (N,), on their device, in ``dtype``."""
        key = (index.device, dtype)
        if key not in self._on_device:
            self._on_device[key] = Prompts(*(None if v is None else v.to(index.device, dtype)
                                             for v in (self.embeddings, self.pooled)))
        return self._on_device[key].rows(index)

    def add(self, prompts: Prompts) -> torch.Tensor:
        """Append the conditioning of new prompts (``emd_fast.sample --prompt``); returns their indices (P,)."""
        start = len(self)
        self.embeddings = torch.cat([self.embeddings, prompts.embeds])
        self.pooled = None if self.pooled is None else torch.cat([self.pooled, prompts.pooled])
        self._on_device.clear()
        return torch.arange(start, len(self))


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); ValueError if there are none."""
    lines = read_text(path, "--prompts", PROMPTS_BYTES).splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def check_prompt_budget(folder: TeacherFolder, n: int, length: int | None, out) -> None:
    """ValueError unless the conditioning of ``n`` prompts (at most n x L x E fp32 from the text encoders' configs:
    L tokens, E wide; ``length``: the T5 length) fits in a quarter of the machine's memory and on the disk of the run
    directory ``out``: it is computed before training, held in memory and cached there."""
    counts, widths = [], [folder.model_config.get("joint_attention_dim") or 1]
    for text in folder.text_encoders:
        t5 = text.cls == "T5EncoderModel"
        width = text.config.get("d_model" if t5 else "hidden_size", 4096 if t5 else 768)
        count = (length or T5_MAX_LENGTH) if t5 else text.config.get("max_position_embeddings", CLIP_LENGTH)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, count)):
            raise ValueError(f"{text.encoder}/config.json: the width {width!r} and length {count!r} of its embeddings "
                             f"must be positive integers")
        counts.append(count)
        widths.append(width)
    if folder.family == "sdxl":  # the two CLIPs side by side in width
        tokens, width = max(counts), sum(widths[1:])
    else:
        tokens, width = sum(counts) or 1, max(widths)
    need = n * tokens * width * 4
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    where = Path(out) if out else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > memory / 4 or need > free:
        room = "a quarter of this machine's memory" if need > memory / 4 else f"the free disk of {where}"
        raise ValueError(f"--prompts: {n} prompts make {need / 2**30:.1f} GiB of text embeddings ({tokens} x "
                         f"{width} fp32 each), more than {room} ({min(memory / 4, free) / 2**30:.1f} GiB): use fewer "
                         f"prompts")


def max_sequence_length(folder: TeacherFolder, asked: int | None) -> int | None:
    """The T5 length of a SD3 / FLUX folder's prompts (``asked``, else the pipeline's default); None for CLIP-only
    families, which take none. ValueError (one line) for a length the pipelines refuse."""
    if folder.family not in T5_LENGTH:
        if asked is not None:
            raise ValueError(f"--max-sequence-length: the {folder.model_class} in {folder.path} takes CLIP "
                             f"embeddings only (the tokenizers' own length)")
        return None
    length = T5_LENGTH[folder.family] if asked is None else asked
    if not 1 <= length <= T5_MAX_LENGTH:
        raise ValueError(f"--max-sequence-length must lie in [1, {T5_MAX_LENGTH}], got {length}")
    return length


def prompt_encoding(folder: TeacherFolder, length: int | None) -> dict:
    """What, besides the prompts and the text encoders' files, decides the cached conditioning."""
    if folder.family == "sd":
        return {}
    return {"family": folder.family, "max_sequence_length": length,
            "unconditional": None if folder.family == "flux" else
            "zeros" if folder.force_zeros_for_empty_prompt else "empty prompt"}


def _tokens(tokenizer, prompts: list[str], length: int, device, mask: bool) -> dict[str, torch.Tensor]:
    """The encoder's inputs: input_ids (P, length), and the attention_mask where ``mask``."""
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return {key: tokens[key].to(device) for key in ("input_ids", "attention_mask")[:1 + mask]}


def _run(folder: TeacherFolder, key: str, prompts: list[str], device, length=None,
         outputs=()) -> tuple[int, list[torch.Tensor]]:
    """Encode ``prompts`` with the text encoder ``key`` (loaded now, freed after), CHUNK at a time: (the token
    length, the tensors ``outputs`` names, each (P, ...) fp32 on the CPU). ``length``: default the CLIP tokenizer's
    own, bounded by the encoder's positions. Outputs: "last" (last hidden state), "penultimate" (hidden_states[-2]),
    "text_embeds" (projection), "pooler" (pooled output)."""
    text = next(t for t in folder.text_encoders if t.key == key)
    tokenizer, encoder = load_text_encoder(folder, text, device)
    if length is None:  # a tokenizer_config.json without model_max_length gives a huge one: the positions bound it
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    # StableDiffusionPipeline passes the padding mask where the encoder's config asks for it; the other pipelines never
    mask = folder.family == "sd" and bool(getattr(encoder.config, "use_attention_mask", False))
    found = {name: [] for name in outputs}
    for i in range(0, len(prompts), CHUNK):
        out = encoder(**_tokens(tokenizer, prompts[i:i + CHUNK], length, device, mask),
                      output_hidden_states="penultimate" in outputs)
        for name in outputs:
            value = out.hidden_states[-2] if name == "penultimate" else getattr(out, OUTPUTS[name])
            found[name].append(value.float().cpu())
    return length, [torch.cat(found[name]) for name in outputs]


@torch.no_grad()
def encode_prompts(folder: TeacherFolder, prompts: list[str], length: int | None = None, device="cpu") -> Prompts:
    """The conditioning of ``prompts`` (fp32, on the CPU) as the family's pipeline computes it (module docstring);
    ``length``: SD3 / FLUX's max_sequence_length (default the pipeline's)."""
    length = max_sequence_length(folder, length)
    if folder.family == "sd":
        return Prompts(*_run(folder, "text_encoder", prompts, device, outputs=("last",))[1])
    if folder.family == "sdxl":
        _, (first,) = _run(folder, "text_encoder", prompts, device, outputs=("penultimate",))
        _, (second, pooled) = _run(folder, "text_encoder_2", prompts, device, outputs=("penultimate", "text_embeds"))
        return Prompts(torch.cat([first, second], dim=-1), pooled)
    if folder.family == "flux":
        _, (pooled,) = _run(folder, "text_encoder", prompts, device, outputs=("pooler",))
        _, (t5,) = _run(folder, "text_encoder_2", prompts, device, length, outputs=("last",))
        return Prompts(t5, pooled)
    # sd3: both CLIPs padded to the first tokenizer's length (the pipeline's tokenizer_max_length)
    clip_length, (first, pooled1) = _run(folder, "text_encoder", prompts, device, None, ("penultimate", "text_embeds"))
    _, (second, pooled2) = _run(folder, "text_encoder_2", prompts, device, clip_length, ("penultimate", "text_embeds"))
    width = folder.model_config["joint_attention_dim"]
    if folder.text_encoders[2].encoder is None:  # no T5 in the folder: zeros in its place, as the pipeline does
        t5 = torch.zeros(len(prompts), length, width)
    else:
        _, (t5,) = _run(folder, "text_encoder_3", prompts, device, length, outputs=("last",))
    clip = F.pad(torch.cat([first, second], dim=-1), (0, width - first.shape[-1] - second.shape[-1]))
    return Prompts(torch.cat([clip, t5], dim=-2), torch.cat([pooled1, pooled2], dim=-1))


def encode_with_unconditional(folder: TeacherFolder, prompts: list[str], length: int | None = None,
                              device="cpu") -> tuple[Prompts, Prompts | None]:
    """(the prompts' conditioning, the unconditional input of classifier-free guidance (1 row) or None for FLUX,
    which is not guided that way): the empty prompt's encoding, or zeros for SDXL's force_zeros_for_empty_prompt."""
    if folder.family == "flux":
        return encode_prompts(folder, prompts, length, device), None
    both = encode_prompts(folder, prompts + [""], length, device)
    cond, uncond = both.rows(slice(0, -1)), both.rows(slice(-1, None))
    if folder.force_zeros_for_empty_prompt:
        uncond = Prompts(*(torch.zeros_like(v) for v in uncond))
    return cond, uncond
