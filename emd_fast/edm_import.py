"""Import NVlabs/EDM checkpoints into ``UNetDenoiser``; save and load our U-Net safetensors files.

EDM key -> our key (EDMPrecond holds DhariwalUNet as ``.model``; unet.py keeps DhariwalUNet's module names):
    model.<name>                                  -> <name>      e.g. model.enc.64x64_block0.norm0.weight
    model.{enc,dec}.<block>.{conv0,skip}.resample_filter -> dropped: the constant [1,1] filter of a resampling
                                                     block (checked), which unet.resample hard-codes
    model.map_augment.weight                      -> dropped: EDM uses it only when augment_labels are passed,
                                                     which sampling never does
Only ``convert_edm_pickle`` needs EDM's code (its ``torch_utils``/``dnnlib`` importable, e.g. a clone of the EDM
repository on PYTHONPATH); everything else reads plain state dicts and safetensors.

    python -m emd_fast.edm_import edm-imagenet-64x64-cond-adm.pkl imagenet64.safetensors
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import torch
from .checkpoint import CheckpointError, read_safetensors, save_safetensors_atomic
from .schedules import EDMSchedule, make_schedule
from .unet import UNET_CONFIGS, UNetBlock, UNetDenoiser

EDM_PREFIX = "model."
EDM_IGNORED = ("model.map_augment.weight",)
RESAMPLE_FILTER = torch.full((1, 1, 2, 2), 0.25)  # EDM's [1,1] filter: f f^T / sum(f)^2
FORMAT = "emd_fast.unet"


def resolve_config(config: str | dict) -> tuple[str, dict]:
    """(name, UNetDenoiser kwargs without schedule) from a UNET_CONFIGS name or a kwargs dict (name 'custom')."""
    if isinstance(config, dict):
        return "custom", dict(config)
    if config not in UNET_CONFIGS:
        raise ValueError(f"unknown U-Net config {config!r}; choose one of {tuple(UNET_CONFIGS)}")
    return config, dict(UNET_CONFIGS[config])


def resample_filter_keys(net: UNetDenoiser) -> list[str]:
    """EDM's resample_filter buffer keys of net's up/down blocks."""
    return [f"{EDM_PREFIX}{name}.{layer}.resample_filter" for name, m in net.named_modules()
            if isinstance(m, UNetBlock) and (m.up or m.down) for layer in ("conv0", "skip")]


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


def build_unet(arch: dict, schedule=None) -> UNetDenoiser:
    """UNetDenoiser(**arch) with the EDM schedule unless one is given."""
    return UNetDenoiser(schedule=schedule or EDMSchedule(), **arch)


def edm_state_dict_from_ours(net: UNetDenoiser) -> dict[str, torch.Tensor]:
    """Our state dict in EDM's naming (EDMPrecond(DhariwalUNet).state_dict() layout): the inverse mapping."""
    sd = {EDM_PREFIX + k: v for k, v in net.state_dict().items()}
    return sd | {k: RESAMPLE_FILTER.clone() for k in resample_filter_keys(net)}


def edm_state_dict_to_ours(state_dict: dict[str, torch.Tensor], config: str | dict,
                           source: str = "EDM state dict") -> dict[str, torch.Tensor]:
    """EDMPrecond(DhariwalUNet) state dict -> UNetDenoiser state dict (fp32, contiguous, CPU).

    config: a UNET_CONFIGS name or UNetDenoiser kwargs; keys and shapes are checked against it (CheckpointError).
    """
    _, arch = resolve_config(config)
    with torch.device("meta"):
        net = build_unet(arch)
    filters = resample_filter_keys(net)
    sd = {k: v for k, v in state_dict.items() if k not in EDM_IGNORED}
    expected = {EDM_PREFIX + k: v.shape for k, v in net.state_dict().items()}
    expected |= {k: RESAMPLE_FILTER.shape for k in filters}
    check_keys(sd, expected, source)
    for k in filters:
        if not torch.equal(sd[k].float().cpu(), RESAMPLE_FILTER):
            raise CheckpointError(f"{source}: {k} is not the [1,1] resampling filter this U-Net implements")
    return {k[len(EDM_PREFIX):]: v.detach().float().cpu().contiguous() for k, v in sd.items() if k not in filters}


def save_unet(net: UNetDenoiser, path: str | Path, config_name: str = "custom") -> None:
    """Write net's weights to safetensors with its architecture and schedule as metadata."""
    save_tensors({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, Path(path),
                 config_name, net.arch, net.schedule.config())


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, config_name: str, arch: dict, schedule: dict) -> None:
    """Write our-named tensors with the metadata load_unet reads (atomically)."""
    meta = {"format": FORMAT, "config": config_name, "arch": json.dumps(arch), "schedule": json.dumps(schedule)}
    save_safetensors_atomic(tensors, path, meta)


def load_unet(path: str | Path, device=None) -> UNetDenoiser:
    """A UNetDenoiser from our safetensors file (architecture and schedule from its metadata), in eval mode.

    CheckpointError (one line) for a missing or corrupt file, foreign metadata, or keys/shapes that do not match.
    """
    meta, tensors = read_safetensors(path, FORMAT, "U-Net", "an emd_fast U-Net")
    try:
        arch, sched = json.loads(meta["arch"]), json.loads(meta["schedule"])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable U-Net metadata ({e})") from None
    net = build_unet(arch, make_schedule(sched.pop("name"), **sched))
    check_keys(tensors, {k: v.shape for k, v in net.state_dict().items()}, str(path))
    net.load_state_dict(tensors)
    return net.to(device).eval()


def convert_edm_pickle(pkl_path: str | Path, out_path: str | Path, config: str = "edm-imagenet64-adm") -> None:
    """Convert an NVlabs/EDM network pickle (its 'ema' EDMPrecond(DhariwalUNet)) to our safetensors file.

    Needs EDM's code importable (pickle refers to its torch_utils/dnnlib modules). The pickle's resolution, channels,
    label_dim and sigma_data must match ``config``; the file is written with the EDM schedule (0.002..80).
    """
    name, arch = resolve_config(config)
    try:
        with open(pkl_path, "rb") as f:
            data = pickle.load(f)
    except ModuleNotFoundError as e:
        raise RuntimeError(f"loading {pkl_path} needs NVlabs/EDM's code importable (put a clone of the EDM "
                           f"repository on PYTHONPATH): {e}") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{pkl_path} is not a readable pickle: {e}") from None
    net = data.get("ema") if isinstance(data, dict) else None
    if type(net).__name__ != "EDMPrecond":
        raise ValueError(f"{pkl_path}: expected an EDMPrecond network under 'ema', got {type(net).__name__} (only "
                         f"EDM's preconditioning is supported)")
    for attr in ("img_resolution", "img_channels", "label_dim", "sigma_data"):
        if getattr(net, attr) != arch[attr]:
            raise ValueError(f"{pkl_path}: {attr}={getattr(net, attr)} but config {name!r} has {arch[attr]}")
    tensors = edm_state_dict_to_ours(net.state_dict(), arch, source=str(pkl_path))
    with torch.device("meta"):
        full_arch = build_unet(arch).arch  # every hyperparameter, defaults included
    save_tensors(tensors, Path(out_path), name, full_arch, EDMSchedule().config())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m emd_fast.edm_import", description=__doc__.split("\n")[0])
    p.add_argument("src", help="EDM network pickle (.pkl)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--config", default="edm-imagenet64-adm", choices=tuple(UNET_CONFIGS))
    args = p.parse_args(argv)
    try:
        convert_edm_pickle(args.src, args.dst, args.config)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.dst} ({args.config})")


if __name__ == "__main__":
    main()
