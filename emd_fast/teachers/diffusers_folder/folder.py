"""A diffusers folder read from its JSON files alone: which teacher family it holds, where its parts are, and a one-line
``ValueError`` for anything missing, inconsistent or unsupported — before any weights are read.

Families (``TeacherFolder.family``):

    pixel  UNet2DModel (a model folder, or a pipeline such as DDPMPipeline)
    sd     UNet2DConditionModel + AutoencoderKL + a CLIP text encoder (Stable Diffusion 1.x / 2.x style)
    sdxl   StableDiffusionXLPipeline: a UNet with addition_embed_type "text_time", two CLIP text encoders
    sd3    StableDiffusion3Pipeline: SD3Transformer2DModel (SD3, SD3.5), two CLIPs with projections and T5 (optional)
    flux   FluxPipeline: FluxTransformer2DModel (FLUX.1 dev with its guidance embedding, schnell without), CLIP + T5

Refused by name: video pipelines, ControlNet / T2I-Adapter / image-conditioned pipelines, IP-adapter image encoders,
transformer classes other than the two above, flow-matching schedulers other than FlowMatchEulerDiscreteScheduler
and its ``invert_sigmas`` option, and the UNet variants that need inputs emd_fast does not give (class labels, image
embeddings, LCM's guidance embedding, the SDXL refiner's aesthetic score, inpainting channels).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import FileRefused
from ...files import JSON_BYTES, check_size, describe, read_json, sha256_file

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")  # DDPMScheduler's
PIXEL_UNETS = ("UNet2DModel",)
LATENT_UNETS = ("UNet2DConditionModel",)
# transformer class -> (family, the pipeline class it is read in)
TRANSFORMERS = {"SD3Transformer2DModel": ("sd3", "StableDiffusion3Pipeline"),
                "FluxTransformer2DModel": ("flux", "FluxPipeline")}
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# schedulers whose training noise is DDPM's: alphas_cumprod from the betas (num_train_timesteps, beta_start, beta_end,
# beta_schedule, trained_betas, rescale_betas_zero_snr) and the UNet called at the integer timestep; what they do
# differently (timestep spacing, sigmas, solver order, clipping, thresholding) is sampling only, unused here
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
              "DPMSolverSDEScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
              "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
              "DEISMultistepScheduler", "SASolverScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")
# the flow-matching scheduler whose noise levels are read (shift, dynamic shifting); its other options (karras /
# exponential / beta sigmas, shift_terminal, stochastic_sampling) change the sampler's spacing or steps only
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# its defaults (its __init__'s) for the options read here: loading a scheduler fills them into its config, and that
# config is what the pipelines read, so their own fallbacks (StableDiffusion3Pipeline's max_shift 1.16) never apply
FLOW_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                 "time_shift_type": "exponential"}
TIME_SHIFT_TYPES = ("exponential", "linear")
WEIGHT_STEM = "diffusion_pytorch_model"  # diffusers' weight file names
TEXT_STEMS = ("model", "pytorch_model")  # transformers' (text encoders)
# tokenizers by concrete class (never Auto*: a config's auto_map would name code in the folder to run)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
MAX_TIMESTEPS = 100_000  # a scheduler's num_train_timesteps (Stable Diffusion's: 1000)
# pipelines refused by their class name, checked in this order: (words in the name, why)
REFUSED_PIPELINES = (
    (("Video", "AnimateDiff", "Mochi", "Wan", "LTX", "Latte", "Allegro", "CogVideoX", "SkyReels", "Cosmos"),
     "is a video pipeline: emd_fast distils image models"),
    (("ControlNet", "Adapter"), "needs control images (ControlNet / T2I-Adapter): emd_fast distils text-to-image"),
    (("Inpaint", "Fill", "Kontext", "Redux", "Control", "Depth", "Upscale", "InstructPix2Pix"),
     "conditions on input images: emd_fast distils text-to-image"),
)
# model_index.json components that add inputs the denoiser would need
REFUSED_COMPONENTS = {"controlnet": "ControlNet control images", "adapter": "T2I-Adapter control images",
                      "image_encoder": "IP-adapter image inputs"}
# text encoders of each text-to-image pipeline family: (model_index key, tokenizer key, class); SD3's T5 may be null
TEXT_ENCODERS = {
    "sd": (("text_encoder", "tokenizer", "CLIPTextModel"),),
    "sdxl": (("text_encoder", "tokenizer", "CLIPTextModel"),
             ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")),
    "sd3": (("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
            ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
            ("text_encoder_3", "tokenizer_3", "T5EncoderModel")),
    "flux": (("text_encoder", "tokenizer", "CLIPTextModel"), ("text_encoder_2", "tokenizer_2", "T5EncoderModel")),
}
OPTIONAL_TEXT_ENCODERS = ("text_encoder_3",)  # SD3 without T5: the pipeline feeds zeros in its place
FLUX_DEFAULT_LATENT = 128  # FluxPipeline.default_sample_size: 1024 px with its 8x VAE


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its folder and its tokenizer's (None where absent: moved away after the run
    cached its prompts, or SD3's optional T5), its transformers class and its config (empty where absent), and the
    tokenizer's class as model_index.json names it (what the pipeline loads; None where it names none)."""

    key: str
    encoder: Path | None
    tokenizer: Path | None
    cls: str
    config: dict = field(default_factory=dict)
    tokenizer_cls: str | None = None

    @property
    def present(self) -> bool:
        return all(part is not None and part.is_dir() for part in (self.encoder, self.tokenizer))


@dataclass(frozen=True)
class TeacherFolder:
    """What ``inspect_folder`` found: the family (see the module docstring), the denoising model's folder, class and
    config, the scheduler's folder and config, and a pipeline's VAE and text encoders (None / () where absent)."""

    path: Path
    family: str
    model: Path
    model_class: str
    model_config: dict
    scheduler: Path
    scheduler_config: dict
    vae: Path | None = None
    vae_config: dict | None = None
    text_encoders: tuple[TextEncoder, ...] = ()
    force_zeros_for_empty_prompt: bool = False  # SDXL: the unconditional input is zeros, not the empty prompt's

    @property
    def unet(self) -> Path:
        """The denoising model's folder (named for the UNets it held first)."""
        return self.model

    @property
    def latent(self) -> bool:
        """Text-to-image in a VAE's latent space (every family but pixel UNets)."""
        return self.family != "pixel"

    @property
    def flow(self) -> bool:
        """A flow-matching (velocity-predicting) transformer."""
        return self.family in ("sd3", "flux")

    @property
    def guidance_embedded(self) -> bool:
        """FLUX.1-dev: guidance is an input of the network (one call), not classifier-free."""
        return self.family == "flux" and bool(self.model_config.get("guidance_embeds"))

    @property
    def prediction_type(self) -> str:
        return "velocity" if self.flow else self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each axis: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.vae_config.get("block_out_channels", (64,))) - 1)

    @property
    def patch(self) -> int:
        """Latent pixels per transformer token along each axis: SD3's patch_size, FLUX's packing (2), 1 for UNets."""
        return {"sd3": int(self.model_config.get("patch_size", 2)), "flux": 2}.get(self.family, 1)

    def data_shape(self, resolution=None) -> tuple[int, int, int]:
        """(C, H, W) of the samples: a pixel UNet's sample_size; a latent model's latents for images of
        ``resolution`` pixels (an int or (height, width); default: the pipeline's). ValueError (one line) for a
        resolution the model cannot take."""
        cfg = self.model_config
        if not self.latent:
            if resolution is not None:
                raise ValueError(f"--resolution: the pixel UNet in {self.model} makes samples of its sample_size")
            return (cfg.get("in_channels", 3), *_pair(cfg["sample_size"]))
        channels = self.vae_config.get("latent_channels", 4)
        if resolution is None:
            latent = _pair(cfg["sample_size"] if self.family != "flux" else FLUX_DEFAULT_LATENT)
            return (channels, *latent)
        pixels, step = _pair(resolution), self.vae_scale * self.patch
        if len(pixels) != 2 or not all(p > 0 and p % step == 0 for p in pixels):
            raise ValueError(f"--resolution {resolution}: the {self.model_class} in {self.path} takes images whose "
                             f"height and width are positive multiples of {step} pixels (VAE factor {self.vae_scale}"
                             f"{f' x patch {self.patch}' if self.patch > 1 else ''})")
        latent = tuple(p // self.vae_scale for p in pixels)
        limit = cfg.get("pos_embed_max_size") if self.family == "sd3" else None
        if limit is not None and max(latent) // self.patch > limit:
            raise ValueError(f"--resolution {resolution}: at most {limit * step} pixels a side for this SD3 "
                             f"transformer (pos_embed_max_size {limit})")
        return (channels, *latent)

    def image_tokens(self, shape) -> int:
        """The number of image tokens a transformer sees for latents of ``shape`` (C, H, W): what the pipelines'
        resolution-dependent time shift (mu) is computed from."""
        return (shape[1] // self.patch) * (shape[2] // self.patch)


def _pair(size) -> tuple[int, ...]:
    """(height, width) of a size given as one number or [number] (square) or [height, width]."""
    size = [size] if isinstance(size, int) else list(size)
    return tuple(size * 2 if len(size) == 1 else size)


def read_folder_json(path: Path, what: str) -> dict:
    if not os.path.lexists(path):
        raise ValueError(f"{path.parent}: incomplete diffusers folder, no {path.name} ({what})")
    data = read_json(path, what)  # a regular file, capped: a link to /dev/zero or a FIFO is refused
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a {what}")
    return data


def weight_files(directory: Path, stems=(WEIGHT_STEM,)) -> tuple[str | None, list[Path]]:
    """(variant, files) of the weights from_pretrained reads in a model folder: ``stem``.safetensors (else .bin), or
    a sharded checkpoint (its index .json and the shards it lists). The plain files where there are any, else those
    of the folder's one variant (``stem``.fp16.safetensors: variant 'fp16'). ValueError (one line) where there are
    none, or only several variants."""
    names = {f.name for f in directory.iterdir()}
    pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, stems))})(?:\.(\w+)\.(?:safetensors|bin)|"
                         rf"\.(?:safetensors|bin)\.index\.(\w+)\.json)$")
    variants = sorted({m.group(1) or m.group(2) for m in map(pattern.match, names) if m})
    for variant in [None] + (variants if len(variants) == 1 else []):
        infix = f".{variant}" if variant else ""
        for stem in stems:
            for fmt in ("safetensors", "bin"):
                if f"{stem}{infix}.{fmt}" in names:
                    return variant, [directory / f"{stem}{infix}.{fmt}"]
                index = directory / f"{stem}.{fmt}.index{infix}.json"
                if index.name in names:
                    shards = sorted(set(read_folder_json(index, "weight index").get("weight_map", {}).values()))
                    missing = [name for name in shards if name not in names]
                    if missing or not shards:
                        raise ValueError(f"{index}: incomplete sharded weights, missing {missing or 'the weight_map'}")
                    return variant, [index, *(directory / name for name in shards)]
    if len(variants) > 1:
        raise ValueError(f"{directory}: weights in several variants ({', '.join(variants)}) and none plain: keep one")
    raise ValueError(f"{directory}: incomplete diffusers folder, no weights "
                     f"({' or '.join(f'{stem}.safetensors / .bin' for stem in stems)})")


def check_model_files(directory: Path) -> None:
    """FileRefused unless every entry of a model folder is a regular file or a folder (links to them are fine: the
    Hugging Face cache is made of links), its JSON and text files no larger than JSON_BYTES: diffusers and
    transformers read them all, and a FIFO or a link to /dev/zero would block or fill memory there."""
    for entry in directory.iterdir():
        kind = describe(entry)
        if kind.endswith(("a regular file", "a directory")):
            if entry.suffix in (".json", ".txt", ".model") and kind.endswith("file"):
                check_size(entry, "diffusers folder file", JSON_BYTES)
            continue
        raise FileRefused(f"{entry}: {kind}, not a regular file: diffusers and transformers would read it")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def check_model_config(directory: Path, cfg: dict) -> None:
    """ValueError (one line) for a model config diffusers would build something unusable from: quantized weights,
    sizes or counts that are not positive integers."""
    if cfg.get("quantization_config") is not None:
        raise ValueError(f"{directory}: a quantized model (quantization_config): emd_fast distills from "
                         f"full-precision weights")
    bad = [k for k in ("layers_per_block", "norm_num_groups", "in_channels", "out_channels", "num_layers",
                       "num_single_layers", "num_attention_heads", "attention_head_dim", "patch_size")
           if k in cfg and cfg[k] is not None and not _positive_int(cfg[k]) and not isinstance(cfg[k], list)]
    if bad:
        raise ValueError(f"{directory}/config.json: {bad[0]} {cfg[bad[0]]!r}: must be a positive integer")


def is_diffusers_folder(path) -> bool:
    """True if ``path`` is a directory with a diffusers pipeline or model config (model_index.json / config.json)."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())


def check_not_a_folders_file(path) -> None:
    """ValueError (one line) where a --teacher file is one of a diffusers folder's own files (its config or weights):
    the folder is the teacher."""
    p = Path(path)
    if p.is_file() and (p.name.endswith("config.json") or p.name == "model_index.json"
                        or p.name.startswith(WEIGHT_STEM)):
        folder = p.parent.parent if (p.parent.parent / "model_index.json").is_file() else p.parent
        if is_diffusers_folder(folder):
            raise ValueError(f"--teacher {p}: a file of the diffusers folder {folder}: give the folder, "
                             f"--teacher {folder}")


# --- inspection --------------------------------------------------------------------------------------------------

def _entry(index: dict, key: str) -> str | None:
    """The class of a model_index.json component, None where it is absent or [null, null]."""
    entry = index.get(key)
    return entry[-1] if isinstance(entry, list) and entry and entry[-1] is not None else None


def _check_pipeline_class(root: Path, index: dict) -> str:
    """The pipeline's class name, refused (ValueError) where its name or components say it needs more than text."""
    cls = str(index.get("_class_name"))
    for words, why in REFUSED_PIPELINES:
        if any(word in cls for word in words):
            raise ValueError(f"{root}: pipeline {cls} {why}")
    for key, what in REFUSED_COMPONENTS.items():
        if _entry(index, key) is not None:
            raise ValueError(f"{root}: model_index.json has a {key} ({_entry(index, key)}): {what} are not supported")
    return cls


def _text_encoders(root: Path, index: dict, family: str, pipeline: str) -> tuple[TextEncoder, ...]:
    """The family's text encoders from model_index.json, their classes checked; a config is read where the folder
    is present (a run that cached its prompts may have moved the encoders away)."""
    found = []
    for key, tok_key, want in TEXT_ENCODERS.get(family, ()):
        cls = _entry(index, key)
        if cls is None and (key in OPTIONAL_TEXT_ENCODERS or family == "sd"):  # sd: needed only to encode prompts
            found.append(TextEncoder(key, None, None, want))
            continue
        if cls is None:
            raise ValueError(f"{root}: {pipeline} without {key} ({want}): a refiner or image-to-image folder?")
        if cls != want:  # only the pipeline's own class: an Auto* class would follow the folder's auto_map to its code
            raise ValueError(f"{root}: {key} is {cls}, not the {want} of {pipeline}")
        encoder = root / key
        config = read_folder_json(encoder / "config.json", f"{key} config") if encoder.is_dir() else {}
        tokenizer_cls = _entry(index, tok_key)
        if tokenizer_cls is not None and tokenizer_cls not in TOKENIZERS:  # never Auto*: no code named by the folder
            raise ValueError(f"{root}: {tok_key} is a {tokenizer_cls}: not supported (emd_fast reads "
                             f"{', '.join(TOKENIZERS)})")
        found.append(TextEncoder(key, encoder, root / tok_key if tokenizer_cls else None, cls, config, tokenizer_cls))
    return tuple(found)


def _family(model_dir: Path, model_class: str, model_cfg: dict, pipeline: str | None) -> str:
    """The family of a denoising model (in a pipeline of class ``pipeline``, None for a model folder)."""
    if model_class in TRANSFORMERS:
        family, wanted = TRANSFORMERS[model_class]
        if pipeline is None:
            raise ValueError(f"{model_dir}: a {model_class} needs its pipeline (VAE, text encoders): give the "
                             f"{wanted} folder with model_index.json")
        if pipeline != wanted:
            raise ValueError(f"{model_dir}: {model_class} in a {pipeline}: emd_fast reads it in a {wanted} folder")
        return family
    if model_class in PIXEL_UNETS:
        return "pixel"
    if model_class in LATENT_UNETS:
        sdxl = model_cfg.get("addition_embed_type") == "text_time"
        if pipeline == SDXL_PIPELINE and not sdxl:
            raise ValueError(f"{model_dir}: a {model_class} without addition_embed_type 'text_time' in a "
                             f"{SDXL_PIPELINE}: not an SDXL UNet")
        return "sdxl" if sdxl and pipeline == SDXL_PIPELINE else "sd"
    supported = ", ".join([*PIXEL_UNETS, *LATENT_UNETS, *TRANSFORMERS])
    raise ValueError(f"{model_dir}: model class {model_class!r} is not supported; emd_fast distills {supported}")


def _check_unet(model_dir: Path, cfg: dict, family: str, vae_cfg: dict | None) -> None:
    """The UNet takes what emd_fast gives: a sample size, no class labels or image embeddings, discrete timesteps,
    no added conditions but SDXL's, channels that fit the VAE (latent) or an image (pixel)."""
    unet_class = cfg["_class_name"]
    size = cfg.get("sample_size")
    if not (_positive_int(size) or (isinstance(size, list) and len(size) == 2 and all(map(_positive_int, size)))):
        raise ValueError(f"{model_dir}: sample_size {size!r} in config.json: need the UNet's input size (an int or "
                         f"[height, width])")
    if cfg.get("class_embed_type") is not None or (family != "pixel" and cfg.get("num_class_embeds")):
        key = "class_embed_type" if cfg.get("class_embed_type") is not None else "num_class_embeds"
        raise ValueError(f"{model_dir}: {unet_class} with {key} {cfg[key]!r} needs class labels of a kind "
                         f"emd_fast does not give: it conditions UNet2DModel on num_class_embeds labels and "
                         f"UNet2DConditionModel on text only")
    if cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ValueError(f"{model_dir}: encoder_hid_dim_type {cfg['encoder_hid_dim_type']!r} needs image "
                         f"embeddings; emd_fast supports text embeddings only")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{model_dir}: time_embedding_type {cfg['time_embedding_type']!r} is not supported "
                         f"(only discrete-timestep UNets: 'positional')")
    for key in ("addition_embed_type", "time_cond_proj_dim") if family != "pixel" else ():
        if cfg.get(key) is not None and not (family == "sdxl" and key == "addition_embed_type"):
            raise ValueError(f"{model_dir}: {unet_class} with {key} {cfg[key]!r} needs extra conditioning "
                             f"inputs; emd_fast supports text embeddings only (Stable Diffusion 1.x/2.x style) and "
                             f"SDXL's text_time conditions in a {SDXL_PIPELINE} folder")
    channels = cfg.get("in_channels", 4 if family != "pixel" else 3)
    if family != "pixel" and channels != vae_cfg.get("latent_channels", 4):
        raise ValueError(f"{model_dir}: in_channels {channels} differs from the VAE's latent_channels "
                         f"{vae_cfg.get('latent_channels', 4)} (an inpainting or image-conditioned UNet?): not "
                         f"supported")
    if family == "pixel" and channels not in (1, 3):  # e.g. LDM's UNet2DModel in a VQ-VAE's latent space
        raise ValueError(f"{model_dir}: {unet_class} with in_channels {channels}: a pixel UNet's samples are images "
                         f"of 1 or 3 channels (latent UNet2DModels, with a VQ-VAE, are not supported)")
    if cfg.get("out_channels", channels) not in (channels, 2 * channels):  # 2x: a learned variance besides
        raise ValueError(f"{model_dir}: out_channels {cfg['out_channels']} differs from in_channels "
                         f"{channels}: not a denoising UNet emd_fast can read")


def _check_text_widths(model_dir: Path, cfg: dict, family: str, texts: tuple[TextEncoder, ...]) -> None:
    """The text encoders' widths are those the denoiser takes (where their configs are present): a text encoder of
    another model, or a refiner's UNet, is caught here."""
    c = [t.config for t in texts]
    if family == "sd" and c[0].get("hidden_size") is not None:
        wanted = cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim", 1280)
        if set(wanted if isinstance(wanted, list) else [wanted]) != {c[0]["hidden_size"]}:
            raise ValueError(f"{texts[0].encoder}: the text encoder's hidden_size {c[0]['hidden_size']} is not the "
                             f"width of the text embeddings the UNet takes ({wanted}): a text encoder of another "
                             f"model?")
    if family == "sd" or not (c[0] and c[1]):  # the encoders moved away after the run cached its prompts
        return
    checks = []
    if family == "sdxl":
        time_ids = (cfg.get("projection_class_embeddings_input_dim", 0) - c[1].get("projection_dim", 0)) / \
            max(cfg.get("addition_time_embed_dim") or 1, 1)
        checks += [("projection_class_embeddings_input_dim", cfg.get("projection_class_embeddings_input_dim"),
                    6 * (cfg.get("addition_time_embed_dim") or 0) + c[1].get("projection_dim", 0),
                    f"6 time ids x addition_time_embed_dim + text_encoder_2's projection_dim (found {time_ids:g} time "
                    f"ids: the refiner's 5 include an aesthetic score)"),
                   ("cross_attention_dim", cfg.get("cross_attention_dim"),
                    c[0].get("hidden_size", 0) + c[1].get("hidden_size", 0), "the two CLIP widths")]
    elif family == "sd3":
        checks += [("pooled_projection_dim", cfg.get("pooled_projection_dim"),
                    c[0].get("projection_dim", 0) + c[1].get("projection_dim", 0), "the two CLIP projections")]
        if c[2]:
            checks += [("joint_attention_dim", cfg.get("joint_attention_dim"), c[2].get("d_model"), "T5's d_model")]
        if c[0].get("hidden_size", 0) + c[1].get("hidden_size", 0) > cfg.get("joint_attention_dim", 0):
            raise ValueError(f"{model_dir}: the CLIP widths {c[0].get('hidden_size')} + {c[1].get('hidden_size')} "
                             f"exceed joint_attention_dim {cfg.get('joint_attention_dim')}")
    elif family == "flux":
        checks += [("pooled_projection_dim", cfg.get("pooled_projection_dim"), c[0].get("hidden_size"),
                    "the CLIP's hidden_size (its pooled output)"),
                   ("joint_attention_dim", cfg.get("joint_attention_dim"), c[1].get("d_model"), "T5's d_model")]
    for key, have, want, what in checks:
        if have != want:
            raise ValueError(f"{model_dir}: {key} {have} is not {what} ({want}): text encoders of another model?")


def _check_transformer(model_dir: Path, cfg: dict, family: str, vae_cfg: dict) -> None:
    latent = vae_cfg.get("latent_channels", 4)
    if family == "sd3":
        if cfg.get("in_channels") != latent or cfg.get("out_channels") not in (None, latent):
            raise ValueError(f"{model_dir}: in/out_channels {cfg.get('in_channels')}/{cfg.get('out_channels')} differ "
                             f"from the VAE's latent_channels {latent} (an image-conditioned transformer?)")
        if not _positive_int(cfg.get("sample_size")):
            raise ValueError(f"{model_dir}: sample_size {cfg.get('sample_size')!r} in config.json: need the latent "
                             f"size the transformer was trained at (an int)")
        if cfg.get("caption_projection_dim") != cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0):
            raise ValueError(f"{model_dir}: caption_projection_dim {cfg.get('caption_projection_dim')} is not "
                             f"num_attention_heads x attention_head_dim: not an SD3 transformer diffusers builds")
    else:
        if cfg.get("in_channels") != 4 * latent or cfg.get("out_channels") not in (None, 4 * latent):
            raise ValueError(f"{model_dir}: in_channels {cfg.get('in_channels')} is not 4 x the VAE's latent_channels "
                             f"{latent} (FLUX Fill / Control / Kontext transformers take extra image channels)")
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"{model_dir}: patch_size {cfg.get('patch_size')}: FluxPipeline packs 2x2 latent "
                             f"patches itself (patch_size 1)")


def _check_discrete_scheduler(directory: Path, sched: dict) -> None:
    scheduler_class = sched.get("_class_name", "DDPMScheduler")
    if scheduler_class not in SCHEDULERS:
        raise ValueError(f"{directory}: scheduler {scheduler_class!r} is not supported: emd_fast reads the "
                         f"noise levels of DDPM-style discrete beta schedules ({', '.join(SCHEDULERS[:6])}, ...)")
    for key, plain in (("timestep_type", "discrete"), ("use_flow_sigmas", False)):
        if sched.get(key, plain) != plain:  # EDM-style continuous timesteps (CosXL), flow matching
            raise ValueError(f"{directory}: {scheduler_class} with {key} {sched[key]!r} is not supported "
                             f"(only discrete-timestep noise levels of a beta schedule)")
    _check_timesteps(directory, sched.get("num_train_timesteps", 1000))
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{directory}: prediction type {prediction!r} is not supported; choose one of "
                         f"{PREDICTION_TYPES}")
    if sched.get("trained_betas") is None and sched.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"{directory}: beta schedule {sched.get('beta_schedule')!r} is not supported; "
                         f"choose one of {BETA_SCHEDULES}")


def _check_timesteps(directory: Path, n) -> None:
    """A scheduler's num_train_timesteps: an int in [2, MAX_TIMESTEPS] (diffusers allocates tables that long)."""
    if not (isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= MAX_TIMESTEPS):
        raise ValueError(f"{directory}: num_train_timesteps {n!r} in scheduler_config.json: need an int in [2, "
                         f"{MAX_TIMESTEPS}]")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_flow_scheduler(directory: Path, sched: dict, model_class: str) -> None:
    """A FlowMatchEulerDiscreteScheduler whose noise levels emd_fast reproduces (see schedules.flow_shift)."""
    scheduler_class = sched.get("_class_name")
    sched = {**FLOW_DEFAULTS, **sched}
    if scheduler_class != FLOW_SCHEDULER:
        raise ValueError(f"{directory}: scheduler {scheduler_class!r} with a {model_class}: emd_fast reads a flow "
                         f"model's noise levels from {FLOW_SCHEDULER}")
    if sched.get("invert_sigmas"):
        raise ValueError(f"{directory}: {FLOW_SCHEDULER} with invert_sigmas (time running backwards, Mochi's) is not "
                         f"supported")
    _check_timesteps(directory, sched["num_train_timesteps"])
    if not (_number(sched["shift"]) and sched["shift"] > 0):
        raise ValueError(f"{directory}: shift {sched.get('shift')!r} in scheduler_config.json: need a number > 0")
    if sched.get("use_dynamic_shifting"):
        kind = sched["time_shift_type"]
        if kind not in TIME_SHIFT_TYPES:
            raise ValueError(f"{directory}: time_shift_type {kind!r} is not supported; one of {TIME_SHIFT_TYPES}")
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        bad = [key for key in keys if not _number(sched[key])]
        if bad or sched["base_image_seq_len"] == sched["max_image_seq_len"]:
            raise ValueError(f"{directory}: dynamic shifting needs numbers {', '.join(keys)} with base_image_seq_len "
                             f"!= max_image_seq_len, got {({key: sched[key] for key in keys})}")


def inspect_folder(path) -> TeacherFolder:
    """Check a diffusers pipeline folder (model_index.json with unet/ or transformer/, and scheduler/) or model folder
    (config.json, weights, scheduler_config.json) from its JSON files; ValueError (one line) for anything missing
    or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--teacher {root}: not a directory")
    check_model_files(root)
    # google/ddpm-*: the UNet's files at the top
    flat = (root / "config.json").is_file() and not (root / "unet").is_dir()
    index, pipeline, texts = {}, None, ()
    if (root / "model_index.json").is_file() and not flat:
        index = read_folder_json(root / "model_index.json", "pipeline index")
        pipeline = _check_pipeline_class(root, index)
        name = "transformer" if _entry(index, "transformer") is not None else "unet"
        parts = {key: root / key if _entry(index, key) is not None else None for key in (name, "scheduler", "vae")}
        for key in (name, "scheduler"):
            if parts[key] is None or not parts[key].is_dir():
                raise ValueError(f"{root}: incomplete diffusers pipeline, no {key}/ folder")
        model_dir = parts[name]
    elif (root / "config.json").is_file():
        parts, model_dir = {"scheduler": root, "vae": None}, root
    else:
        raise ValueError(f"--teacher {root}: a directory without model_index.json or config.json is not a diffusers "
                         f"pipeline or model folder")
    what = "transformer" if model_dir.name == "transformer" else "UNet"
    model_cfg = read_folder_json(model_dir / "config.json", f"{what} config")
    model_class = model_cfg.get("_class_name")
    family = _family(model_dir, model_class, model_cfg, pipeline)
    vae_cfg = None
    if family != "pixel":
        if parts["vae"] is None or not parts["vae"].is_dir():
            raise ValueError(f"{root}: the latent model {model_class} needs a VAE to decode samples: give the pipeline "
                             f"folder (model_index.json with vae/), not the model's own folder")
        vae_cfg = read_folder_json(parts["vae"] / "config.json", "VAE config")
        if vae_cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{parts['vae']}: VAE class {vae_cfg['_class_name']!r} is not supported; emd_fast decodes "
                             f"with AutoencoderKL (Stable Diffusion's)")
        if vae_cfg.get("out_channels", 3) not in (1, 3):
            raise ValueError(f"{parts['vae']}: out_channels {vae_cfg['out_channels']}: the VAE must decode images of 1 "
                             f"or 3 channels")
        texts = _text_encoders(root, index, family, pipeline)
    if model_class in TRANSFORMERS:
        _check_transformer(model_dir, model_cfg, family, vae_cfg)
    else:
        _check_unet(model_dir, model_cfg, family, vae_cfg)
    if texts:
        _check_text_widths(model_dir, model_cfg, family, texts)
    folders = [model_dir, parts["vae"], parts["scheduler"], *(p for t in texts for p in (t.encoder, t.tokenizer))]
    for folder in folders:
        if folder is not None and folder.is_dir():
            check_model_files(folder)
    check_model_config(model_dir, model_cfg)
    if vae_cfg is not None:
        check_model_config(parts["vae"], vae_cfg)
    weight_files(model_dir)
    if family != "pixel":
        weight_files(parts["vae"])
    if not (parts["scheduler"] / "scheduler_config.json").is_file() and (root.parent / "model_index.json").is_file():
        raise ValueError(f"{root}: no scheduler_config.json: the {root.name}/ folder of a pipeline? give the pipeline "
                         f"folder, --teacher {root.parent}")
    sched = read_folder_json(parts["scheduler"] / "scheduler_config.json", "scheduler config")
    if family in ("sd3", "flux"):
        _check_flow_scheduler(parts["scheduler"], sched, model_class)
    else:
        _check_discrete_scheduler(parts["scheduler"], sched)
    force_zeros = family == "sdxl" and index.get("force_zeros_for_empty_prompt", True) is not False
    return TeacherFolder(root, family, model_dir, model_class, model_cfg, parts["scheduler"], sched, parts["vae"],
                         vae_cfg, texts, force_zeros)


# --- hashes ------------------------------------------------------------------------------------------------------

def hash_files(root: Path, files, extra: str = "") -> str:
    """SHA-256 over the ``files`` (their names below ``root`` and content hashes) and ``extra``."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root)}:{sha256_file(f, reuse=True)}\n".encode())
    h.update(extra.encode())
    return h.hexdigest()


def folder_sha256(path) -> str:
    """SHA-256 over what defines the teacher: the denoising model's config and the weight files it loads, the
    scheduler's config (name and content hash of each file) and, for SDXL, the unconditional input's kind."""
    folder = inspect_folder(path)
    files = [folder.model / "config.json", folder.scheduler / "scheduler_config.json", *weight_files(folder.model)[1]]
    extra = f"force_zeros_for_empty_prompt:{folder.force_zeros_for_empty_prompt}\n" if folder.family == "sdxl" else ""
    return hash_files(folder.path, files, extra)


def text_encoder_sha256(folder: TeacherFolder) -> str | None:
    """SHA-256 over the files of the text encoder and tokenizer folders the family uses, None if any is absent."""
    used = [t for t in folder.text_encoders if t.encoder is not None or t.key not in OPTIONAL_TEXT_ENCODERS]
    if not used or not all(t.present for t in used):
        return None
    return hash_files(folder.path, sorted(f for t in used for part in (t.encoder, t.tokenizer)
                                           for f in part.rglob("*") if f.is_file()))
