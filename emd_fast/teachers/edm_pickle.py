"""NVlabs/EDM networks as ours: EDM network pickles read without EDM's code, and EDM state dicts converted.

Reading (``read_edm_pickle``). EDM pickles each network object as a call ``torch_utils.persistence.
_reconstruct_persistent_obj(meta)``, meta = {class_name, module_src (the source of EDM's networks.py), state (the
object's __dict__: _parameters, _buffers, _modules, _init_kwargs and attributes such as num_heads)}. A restricted
unpickler (``emd_fast.safe_pickle``) resolves only the globals such a pickle needs: that call (it captures class_name
and state; module_src is never executed), dnnlib.util.EasyDict (as dict), collections.OrderedDict, torch's tensor and
parameter rebuilds, torch.storage._load_from_bytes (each storage's legacy torch record, parsed as data), torch.nn.
ModuleDict (captured state), numpy scalars/dtypes and numeric numpy arrays (EDM2's latent encoder keeps its scale
and bias in arrays). Any other global is refused: CheckpointError naming it. The
file's work and memory are bounded by its size: memo indices in order, every tensor a non-overlapping view of a
storage the file holds (no stride-0 views), the module tree a tree (no module reached twice, no cycle, at most
``MAX_DEPTH`` deep).
The same reader serves EDM2's pickles (``edm2_pickle``), which use the same persistence protocol;
``network_file.load_nvlabs_pickle`` tells the two apart by the network's class.

Conversion (``load_edm_pickle``, ``convert_edm_network``). The network is ``data['ema']`` (EDM's snapshots are dicts
of ema, loss_fn, augment_pipe, dataset_kwargs) or the pickled object itself. Its constructor arguments, with EDM's
defaults (``EDM_DEFAULTS``) filled in, give our arch:
    EDMPrecond / VPPrecond / VEPrecond   -> precond {"type": "edm" | "vp" | "ve", ...the same parameters}
    model_type DhariwalUNet / SongUNet   -> network "adm" (channels_per_head 64, EDM's rule) / "song"
    use_fp16                             -> dropped: our networks compute in fp32 (bf16 autocast is a run-time choice)
    augment_dim (map_augment)            -> dropped: used only with augment labels, which sampling never passes
    label_dropout                        -> recorded in the arch, never applied (training-time CFG dropout)
    dropout                              -> 0.0 by default (the converted networks start a distillation); pass
                                            dropout=None to keep the checkpoint's
    sigma_data                           -> EDMPrecond's; 0.5 for VP/VE networks (EDM's images lie in [-1, 1])
and its schedule is ``EDMSchedule(t_min, t_max)`` with [t_min, t_max] = [0.002, 80] (EDM's sampling range)
intersected with the noise levels the preconditioning supports. iDDPMPrecond is not supported.
State dict: ``model.<name>`` -> ``<name>``; ``model.map_augment.*`` dropped; each ``*.resample_filter`` checked
against the arch's filter and dropped (ours is derived from the arch). From a pickle, the attributes recorded per
module that the state dict does not pin down (``VERIFIED_ATTRS``: heads, skip scales, GroupNorm groups and eps,
resampling, embeddings) and the preconditioning's are compared with what our network computes: a network that would
load key for key but compute another function is a CheckpointError naming the module and the hyperparameter.
"""
from __future__ import annotations

import collections
import io
import math
import mmap
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, FileRefused
from ..files import open_regular
from ..nets.precond import Precond, make_precond
from ..nets.unet import (
    NETWORKS,
    FourierEmbedding,
    ImageDenoiser,
    PositionalEmbedding,
    Resample,
    Resampling,
    UNetBlock,
    build_network,
    check_arch,
    check_keys,
    resample_kernel,
)
from ..safe_pickle import DataUnpickler, Malformed, Storage, Tensors, check_nesting, legacy_storages
from ..schedules import EDMSchedule

EDM_SIGMA_RANGE = (0.002, 80.0)  # EDM's sampler defaults (sigma_min, sigma_max)
EDM_DEFAULTS = {  # constructor defaults of EDM's classes, beyond the required img_resolution and img_channels
    "EDMPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0, sigma_max=math.inf, sigma_data=0.5,
                       model_type="DhariwalUNet"),
    "VPPrecond": dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                      model_type="SongUNet"),
    "VEPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100, model_type="SongUNet"),
    "DhariwalUNet": dict(augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0),
    "SongUNet": dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                     attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                     channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
}
PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
MODELS = {"DhariwalUNet": "adm", "SongUNet": "song"}
NOT_PRECOND_PARAMS = ("label_dim", "use_fp16", "model_type")
VERIFIED_ATTRS = {  # EDM class -> (our module classes, attributes compared with ours)
    "UNetBlock": (UNetBlock, ("num_heads", "skip_scale", "adaptive_scale")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "eps")),
    "Conv2d": ((nn.Conv2d, Resample), ("up", "down", "fused_resample")),
    "Linear": (nn.Linear, ()),
    "PositionalEmbedding": (PositionalEmbedding, ("num_channels", "max_positions", "endpoint")),
    "FourierEmbedding": (FourierEmbedding, ()),
    "ModuleDict": (nn.ModuleDict, ()),
}
PLAIN_CONV = {"up": False, "down": False, "fused_resample": False}  # what a plain nn.Conv2d does


class Captured:
    """An object of an EDM pickle as read: its class name and state (the object's __dict__)."""

    def __init__(self, class_name: str, state: dict):
        self.class_name, self.state = class_name, checked_state(class_name, state)

    def __setstate__(self, state):
        self.state = checked_state(self.class_name, state)

    def children(self) -> dict[str, Captured]:
        return {k: v for k, v in self.state.get("_modules", {}).items() if v is not None}


class CapturedModuleDict(Captured):
    """A torch.nn.ModuleDict of an EDM pickle (created empty by the unpickler, its state set afterwards)."""

    class_name, state = "ModuleDict", types.MappingProxyType({})


def checked_state(class_name: str, state) -> dict:
    """state, if its _parameters and _buffers are dicts of tensors and its _modules one of Captured (or None)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"a {class_name} whose state is a {type(state).__name__}")
    for key, kind in (("_parameters", torch.Tensor), ("_buffers", torch.Tensor), ("_modules", Captured)):
        part = state.get(key, {})
        if not (isinstance(part, dict) and all(v is None or isinstance(v, kind) for v in part.values())):
            raise CheckpointError(f"a {class_name} whose {key} are not all {kind.__name__} objects")
    return state


def _persistent(meta) -> Captured:
    if not (isinstance(meta, dict) and isinstance(meta.get("class_name"), str)):
        raise CheckpointError("a persistent object without a class name")
    return Captured(meta["class_name"], meta.get("state"))


def _numpy_scalar(dtype, data: bytes):
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise CheckpointError(f"a numpy scalar that is not a plain number ({dtype!r})")
    return np.frombuffer(data, dtype=dtype)[0].item()


class _NDArrayType:
    """Stands for numpy.ndarray in a pickle: accepted as the array type to reconstruct, never called."""


class _NumericArray(np.ndarray):
    """An array that the pickle's BUILD fills (ndarray.__setstate__): numeric dtypes only."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)
                and state[2].kind in "biuf"):
            raise CheckpointError("refuses a numpy array that is not numeric")
        super().__setstate__(state)


def _ndarray(subtype, shape, dtype):
    """numpy's _reconstruct(ndarray, (0,), b'b'): an empty array that the pickle then fills."""
    if subtype is not _NDArrayType:
        raise CheckpointError("refuses a numpy array of a type other than numpy.ndarray")
    return _NumericArray(0, dtype=np.uint8)


def safe_globals(tensors: Tensors, what: str) -> dict:
    """The globals an EDM pickle may use, tensors built by ``tensors`` (see the module docstring)."""
    def storage(data: bytes) -> Storage:
        if not isinstance(data, bytes):
            raise CheckpointError("a storage that is not a byte string")
        found = legacy_storages(io.BytesIO(data), tensors, {}, what)
        if not isinstance(found, Storage):
            raise CheckpointError("a storage record that holds something else")
        return found

    return {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
        ("dnnlib.util", "EasyDict"): dict,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): tensors.rebuild,
        ("torch._utils", "_rebuild_parameter"): tensors.parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): tensors.parameter,
        ("torch.storage", "_load_from_bytes"): storage,
        ("torch.nn.modules.container", "ModuleDict"): CapturedModuleDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("numpy", "ndarray"): _NDArrayType,
        ("numpy.core.multiarray", "_reconstruct"): _ndarray,  # numpy 1, as EDM2's published pickles were written
        ("numpy._core.multiarray", "_reconstruct"): _ndarray,
    }


def read_edm_pickle(path: str | Path):
    """The object tree of an EDM pickle, EDM's objects as ``Captured``; CheckpointError (one line) for a missing,
    truncated, foreign or hostile file (see the module docstring). Nothing in the file is executed."""
    what = "an EDM network pickle"
    try:
        with open_regular(path, "EDM pickle") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            tree = DataUnpickler(data, safe_globals(Tensors(), what), what=what).load()
        check_nesting(tree)
        return tree
    except Malformed as e:
        raise CheckpointError(f"{path} is not a readable EDM network pickle ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except FileRefused as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read EDM pickle {path}: {e}") from None
    except Exception as e:  # a corrupt pickle raises whatever pickle, torch or numpy meet first
        first = (str(e).splitlines() or [""])[0]
        if isinstance(e, ValueError) and "empty file" in first:  # mmap of an empty file
            raise CheckpointError(f"{path} is not a readable EDM network pickle (an empty file)") from None
        raise CheckpointError(f"{path} is not a readable EDM network pickle ({type(e).__name__}: {first})") from None


def edm_network_node(data, source: str) -> Captured:
    """The preconditioned network of an EDM pickle's tree: data['ema'] or data itself."""
    net = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(net, Captured):
        raise CheckpointError(f"{source} holds no EDM network (expected one under 'ema', as in EDM's snapshots)")
    return net


def edm_arch(precond_class: str, init_kwargs: dict, dropout: float | None = 0.0, source: str = "EDM network") -> dict:
    """Our arch of an EDM network from its preconditioning class and constructor arguments (EDM's defaults filled
    in); CheckpointError for an unsupported class, model or argument."""
    if precond_class not in PRECONDS:
        what = "not supported" if precond_class.endswith("Precond") else "not an EDM network"
        raise CheckpointError(f"{source}: {what}: {precond_class} (convertible: {', '.join(PRECONDS)})")
    try:
        check_arch(init_kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: the {precond_class} arguments: {e}") from None
    kw = EDM_DEFAULTS[precond_class] | dict(init_kwargs)
    missing = [k for k in ("img_resolution", "img_channels") if k not in kw]
    if missing:
        raise CheckpointError(f"{source}: the {precond_class} arguments lack {missing}")
    model_type = kw["model_type"]
    if model_type not in MODELS:
        raise CheckpointError(f"{source}: not supported: model_type {model_type!r} (convertible: {', '.join(MODELS)})")
    own = set(EDM_DEFAULTS[precond_class]) | {"img_resolution", "img_channels"}
    model_kw = EDM_DEFAULTS[model_type] | {k: v for k, v in kw.items() if k not in own}
    unknown = sorted(set(model_kw) - set(EDM_DEFAULTS[model_type]))
    if unknown:
        raise CheckpointError(f"{source}: not supported: {model_type} arguments {unknown}")
    precond = {"type": PRECONDS[precond_class]} | {k: v for k, v in kw.items()
                                                    if k in EDM_DEFAULTS[precond_class] and k not in NOT_PRECOND_PARAMS}
    model_kw.pop("augment_dim")
    arch = dict(network=MODELS[model_type], img_channels=kw["img_channels"], img_resolution=kw["img_resolution"],
                label_dim=kw["label_dim"], sigma_data=kw.get("sigma_data", 0.5), **model_kw,
                precond=make_precond(precond).config())
    if dropout is not None:
        arch["dropout"] = dropout
    if model_type == "DhariwalUNet":
        arch["channels_per_head"] = 64
    return arch


def teacher_schedule(precond: Precond, source: str = "EDM network") -> EDMSchedule:
    """EDMSchedule on [0.002, 80] intersected with the preconditioning's supported [sigma_min, sigma_max]."""
    lo, hi = max(EDM_SIGMA_RANGE[0], precond.sigma_min), min(EDM_SIGMA_RANGE[1], precond.sigma_max)
    if not lo < hi:
        raise CheckpointError(f"{source}: its preconditioning supports sigma in [{precond.sigma_min}, "
                              f"{precond.sigma_max}], outside EDM's sampling range {list(EDM_SIGMA_RANGE)}")
    return EDMSchedule(lo, hi)


def edm_tensors_to_ours(state_dict: dict[str, torch.Tensor], arch: dict,
                        source: str = "EDM state dict") -> dict[str, torch.Tensor]:
    """An EDM state dict (``model.<name>`` keys) -> our state dict of ``arch`` (fp32, contiguous); CheckpointError
    naming missing/unexpected keys, a shape, or a resampling filter that is not the arch's."""
    with torch.device("meta"):
        ref = build_network(arch)
    filters = {f"model.{name}.resample_filter": m for name, m in ref.named_modules() if isinstance(m, Resampling)}
    sd = {k: v for k, v in state_dict.items() if not k.startswith("model.map_augment.")}
    expected = {f"model.{k}": v.shape for k, v in ref.state_dict().items()}
    check_keys(sd, expected | {k: resample_kernel(m.taps).shape for k, m in filters.items()}, source)
    for k, m in filters.items():
        if not torch.equal(sd[k].detach().float().cpu(), resample_kernel(m.taps)):
            raise CheckpointError(f"{source}: {k} is not the {list(m.taps)} resampling filter of this "
                                  f"{NETWORKS[arch['network']].__name__}")
    return {k[len("model."):]: v.detach().float().contiguous() for k, v in sd.items() if k in expected}


def convert_edm_network(precond_class: str, init_kwargs: dict, state_dict: dict[str, torch.Tensor],
                        source: str = "EDM state dict", dropout: float | None = 0.0) -> ImageDenoiser:
    """Our network (eval mode, EDM schedule) computing what EDM's ``precond_class(**init_kwargs)`` with this state
    dict computes; CheckpointError (one line) for anything that does not convert."""
    try:
        arch = edm_arch(precond_class, init_kwargs, dropout, source)
        tensors = edm_tensors_to_ours(state_dict, arch, source)
        schedule = teacher_schedule(make_precond(arch["precond"]), source)
        return build_network(arch, schedule, tensors, source).eval()
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:  # numbers no network is built with
        model_type = (EDM_DEFAULTS[precond_class] | init_kwargs)["model_type"]
        raise CheckpointError(f"{source}: cannot build its {model_type}: {e}") from None


def edm_modules(node: Captured) -> dict[str, Captured]:
    """Every module below a captured module, by its dotted name (breadth first); CheckpointError where the modules
    are not a tree (a module reached twice: a cycle or shared subtrees, which would make every walk exponential;
    read_edm_pickle has bounded the depth)."""
    out, seen, level = {}, {id(node)}, [("", node)]
    while level:
        below = []
        for prefix, parent in level:
            for name, child in parent.children().items():
                if id(child) in seen:
                    raise CheckpointError(f"module {prefix}{name} appears twice in the module tree (a cycle or a "
                                          f"shared module: not a network EDM pickles)")
                seen.add(id(child))
                out[prefix + name] = child
                below.append((f"{prefix}{name}.", child))
        level = below
    return out


def edm_state_dict(node: Captured) -> dict[str, torch.Tensor]:
    """The state dict of a captured module tree (parameters and buffers; EDM's modules have no non-persistent
    buffers), in EDM's key names."""
    return {f"{prefix}{k}": v for prefix, m in [("", node), *((f"{n}.", m) for n, m in edm_modules(node).items())]
            for part in ("_parameters", "_buffers") for k, v in m.state.get(part, {}).items() if v is not None}


def verify_modules(node: Captured, net: ImageDenoiser, source: str) -> None:
    """CheckpointError unless the captured EDM model (node: the DhariwalUNet/SongUNet) has our network's modules
    (map_augment aside), of matching classes, with the recorded VERIFIED_ATTRS values ours compute with."""
    theirs = {k: v for k, v in edm_modules(node).items() if k.split(".")[0] != "map_augment"}
    ours = dict(net.named_modules())
    ours.pop("")
    if set(theirs) != set(ours):
        raise CheckpointError(f"{source}: modules differ from the {node.class_name} of its arguments: only in the "
                              f"checkpoint {sorted(set(theirs) - set(ours))[:5]}, only in ours "
                              f"{sorted(set(ours) - set(theirs))[:5]}")
    for name, m in theirs.items():
        if m.class_name not in VERIFIED_ATTRS:
            raise CheckpointError(f"{source}: model.{name}: not supported: EDM class {m.class_name}")
        classes, attrs = VERIFIED_ATTRS[m.class_name]
        if not isinstance(ours[name], classes):
            raise CheckpointError(f"{source}: model.{name}: a {m.class_name} in the checkpoint, a "
                                  f"{type(ours[name]).__name__} in ours")
        for attr in attrs:
            mine = getattr(ours[name], attr, PLAIN_CONV.get(attr))
            if m.state.get(attr) != mine:
                raise CheckpointError(f"{source}: model.{name}: {attr} {m.state.get(attr)} in the checkpoint, "
                                      f"{mine} in a {node.class_name} of its arguments")


def load_edm_pickle(path: str | Path, dropout: float | None = 0.0) -> ImageDenoiser:
    """Our network (eval mode, EDM schedule, see the module notes) from an NVlabs/EDM network pickle, verified
    against the attributes the pickle records; CheckpointError (one line) for anything that does not convert."""
    return edm_network(read_edm_pickle(path), str(path), dropout)


def edm_network(data, source: str, dropout: float | None = 0.0) -> ImageDenoiser:
    """``load_edm_pickle`` of the tree ``read_edm_pickle`` returned (``source``: the file, for messages)."""
    node = edm_network_node(data, source)
    kwargs, model = node.state.get("_init_kwargs"), node.children().get("model")
    if node.state.get("_init_args") or not isinstance(kwargs, dict) or model is None:
        raise CheckpointError(f"{source}: the {node.class_name} records no keyword constructor arguments or no model")
    net = convert_edm_network(node.class_name, kwargs, edm_state_dict(node), source, dropout)
    kw = EDM_DEFAULTS[node.class_name] | kwargs
    for attr in ("img_resolution", "img_channels", *(k for k in EDM_DEFAULTS[node.class_name]
                                                      if k not in ("use_fp16", "model_type"))):
        if node.state.get(attr) != kw[attr]:
            raise CheckpointError(f"{source}: {attr} {node.state.get(attr)} in the checkpoint, {kw[attr]} in its "
                                  f"constructor arguments")
    if model.class_name != kw["model_type"]:
        raise CheckpointError(f"{source}: its model is a {model.class_name}, its arguments say {kw['model_type']}")
    verify_modules(model, net, source)
    return net
