"""NVlabs/EDM2 network pickles as ours (``EDM2Denoiser``), read without EDM2's code.

The file. EDM2's training snapshots and post-hoc EMA reconstructions (the published ``edm2-img*.pkl``) are a dict of
``ema`` (the network: ``training.networks_edm2.Precond`` holding a ``UNet``, every tensor fp16), ``encoder``
(``StandardRGBEncoder`` for pixel models; ``StabilityVAEEncoder`` for latent ones: the VAE's name and per-channel
latent scale and bias, never the VAE), ``loss_fn`` (``EDM2Loss``: P_mean, P_std, sigma_data) and ``dataset_kwargs``.
They use EDM's persistence protocol, so ``edm_pickle.read_edm_pickle`` reads them: nothing in the file runs, any
global outside its short list is refused.

Conversion (``edm2_network``):
    architecture   the Precond's constructor arguments (positional ones named by its signature) over EDM2's defaults;
                   use_fp16 dropped (fp32 weights; bf16 autocast is a run-time choice); logvar_channels dropped with
                   the uncertainty head; dropout 0 (the network starts a distillation) unless dropout=None keeps it;
                   a resample_filter other than [1, 1] or an unknown argument is refused
    tensors        ``unet.<name>`` -> ``<name>`` (fp16 -> fp32, exact); ``logvar_*`` dropped
    verified       Precond: img_resolution, img_channels, label_dim, sigma_data; UNet: label_balance,
                   concat_balance; every module's class, and per Block out_channels, flavor, resample_mode,
                   resample_filter, num_heads, res_balance, attn_balance, clip_act, per MPConv out_channels: a
                   network that would load key for key but compute another function is refused, naming the module
    schedule       EDMSchedule on EDM2's sampling range [0.002, 80], its training-time noise levels (P_mean, P_std)
                   those of the pickle's EDM2Loss (EDM2's defaults -0.4, 1.0 where it has none)
    latents        a StabilityVAEEncoder's VAE name, scale and bias as the network's ``latents``; pixel models
                   (StandardRGBEncoder, or no encoder, as EDM2's generate_images.py reads them) have none
Anything else EDM2 could pickle as a network (another class, another encoder) is a one-line CheckpointError.
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from ..errors import CheckpointError
from ..nets.edm2 import EDM2Denoiser
from ..nets.unet import build_network
from ..schedules import EDMSchedule
from .edm_pickle import EDM_SIGMA_RANGE, Captured, edm_modules, edm_network_node, edm_state_dict

PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
DROPPED = ("use_fp16", "logvar_channels")
FIXED = {"resample_filter": [1, 1]}  # arguments supported at this value only
ARGUMENTS = tuple(inspect.signature(EDM2Denoiser).parameters.keys() - {"schedule", "latents", "precond", "network"})
LOSS_DEFAULTS = {"P_mean": -0.4, "P_std": 1.0}  # EDM2Loss's
VERIFIED_ATTRS = {  # EDM2 class -> attributes it records that ours must compute with
    "Block": ("out_channels", "flavor", "resample_mode", "resample_filter", "num_heads", "res_balance",
              "attn_balance", "clip_act"),
    "MPConv": ("out_channels",),
    "MPFourier": (),
    "ModuleDict": (),
}
PRECOND_CHILDREN = {"unet": "UNet", "logvar_fourier": "MPFourier", "logvar_linear": "MPConv"}


def is_edm2_network(node: Captured) -> bool:
    """Whether a captured network is EDM2's (a Precond) rather than EDM's (EDMPrecond, VPPrecond, ...)."""
    return node.class_name == "Precond"


def precond_kwargs(node: Captured, source: str) -> dict:
    """The Precond's constructor arguments, positional ones named."""
    args, kwargs = node.state.get("_init_args") or (), node.state.get("_init_kwargs")
    if not isinstance(kwargs, dict) or not isinstance(args, (tuple, list)) or len(args) > len(PRECOND_POSITIONAL):
        raise CheckpointError(f"{source}: the {node.class_name} records no usable constructor arguments")
    return dict(zip(PRECOND_POSITIONAL, args)) | kwargs


def edm2_arch(kwargs: dict, dropout: float | None = 0.0, source: str = "EDM2 network") -> dict:
    """Our arch of an EDM2 Precond's constructor arguments (module doc); CheckpointError for what is not supported."""
    missing = [k for k in ("img_resolution", "img_channels", "label_dim") if k not in kwargs]
    if missing:
        raise CheckpointError(f"{source}: the Precond arguments lack {missing}")
    for k, value in FIXED.items():
        if k in kwargs and list(kwargs[k]) != value:
            raise CheckpointError(f"{source}: not supported: {k} {list(kwargs[k])} (every published EDM2 network "
                                  f"uses {value})")
    arch = {k: v for k, v in kwargs.items() if k not in (*DROPPED, *FIXED)}
    unknown = sorted(set(arch) - set(ARGUMENTS))
    if unknown:
        raise CheckpointError(f"{source}: not supported: EDM2 arguments {unknown}")
    return dict(network="edm2", **arch) | ({} if dropout is None else {"dropout": dropout})


def edm2_schedule(data: dict, source: str) -> EDMSchedule:
    """EDMSchedule on EDM2's sampling range with the training noise levels of the pickle's EDM2Loss (module doc)."""
    loss = data.get("loss_fn")
    if loss is not None and not (isinstance(loss, Captured) and loss.class_name == "EDM2Loss"):
        raise CheckpointError(f"{source}: not supported: loss_fn {getattr(loss, 'class_name', type(loss).__name__)}")
    p = {k: (v if loss is None else loss.state.get(k, v)) for k, v in LOSS_DEFAULTS.items()}
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p.values()) or not p["P_std"] > 0:
        raise CheckpointError(f"{source}: its EDM2Loss has P_mean {p['P_mean']}, P_std {p['P_std']}")
    return EDMSchedule(*EDM_SIGMA_RANGE, p_mean=float(p["P_mean"]), p_std=float(p["P_std"]))


def edm2_latents(data: dict, source: str) -> dict | None:
    """The pickle's encoder as the network's ``latents`` (None: a pixel model)."""
    enc = data.get("encoder")
    if enc is None or (isinstance(enc, Captured) and enc.class_name == "StandardRGBEncoder"):
        return None
    if not (isinstance(enc, Captured) and enc.class_name == "StabilityVAEEncoder"):
        raise CheckpointError(f"{source}: not supported: encoder {getattr(enc, 'class_name', type(enc).__name__)}")
    try:
        scale, bias = (np.asarray(enc.state[k], dtype=np.float64).reshape(-1).tolist() for k in ("scale", "bias"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: its StabilityVAEEncoder has no usable scale and bias ({e})") from None
    return {"vae": str(enc.state.get("vae_name")), "scale": scale, "bias": bias}


def edm2_tensors(node: Captured) -> dict:
    """The Precond's state dict as ours: ``unet.`` dropped, the uncertainty head left out; fp32, contiguous."""
    return {k.removeprefix("unet."): v.detach().float().contiguous() for k, v in edm_state_dict(node).items()
            if not k.startswith("logvar_")}


def precond_node(data, source: str) -> Captured:
    """The captured Precond of an EDM2 pickle's tree; CheckpointError where it is not EDM2's or holds other
    modules than EDM2's."""
    node = edm_network_node(data, source)
    if not is_edm2_network(node) or "unet" not in node.children():
        raise CheckpointError(f"{source}: not an EDM2 network: a {node.class_name} (EDM2's: a Precond with a UNet)")
    for name, child in node.children().items():
        if PRECOND_CHILDREN.get(name) != child.class_name:
            raise CheckpointError(f"{source}: not supported: a {child.class_name} {name!r} in EDM2's Precond")
    return node


def verify(node: Captured, net: EDM2Denoiser, source: str) -> None:
    """CheckpointError unless the captured Precond has our network's modules, of EDM2's classes, with the recorded
    attributes (module doc) ours computes with."""
    unet = node.children()["unet"]
    for owner, attrs, prefix in ((node, ("img_resolution", "img_channels", "label_dim", "sigma_data"), ""),
                                 (unet, ("label_balance", "concat_balance"), "unet.")):
        for attr in attrs:
            if owner.state.get(attr) != getattr(net, attr):
                raise CheckpointError(f"{source}: {prefix}{attr} {owner.state.get(attr)} in the pickle, "
                                      f"{getattr(net, attr)} in its constructor arguments")
    theirs, ours = edm_modules(unet), {k: m for k, m in net.named_modules() if k}
    if set(theirs) != set(ours):
        only_theirs, only_ours = sorted(set(theirs) - set(ours))[:5], sorted(set(ours) - set(theirs))[:5]
        raise CheckpointError(f"{source}: modules differ from the UNet of its arguments: only in the pickle "
                              f"{only_theirs}, only in ours {only_ours}")
    for name, m in theirs.items():
        if m.class_name != type(ours[name]).__name__ or m.class_name not in VERIFIED_ATTRS:
            raise CheckpointError(f"{source}: unet.{name}: a {m.class_name} in the pickle, a "
                                  f"{type(ours[name]).__name__} in ours")
        for attr in VERIFIED_ATTRS[m.class_name]:
            value, mine = m.state.get(attr), getattr(ours[name], attr)
            if (list(value) if isinstance(value, (tuple, list)) else value) != mine:
                raise CheckpointError(f"{source}: unet.{name}: {attr} {value} in the pickle, {mine} in ours")


def edm2_network(data, source: str, dropout: float | None = 0.0) -> EDM2Denoiser:
    """Our network (eval mode) of an EDM2 pickle's tree as ``read_edm_pickle`` returns it (module doc);
    CheckpointError (one line) for anything that does not convert."""
    node = precond_node(data, source)
    parts = data if isinstance(data, dict) else {}  # encoder, loss_fn: a bare pickled network has neither
    arch = edm2_arch(precond_kwargs(node, source), dropout, source) | {"latents": edm2_latents(parts, source)}
    schedule = edm2_schedule(parts, source)
    try:
        net = build_network(arch, schedule, edm2_tensors(node), source)
    except ValueError as e:
        raise CheckpointError(f"{source}: cannot build its EDM2 network: {e}") from None
    verify(node, net, source)
    return net.eval()
