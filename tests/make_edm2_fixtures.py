"""Golden outputs of NVlabs/EDM2's own code for tests/test_edm2.py; run by a developer who has EDM2's source:

    python tests/make_edm2_fixtures.py /path/to/edm2     (or EDM2_ROOT=/path/to/edm2 python tests/make_edm2_fixtures.py)

For each of CASES: EDM2's ``training.networks_edm2.Precond`` with these constructor arguments, every parameter random
(the zero-initialised gains too) and rounded to fp16, as EDM2's snapshots store it. EDM2's code computes, in fp32:
``out`` = D(x; sigma, one_hot(labels)) and ``raw`` = its UNet's F(c_in x, log(sigma) / 4, one_hot(labels)) (F is
compared on its own: D hides it at small sigma, where c_out ~ sigma), at 8 noise levels from 0.002 to 80
(make_edm_fixtures.make_inputs).
Latent cases also hold EDM2's ``StabilityVAEEncoder`` (its scale and bias), and DECODED_CASE ``decoded``: its
``decode`` of x[:2] (uint8 pixels) through a tiny random diffusers AutoencoderKL whose weights are stored too
(``vae.<key>``, config in the metadata).
Writes tests/fixtures/edm2_<case>.safetensors: ``edm2.<key>`` (the Precond's state dict, fp16), x, sigma, labels
(conditional cases), out, raw[, decoded, vae.*]; metadata init_kwargs, encoder (JSON: class, vae_name, scale, bias),
loss (JSON: EDM2Loss's P_mean, P_std)[, vae_config]. Nothing of EDM2's code is stored; its pickles are never written
here (they embed its source).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_edm_fixtures import make_inputs  # x, sigma (0.002..80), labels: the same inputs as EDM's fixtures

FIXTURES = Path(__file__).with_name("fixtures")
LOSS = dict(P_mean=-0.8, P_std=1.6)  # EDM2's ImageNet-64 presets' (train_edm2.py); its default is (-0.4, 1.0)
CASES = {  # name: (Precond keyword arguments, encoder class or None)
    # pixels, 10 classes, 3 levels, 2 heads of 8 channels at 8x8 and 4x4, dropout recorded, use_fp16
    "pix_cond": (dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=8, channel_mult=[1, 2, 2],
                      num_blocks=1, attn_resolutions=[8, 4], channels_per_head=8, dropout=0.1, use_fp16=True),
                 "StandardRGBEncoder"),
    # unconditional, every other architecture option away from its default; no encoder (EDM2 reads it as RGB)
    "pix_uncond_opts": (dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2, 2],
                             num_blocks=1, attn_resolutions=[4], channels_per_head=8, channel_mult_noise=2,
                             channel_mult_emb=3, concat_balance=0.4, res_balance=0.25, attn_balance=0.35,
                             clip_act=None, logvar_channels=32, sigma_data=0.6, use_fp16=False),
                        None),
    # latents (4 channels), 1000 classes as the ImageNet-512 models, label_balance away from its default
    "latent_cond": (dict(img_resolution=8, img_channels=4, label_dim=1000, model_channels=16, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[4], channels_per_head=16, label_balance=0.6),
                    "StabilityVAEEncoder"),
    # latents, unconditional (as edm2-img512-xs-uncond), activations clipped at 1.5 so that the clip acts
    "latent_uncond_clip": (dict(img_resolution=8, img_channels=4, label_dim=0, model_channels=8, channel_mult=[1, 2],
                                num_blocks=2, attn_resolutions=[4], channels_per_head=8, clip_act=1.5),
                           "StabilityVAEEncoder"),
}
LIVE_CASES = {  # compared with EDM2's code only when it is importable: EDM2's edm2-img64-xs at full size (125 M)
    "img64_xs": (dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=128, dropout=0.0),
                 "StandardRGBEncoder"),
}
DECODED_CASE = "latent_cond"
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 8, 8],
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=64)


def import_edm2(root: str | os.PathLike):
    """EDM2's modules (training.networks_edm2, training.encoders, training.training_loop, dnnlib) from a source tree.
    training_loop imports psutil for its status lines only: an empty stand-in while it is imported, where psutil is
    not installed (removed afterwards: transformers probes for psutil)."""
    sys.path.insert(0, str(root))
    stub = importlib.util.find_spec("psutil") is None and "psutil" not in sys.modules
    if stub:
        sys.modules["psutil"] = types.ModuleType("psutil")
    try:
        return tuple(importlib.import_module(m) for m in ("training.networks_edm2", "training.encoders",
                                                          "training.training_loop", "dnnlib"))
    finally:
        if stub:
            del sys.modules["psutil"]


def randomize(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and fp16-exact: weights N(0, 1) times a per-tensor scale in [1/2, 2] (the layers
    normalise them), emb_gain N(0, 0.5^2), out_gain 1 + N(0, 0.3^2); the Fourier buffers EDM2's own, in fp16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("emb_gain"):
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith("out_gain"):
                v = 1 + 0.3 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) * 2 ** (2 * torch.rand((), generator=g) - 1)
            p.copy_(v.half().float())
        for b in net.buffers():
            b.copy_(b.half().float())
    return net


def make_case(networks, name: str, seed: int = 0):
    """(EDM2's Precond in eval mode with random fp16-exact weights, its constructor arguments, encoder class)."""
    kwargs, encoder = (CASES | LIVE_CASES)[name]
    torch.manual_seed(seed)  # EDM2's Fourier buffers
    return randomize(networks.Precond(**kwargs), seed).eval(), kwargs, encoder


@torch.no_grad()
def edm2_outputs(net, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EDM2's D and raw F (module doc) of the network upcast to fp32: the function its fp16 weights define."""
    net = net.float()
    labels = inputs.get("labels")
    one_hot = None if labels is None else torch.nn.functional.one_hot(labels, net.label_dim).float()
    x, sigma = inputs["x"], inputs["sigma"]
    c_in = 1 / (sigma**2 + net.sigma_data**2).sqrt()
    raw = net.unet(c_in[:, None, None, None] * x, sigma.log() / 4, one_hot)
    return dict(out=net(x, sigma, one_hot).float(), raw=raw.float())


def tiny_vae():
    """A tiny random diffusers AutoencoderKL (4 latent channels, 8x upsampling) and its state dict."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    return vae, vae.state_dict()


@torch.no_grad()
def edm2_decoded(encoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """EDM2's encoder.decode of x (uint8 (N, 3, 8R, 8R)) through tiny_vae, and the VAE's weights."""
    vae, sd = tiny_vae()
    encoder._vae = vae
    return {"decoded": encoder.decode(x).contiguous()} | {f"vae.{k}": v.contiguous() for k, v in sd.items()}


def write_fixture(path: Path, modules, name: str) -> None:
    networks, encoders, _, _ = modules
    net, kwargs, encoder_class = make_case(networks, name)
    inputs = make_inputs(net)
    tensors = {f"edm2.{k}": v.half().contiguous() for k, v in net.state_dict().items()}
    tensors |= inputs | edm2_outputs(net, inputs)
    encoder = {"class": encoder_class}
    meta = {"init_kwargs": json.dumps(kwargs), "loss": json.dumps(LOSS)}
    if encoder_class == "StabilityVAEEncoder":
        enc = encoders.StabilityVAEEncoder()
        encoder |= {"vae_name": enc.vae_name, "scale": enc.scale.tolist(), "bias": enc.bias.tolist()}
    if name == DECODED_CASE:
        tensors |= edm2_decoded(enc, inputs["x"][:2])
        meta["vae_config"] = json.dumps(VAE_CONFIG)
    save_file(tensors, str(path), metadata=meta | {"encoder": json.dumps(encoder)})


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    root = argv[0] if argv else os.environ.get("EDM2_ROOT")
    if not root:
        sys.exit("usage: python tests/make_edm2_fixtures.py /path/to/edm2 (or set EDM2_ROOT)")
    torch.set_num_threads(1)  # tiny networks: threads only contend
    modules = import_edm2(root)
    FIXTURES.mkdir(exist_ok=True)
    for name in CASES:
        path = FIXTURES / f"edm2_{name}.safetensors"
        write_fixture(path, modules, name)
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
