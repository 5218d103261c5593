"""EDM networks as ours: golden outputs of EDM's own code, EDM pickles read without EDM's code (written here by a
stand-in of its persistence protocol), verification errors, our network files and the conversion CLI."""
import json
import math
import os
import pickle
import re
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_unet import NETS, inputs, random_song, random_unet

from emd_fast.edm_import import main
from emd_fast.errors import CheckpointError
from emd_fast.nets.unet import UNET_CONFIGS, Resampling, UNetDenoiser
from emd_fast.problems import digits
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.teachers.edm_pickle import (
    EDM_DEFAULTS,
    VERIFIED_ATTRS,
    convert_edm_network,
    edm_tensors_to_ours,
    load_edm_pickle,
    read_edm_pickle,
)
from emd_fast.teachers.network_file import load_network, load_teacher_network, save_network

import make_edm_fixtures

FIXTURES = sorted(make_edm_fixtures.FIXTURES.glob("edm_*.safetensors"))
EDM_ROOT = os.environ.get("EDM_ROOT")
MODEL_TYPES = {"adm": "DhariwalUNet", "song": "SongUNet"}
PRECOND_CLASSES = {"edm": "EDMPrecond", "vp": "VPPrecond", "ve": "VEPrecond"}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Per example (noise level): max |out - ref| <= rtol * max |ref|."""
    err, scale = ((v.flatten(1).abs().max(1).values) for v in (out - ref, ref))
    assert bool((err <= rtol * scale).all()), f"relative errors {(err / scale).tolist()}"


# ------------------------------------------------------------------ golden outputs of EDM's code

def read_fixture(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    sd = {k[len("edm."):]: v.float() for k, v in t.items() if k.startswith("edm.")}
    return meta["precond"], json.loads(meta["init_kwargs"]), sd, t


def test_fixtures_cover_every_architecture_option():
    assert [p.stem for p in FIXTURES] == sorted(f"edm_{c}" for c in make_edm_fixtures.CASES)  # regenerated
    assert sum(p.stat().st_size for p in FIXTURES) < 2.1e6
    archs = [convert_edm_network(*read_fixture(p)[:3]).arch for p in FIXTURES]
    options = {k: {json.dumps(a[k]) for a in archs if k in a} for k in ("network", "embedding_type", "encoder_type",
                                                                         "decoder_type", "resample_filter")}
    assert options == {"network": {'"adm"', '"song"'}, "embedding_type": {'"positional"', '"fourier"'},
                       "encoder_type": {'"standard"', '"skip"', '"residual"'}, "decoder_type": {'"standard"', '"skip"'},
                       "resample_filter": {"[1, 1]", "[1, 3, 3, 1]"}}
    assert {a["precond"]["type"] for a in archs} == {"edm", "vp", "ve"}
    assert {bool(a["label_dim"]) for a in archs} == {True, False}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_converted_network_reproduces_edm_outputs(path):
    """EDM's D(x; sigma, one_hot(y)) at 8 noise levels from 0.002 to 80, to 1e-5 of its size at each (fp32)."""
    cls, kwargs, sd, t = read_fixture(path)
    net = convert_edm_network(cls, kwargs, sd, str(path))
    assert net.arch["network"] == {v: k for k, v in MODEL_TYPES.items()}[kwargs.get("model_type", EDM_DEFAULTS[cls][
        "model_type"])] and PRECOND_CLASSES[net.arch["precond"]["type"]] == cls
    assert not net.training and net.arch["dropout"] == 0.0
    with torch.no_grad():
        assert_matches(net(t["x"], t["sigma"], t.get("labels")), t["out"])


@pytest.mark.skipif(not EDM_ROOT, reason="set EDM_ROOT to a clone of NVlabs/edm to compare with EDM's own code")
@pytest.mark.parametrize("case", [*make_edm_fixtures.CASES, *make_edm_fixtures.LIVE_CASES])
def test_real_edm_pickles_compute_what_edm_computes(case, tmp_path):
    """A training snapshot pickled by EDM's code (its persistence, loss and all) converts and computes EDM's D."""
    networks, loss, _ = make_edm_fixtures.import_edm(EDM_ROOT)
    net, cls, kwargs = make_edm_fixtures.make_case(networks, case, seed=5)
    x = make_edm_fixtures.make_inputs(net, seed=6)
    ref = make_edm_fixtures.edm_output(net, x)
    pkl = tmp_path / "network-snapshot.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None, dataset_kwargs=dict(path="x.zip")), f)
    with torch.no_grad():
        assert_matches(load_teacher_network(pkl)(x["x"], x["sigma"], x.get("labels")), ref)
        assert_matches(convert_edm_network(cls, kwargs, net.state_dict())(x["x"], x["sigma"], x.get("labels")), ref)


# ------------------------------------------------------------------ a stand-in of EDM's persistence protocol

class Persistent:
    """Pickles as EDM's persistent objects do: _reconstruct_persistent_obj(meta), meta carrying the source code."""

    def __init__(self, class_name, state):
        self.class_name, self.state = class_name, state

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=Persistent.module_src, class_name=self.class_name,
                    state=self.state)
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


@pytest.fixture
def edm_globals(monkeypatch, tmp_path):
    """torch_utils.persistence and dnnlib.util stand-ins in sys.modules while pickling; module_src is code that
    would leave a file behind if it were ever executed (returned: that file's path)."""
    persistence, util = types.ModuleType("torch_utils.persistence"), types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the stand-in only pickles")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    persistence._reconstruct_persistent_obj, util.EasyDict = _reconstruct_persistent_obj, EasyDict
    for mod in (types.ModuleType("torch_utils"), persistence, types.ModuleType("dnnlib"), util):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    marker = tmp_path / "module_src_was_executed"
    monkeypatch.setattr(Persistent, "module_src", f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n",
                        raising=False)
    return marker


def edm_class(module: torch.nn.Module) -> str:
    """EDM's class of our module (a ResampleConv2d is an nn.Conv2d; a Resample is EDM's Conv2d of kernel 0)."""
    return next(cls for cls, (ours, _) in VERIFIED_ATTRS.items() if isinstance(module, ours))


def edm_object(module: torch.nn.Module, class_name: str):
    """module as EDM's object of class_name pickles: parameters, buffers (resampling filters included), children,
    and the attributes EDM records (skip_scale as numpy's float64, as in EDM's SongUNet); a ModuleDict is a real
    torch.nn.ModuleDict holding the children's stand-ins."""
    children = OrderedDict((k, edm_object(m, edm_class(m))) for k, m in module.named_children())
    if class_name == "ModuleDict":
        container = torch.nn.ModuleDict().eval()
        container._modules.update(children)
        return container
    state = dict(training=False, _non_persistent_buffers_set=set(), _init_args=(), _init_kwargs={}, _modules=children,
                 _parameters=OrderedDict((k, torch.nn.Parameter(v.detach().clone(), requires_grad=False))
                                         for k, v in module._parameters.items() if v is not None),
                 _buffers=OrderedDict((k, v.clone()) for k, v in module._buffers.items() if v is not None))
    for attr in VERIFIED_ATTRS.get(class_name, (None, ()))[1]:
        state[attr] = getattr(module, attr, False)
    if class_name == "UNetBlock":
        state["skip_scale"] = np.float64(state["skip_scale"])
    return Persistent(class_name, state)


def edm_init_kwargs(arch: dict) -> tuple[str, dict]:
    """(EDM preconditioning class, constructor arguments) of our arch: the inverse of edm_pickle.edm_arch."""
    a, precond = dict(arch), dict(arch["precond"])
    kind = precond.pop("type")
    if precond.get("sigma_max", 0) is None:
        precond["sigma_max"] = math.inf
    for k in ("precond", "sigma_data", "channels_per_head"):
        a.pop(k, None)
    return PRECOND_CLASSES[kind], dict(model_type=MODEL_TYPES[a.pop("network")], **a, **precond)


def write_edm_pickle(net, path, change=None):
    """An EDM training snapshot of net as EDM's code would pickle it; change(root) edits the tree first."""
    cls, kwargs = edm_init_kwargs(net.arch)
    model = edm_object(net, MODEL_TYPES[net.network])
    model.state["label_dropout"] = net.arch["label_dropout"]
    own = {k for k in EDM_DEFAULTS[cls] if k not in ("model_type", "use_fp16")} | {"img_resolution", "img_channels"}
    attrs = {k: v for k, v in kwargs.items() if k in own} | {"use_fp16": False}
    if cls == "VPPrecond":
        attrs |= {"sigma_min": net.precond.sigma_min, "sigma_max": net.precond.sigma_max}
    root = Persistent(cls, dict(training=False, _parameters=OrderedDict(), _buffers=OrderedDict(),
                                _modules=OrderedDict(model=model), _init_args=(), _init_kwargs=kwargs, **attrs))
    if change:
        change(root)
    data = dict(ema=root, loss_fn=Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
                augment_pipe=None, dataset_kwargs=sys.modules["dnnlib.util"].EasyDict(path="x.zip", use_labels=True))
    path.write_bytes(pickle.dumps(data))
    return path


def edm_modules(root) -> dict:
    """name -> stand-in object of the model's tree."""
    out, todo = {}, list(root.state["_modules"]["model"].state["_modules"].items())
    while todo:
        name, obj = todo.pop()
        out[name] = obj
        children = obj._modules if isinstance(obj, torch.nn.ModuleDict) else obj.state["_modules"]
        todo += [(f"{name}.{k}", v) for k, v in children.items()]
    return out


def edm_named(net) -> dict[str, torch.Tensor]:
    """net's state dict in EDM's naming, resampling filters included (EDMPrecond(...).state_dict()'s layout)."""
    return {f"model.{k}": v for k, v in net.state_dict().items()} | {
        f"model.{n}.resample_filter": m.resample_filter for n, m in net.named_modules() if isinstance(m, Resampling)}


STANDIN_NETS = {"adm": lambda: random_unet(channels_per_head=64)} | {k: v for k, v in NETS.items() if k != "adm"}


@pytest.mark.parametrize("kind", STANDIN_NETS)
def test_edm_pickles_convert_without_edm_code(kind, edm_globals, tmp_path):
    """Our network -> an EDM-format pickle -> ours again: the same arch and function, EDM's schedule range; the
    pickle's module_src is never executed."""
    net = STANDIN_NETS[kind]()
    pkl = write_edm_pickle(net, tmp_path / "net.pkl")
    loaded = load_teacher_network(pkl)
    assert loaded.arch == net.arch and not loaded.training
    lo, hi = max(0.002, net.precond.sigma_min), min(80.0, net.precond.sigma_max)
    assert loaded.schedule.config() == EDMSchedule(lo, hi).config()
    args = inputs(5)
    assert torch.equal(loaded(*args), net(*args))
    assert not edm_globals.exists()
    assert not any(m.startswith("_imported_module_") for m in sys.modules)


def test_edm_dhariwal_unet_has_64_channels_per_head(edm_globals, tmp_path):
    """The tiny preset's heads (32 channels each) are not EDM's DhariwalUNet's (64): its pickle would load key for
    key but compute another function."""
    pkl = write_edm_pickle(random_unet(), tmp_path / "net.pkl")
    with pytest.raises(CheckpointError, match=re.escape(
            "model.enc.4x4_block0: num_heads 2 in the checkpoint, 1 in a DhariwalUNet of its arguments")):
        load_edm_pickle(pkl)


def set_attr(name, attr, value):
    return lambda root: edm_modules(root)[name].state.__setitem__(attr, value)


def set_class(name, class_name):
    return lambda root: setattr(edm_modules(root)[name], "class_name", class_name)


def scale_buffer(name, key):
    return lambda root: edm_modules(root)[name].state["_buffers"].__setitem__(
        key, 2 * edm_modules(root)[name].state["_buffers"][key])


@pytest.mark.parametrize("kind,change,message", [
    ("song-ddpmpp", set_attr("enc.4x4_block0", "num_heads", 2),
     "model.enc.4x4_block0: num_heads 2 in the checkpoint, 1 in a SongUNet of its arguments"),
    ("song-ddpmpp", set_attr("dec.8x8_block0", "skip_scale", 1),
     "model.dec.8x8_block0: skip_scale 1 in the checkpoint, 0.7071067811865476 in a SongUNet"),
    ("song-ddpmpp", set_attr("dec.4x4_in1", "adaptive_scale", True), "model.dec.4x4_in1: adaptive_scale True"),
    ("song-ddpmpp", set_attr("dec.8x8_aux_norm", "eps", 1e-5), "model.dec.8x8_aux_norm: eps 1e-05 in the "
                                                               "checkpoint, 1e-06"),
    ("adm", set_attr("enc.8x8_block0.norm1", "num_groups", 4), "model.enc.8x8_block0.norm1: num_groups 4 in the "
                                                               "checkpoint, 8 in a DhariwalUNet"),
    ("song-ddpmpp", set_attr("map_noise", "endpoint", False),
     "model.map_noise: endpoint False in the checkpoint, True"),
    ("adm", set_attr("map_noise", "max_positions", 1000), "model.map_noise: max_positions 1000 in the checkpoint"),
    ("song-ncsnpp", set_attr("enc.4x4_aux_residual", "fused_resample", False),
     "model.enc.4x4_aux_residual: fused_resample False in the checkpoint, True"),
    ("song-ddpmpp", set_attr("enc.8x8_conv", "down", True), "model.enc.8x8_conv: down True in the checkpoint, False"),
    ("song-ddpmpp", scale_buffer("enc.4x4_down.conv0", "resample_filter"),
     "model.enc.4x4_down.conv0.resample_filter is not the [1, 1] resampling filter of this SongUNetDenoiser"),
    ("song-ncsnpp", scale_buffer("dec.8x8_up.skip", "resample_filter"),
     "model.dec.8x8_up.skip.resample_filter is not the [1, 3, 3, 1] resampling filter"),
    ("adm", set_class("enc.8x8_block0.norm0", "LayerNorm"), "model.enc.8x8_block0.norm0: not supported: EDM class "
                                                            "LayerNorm"),
    ("adm", set_class("enc.8x8_conv", "Linear"), "model.enc.8x8_conv: a Linear in the checkpoint, a Conv2d in ours"),
    ("adm", lambda root: root.state["_modules"]["model"].state["_modules"].__setitem__(
        "extra_embedding", Persistent("PositionalEmbedding", dict(_modules={}))),
     "modules differ from the DhariwalUNet of its arguments: only in the checkpoint ['extra_embedding'], only in "
     "ours []"),
    ("adm", lambda root: root.state.__setitem__("sigma_data", 0.6),
     "sigma_data 0.6 in the checkpoint, 0.5 in its constructor arguments"),
    ("adm", lambda root: setattr(root.state["_modules"]["model"], "class_name", "SongUNet"),
     "its model is a SongUNet, its arguments say DhariwalUNet"),
    ("adm", lambda root: root.state["_init_kwargs"].update(model_type="DiT"),
     "not supported: model_type 'DiT' (convertible: DhariwalUNet, SongUNet)"),
    ("song-ddpmpp", lambda root: root.state["_init_kwargs"].update(num_heads=4),
     "not supported: SongUNet arguments ['num_heads']"),
    ("adm", lambda root: setattr(root, "class_name", "iDDPMPrecond"),
     "not supported: iDDPMPrecond (convertible: EDMPrecond, VPPrecond, VEPrecond)"),
    ("adm", lambda root: setattr(root, "class_name", "EDMLoss"), "not an EDM network: EDMLoss"),
    ("adm", lambda root: root.state.__setitem__("_init_args", (8, 1)), "records no keyword constructor arguments"),
])
def test_networks_that_would_compute_another_function_are_refused(kind, change, message, edm_globals, tmp_path):
    pkl = write_edm_pickle(STANDIN_NETS[kind](), tmp_path / "net.pkl", change)
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        load_teacher_network(pkl)
    assert str(e.value).startswith(str(pkl)) and "\n" not in str(e.value)


def test_foreign_globals_are_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(CheckpointError, match=r"evil.pkl: refuses global (posix|os)\.system \(not part of an EDM"):
        read_edm_pickle(pkl)
    pkl.write_bytes(pickle.dumps({"ema": torch.nn.Linear(2, 2)}))  # a pickled torch module class: not EDM's
    with pytest.raises(CheckpointError, match=r"refuses global torch\.nn\.modules\.linear\.Linear"):
        load_teacher_network(pkl)
    assert not marker.exists()


def test_unreadable_files_are_one_line_errors(edm_globals, tmp_path):
    good = write_edm_pickle(random_song(), tmp_path / "good.pkl").read_bytes()
    cases = {"truncated": good[: len(good) // 2], "garbage": b"\x80\x04 not a pickle at all",
             "text": b"hello", "not_a_network": pickle.dumps({"ema": [1, 2]}), "bare_dict": pickle.dumps({"a": 1})}
    for name, data in cases.items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
    for name, match in (("truncated", "is not a readable EDM network pickle"), ("garbage", "is not a readable EDM"),
                        ("text", "is not a readable EDM"), ("not_a_network", "holds no EDM network"),
                        ("bare_dict", "holds no EDM network"), ("absent", "no such file")):
        with pytest.raises(CheckpointError, match=f"{name}.pkl.*{match}|{match}.*{name}.pkl") as e:
            load_teacher_network(tmp_path / f"{name}.pkl")
        assert "\n" not in str(e.value)


def test_cli_converts_and_fails_in_one_line(edm_globals, tmp_path, capsys):
    net = random_song("ncsnpp")
    pkl, out = write_edm_pickle(net, tmp_path / "edm-net.pkl"), tmp_path / "net.safetensors"
    assert main([str(pkl), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_network(out)
    assert loaded.arch == net.arch and loaded.schedule.config() == EDMSchedule(0.02, 80.0).config()
    args = inputs(4)
    assert torch.equal(loaded(*args), net(*args))
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["config"] == "edm-net"
    for src in (tmp_path / "absent.pkl", write_edm_pickle(random_unet(), tmp_path / "tiny.pkl")):
        code = main([str(src), str(tmp_path / "o.safetensors")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_dropout_default_and_kept(edm_globals, tmp_path):
    """Converted networks default to dropout 0 (distillation starts); dropout=None keeps the checkpoint's."""
    net = random_song()
    pkl = write_edm_pickle(net, tmp_path / "n.pkl", lambda root: root.state["_init_kwargs"].update(dropout=0.13))
    assert load_edm_pickle(pkl).arch["dropout"] == 0.0
    assert load_edm_pickle(pkl, dropout=None).arch["dropout"] == 0.13


# ------------------------------------------------------------------ EDM state dicts

@pytest.fixture(scope="module")
def net():
    return random_unet()


def test_edm_key_names(net):
    sd = edm_named(net)
    for key in ("model.map_layer0.weight", "model.map_layer1.bias", "model.map_label.weight",
                "model.enc.8x8_conv.weight", "model.enc.8x8_block0.norm0.weight", "model.enc.4x4_down.affine.weight",
                "model.enc.4x4_down.conv0.resample_filter", "model.enc.4x4_down.skip.resample_filter",
                "model.enc.4x4_block0.skip.weight", "model.dec.4x4_in0.qkv.weight", "model.dec.4x4_in1.conv1.bias",
                "model.dec.8x8_up.skip.resample_filter", "model.dec.8x8_block1.norm1.weight",
                "model.out_norm.weight", "model.out_conv.weight"):
        assert key in sd, key
    assert sd["model.map_label.weight"].shape == (128, 10)  # Linear(label_dim -> emb, bias=False) on one-hots
    assert set(edm_tensors_to_ours(sd, net.arch)) == set(net.state_dict())


def test_imagenet64_key_count():
    """ADM ImageNet-64: our parameters plus conv0/skip resample filters of 3 down and 3 up blocks."""
    with torch.device("meta"):
        net = UNetDenoiser(schedule=EDMSchedule(), **UNET_CONFIGS["edm-imagenet64-adm"])
    sd = edm_named(net)
    assert len(sd) == len(net.state_dict()) + 12
    assert "model.enc.64x64_conv.weight" in sd and "model.dec.8x8_in0.qkv.weight" in sd
    assert "model.enc.32x32_down.skip.resample_filter" in sd and "model.dec.64x64_up.conv0.resample_filter" in sd


def test_map_augment_is_ignored(net):
    sd = edm_named(net) | {"model.map_augment.weight": torch.zeros(32, 9)}
    assert set(edm_tensors_to_ours(sd, net.arch)) == set(net.state_dict())


@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.pop("model.dec.4x4_in0.qkv.weight"), "1 missing ['model.dec.4x4_in0.qkv.weight']"),
    (lambda sd: sd.update({"model.enc.8x8_extra.weight": torch.zeros(1)}),
     "1 unexpected ['model.enc.8x8_extra.weight']"),
    (lambda sd: sd.update({"model.out_conv.weight": torch.zeros(3, 32, 3, 3)}),
     "model.out_conv.weight has shape (3, 32, 3, 3), the architecture expects (1, 32, 3, 3)"),
    (lambda sd: sd.update({"model.dec.8x8_up.conv0.resample_filter": sd["model.dec.8x8_up.conv0.resample_filter"] + 1}),
     "model.dec.8x8_up.conv0.resample_filter is not the [1, 1] resampling filter"),
])
def test_edm_state_dict_errors(net, change, match):
    sd = edm_named(net)
    change(sd)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        edm_tensors_to_ours(sd, net.arch)


def test_zero_head_attention_is_refused():
    """EDM's DhariwalUNet silently drops attention on fewer than 64 channels; we refuse to build that network."""
    kwargs = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1, 2], attn_resolutions=[])
    message = "cannot build its DhariwalUNet: (bad adm architecture: )?attention on 32 channels with "
    with pytest.raises(CheckpointError, match=message + "channels_per_head=64 gives 0 heads"):
        convert_edm_network("EDMPrecond", kwargs | {"model_type": "DhariwalUNet"}, {})


# ------------------------------------------------------------------ our network files

@pytest.mark.parametrize("kind", NETS)
def test_save_and_load_keep_the_network(kind, tmp_path):
    net = NETS[kind](VPCosine(t_min=0.01))
    save_network(net, tmp_path / "u.safetensors", "tiny")
    loaded = load_network(tmp_path / "u.safetensors")
    assert loaded.schedule.config() == net.schedule.config() and loaded.arch == net.arch and not loaded.training
    x_t, _, y = inputs(3)
    t = torch.tensor([0.2, 0.5, 0.8])
    assert torch.equal(loaded(x_t, t, y), net(x_t, t, y))
    assert torch.equal(load_teacher_network(tmp_path / "u.safetensors")(x_t, t, y), net(x_t, t, y))


def test_files_from_before_songunet_load_as_adm(net, tmp_path):
    """Files written before this change: arch without network, precond and label_dropout -> ADM, EDM precond."""
    save_network(net, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = {k: v for k, v in net.arch.items() if k not in ("network", "precond", "label_dropout")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta | {"arch": json.dumps(old)})
    loaded = load_network(tmp_path / "old.safetensors")
    assert isinstance(loaded, UNetDenoiser) and loaded.arch == net.arch
    args = inputs(3)
    assert torch.equal(loaded(*args), net(*args))


def test_digits_teacher_loads_as_a_teacher():
    net = load_teacher_network(digits.TEACHER_FILE)
    assert isinstance(net, UNetDenoiser) and net.arch["precond"]["type"] == "edm" and "resample_filter" not in str(
        net.state_dict().keys())
    args = inputs(3)
    assert torch.equal(net(*args), digits.load_teacher_unet()(*args))


def test_load_errors(net, tmp_path):
    good = tmp_path / "good.safetensors"
    save_network(net, good, "tiny")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("truncated", "garbage", "absent"):
        with pytest.raises(CheckpointError, match=f"U-Net file .*{name}"):
            load_network(tmp_path / f"{name}.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not an emd_fast U-Net file"):
        load_network(tmp_path / "foreign.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "out_norm.bias"}
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=re.escape("1 missing ['out_norm.bias']")):
        load_network(tmp_path / "missing.safetensors")
    save_file(tensors, str(tmp_path / "bad_arch.safetensors"), metadata=meta | {"arch": '{"network": "dit"}'})
    with pytest.raises(CheckpointError, match="unreadable U-Net metadata .*unknown network 'dit'"):
        load_network(tmp_path / "bad_arch.safetensors")
