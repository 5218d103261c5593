"""Teachers from Hugging Face ``diffusers`` folders: pixel UNets (``UNet2DModel``) and latent text-to-image UNets
(``UNet2DConditionModel`` with a VAE and a CLIP text encoder, Stable Diffusion style).

What the EMD iteration sees is this project's denoiser ``D(x_t, t, y) ~ E[x | x_t]`` and a ``Schedule``:

* ``DiscreteSchedule`` turns the scheduler's ``alphas_cumprod`` (T discrete timesteps) into a continuous schedule on
  t in [0, T-1]: the log-SNR lambda_i = log(abar_i / (1 - abar_i)) is interpolated linearly between neighbouring
  integer timesteps, alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t) (variance preserving), and the
  UNet is called at the fractional timestep t. This is how diffusers' own samplers reach noise levels between the
  training timesteps: ``EulerDiscreteScheduler._sigma_to_t`` interpolates log sigma linearly between timesteps, and
  log sigma = -lambda / 2 there. At integer t the schedule is exactly the scheduler's (abar_t).
* ``DiffusersDenoiser`` turns the UNet's output into D for each prediction type:
  epsilon: D = (x_t - sigma eps) / alpha;  v_prediction (v = alpha eps - sigma x): D = alpha x_t - sigma v;
  sample: D = the output. Conditioning ``y``: class labels (N,) for a class-conditional UNet2DModel; for a
  text-conditioned UNet prompt indices (N,) into the run's cached prompt embeddings, or embeddings (N, L, E).
* ``GuidedTeacher`` applies classifier-free guidance: D = D_u + w (D_c - D_u) (the same as guiding eps, since D is
  affine in eps at fixed x_t), one UNet call on the stacked conditional and unconditional batch.

Folders are read with ``local_files_only``: nothing is downloaded. ``inspect_folder`` checks a folder from its JSON
files alone (one-line ``ValueError`` naming what is missing or unsupported) before any weights are read; diffusers
and transformers are imported only when weights are loaded (``pip install -e ".[diffusers]"``).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..checks import check_per_example
from ..optional import require
from ..schedules import Schedule, expand_like
from . import NetworkTeacher

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")  # DDPMScheduler's
PIXEL_UNETS = ("UNet2DModel",)
LATENT_UNETS = ("UNet2DConditionModel",)
DEFAULT_GUIDANCE = 3.0  # this project's choice: the EMD paper's text-to-image value could not be read here
# schedulers whose training noise is DDPM's: alphas_cumprod from the betas (num_train_timesteps, beta_start, beta_end,
# beta_schedule, trained_betas, rescale_betas_zero_snr) and the UNet called at the integer timestep; what they do
# differently (timestep spacing, sigmas, solver order, clipping, thresholding) is sampling only, unused here
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
              "DPMSolverSDEScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
              "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
              "DEISMultistepScheduler", "SASolverScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler")
WEIGHT_STEM = "diffusion_pytorch_model"  # diffusers' weight file names; transformers' text encoders: model, pytorch_model
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)  # what from_pretrained raises for a broken file


# --- the schedule ------------------------------------------------------------------------------------------------

class DiscreteSchedule(Schedule):
    """A diffusers scheduler's noise levels: alphas_cumprod (T,) on the timesteps 0..T-1, t continuous in between
    (log-SNR interpolated linearly, see the module docstring). t_max is the last timestep with abar > 0 (a zero
    terminal SNR has lambda = -inf)."""

    name = "diffusers_discrete"

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or not bool(((abar >= 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be at least 2 values in [0, 1), strictly decreasing")
        positive = int((abar > 0).sum())
        self.lam_table = (abar[:positive] / (1 - abar[:positive])).log()  # (T',) float64, decreasing
        self.num_timesteps = abar.numel()
        self.t_min, self.t_max = 0.0, float(positive - 1)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        """lam_table on ``device``, copied there once (no host-device copies inside a training step)."""
        if device not in self._on_device:
            self._on_device[device] = self.lam_table.to(device)
        return self._on_device[device]

    def lam(self, t):
        """log-SNR at fractional timesteps t (N,), linear between the integer timesteps; in t's dtype."""
        table = self._table(t.device)
        tt = t.to(torch.float64).clamp(self.t_min, self.t_max)
        lo = tt.floor().clamp(max=self.t_max - 1).long()
        frac = tt - lo
        return (table[lo] * (1 - frac) + table[lo + 1] * frac).to(t.dtype)

    def alpha(self, t):
        return torch.sigmoid(self.lam(t).to(torch.float64)).sqrt().to(t.dtype)

    def sigma(self, t):
        return torch.sigmoid(-self.lam(t).to(torch.float64)).sqrt().to(t.dtype)

    def t_from_lambda(self, lam):
        """The fractional timestep with log-SNR ``lam`` (inverse of ``lam``), clamped to [t_min, t_max]."""
        table = self._table(lam.device)
        lam64 = lam.to(torch.float64)
        hi = torch.searchsorted(-table, -lam64.reshape(-1)).reshape(lam64.shape)  # first timestep with lambda <= lam
        lo = (hi - 1).clamp(0, table.numel() - 2)
        frac = (table[lo] - lam64) / (table[lo] - table[lo + 1])
        return (lo + frac).clamp(self.t_min, self.t_max).to(lam.dtype)

    def generator_t(self, lam: float) -> float:
        """The training timestep nearest to log-SNR ``lam``: the UNet is trained at integer timesteps, and a stock
        diffusers scheduler calls it at exactly this one in an exported one-step pipeline (docs/export.md)."""
        return float(round(self.t_at_lambda(lam)))

    def config(self):
        return {**super().config(), "num_train_timesteps": self.num_timesteps}


# --- the denoiser ------------------------------------------------------------------------------------------------

def denoiser_from_prediction(prediction_type: str, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor,
                             sigma: torch.Tensor) -> torch.Tensor:
    """D from a network output ``out`` (N, ...) at x_t (N, ...); alpha, sigma broadcastable (N, 1, ...); VP only."""
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")


class PromptTable:
    """Cached prompt embeddings (P, L, E), shared (not copied) by every network that looks prompts up, and copied to
    each device once. Not part of any state dict: a run's embeddings live in its prompt_embeddings.safetensors."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings
        self._on_device: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __deepcopy__(self, memo) -> "PromptTable":
        return self  # read-only: the generator and student copies share the teacher's table

    def lookup(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embeddings (N, L, E) of the prompt indices (N,), on their device, in ``dtype``."""
        key = (index.device, dtype)
        if key not in self._on_device:
            self._on_device[key] = self.embeddings.to(index.device, dtype)
        return self._on_device[key][index]


class DiffusersDenoiser(nn.Module):
    """D(x_t, t, y) of a diffusers UNet: x_t (N, C, H, W), t (N,) fractional timesteps -> (N, C, H, W) fp32.

    The UNet runs in its own dtype (a bf16 teacher takes bf16 inputs); the conversion to D is done in fp32.
    ``prompts``: the run's PromptTable for a text-conditioned UNet (then y may be prompt indices), else None.
    """

    def __init__(self, unet: nn.Module, schedule: DiscreteSchedule, prediction_type: str,
                 prompts: PromptTable | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
        self.unet, self.schedule, self.prediction_type, self.prompts = unet, schedule, prediction_type, prompts
        self.text = type(unet).__name__ in LATENT_UNETS or prompts is not None
        self.arch = {"class": type(unet).__name__, "prediction_type": prediction_type}

    def condition(self, y: torch.Tensor | None, dtype: torch.dtype) -> dict:
        """The UNet's conditioning keyword arguments for y (see the class docstring)."""
        if not self.text:
            return {} if y is None else {"class_labels": y}
        if y is None:
            raise ValueError("a text-conditioned UNet needs y: prompt indices (N,) or embeddings (N, L, E)")
        if y.is_floating_point():
            return {"encoder_hidden_states": y.to(dtype)}
        if self.prompts is None:
            raise ValueError("prompt indices need the run's prompt embeddings; pass embeddings (N, L, E)")
        return {"encoder_hidden_states": self.prompts.lookup(y, dtype)}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        check_per_example("x_t", x_t, t=t)
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_t.to(dtype), t, **self.condition(y, dtype), return_dict=False)[0]
        out = out[:, :x_t.shape[1]].float()  # a UNet with a learned variance outputs (prediction, variance)
        alpha, sigma = (expand_like(v.float(), x_t) for v in self.schedule.alpha_sigma(t))
        return denoiser_from_prediction(self.prediction_type, out, x_t.float(), alpha, sigma)


class GuidedTeacher(NetworkTeacher):
    """A diffusers teacher, frozen. Text-conditioned: classifier-free guidance with scale ``guidance_scale`` >= 0,
    D = D(x_t, t, "") + w (D(x_t, t, y) - D(x_t, t, "")), ``uncond`` (1, L, E) the empty prompt's embedding; w = 1
    is the conditional denoiser (one UNet call), w = 0 the unconditional one. ``source``: the folder."""

    def __init__(self, net: DiffusersDenoiser, data_shape, guidance_scale: float = DEFAULT_GUIDANCE,
                 uncond: torch.Tensor | None = None, source=None):
        super().__init__(net, net.schedule, data_shape, source=source)
        check_guidance(guidance_scale)
        if net.text and uncond is None and guidance_scale != 1:
            raise ValueError("classifier-free guidance needs the empty prompt's embedding (uncond)")
        self.guidance_scale = float(guidance_scale)
        self.register_buffer("uncond", uncond, persistent=False)  # moves with the teacher: no copy per call

    def to_config(self) -> dict:
        return {"folder": str(self.source), "sha256": folder_sha256(self.source), "arch": self.net.arch,
                "schedule": self.schedule.config(), "guidance_scale": self.guidance_scale if self.net.text else None}

    @torch.no_grad()
    def denoise(self, x_t, t, y=None):
        if not self.net.text or self.guidance_scale == 1:
            return self.net(x_t, t, y)
        n = x_t.shape[0]
        dtype = next(self.net.unet.parameters()).dtype
        cond = self.net.condition(y, dtype)["encoder_hidden_states"]
        uncond = self.uncond.to(dtype).expand(n, *cond.shape[1:])
        d = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond]))
        d_c, d_u = d[:n], d[n:]
        return d_u + self.guidance_scale * (d_c - d_u)


# --- folders -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherFolder:
    """What ``inspect_folder`` found: the UNet's and scheduler's folders, the UNet class, the scheduler's config,
    and the VAE / text encoder / tokenizer folders of a pipeline (None where absent)."""

    path: Path
    unet: Path
    scheduler: Path
    unet_class: str
    scheduler_config: dict
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None

    @property
    def latent(self) -> bool:
        return self.unet_class in LATENT_UNETS

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: incomplete diffusers folder, no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e})") from None
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
                    shards = sorted(set(_read_json(index, "weight index").get("weight_map", {}).values()))
                    missing = [name for name in shards if name not in names]
                    if missing or not shards:
                        raise ValueError(f"{index}: incomplete sharded weights, missing {missing or 'the weight_map'}")
                    return variant, [index, *(directory / name for name in shards)]
    if len(variants) > 1:
        raise ValueError(f"{directory}: weights in several variants ({', '.join(variants)}) and none plain: keep one")
    raise ValueError(f"{directory}: incomplete diffusers folder, no weights "
                     f"({' or '.join(f'{stem}.safetensors / .bin' for stem in stems)})")


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
            raise ValueError(f"--teacher {p}: a file of the diffusers folder {folder}: give the folder, --teacher {folder}")


def inspect_folder(path) -> TeacherFolder:
    """Check a diffusers pipeline folder (model_index.json with unet/ and scheduler/) or model folder (config.json,
    weights, scheduler_config.json) from its JSON files; ValueError (one line) for anything missing or unsupported."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--teacher {root}: not a directory")
    parts: dict[str, Path | None] = {}
    flat = (root / "config.json").is_file() and not (root / "unet").is_dir()  # google/ddpm-*: the UNet's files at the top
    if (root / "model_index.json").is_file() and not flat:
        index = _read_json(root / "model_index.json", "pipeline index")
        for name in ("unet", "scheduler", "vae", "text_encoder", "tokenizer"):
            entry = index.get(name)
            present = isinstance(entry, list) and entry and entry[-1] is not None
            parts[name] = root / name if present else None
        for name in ("unet", "scheduler"):
            if parts[name] is None or not parts[name].is_dir():
                raise ValueError(f"{root}: incomplete diffusers pipeline, no {name}/ folder")
    elif (root / "config.json").is_file():
        parts = {"unet": root, "scheduler": root, "vae": None, "text_encoder": None, "tokenizer": None}
    else:
        raise ValueError(f"--teacher {root}: a directory without model_index.json or config.json is not a diffusers "
                         f"pipeline or model folder")
    unet_cfg = _read_json(parts["unet"] / "config.json", "UNet config")
    unet_class = unet_cfg.get("_class_name")
    if unet_class not in PIXEL_UNETS + LATENT_UNETS:
        raise ValueError(f"{parts['unet']}: model class {unet_class!r} is not supported; emd_fast distills "
                         f"{', '.join(PIXEL_UNETS + LATENT_UNETS)}")
    if unet_class in LATENT_UNETS and (parts["vae"] is None or not parts["vae"].is_dir()):
        raise ValueError(f"{root}: the latent model {unet_class} needs a VAE to decode samples: give the pipeline "
                         f"folder (model_index.json with vae/), not the UNet's own folder")
    size = unet_cfg.get("sample_size")
    if not (isinstance(size, int) or (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size))):
        raise ValueError(f"{parts['unet']}: sample_size {size!r} in config.json: need the UNet's input size (an int or "
                         f"[height, width])")
    if unet_cfg.get("class_embed_type") is not None or (unet_class in LATENT_UNETS and unet_cfg.get("num_class_embeds")):
        key = "class_embed_type" if unet_cfg.get("class_embed_type") is not None else "num_class_embeds"
        raise ValueError(f"{parts['unet']}: {unet_class} with {key} {unet_cfg[key]!r} needs class labels of a kind "
                         f"emd_fast does not give: it conditions UNet2DModel on num_class_embeds labels and "
                         f"UNet2DConditionModel on text only")
    if unet_cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
        raise ValueError(f"{parts['unet']}: encoder_hid_dim_type {unet_cfg['encoder_hid_dim_type']!r} needs image "
                         f"embeddings; emd_fast supports text embeddings only")
    if unet_cfg.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{parts['unet']}: time_embedding_type {unet_cfg['time_embedding_type']!r} is not supported "
                         f"(only discrete-timestep UNets: 'positional')")
    for key in ("addition_embed_type", "time_cond_proj_dim") if unet_class in LATENT_UNETS else ():
        if unet_cfg.get(key) is not None:  # SDXL-style added conditions, LCM's guidance embedding
            raise ValueError(f"{parts['unet']}: {unet_class} with {key} {unet_cfg[key]!r} needs extra conditioning "
                             f"inputs; emd_fast supports text embeddings only (Stable Diffusion 1.x/2.x style)")
    if unet_class in LATENT_UNETS:
        vae_cfg = _read_json(parts["vae"] / "config.json", "VAE config")
        if vae_cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{parts['vae']}: VAE class {vae_cfg['_class_name']!r} is not supported; emd_fast decodes "
                             f"with AutoencoderKL (Stable Diffusion's)")
        latent = vae_cfg.get("latent_channels", 4)
        if vae_cfg.get("out_channels", 3) not in (1, 3):
            raise ValueError(f"{parts['vae']}: out_channels {vae_cfg['out_channels']}: the VAE must decode images of 1 "
                             f"or 3 channels")
        if unet_cfg.get("in_channels", 4) != latent:
            raise ValueError(f"{parts['unet']}: in_channels {unet_cfg.get('in_channels')} differs from the VAE's "
                             f"latent_channels {latent} (an inpainting or image-conditioned UNet?): not supported")
    text_config = parts["text_encoder"] / "config.json" if parts["text_encoder"] is not None else None
    if unet_class in LATENT_UNETS and text_config is not None and text_config.is_file():
        width = _read_json(text_config, "text encoder config").get("hidden_size")
        wanted = unet_cfg.get("encoder_hid_dim") or unet_cfg.get("cross_attention_dim", 1280)
        if width is not None and set(wanted if isinstance(wanted, list) else [wanted]) != {width}:
            raise ValueError(f"{text_config.parent}: the text encoder's hidden_size {width} is not the width of the "
                             f"text embeddings the UNet takes ({wanted}): a text encoder of another model?")
    channels = unet_cfg.get("in_channels", 4 if unet_class in LATENT_UNETS else 3)
    if unet_class in PIXEL_UNETS and channels not in (1, 3):  # e.g. LDM's UNet2DModel in a VQ-VAE's latent space
        raise ValueError(f"{parts['unet']}: {unet_class} with in_channels {channels}: a pixel UNet's samples are images "
                         f"of 1 or 3 channels (latent UNet2DModels, with a VQ-VAE, are not supported)")
    if unet_cfg.get("out_channels", channels) not in (channels, 2 * channels):  # 2x: a learned variance besides
        raise ValueError(f"{parts['unet']}: out_channels {unet_cfg['out_channels']} differs from in_channels "
                         f"{channels}: not a denoising UNet emd_fast can read")
    weight_files(parts["unet"])
    if unet_class in LATENT_UNETS:
        weight_files(parts["vae"])
    if not (parts["scheduler"] / "scheduler_config.json").is_file() and (root.parent / "model_index.json").is_file():
        raise ValueError(f"{root}: no scheduler_config.json: the {root.name}/ folder of a pipeline? give the pipeline "
                         f"folder, --teacher {root.parent}")
    sched = _read_json(parts["scheduler"] / "scheduler_config.json", "scheduler config")
    scheduler_class = sched.get("_class_name", "DDPMScheduler")
    if scheduler_class not in SCHEDULERS:
        raise ValueError(f"{parts['scheduler']}: scheduler {scheduler_class!r} is not supported: emd_fast reads the "
                         f"noise levels of DDPM-style discrete beta schedules ({', '.join(SCHEDULERS[:6])}, ...)")
    for key, plain in (("timestep_type", "discrete"), ("use_flow_sigmas", False)):
        if sched.get(key, plain) != plain:  # EDM-style continuous timesteps (CosXL), flow matching
            raise ValueError(f"{parts['scheduler']}: {scheduler_class} with {key} {sched[key]!r} is not supported "
                             f"(only discrete-timestep noise levels of a beta schedule)")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{parts['scheduler']}: prediction type {prediction!r} is not supported; choose one of "
                         f"{PREDICTION_TYPES}")
    if sched.get("trained_betas") is None and sched.get("beta_schedule", "linear") not in BETA_SCHEDULES:
        raise ValueError(f"{parts['scheduler']}: beta schedule {sched.get('beta_schedule')!r} is not supported; "
                         f"choose one of {BETA_SCHEDULES}")
    return TeacherFolder(root, parts["unet"], parts["scheduler"], unet_class, sched, parts["vae"],
                         parts["text_encoder"], parts["tokenizer"])


def folder_sha256(path) -> str:
    """SHA-256 over what defines the teacher: the UNet's config and the weight files it loads, and the scheduler's
    config (name and content hash of each file)."""
    folder = inspect_folder(path)
    files = [folder.unet / "config.json", folder.scheduler / "scheduler_config.json", *weight_files(folder.unet)[1]]
    from ..files import sha256_file

    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder.path)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def text_encoder_sha256(folder: TeacherFolder) -> str | None:
    """SHA-256 over the files of the text encoder and tokenizer folders, None if either is absent."""
    parts = (folder.text_encoder, folder.tokenizer)
    if not all(part is not None and part.is_dir() for part in parts):
        return None
    from ..files import sha256_file

    h = hashlib.sha256()
    for f in sorted(f for part in parts for f in part.rglob("*") if f.is_file()):
        h.update(f"{f.relative_to(folder.path)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_prompts(path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); ValueError if there are none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts {path}: cannot read it ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def check_guidance(scale: float) -> None:
    """ValueError (one line) unless the classifier-free guidance scale is finite and >= 0."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--guidance-scale must be finite and >= 0, got {scale}")


def check_options(cfg: dict) -> TeacherFolder:
    """The diffusers options of a run fit its teacher folder (ValueError, one line); returns the folder."""
    folder = inspect_folder(cfg["teacher"])
    check_guidance(cfg.get("guidance_scale", DEFAULT_GUIDANCE))
    if cfg.get("schedule"):
        raise ValueError("--schedule: a diffusers teacher's noise levels are its scheduler's; leave --schedule out")
    if folder.latent:
        if not cfg.get("prompts"):
            raise ValueError(f"{folder.path}: {folder.unet_class} is text-conditioned: pass --prompts FILE")
        read_prompts(cfg["prompts"])
    elif cfg.get("prompts"):
        raise ValueError(f"--prompts: the teacher {folder.unet_class} in {folder.path} is not text-conditioned")
    return folder


# --- loading (diffusers / transformers) --------------------------------------------------------------------------

def _diffusers():
    diffusers = require("diffusers", "diffusers teachers",
                        names=(*PIXEL_UNETS, *LATENT_UNETS, "AutoencoderKL", "DDPMScheduler"))
    diffusers.utils.logging.disable_progress_bar()  # a bar per sharded weight file read; the run has its own
    return diffusers


def _reason(e: Exception) -> str:
    """The first line of a loading error (and the next where the first only announces a list)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def _load_model(cls, directory: Path, what: str, stems=(WEIGHT_STEM,)) -> nn.Module:
    """``cls.from_pretrained`` of a model folder in fp32, eval mode, from disk only, with the variant of its weights;
    ValueError (one line) for a broken file."""
    variant, files = weight_files(directory, stems)
    try:  # use_safetensors: no error logged for the .safetensors file a .bin-only folder lacks
        return cls.from_pretrained(directory, local_files_only=True, torch_dtype=torch.float32, variant=variant,
                                   use_safetensors=".safetensors" in files[0].name, low_cpu_mem_usage=False).eval()
    except LOAD_ERRORS as e:
        raise ValueError(f"{directory}: cannot load {what}: {_reason(e)}") from None


def load_unet(folder: TeacherFolder) -> nn.Module:
    """The UNet in fp32, eval mode, from disk only."""
    return _load_model(getattr(_diffusers(), folder.unet_class), folder.unet, folder.unet_class)


def noise_scheduler(folder: TeacherFolder):
    """diffusers' DDPMScheduler with the noise levels of the folder's scheduler config (its betas, alphas_cumprod)."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr")
    options = {k: v for k, v in folder.scheduler_config.items() if k in keep}
    try:
        return _diffusers().DDPMScheduler(**options)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:  # e.g. a number of the wrong type
        raise ValueError(f"{folder.scheduler}/scheduler_config.json: no noise levels from {options}: "
                         f"{_reason(e)}") from None


def load_schedule(folder: TeacherFolder) -> DiscreteSchedule:
    """The scheduler config's alphas_cumprod (computed by diffusers' DDPMScheduler) as a DiscreteSchedule."""
    alphas_cumprod = noise_scheduler(folder).alphas_cumprod
    try:
        return DiscreteSchedule(alphas_cumprod)
    except ValueError as e:
        raise ValueError(f"{folder.scheduler}/scheduler_config.json: {e} (fp32, as diffusers computes them)") from None


def load_vae(folder: TeacherFolder) -> nn.Module:
    return _load_model(_diffusers().AutoencoderKL, folder.vae, "the VAE").requires_grad_(False)


def load_text_encoder(folder: TeacherFolder) -> tuple[object, nn.Module]:
    """(tokenizer, CLIP text encoder in fp32, eval mode) of the pipeline's tokenizer/ and text_encoder/."""
    if not all(part is not None and part.is_dir() for part in (folder.text_encoder, folder.tokenizer)):
        raise ValueError(f"{folder.path}: no text_encoder/ or tokenizer/ in the pipeline folder: prompts cannot be "
                         f"encoded")
    transformers = require("transformers", "text-to-image diffusers teachers", names=("AutoTokenizer", "CLIPTextModel"))
    AutoTokenizer, CLIPTextModel = transformers.AutoTokenizer, transformers.CLIPTextModel
    transformers.utils.logging.disable_progress_bar()  # a bar per weight file read; the run has its own
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder.tokenizer, local_files_only=True)
    except LOAD_ERRORS as e:
        raise ValueError(f"{folder.tokenizer}: cannot load the tokenizer: {_reason(e)}") from None
    return tokenizer, _load_model(CLIPTextModel, folder.text_encoder, "the text encoder", ("model", "pytorch_model"))


@torch.no_grad()
def encode_prompts(folder: TeacherFolder, prompts: list[str], device="cpu") -> torch.Tensor:
    """The text encoder's last hidden states (P, L, E) fp32 of ``prompts`` (padded to the tokenizer's max length,
    as Stable Diffusion pipelines do), from the pipeline's text_encoder/ and tokenizer/ (CLIP)."""
    tokenizer, encoder = load_text_encoder(folder)
    encoder = encoder.to(device)
    # a tokenizer_config.json without model_max_length gives a huge one: the encoder's positions bound it
    length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return torch.cat([encoder(ids[i:i + 64])[0].float().cpu() for i in range(0, len(prompts), 64)])

