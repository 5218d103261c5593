"""The denoiser ``D(x_t, t, y) ~ E[x | x_t]`` of a diffusers network, per family, and the guided teacher.

* UNets (``DiffusersDenoiser``: pixel, SD, SDXL) on a ``DiscreteSchedule``, called at the fractional timestep t:
  epsilon: D = (x_t - sigma eps) / alpha;  v_prediction (v = alpha eps - sigma x): D = alpha x_t - sigma v;
  sample: D = the output. SDXL adds its pooled text embedding and time ids (original size, crop, target size).
* Flow transformers (``SD3Denoiser``, ``FluxDenoiser``) on a ``FlowMatching`` schedule: the network predicts the
  velocity v = eps - x at noise level s, and D = x_t - s v. SD3 takes the timestep N s, FLUX s N / 1000 (its
  transformer multiplies by 1000, as FluxPipeline divides by it). FLUX works on 2x2-packed latent tokens with
  position ids; D is computed on the unpacked latents (packing is a permutation). FLUX.1-dev takes its guidance
  scale as an input (a guidance-distilled model): the same scale in teacher, generator and student.

Conditioning ``y``: class labels (N,) for a class-conditional UNet2DModel; for text, prompt indices (N,) into the
run's ``PromptTable`` — or, for SD's UNets, embeddings (N, L, E), or ``Prompts`` (embeds, pooled) of N rows, as
classifier-free guidance passes them. Every network runs in its own dtype (a bf16 teacher takes bf16 inputs); D is
computed in fp32.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...checks import check_per_example
from ...schedules import FlowMatching, Schedule, expand_like
from .. import NetworkTeacher
from .folder import LATENT_UNETS, PREDICTION_TYPES, TeacherFolder, folder_sha256
from .prompts import Prompts, PromptTable

DEFAULT_GUIDANCE = 3.0  # this project's choice for classifier-free guidance: the EMD paper's value could not be read
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, FLUX.1-dev's embedded guidance


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


def text_condition(prompts: PromptTable | None, y, dtype: torch.dtype) -> Prompts:
    """The Prompts of y: prompt indices (N,) looked up in ``prompts``, embeddings (N, L, E), or Prompts as given."""
    if y is None:
        raise ValueError("a text-conditioned model needs y: prompt indices (N,)")
    if isinstance(y, Prompts):
        return Prompts(*(None if v is None else v.to(dtype) for v in y))
    if y.is_floating_point():
        return Prompts(y.to(dtype))
    if prompts is None:
        raise ValueError("prompt indices need the run's prompt embeddings; pass embeddings (N, L, E)")
    return prompts.lookup(y, dtype)


class DiffusersDenoiser(nn.Module):
    """D(x_t, t, y) of a diffusers UNet: x_t (N, C, H, W), t (N,) fractional timesteps -> (N, C, H, W) fp32.

    ``prompts``: the run's PromptTable for a text-conditioned UNet (then y may be prompt indices), else None.
    ``time_ids`` (6,): SDXL's added time conditions (original height, width, crop top, left, target height, width).
    """

    classifier_free = True  # text-conditioned: guided by D_u + w (D_c - D_u)

    def __init__(self, unet: nn.Module, schedule: Schedule, prediction_type: str,
                 prompts: PromptTable | None = None, time_ids: torch.Tensor | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction type {prediction_type!r} is not supported; choose one of {PREDICTION_TYPES}")
        self.unet, self.schedule, self.prediction_type, self.prompts = unet, schedule, prediction_type, prompts
        self.text = type(unet).__name__ in LATENT_UNETS or prompts is not None
        self.register_buffer("time_ids", None if time_ids is None else torch.as_tensor(time_ids, dtype=torch.float32),
                             persistent=False)  # a property of the run's resolution, not a weight
        self.arch = {"class": type(unet).__name__, "prediction_type": prediction_type,
                     **({} if time_ids is None else {"time_ids": self.time_ids.tolist()})}

    @property
    def model(self) -> nn.Module:
        return self.unet

    def condition(self, y, dtype: torch.dtype) -> dict:
        """The UNet's conditioning keyword arguments for y (see the module docstring)."""
        if not self.text:
            return {} if y is None else {"class_labels": y}
        cond = text_condition(self.prompts, y, dtype)
        if self.time_ids is None:
            return {"encoder_hidden_states": cond.embeds}
        time_ids = self.time_ids.to(dtype).expand(cond.embeds.shape[0], -1)
        return {"encoder_hidden_states": cond.embeds,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": time_ids}}

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        check_per_example("x_t", x_t, t=t)
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_t.to(dtype), t, **self.condition(y, dtype), return_dict=False)[0]
        out = out[:, :x_t.shape[1]].float()  # a UNet with a learned variance outputs (prediction, variance)
        alpha, sigma = (expand_like(v.float(), x_t) for v in self.schedule.alpha_sigma(t))
        return denoiser_from_prediction(self.prediction_type, out, x_t.float(), alpha, sigma)


class FlowDenoiser(nn.Module):
    """D(x_t, t, y) = x_t - s v of a velocity-predicting transformer: x_t (N, C, H, W), t (N,) flow times ->
    (N, C, H, W) fp32. Subclasses call the network (``velocity``); y: prompt indices (N,) or Prompts."""

    classifier_free = True
    text = True

    def __init__(self, transformer: nn.Module, schedule: FlowMatching, prompts: PromptTable | None,
                 num_train_timesteps: int):
        super().__init__()
        self.transformer, self.schedule, self.prompts = transformer, schedule, prompts
        self.num_train_timesteps = num_train_timesteps
        self.arch = {"class": type(transformer).__name__, "prediction_type": "velocity"}

    @property
    def model(self) -> nn.Module:
        return self.transformer

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: Prompts) -> torch.Tensor:
        """v (N, C, H, W) at noise levels s (N,) fp32, x and cond in the network's dtype."""
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        check_per_example("x_t", x_t, t=t)
        dtype = next(self.transformer.parameters()).dtype
        s = self.schedule.sigma(t.float())
        v = self.velocity(x_t.to(dtype), s, text_condition(self.prompts, y, dtype)).float()
        return x_t.float() - expand_like(s, x_t) * v


class SD3Denoiser(FlowDenoiser):
    """SD3 / SD3.5: SD3Transformer2DModel at timestep N s, with the prompt's sequence and pooled embeddings."""

    def velocity(self, x, s, cond):
        return self.transformer(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                                timestep=s * self.num_train_timesteps, return_dict=False)[0]


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's latent tokens: (N, C, H, W) -> (N, H/2 * W/2, 4C), a 2x2 patch per token, channel-major in it."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``: (N, H/2 * W/2, 4C) -> (N, C, H, W)."""
    n, _, c4 = tokens.shape
    return tokens.reshape(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed tokens of (H, W) latents: (H/2 * W/2, 3) rows [0, row, column]."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxDenoiser(FlowDenoiser):
    """FLUX.1: FluxTransformer2DModel on packed latents at timestep s N / 1000, with T5's sequence and CLIP's pooled
    embedding, zero text ids; ``guidance``: FLUX.1-dev's embedded guidance scale (None for schnell)."""

    classifier_free = False  # dev is guided by its guidance input, schnell not at all

    def __init__(self, transformer, schedule, prompts, num_train_timesteps, guidance: float | None):
        super().__init__(transformer, schedule, prompts, num_train_timesteps)
        if transformer.config.guidance_embeds != (guidance is not None):
            raise ValueError("FLUX.1-dev (guidance_embeds) takes a guidance scale, FLUX.1-schnell none")
        self.guidance = guidance
        self.arch["guidance"] = guidance

    def velocity(self, x, s, cond):
        n, _, h, w = x.shape
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=x.device)
        v = self.transformer(hidden_states=pack(x), timestep=s * (self.num_train_timesteps / 1000), guidance=guidance,
                             pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                             txt_ids=x.new_zeros(cond.embeds.shape[1], 3), img_ids=image_ids(h, w, x.device, x.dtype),
                             return_dict=False)[0]
        return unpack(v, h, w)


def sdxl_time_ids(shape: tuple[int, int, int], vae_scale: int) -> torch.Tensor:
    """SDXL's add_time_ids for latents of ``shape`` (C, H, W): original size, crop (0, 0) and target size, in pixels,
    as StableDiffusionXLPipeline makes them by default."""
    height, width = shape[1] * vae_scale, shape[2] * vae_scale
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def make_denoiser(folder: TeacherFolder, network: nn.Module, schedule: Schedule, shape, prompts: PromptTable | None,
                  guidance: float | None) -> nn.Module:
    """The family's denoiser of a loaded ``network`` for samples of ``shape`` (C, H, W)."""
    if folder.family == "sd3":
        return SD3Denoiser(network, schedule, prompts, folder.num_train_timesteps)
    if folder.family == "flux":
        return FluxDenoiser(network, schedule, prompts, folder.num_train_timesteps, guidance)
    time_ids = sdxl_time_ids(shape, folder.vae_scale) if folder.family == "sdxl" else None
    return DiffusersDenoiser(network, schedule, folder.prediction_type, prompts, time_ids)


def check_guidance(scale: float) -> None:
    """ValueError (one line) unless the guidance scale is finite and >= 0."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"--guidance-scale must be finite and >= 0, got {scale}")


class GuidedTeacher(NetworkTeacher):
    """A diffusers teacher, frozen. Text-conditioned with classifier-free guidance (SD, SDXL, SD3): scale
    ``guidance_scale`` >= 0, D = D(x_t, t, "") + w (D(x_t, t, y) - D(x_t, t, "")), ``uncond`` the unconditional
    input (1 row): embeddings (1, L, E) or Prompts; w = 1 is the conditional denoiser (one network call), w = 0 the
    unconditional one. FLUX: the network's own D (its guidance is an input). ``source``: the folder."""

    def __init__(self, net: nn.Module, data_shape, guidance_scale: float | None = DEFAULT_GUIDANCE,
                 uncond: torch.Tensor | Prompts | None = None, source=None):
        super().__init__(net, net.schedule, data_shape, source=source)
        guided = net.text and net.classifier_free
        if guided:
            check_guidance(guidance_scale)
        if guided and uncond is None and guidance_scale != 1:
            raise ValueError("classifier-free guidance needs the empty prompt's embedding (uncond)")
        self.guidance_scale = float(guidance_scale) if guided else getattr(net, "guidance", None)
        self.classifier_free = guided and guidance_scale != 1
        uncond = Prompts(uncond) if isinstance(uncond, torch.Tensor) else Prompts(None) if uncond is None else uncond
        self.register_buffer("uncond", uncond.embeds, persistent=False)  # moves with the teacher: no copy per call
        self.register_buffer("uncond_pooled", uncond.pooled, persistent=False)

    def to_config(self) -> dict:
        return {"folder": str(self.source), "sha256": folder_sha256(self.source), "arch": self.net.arch,
                "schedule": self.schedule.config(), "guidance_scale": self.guidance_scale if self.net.text else None}

    @torch.no_grad()
    def denoise(self, x_t, t, y=None):
        if not self.classifier_free:
            return self.net(x_t, t, y)
        n = x_t.shape[0]
        dtype = next(self.net.parameters()).dtype
        cond = text_condition(self.net.prompts, y, dtype)
        both = Prompts(*(None if c is None else torch.cat([c, u.to(dtype).expand(n, *c.shape[1:])])
                         for c, u in zip(cond, (self.uncond, self.uncond_pooled))))
        d = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        d_c, d_u = d[:n], d[n:]
        return d_u + self.guidance_scale * (d_c - d_u)
