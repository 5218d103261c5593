"""An EDM-preconditioned U-Net denoiser for images: the ADM network (Dhariwal & Nichol 2021) as laid out in
NVlabs/edm's ``DhariwalUNet``, the network of EDM's ImageNet-64 checkpoint.

Preconditioning (Karras et al. 2022) written for any Schedule, as in ``networks.MLPDenoiser``: with s = sigma/alpha
and x = x_t / alpha,  D(x_t, t, y) = c_skip(s) x + c_out(s) F(c_in(s) x, log(s) / 4, y).

Module and parameter names follow DhariwalUNet so that EDM checkpoints import key by key (``edm_import.py``):
``map_layer0``, ``map_layer1``, ``map_label``, ``enc.{R}x{R}_conv | _down | _block{i}``,
``dec.{R}x{R}_in0 | _in1 | _up | _block{i}``, ``out_norm``, ``out_conv``; inside a block ``norm0``, ``conv0``,
``affine``, ``norm1``, ``conv1``, ``skip``, ``norm2``, ``qkv``, ``proj``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_per_example
from .schedules import Schedule, expand_like

UNET_CONFIGS = {
    # EDM's edm-imagenet-64x64-cond-adm.pkl (trained with dropout 0.10; 0 here: the net is a distillation start).
    "edm-imagenet64-adm": dict(img_channels=3, img_resolution=64, label_dim=1000, model_channels=192,
                               channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8],
                               channels_per_head=64, dropout=0.0, sigma_data=0.5),
    # 8x8 one-channel images with 10 classes (e.g. sklearn's digits): CPU tests and a CPU-trainable teacher.
    "tiny": dict(img_channels=1, img_resolution=8, label_dim=10, model_channels=32, channel_mult=[1, 2],
                 num_blocks=1, attn_resolutions=[4], channels_per_head=32, dropout=0.0, sigma_data=0.5),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: 32 groups, at least 4 channels per group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-5)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    """EDM's [1,1] resampling filter: nearest-neighbour 2x upsampling or 2x2 average pooling, (N, C, H, W)."""
    if up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return F.avg_pool2d(x, 2) if down else x


def positional_embedding(c: torch.Tensor, channels: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer sinusoidal embedding of c_noise (N,) -> (N, channels): [cos(c f_i), sin(c f_i)]."""
    freqs = torch.arange(channels // 2, dtype=torch.float32, device=c.device) / (channels // 2)
    arg = c.float()[:, None] * ((1 / max_positions) ** freqs)[None]
    return torch.cat([arg.cos(), arg.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with adaptive scale/shift and optional self-attention.

    x: (N, cin, H, W), emb: (N, emb_channels) -> (N, cout, H', W'), H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, up: bool = False, down: bool = False,
                 heads: int = 0, dropout: float = 0.0):
        super().__init__()
        self.cin, self.up, self.down, self.heads, self.dropout = cin, up, down, heads, dropout
        self.norm0 = group_norm(cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * cout)
        self.norm1 = group_norm(cout)
        self.conv1 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        if heads:
            self.norm2 = group_norm(cout)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.proj = zero_init(nn.Conv2d(cout, cout, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(resample(F.silu(self.norm0(x)), self.up, self.down))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = resample(x, self.up, self.down)
        x = h + (self.skip(x) if self.skip is not None else x)
        return self.attention(x) if self.heads else x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x + proj(multi-head self-attention over the H*W positions), (N, C, H, W).

        EDM's channel layout: qkv's 3C output channels are (head, channel-in-head, q|k|v), the heads' outputs
        are concatenated head-major.
        """
        n, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm2(x)).permute(0, 2, 3, 1).reshape(n, hgt * wid, self.heads, c // self.heads, 3)
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(-1))  # (N, heads, H*W, C/heads)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hgt, wid, c)
        return x + self.proj(a.permute(0, 3, 1, 2))


class UNetDenoiser(nn.Module):
    """D(x_t, t, y): (N, C, H, W) x (N,) x (N,) int64 labels or None -> (N, C, H, W) float32.

    channel_mult[i] sets the channels at resolution img_resolution / 2^i; attention runs at the resolutions in
    attn_resolutions (and in the innermost decoder block) with heads of channels_per_head channels.
    """

    def __init__(self, img_channels: int, img_resolution: int, schedule: Schedule, model_channels: int = 192,
                 channel_mult=(1, 2, 3, 4), num_blocks: int = 3, attn_resolutions=(32, 16, 8), label_dim: int = 0,
                 dropout: float = 0.0, sigma_data: float = 0.5, channels_per_head: int = 64,
                 channel_mult_emb: int = 4):
        super().__init__()
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult has {len(channel_mult)} levels)")
        self.schedule, self.sigma_data, self.label_dim = schedule, sigma_data, label_dim
        self.img_channels, self.img_resolution, self.model_channels = img_channels, img_resolution, model_channels
        self.arch = dict(img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
                         model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
                         attn_resolutions=list(attn_resolutions), channels_per_head=channels_per_head,
                         dropout=dropout, sigma_data=sigma_data, channel_mult_emb=channel_mult_emb)
        emb = model_channels * channel_mult_emb

        def block(cin, cout, attention=False, **kw):
            heads = cout // channels_per_head if attention else 0
            if attention and (heads == 0 or cout % heads):
                raise ValueError(f"attention on {cout} channels with channels_per_head={channels_per_head} gives "
                                 f"{heads} heads; that must be at least 1 and divide {cout}")
            return UNetBlock(cin, cout, emb, heads=heads, dropout=dropout, **kw)

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

    def unet(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The raw network F (EDM's DhariwalUNet.forward): (N, C, H, W) x (N,) x (N,) or None -> (N, C, H, W)."""
        emb = F.silu(self.map_layer0(positional_embedding(c_noise, self.model_channels)))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label.weight.t()[y]  # = map_label(one_hot(y))
        emb = F.silu(emb)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.cin:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x_t, t, y)
        alpha, sigma = self.schedule.alpha_sigma(t.float())
        s, sd = sigma / alpha, self.sigma_data
        x = x_t.float() / expand_like(alpha, x_t)
        c_skip, c_out, c_in = (expand_like(c, x) for c in (sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(),
                                                            1 / (s**2 + sd**2).sqrt()))
        return c_skip * x + c_out * self.unet(c_in * x, s.log() / 4, y)

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
        if torch.compiler.is_compiling() or (y.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # the range check needs a host sync
        if y.numel() and not bool(((y >= 0) & (y < self.label_dim)).all()):
            raise ValueError(f"class labels must lie in [0, {self.label_dim}), got min {int(y.min())}, "
                             f"max {int(y.max())}")
