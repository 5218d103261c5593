"""Preconditioned U-Net denoisers for images: the architectures of NVlabs/EDM's networks.

``UNetDenoiser``      ADM (Dhariwal & Nichol 2021) as laid out in EDM's ``DhariwalUNet`` (EDM's ImageNet-64 network).
``SongUNetDenoiser``  DDPM++ and NCSN++ (Song et al. 2021) as laid out in EDM's ``SongUNet`` (its CIFAR-10, FFHQ and
                      AFHQv2 networks): positional or Fourier noise embedding, standard/skip/residual encoder,
                      standard/skip decoder, [1,1] or [1,3,3,1] resampling filter.
Both are written for any Schedule through a preconditioning (``precond.py``; EDM's by default): with s = sigma/alpha
and x = x_t / alpha,  D(x_t, t, y) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), y), F = ``unet``.

Module and parameter names are EDM's, so that EDM state dicts map key by key (``teachers/edm_pickle.py``):
``map_noise``, ``map_label``, ``map_layer0``, ``map_layer1``, ``enc.{R}x{R}_conv | _down | _block{i} | _aux_down |
_aux_skip | _aux_residual``, ``dec.{R}x{R}_in0 | _in1 | _up | _block{i} | _aux_up | _aux_norm | _aux_conv``,
``out_norm``, ``out_conv``; inside a block ``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``, ``skip``, ``norm2``,
``qkv``, ``proj``. Module attributes that set the computed function carry EDM's names too (``num_heads``,
``skip_scale``, ``adaptive_scale``, ``up``, ``down``, ``fused_resample``, ``endpoint``, ``max_positions``; GroupNorm's
``num_groups``, ``eps``) so that a checkpoint's recorded values can be compared with ours.

``.arch`` is a JSON-able dict of every constructor argument, with ``network`` ("adm" or "song") and ``precond``
(the preconditioning's config); ``build_network(arch)`` rebuilds the network. Class labels are int64 (N,): label y
computes what EDM computes for the one-hot vector e_y. ``label_dropout`` (EDM's training-time classifier-free-guidance
dropout) is recorded in the arch and never applied; ``dropout`` applies in train mode.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_per_example, value_checks_wanted
from ..errors import CheckpointError
from ..schedules import EDMSchedule, Schedule
from .precond import EDMPrecond, make_precond, precondition

EDM_PRECOND = EDMPrecond().config()
UNET_CONFIGS = {
    # EDM's edm-imagenet-64x64-cond-adm.pkl (trained with dropout 0.10; 0 here: the net is a distillation start).
    "edm-imagenet64-adm": dict(network="adm", img_channels=3, img_resolution=64, label_dim=1000, model_channels=192,
                               channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                               channels_per_head=64, channel_mult_emb=4, dropout=0.0, label_dropout=0.0,
                               sigma_data=0.5, precond=EDM_PRECOND),
    # 8x8 one-channel images with 10 classes (e.g. sklearn's digits): CPU tests and a CPU-trainable teacher. Its
    # 32 channels per head make it no EDM DhariwalUNet (64 per head there).
    "tiny": dict(network="adm", img_channels=1, img_resolution=8, label_dim=10, model_channels=32, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[4], channels_per_head=32, channel_mult_emb=4, dropout=0.0,
                 label_dropout=0.0, sigma_data=0.5, precond=EDM_PRECOND),
}


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """EDM's GroupNorm: 32 groups, at least 4 channels per group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, without reading ``training`` when p is 0: torch.compile then builds one graph for a block in train
    and in eval mode (the frozen teacher's calls and the student's no-grad calls share it)."""
    return F.dropout(x, p=p, training=training) if p else x


def resample_kernel(taps) -> torch.Tensor:
    """The 2-D resampling filter f f^T / sum(f)^2 of 1-D taps f, (1, 1, k, k) float32."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (f.outer(f) / f.sum().square())[None, None]


class Resampling:
    """2x up- or downsampling by a separable filter (EDM's Conv2d resampling), per channel, (N, C, H, W).

    Down: convolution with the filter, stride 2; up: transposed convolution with 4 x the filter, stride 2; padding
    (k - 1) / 2 for a k-tap filter. The [1,1] filter is nearest-neighbour upsampling / 2x2 average pooling (the same
    numbers, computed as such). The filter is a buffer outside the state dict (the taps are in the arch).
    """

    def init_resampling(self, up: bool, down: bool, taps) -> None:
        if up == down:
            raise ValueError(f"a resampling layer must go either up or down, got up={up}, down={down}")
        self.up, self.down, self.taps = up, down, tuple(taps)
        self.register_buffer("resample_filter", resample_kernel(self.taps), persistent=False)

    def resample(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.taps) == 2 and self.taps[0] == self.taps[1]:
            return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, 2)
        f = self.resample_filter.to(x.dtype)
        c, pad = x.shape[1], (f.shape[-1] - 1) // 2
        if self.up:
            return F.conv_transpose2d(x, (4 * f).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)


class Resample(Resampling, nn.Module):
    """A resampling without weights (EDM's kernel-0 Conv2d): (N, C, H, W) -> (N, C, 2H or H/2, ...)."""

    def __init__(self, up: bool = False, down: bool = False, resample_filter=(1, 1)):
        super().__init__()
        self.init_resampling(up, down, resample_filter)

    def forward(self, x):
        return self.resample(x)


class ResampleConv2d(Resampling, nn.Conv2d):
    """Resampling followed by a convolution (padding kernel // 2), (N, cin, H, W) -> (N, cout, 2H or H/2, ...).

    fused_resample (down only): EDM's fused form, another function: the convolution at the input resolution (padding
    kernel // 2 + (k - 1) / 2), then the stride-2 filter (no padding), then the bias.
    """

    def __init__(self, cin: int, cout: int, kernel: int, up: bool = False, down: bool = False,
                 resample_filter=(1, 1), fused_resample: bool = False):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.init_resampling(up, down, resample_filter)
        if fused_resample and up:
            raise ValueError("fused_resample is implemented for downsampling only")
        self.fused_resample = fused_resample

    def forward(self, x):
        if not self.fused_resample:
            return super().forward(self.resample(x))
        f = self.resample_filter.to(x.dtype)
        x = F.conv2d(x, self.weight, padding=self.kernel_size[0] // 2 + (f.shape[-1] - 1) // 2)
        x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), groups=x.shape[1], stride=2)
        return x + self.bias[:, None, None]


def conv_layer(cin: int, cout: int, kernel: int, up: bool = False, down: bool = False, resample_filter=(1, 1),
           fused_resample: bool = False) -> nn.Module:
    """EDM's Conv2d as our module: nn.Conv2d, or with up/down a ResampleConv2d (kernel > 0) or a Resample (0)."""
    if not (up or down):
        return nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    if kernel == 0:
        return Resample(up, down, resample_filter)
    return ResampleConv2d(cin, cout, kernel, up, down, resample_filter, fused_resample)


class PositionalEmbedding(nn.Module):
    """c (N,) -> (N, num_channels): [cos(c f_i), sin(c f_i)], f_i = max_positions^(-i / (num_channels/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=c.device) / (half - int(self.endpoint))
        arg = c.float()[:, None] * ((1 / self.max_positions) ** freqs)[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """c (N,) -> (N, num_channels): [cos(2 pi c f_i), sin(2 pi c f_i)], f (buffer freqs): fixed N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = c.float()[:, None] * (2 * math.pi * self.freqs)[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def embed_labels(layer: nn.Linear, y: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """layer(gain * one_hot(y)) as a column gather: labels (N,) int64 -> (N, out_features)."""
    e = layer.weight.t()[y]
    e = e * gain if gain != 1 else e
    return e if layer.bias is None else e + layer.bias


class UNetBlock(nn.Module):
    """EDM's residual block (one block for ADM, DDPM++ and NCSN++), x: (N, in_channels, H, W), emb:
    (N, emb_channels) -> (N, out_channels, H', W'), H' = 2H (up), H/2 (down) or H.

    h = conv0(silu(norm0(x))) (resampled first); then silu(norm1(h) (1 + scale) + shift) with (scale, shift) =
    affine(emb) (adaptive_scale), or silu(norm1(h + affine(emb))); conv1(dropout(.)); plus skip(x) (identity,
    resampling, or a 1x1 convolution: with resample_proj or a change of channels); times skip_scale. With num_heads:
    x + proj(self-attention), times skip_scale again.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 num_heads: int = 0, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter=(1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads, self.dropout, self.skip_scale = num_heads, dropout, skip_scale
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = conv_layer(in_channels, out_channels, 3, up, down, resample_filter)
        self.affine = nn.Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = conv_layer(in_channels, out_channels, kernel, up, down, resample_filter)
        if num_heads:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = zero_init(nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(dropout(h, self.dropout, self.training))
        x = self.scaled(h + (self.skip(x) if self.skip is not None else x))
        return self.scaled(self.attention(x)) if self.num_heads else x

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.skip_scale if self.skip_scale != 1 else x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x + proj(multi-head self-attention over the H*W positions), (N, C, H, W).

        EDM's channel layout: qkv's 3C output channels are (head, channel-in-head, q|k|v), the heads' outputs
        are concatenated head-major.
        """
        n, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm2(x)).permute(0, 2, 3, 1).reshape(n, hgt * wid, self.num_heads, c // self.num_heads, 3)
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(-1))  # (N, heads, H*W, C/heads)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hgt, wid, c)
        return x + self.proj(a.permute(0, 3, 1, 2))


def check_levels(img_resolution: int, channel_mult) -> None:
    if img_resolution % 2 ** (len(channel_mult) - 1):
        raise ValueError(f"img_resolution={img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                         f"(channel_mult has {len(channel_mult)} levels)")


class ImageDenoiser(nn.Module):
    """D(x_t, t, y): (N, C, H, W) x (N,) x (N,) int64 labels or None -> (N, C, H, W) float32.

    The base of the image networks: preconditioning, input checks and the arch; a subclass defines ``unet``, the raw
    network F(x (N, C, H, W), c_noise (N,), y) -> (N, C, H, W). ``sigma_data`` is the data's standard deviation (the
    EMD loss weights use it); ``precond`` a config of precond.py, None for EDM's built on sigma_data.
    """

    network: str

    def __init__(self, schedule: Schedule, arch: dict):
        super().__init__()
        if arch["network"] != self.network:
            raise ValueError(f"{type(self).__name__} builds network {self.network!r}, not {arch['network']!r}")
        self.precond = make_precond(arch["precond"] or EDMPrecond(arch["sigma_data"]).config())
        if self.precond.type == "edm" and self.precond.sigma_data != arch["sigma_data"]:
            raise ValueError(f"sigma_data={arch['sigma_data']} but the edm preconditioning has sigma_data "
                             f"{self.precond.sigma_data}")
        self.schedule, self.sigma_data, self.label_dim = schedule, arch["sigma_data"], arch["label_dim"]
        self.img_channels, self.img_resolution = arch["img_channels"], arch["img_resolution"]
        self.arch = arch | {"precond": self.precond.config()}
        check_levels(self.img_resolution, arch["channel_mult"])

    def unet(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x_t, t, y)
        return precondition(self.precond, self.schedule, x_t, t, self.unet, y)

    def check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        """ValueError on a wrong image shape, t not (N,), or labels that do not fit label_dim."""
        c, r = self.img_channels, self.img_resolution
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != (c, r, r):
            raise ValueError(f"x_t must have shape (N, {c}, {r}, {r}), got {tuple(x_t.shape)}")
        check_per_example("x_t", x_t, t=t, y=y)
        if not self.label_dim:
            if y is not None:
                raise ValueError("class labels y were given to an unconditional U-Net (label_dim=0)")
            return
        if y is None:
            raise ValueError(f"this U-Net is class-conditional (label_dim={self.label_dim}): pass labels y of "
                             f"shape ({x_t.shape[0]},)")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if not value_checks_wanted(y):
            return  # the range check needs a host sync
        if y.numel() and not bool(((y >= 0) & (y < self.label_dim)).all()):
            raise ValueError(f"class labels must lie in [0, {self.label_dim}), got min {int(y.min())}, "
                             f"max {int(y.max())}")


class UNetDenoiser(ImageDenoiser):
    """ADM (EDM's DhariwalUNet). channel_mult[i] sets the channels at resolution img_resolution / 2^i; attention
    runs at the resolutions in attn_resolutions, in every decoder block there, and in the innermost decoder block,
    with out_channels // channels_per_head heads (EDM: 64 channels per head). Labels add to the embedding after
    map_layer1."""

    network = "adm"

    def __init__(self, img_channels: int, img_resolution: int, schedule: Schedule, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(32, 16, 8), label_dim: int = 0,
                 dropout: float = 0.0, sigma_data: float = 0.5, channels_per_head: int = 64,
                 channel_mult_emb: int = 4, label_dropout: float = 0.0, precond: dict | None = None,
                 network: str = "adm"):
        super().__init__(schedule, dict(
            network=network, img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
            model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
            attn_resolutions=list(attn_resolutions), channels_per_head=channels_per_head,
            channel_mult_emb=channel_mult_emb, dropout=dropout, label_dropout=label_dropout, sigma_data=sigma_data,
            precond=precond))
        emb = model_channels * channel_mult_emb

        def block(cin, cout, attention=False, **kw):
            heads = cout // channels_per_head if attention else 0
            if attention and (heads == 0 or cout % heads):
                raise ValueError(f"attention on {cout} channels with channels_per_head={channels_per_head} gives "
                                 f"{heads} heads; that must be at least 1 and divide {cout}")
            return UNetBlock(cin, cout, emb, num_heads=heads, dropout=dropout, **kw)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = nn.Linear(label_dim, emb, bias=False) if label_dim else None
        if label_dim:
            nn.init.normal_(self.map_label.weight)

        self.enc, skips, cout = nn.ModuleDict(), [], img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(img_channels, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = block(cin, cout, res in attn_resolutions)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = block(cin, cout, res in attn_resolutions)
        self.out_norm = group_norm(cout)
        self.out_conv = zero_init(nn.Conv2d(cout, img_channels, 3, padding=1))

    def encode(self, x, c_noise, y) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The embedding and the encoder: (the innermost features (N, C', H / 2^L, W / 2^L), the skip features,
        the embedding (N, emb_channels))."""
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(c_noise))))
        if self.map_label is not None:
            emb = emb + embed_labels(self.map_label, y)
        emb = F.silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        return x, skips, emb

    def unet(self, x, c_noise, y):
        """The raw network F (EDM's DhariwalUNet.forward): (N, C, H, W) x (N,) x (N,) or None -> (N, C, H, W)."""
        x, skips, emb = self.encode(x, c_noise, y)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class SongUNetDenoiser(ImageDenoiser):
    """DDPM++ / NCSN++ (EDM's SongUNet). Blocks: one attention head, skip_scale sqrt(1/2), GroupNorm eps 1e-6, the
    embedding added before norm1 (adaptive_scale off), 1x1 projections in resampling skips (resample_proj); attention
    at attn_resolutions (in the decoder only in a level's last block) and in the innermost decoder block.

    Noise embedding of model_channels * channel_mult_noise channels, positional (with endpoint) or Fourier, its sin
    and cos halves swapped; labels (a Linear with bias on sqrt(label_dim) one-hots) add to it before map_layer0.
    encoder_type: "standard", "skip" (the input image, downsampled by the filter, enters each level through a 1x1
    convolution) or "residual" (a fused-downsampling 3x3 convolution of the previous level's output, summed and
    scaled by sqrt(1/2)); decoder_type: "standard" or "skip" (every level's output is projected to the image and the
    projections are upsampled and summed). resample_filter: [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    """

    network = "song"

    def __init__(self, img_channels: int, img_resolution: int, schedule: Schedule, model_channels: int = 128,
                 channel_mult=(1, 2, 2, 2), num_blocks: int = 4, attn_resolutions=(16,), label_dim: int = 0,
                 dropout: float = 0.0, sigma_data: float = 0.5, channel_mult_emb: int = 4,
                 label_dropout: float = 0.0, embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard", resample_filter=(1, 1),
                 precond: dict | None = None, network: str = "song"):
        for name, value, choices in (("embedding_type", embedding_type, ("positional", "fourier")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in choices:
                raise ValueError(f"{name}={value!r}; choose one of {choices}")
        super().__init__(schedule, dict(
            network=network, img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
            model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
            attn_resolutions=list(attn_resolutions), channel_mult_emb=channel_mult_emb, dropout=dropout,
            label_dropout=label_dropout, embedding_type=embedding_type, channel_mult_noise=channel_mult_noise,
            encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=list(resample_filter),
            sigma_data=sigma_data, precond=precond))
        emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        block = functools.partial(UNetBlock, emb_channels=emb, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                                  resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)
        resampler = functools.partial(conv_layer, resample_filter=resample_filter)

        self.map_noise = (PositionalEmbedding(noise, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise))
        self.map_label = nn.Linear(label_dim, noise) if label_dim else None
        self.map_layer0 = nn.Linear(noise, emb)
        self.map_layer1 = nn.Linear(emb, emb)

        self.enc, skips, cout, caux = nn.ModuleDict(), [], img_channels, img_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = nn.Conv2d(img_channels, cout, 3, padding=1)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = resampler(caux, caux, 0, down=True)
                    self.enc[f"{res}x{res}_aux_skip"] = nn.Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = resampler(caux, cout, 3, down=True, fused_resample=True)
                    caux = cout
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = block(cin, cout, num_heads=int(res in attn_resolutions))
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, num_heads=1)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = block(cin, cout, num_heads=int(attention))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = resampler(img_channels, img_channels, 0, up=True)
                self.dec[f"{res}x{res}_aux_norm"] = group_norm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = zero_init(nn.Conv2d(cout, img_channels, 3, padding=1))

    def unet(self, x, c_noise, y):
        """The raw network F (EDM's SongUNet.forward): (N, C, H, W) x (N,) x (N,) or None -> (N, C, H, W)."""
        emb = torch.cat(self.map_noise(c_noise).chunk(2, dim=1)[::-1], dim=1)  # [sin, cos]
        if self.map_label is not None:
            emb = emb + embed_labels(self.map_label, y, math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if name.endswith("_aux_down"):
                aux = block(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + block(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if name.endswith("_aux_up"):
                aux = block(aux)
            elif name.endswith("_aux_norm"):
                tmp = block(x)
            elif name.endswith("_aux_conv"):
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


NETWORKS = {cls.network: cls for cls in (UNetDenoiser, SongUNetDenoiser)}


def network_class(kind: str) -> type[ImageDenoiser]:
    """The network class of an arch's "network"; EDM2's lives in edm2.py, which builds on this module. ValueError
    for an unknown network."""
    if kind == "edm2":
        from .edm2 import EDM2Denoiser

        return EDM2Denoiser
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; choose one of {(*NETWORKS, 'edm2')}")
    return NETWORKS[kind]


def check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], source: str) -> None:
    """CheckpointError (one line) naming missing/unexpected keys or the first shape mismatch."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match the architecture: {len(missing)} missing {missing[:5]}, "
                              f"{len(unexpected)} unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, the architecture expects "
                                  f"{tuple(shape)}")


ARCH_INT_MAX = 1 << 20  # any count or size in an arch (channels, resolution, blocks, labels)


def check_arch(arch) -> None:
    """ValueError (one line) unless ``arch`` is an arch's shape: a dict of numbers (ints in [0, ARCH_INT_MAX], floats
    finite), strings, booleans, None, flat lists of such ints, ``precond`` a flat dict of the same and ``latents`` one
    of names and short lists of finite numbers (an arch read from a file reaches the constructors only so)."""
    def plain(key, v) -> bool:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return True
        if isinstance(v, int):
            return 0 <= v <= ARCH_INT_MAX
        return isinstance(v, float) and (math.isfinite(v) or (key == "sigma_max" and v == math.inf))

    if not isinstance(arch, dict):
        raise ValueError(f"an architecture is a JSON object, got {type(arch).__name__}")
    for key, v in arch.items():
        if key == "precond" and isinstance(v, dict):
            bad = [k for k, x in v.items() if not plain(k, x)]
            if bad:
                raise ValueError(f"precond {bad[0]}: a {_shown(v[bad[0]])}, not a plain number, string or flag")
        elif key == "latents" and isinstance(v, dict):  # EDM2's latent encoder: the VAE's name, scale and bias
            for k, x in v.items():
                if not (isinstance(x, str) or (isinstance(x, list) and len(x) <= 64 and all(
                        isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) for f in x))):
                    raise ValueError(f"latents {k}: a {_shown(x)}, not a name or a short list of finite numbers")
        elif isinstance(v, list):
            if len(v) > 64 or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= ARCH_INT_MAX
                                      for x in v):
                raise ValueError(f"{key}: not a short list of counts in [0, {ARCH_INT_MAX}]")
        elif not (key != "precond" and plain(key, v)):
            raise ValueError(f"{key}: {_shown(v)}, not a number in [0, {ARCH_INT_MAX}], a string or a flag")


def _shown(v) -> str:
    """A value from a file, for a message: numbers and short strings as they are, anything else by its type."""
    return repr(v) if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 40) else type(v).__name__


def build_network(arch: dict, schedule: Schedule | None = None, tensors: dict[str, torch.Tensor] | None = None,
                  source: str = "state dict") -> ImageDenoiser:
    """The network ``arch`` describes (no "network" key: ADM, as in files written before SongUNet support), in the
    EDM schedule unless one is given. With ``tensors`` (its whole state dict, fp32) it is built without initialising
    weights and takes them (CheckpointError from ``source`` for missing/unexpected keys or shapes).
    ValueError for an unknown network or argument, or numbers no network is built with (``check_arch``)."""
    check_arch(arch)
    kind = arch.get("network", "adm")
    cls = network_class(kind)
    schedule = schedule or EDMSchedule()
    try:
        with torch.device("meta") if tensors is not None else contextlib.nullcontext():
            net = cls(schedule=schedule, **arch)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, KeyError) as e:  # e.g. 0 channels
        raise ValueError(f"bad {kind} architecture: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if tensors is None:
        return net
    check_keys(tensors, {k: v.shape for k, v in net.state_dict().items()}, source)
    net.load_state_dict(tensors, assign=True)
    device = next(iter(tensors.values())).device
    for m in net.modules():
        if isinstance(m, Resampling):  # the one buffer outside the state dict
            m.resample_filter = resample_kernel(m.taps).to(device)
    return net
