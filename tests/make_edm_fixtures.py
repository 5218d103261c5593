"""Golden outputs of NVlabs/EDM's own networks for tests/test_edm_import.py; run by a developer who has EDM's code:

    python tests/make_edm_fixtures.py /path/to/edm      (or EDM_ROOT=/path/to/edm python tests/make_edm_fixtures.py)

For each of CASES: EDM's network of that preconditioning class and constructor arguments, every parameter and buffer
random (the zero-initialised layers too) and rounded to fp16 values, so that the fp16 state dict stored is exact;
D(x; sigma, labels) evaluated by EDM's code in fp32 at N_SIGMAS noise levels from 0.002 to 80, with random x and labels.
Writes tests/fixtures/edm_<case>.safetensors: tensors ``edm.<key>`` (EDM's state dict), ``x``, ``sigma``, ``labels``
(conditional cases), ``out`` (EDM's D); metadata ``precond`` (the class name) and ``init_kwargs`` (JSON).
LIVE_CASES are compared with EDM's code only when it is importable (too large to store).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

FIXTURES = Path(__file__).with_name("fixtures")
N_SIGMAS = 8
SMALL = dict(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4])
CASES = {  # name: (preconditioning class, constructor arguments)
    # ADM: 64 channels per head, so the attention levels need 64 channels
    "adm_cond_edm": ("EDMPrecond", SMALL | dict(label_dim=10, model_channels=16, channel_mult=[1, 4],
                                                channel_mult_emb=1, augment_dim=9)),
    "ddpmpp_cond_vp": ("VPPrecond", SMALL | dict(label_dim=10, embedding_type="positional", encoder_type="standard")),
    "ddpmpp_uncond_vp": ("VPPrecond", SMALL | dict(channel_mult=[1, 1, 2], beta_d=18.0, beta_min=0.2, M=500,
                                                   epsilon_t=1e-4)),
    "ncsnpp_cond_ve": ("VEPrecond", SMALL | dict(label_dim=10, embedding_type="fourier", channel_mult_noise=2,
                                                 encoder_type="residual", resample_filter=[1, 3, 3, 1])),
    "ddpmpp_cond_edm": ("EDMPrecond", SMALL | dict(label_dim=4, model_type="SongUNet", sigma_data=0.6)),
    "song_skip_uncond_ve": ("VEPrecond", SMALL | dict(channel_mult=[1, 1, 2], encoder_type="skip", decoder_type="skip",
                                                      embedding_type="fourier", resample_filter=[1, 3, 3, 1])),
    "song_residual_skipdec_cond_edm": ("EDMPrecond", SMALL | dict(label_dim=3, model_type="SongUNet",
                                                                  encoder_type="residual", decoder_type="skip",
                                                                  sigma_min=0.01, sigma_max=50.0)),
}
LIVE_CASES = {  # multi-head ADM attention: 64 channels at 8x8 (1 head), 192 at 4x4 (3 heads)
    "adm_multihead_uncond_edm": ("EDMPrecond", dict(img_resolution=8, img_channels=3, model_channels=64,
                                                    channel_mult=[1, 3], num_blocks=1, attn_resolutions=[8, 4])),
}


def import_edm(root: str | os.PathLike):
    """EDM's training.networks, training.loss and torch_utils.persistence from a clone at ``root``."""
    sys.path.insert(0, str(root))
    return tuple(importlib.import_module(m) for m in ("training.networks", "training.loss", "torch_utils.persistence"))


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer (resampling filters aside) random and fp16-exact: weights N(0, 1/fan_in),
    GroupNorm weights 1 + N(0, 0.3^2), other vectors N(0, 0.3^2), Fourier frequencies EDM's N(0, 16^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*net.named_parameters(), *net.named_buffers()]:
            if name.endswith("resample_filter"):
                continue
            if name.endswith("freqs"):
                v = 16 * torch.randn(p.shape, generator=g)
            elif p.dim() >= 2:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            else:
                v = ("norm" in name and name.endswith("weight")) + 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(v.half().float())
    return net


def make_case(networks, name: str, seed: int = 0):
    """(EDM network in eval mode with random weights, its class name, its constructor arguments)."""
    cls, kwargs = (CASES | LIVE_CASES)[name]
    net = getattr(networks, cls)(**kwargs)
    return randomize(net, seed).eval(), cls, kwargs


def make_inputs(net, seed: int = 1) -> dict[str, torch.Tensor]:
    """x (N, C, H, W): data-like plus sigma-scaled noise; sigma (N,) log-spaced 0.002..80; labels (N,) if
    conditional."""
    g = torch.Generator().manual_seed(seed)
    c, r = net.img_channels, net.img_resolution
    sigma = torch.logspace(math.log10(0.002), math.log10(80.0), N_SIGMAS)
    x = 0.5 * torch.randn(N_SIGMAS, c, r, r, generator=g) + sigma[:, None, None, None] * torch.randn(
        N_SIGMAS, c, r, r, generator=g)
    out = dict(x=x, sigma=sigma)
    if net.label_dim:
        out["labels"] = torch.randint(net.label_dim, (N_SIGMAS,), generator=g)
    return out


def edm_output(net, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """EDM's D(x; sigma, one_hot(labels)) in fp32, (N, C, H, W)."""
    labels = inputs.get("labels")
    one_hot = None if labels is None else torch.nn.functional.one_hot(labels, net.label_dim).float()
    with torch.no_grad():
        return net(inputs["x"], inputs["sigma"], one_hot).float()


def write_fixture(path: Path, net, cls: str, kwargs: dict, inputs: dict[str, torch.Tensor]) -> None:
    tensors = {f"edm.{k}": v.half().contiguous() for k, v in net.state_dict().items()}
    tensors |= inputs | {"out": edm_output(net, inputs)}
    save_file(tensors, str(path), metadata={"precond": cls, "init_kwargs": json.dumps(kwargs)})


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else os.environ.get("EDM_ROOT")
    if not root:
        sys.exit("usage: python tests/make_edm_fixtures.py /path/to/edm (or set EDM_ROOT)")
    networks, _, _ = import_edm(root)
    FIXTURES.mkdir(exist_ok=True)
    for name in CASES:
        net, cls, kwargs = make_case(networks, name)
        path = FIXTURES / f"edm_{name}.safetensors"
        write_fixture(path, net, cls, kwargs, make_inputs(net))
        print(f"{path}: {sum(p.numel() for p in net.parameters())} parameters, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
