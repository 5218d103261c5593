"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models"; NVlabs/edm2 ``training/networks_edm2.py``) as this project's image denoiser, written independently.

Every layer preserves magnitudes: weights are normalised when the layer runs, activations keep unit scale.
    n(v)            v / (1e-4 + rms(v))      (rms over the channels of a pixel, or over a weight row's fan-in)
    MP weight       W_i -> gain * n(W_i) / sqrt(fan_in)    (no biases anywhere)
    mp_silu(v)      silu(v) / 0.596
    mp_sum(a, b, t) ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)
    mp_cat(a, b, t) [c_a a, c_b b] on channels, c_a = (1 - t) s / sqrt(Na), c_b = t s / sqrt(Nb),
                    s^2 = (Na + Nb) / ((1 - t)^2 + t^2)
    Fourier(c)      sqrt(2) cos(c freqs + phases)  (fixed random buffers)
The raw network F(x (N, C, R, R), c_noise (N,), y) -> (N, C, R, R):
    emb = mp_silu(mp_sum(emb_noise(Fourier(c_noise)), emb_label(sqrt(L) e_y), label_balance))   (no label term: L = 0)
    encoder: [x, 1] (a constant channel) -> ``{R}x{R}_conv`` (3x3); per level ``{r}x{r}_down`` (not at the first)
             and ``{r}x{r}_block{i}``, i < num_blocks; every output is kept as a skip
    decoder: ``{r}x{r}_in0`` (attention) and ``_in1`` at the lowest resolution, ``{r}x{r}_up`` at the others, then
             ``{r}x{r}_block{i}``, i <= num_blocks, each on mp_cat(x, skip, concat_balance)
    out    = ``out_conv`` (3x3) with the learned gain ``out_gain``
Block (x (N, cin, r, r), emb) -> (N, cout, r', r'), r' = r/2 ("down": 2x2 average), 2r ("up": nearest) or r:
    encoder blocks: x = n(conv_skip(x)) (the 1x1 projection when cin != cout; n over channels);
    y = conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb, gain=emb_gain)))));
    decoder blocks: x = conv_skip(x);  x = mp_sum(x, y, res_balance);  with attention (cout // channels_per_head
    heads; 0 heads: none): q, k, v normalised per head and position, x = mp_sum(x, attn_proj(softmax(q.k/sqrt(d)) v),
    attn_balance);  x clipped to [-clip_act, clip_act].
Preconditioning: EDM's with sigma_data (0.5 for EDM2's pixel and latent models alike), ``precond.py``.

Differences from EDM2's classes, none of which changes D:
  * EDM2 overwrites each weight by n(weight) in place whenever a layer runs in train mode ("forced weight
    normalisation"). Here weights are normalised when the layer runs and never written: a forward that changes
    parameters clashes with torch.compile, DDP's gradient buckets, functional calls and CUDA graphs, and in eval mode
    (the teacher) EDM2 does not write either. The function is the same; only the stored scale of a trained weight
    may drift (docs/teachers_edm2.md).
  * EDM2's uncertainty head logvar(sigma) (its training loss's noise-level weighting; not part of D) is not built.
  * Class labels are int64 (N,); label y computes what EDM2 computes for the one-hot vector e_y.
  * Only EDM2's [1, 1] resampling filter (every published network's) is supported.
Module, parameter and buffer names are EDM2's with its ``unet.`` prefix dropped, and each Block records EDM2's
attribute names, so an EDM2 pickle converts key by key and its recorded attributes can be compared with ours.
``latents``: for EDM2's latent (ImageNet-512) models, how samples relate to a VAE's latents (``VAELatents``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import Schedule
from .unet import ImageDenoiser, dropout

EPS = 1e-4
SILU_SCALE = 0.596  # rms of silu(z), z ~ N(0, 1)
PRESET_CHANNELS = {"xs": 128, "s": 192, "m": 256, "l": 320, "xl": 384, "xxl": 448}  # train_edm2.py's presets
# The published networks (NVlabs/edm2 train_edm2.py): the default architecture at these widths, 1000 classes (0 for
# "-uncond"); ImageNet-512 on 4x64x64 latents (XS..XXL), ImageNet-64 on 3x64x64 pixels (XS..XL).
EDM2_CONFIGS = {
    f"edm2-img{res}-{size}": dict(network="edm2", img_channels=4 if res == 512 else 3, img_resolution=64,
                                  label_dim=1000, model_channels=ch)
    for res, sizes in ((512, PRESET_CHANNELS), (64, {k: v for k, v in PRESET_CHANNELS.items() if k != "xxl"}))
    for size, ch in sizes.items()
}


def normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float = EPS) -> torch.Tensor:
    """x / (eps + rms of x over ``dims``), the rms in fp32; x's shape and dtype."""
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm * (1 / math.sqrt(math.prod([x.shape[d] for d in dims])))).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / SILU_SCALE


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """(N, Na, H, W), (N, Nb, H, W) -> (N, Na + Nb, H, W): b weighted t, a 1 - t, at unit overall magnitude."""
    na, nb = a.shape[1], b.shape[1]
    s = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (s * (1 - t) / math.sqrt(na)), b * (s * t / math.sqrt(nb))], dim=1)


def mp_weight(weight: torch.Tensor, gain=1.0) -> torch.Tensor:
    """The weight an MP layer applies for a stored ``weight`` (out, in, *kernel): gain * n(weight_i) / sqrt(fan_in)
    per output i, fp32."""
    w = weight.float()
    return normalize(w, tuple(range(1, w.dim()))) * (gain / math.sqrt(w[0].numel()))


class MPFourier(nn.Module):
    """c (N,) -> (N, num_channels): sqrt(2) cos(c freqs + phases) in fp32; buffers freqs ~ 2 pi N(0, 1) and
    phases ~ 2 pi U(0, 1) (EDM2's initialisation)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return ((c.float()[:, None] * self.freqs.float() + self.phases.float()).cos() * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving linear layer (``kernel`` ()) or k x k convolution with 'same' padding, no bias: applies
    gain * n(weight_i) / sqrt(fan_in) per output i. weight (out, in, *kernel); x (N, in) -> (N, out) or
    (N, in, H, W) -> (N, out, H, W); gain a number or a 0-d tensor."""

    def __init__(self, in_channels: int, out_channels: int, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain=1.0) -> torch.Tensor:
        """The weight the layer applies, fp32."""
        return mp_weight(self.weight, gain)

    def forward(self, x: torch.Tensor, gain=1.0) -> torch.Tensor:
        return self.apply_weight(x, self.effective_weight(gain))

    @staticmethod
    def apply_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x through an applied weight w (out, in, *kernel), in x's dtype."""
        w = w.to(x.dtype)
        return x @ w.t() if w.dim() == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """EDM2's U-Net block (module doc): x (N, in_channels, r, r), emb (N, emb_channels) -> (N, out_channels, r', r').

    flavor "enc": skip projection and pixel norm first, the residual branch on out_channels; "dec": the residual
    branch on in_channels, the skip projection after it. resample_mode "keep", "down" or "up"."""

    resample_filter = [1, 1]  # EDM2's attribute: the only filter supported here

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "down", "up"):
            raise ValueError(f"a Block of flavor {flavor!r} (enc, dec) and resample_mode {resample_mode!r} (keep, "
                             f"down, up)")
        self.out_channels, self.flavor, self.resample_mode = out_channels, flavor, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"attention on {out_channels} channels with channels_per_head={channels_per_head}: "
                             f"{self.num_heads} heads do not divide them")
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        if self.num_heads:
            self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1))
            self.attn_proj = MPConv(out_channels, out_channels, (1, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.resample_mode == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample_mode == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.flavor == "enc":
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), (1,))
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(y * (self.emb_linear(emb, gain=self.emb_gain) + 1)[:, :, None, None].to(y.dtype))
        y = self.conv_res1(dropout(y, self.dropout, self.training))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """attn_proj of multi-head self-attention over the H*W positions, (N, C, H, W) -> (N, C, H, W).

        EDM2's layout: attn_qkv's 3C channels are (head, channel in head, q|k|v); q, k, v are normalised over the
        channels of a head at each position; the heads' outputs are concatenated head-major."""
        n, c, h, w = x.shape
        qkv = normalize(self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w), (2,))
        q, k, v = qkv.transpose(2, 4).unbind(3)  # (N, heads, H*W, C/heads)
        return self.attn_proj(F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(n, c, h, w))


class VAELatents:
    """How an EDM2 latent model's samples relate to a VAE (EDM2's ``StabilityVAEEncoder``): x = scale * z + bias per
    channel, z the latents the VAE's encoder gives for pixels in [0, 1]. ``vae``: the VAE EDM2 names (a Hugging Face
    id, e.g. stabilityai/sd-vae-ft-mse; emd_fast takes a local folder of it), scale and bias: C floats each."""

    def __init__(self, vae: str, scale, bias):
        self.vae, self.scale, self.bias = str(vae), [float(v) for v in scale], [float(v) for v in bias]
        if len(self.scale) != len(self.bias) or not all(math.isfinite(v) and v != 0 for v in self.scale):
            raise ValueError(f"latent scale {self.scale} and bias {self.bias}: as many of each, finite, non-zero")

    def config(self) -> dict:
        return {"vae": self.vae, "scale": self.scale, "bias": self.bias}

    @torch.no_grad()
    def decode(self, vae: nn.Module, x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Images (N, 3, 8R, 8R) in about [-1, 1] on the CPU from samples x (N, C, R, R): the VAE's decoding of
        (x - bias) / scale, which EDM2 reads as pixels in [0, 1] (not clamped here; the VAE's scaling_factor is not
        used). ``vae``: a diffusers AutoencoderKL."""
        device = next(vae.parameters()).device
        scale, bias = (torch.tensor(v, device=device).reshape(1, -1, 1, 1) for v in (self.scale, self.bias))
        return torch.cat([vae.decode((c.to(device).float() - bias) / scale).sample.float().cpu() * 2 - 1
                          for c in x.split(chunk)])


class EDM2Denoiser(ImageDenoiser):
    """EDM2's Precond(UNet) as D(x_t, t, y) (module doc): (N, C, R, R) x (N,) x (N,) int64 labels or None ->
    (N, C, R, R) float32. Arguments are EDM2's (Precond, UNet and Block keywords in one list; its defaults), plus
    ``latents`` (a ``VAELatents.config()`` for latent models, None for pixel models) and ``precond``."""

    network = "edm2"
    heun_steps = 32  # EDM2's sampler (generate_images.py: 32 Heun steps, 63 evaluations), its published FIDs'

    def __init__(self, img_channels: int, img_resolution: int, schedule: Schedule, label_dim: int = 0,
                 model_channels: int = 192, channel_mult=(1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions=(16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256, sigma_data: float = 0.5, latents: dict | None = None,
                 precond: dict | None = None, network: str = "edm2"):
        super().__init__(schedule, dict(
            network=network, img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
            model_channels=model_channels, channel_mult=list(channel_mult), channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=list(attn_resolutions),
            label_balance=label_balance, concat_balance=concat_balance, channels_per_head=channels_per_head,
            dropout=dropout, res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act,
            sigma_data=sigma_data, latents=latents, precond=precond))
        self.latents = None if latents is None else VAELatents(**latents)
        if self.latents is not None and len(self.latents.scale) != img_channels:
            raise ValueError(f"{len(self.latents.scale)} latent scales for {img_channels} channels")
        self.label_balance, self.concat_balance = label_balance, concat_balance
        widths = [model_channels * m for m in channel_mult]
        noise = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb

        def block(cin, cout, flavor, **kw):
            return Block(cin, cout, emb, flavor, channels_per_head=channels_per_head, dropout=dropout,
                         res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act, **kw)

        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise)
        self.emb_noise = MPConv(noise, emb)
        self.emb_label = MPConv(label_dim, emb) if label_dim else None

        self.enc, skips, cout = nn.ModuleDict(), [], img_channels + 1  # the input gets a constant channel
        for level, width in enumerate(widths):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"], cout = MPConv(cout, width, (3, 3)), width
            else:
                self.enc[f"{r}x{r}_down"] = block(cout, cout, "enc", resample_mode="down")
            skips.append(cout)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = block(cout, width, "enc", attention=r in attn_resolutions)
                cout = width
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            r = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{r}x{r}_in0"] = block(cout, cout, "dec", attention=True)
                self.dec[f"{r}x{r}_in1"] = block(cout, cout, "dec")
            else:
                self.dec[f"{r}x{r}_up"] = block(cout, cout, "dec", resample_mode="up")
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = block(cout + skips.pop(), width, "dec",
                                                      attention=r in attn_resolutions)
                cout = width
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def embedding(self, c_noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The blocks' conditioning (N, emb_channels) of c_noise (N,) and int64 labels y (N,) or None."""
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:  # column y of the applied weight = the layer on sqrt(L) e_y
            label = self.emb_label.effective_weight().t()[y] * math.sqrt(self.label_dim)
            emb = mp_sum(emb, label.to(emb.dtype), self.label_balance)
        return mp_silu(emb)

    def unet(self, x, c_noise, y):
        """The raw network F (EDM2's UNet.forward): (N, C, R, R) x (N,) x (N,) or None -> (N, C, R, R)."""
        emb = self.embedding(c_noise, y)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)
