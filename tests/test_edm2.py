"""EDM2 teachers: golden outputs of EDM2's own code (tests/make_edm2_fixtures.py), EDM2 pickles read without EDM2's
code (written here by a stand-in of its persistence protocol), refusals, our network files, latent decoding by a VAE,
and runs of the training command that checkpoint, resume exactly and sample."""
import json
import math
import os
import pickle
import re
import sys
from collections import OrderedDict

import make_edm2_fixtures
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_edm_import import Persistent, assert_matches, edm_globals  # noqa: F401 (a fixture)

from emd_fast import edm_import, sample, train
from emd_fast.emd import EMDConfig
from emd_fast.errors import CheckpointError
from emd_fast.nets.edm2 import EDM2_CONFIGS, Block, EDM2Denoiser, MPConv, VAELatents, mp_cat, mp_silu, mp_sum, normalize
from emd_fast.nets.unet import build_network
from emd_fast.problems import init_networks
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.teachers import GuidedNetworkTeacher
from emd_fast.teachers.edm2_pickle import VERIFIED_ATTRS, edm2_arch
from emd_fast.teachers.network_file import load_network, load_nvlabs_pickle, load_teacher_network, save_network
from emd_fast.training.checkpoint import list_checkpoints
from emd_fast.training.distiller import Distiller

from helpers import NoHostRead

FIXTURES = sorted(make_edm2_fixtures.FIXTURES.glob("edm2_*.safetensors"))
EDM2_ROOT = os.environ.get("EDM2_ROOT")
SMALL = ["--steps", "4", "--batch", "4", "--K", "1", "--eval-every", "2", "--eval-samples", "6", "--ckpt-every", "2",
         "--quiet", "--device", "cpu", "--phase-every", "0"]


# ------------------------------------------------------------------ fixtures of EDM2's code

def read_fixture(name):
    """(Precond constructor arguments, encoder JSON, loss JSON, EDM2 state dict (fp16), the other tensors, metadata)."""
    path = make_edm2_fixtures.FIXTURES / f"edm2_{name}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    sd = {k[len("edm2."):]: v for k, v in t.items() if k.startswith("edm2.")}
    return (json.loads(meta["init_kwargs"]), json.loads(meta["encoder"]), json.loads(meta["loss"]), sd,
            {k: v for k, v in t.items() if not k.startswith("edm2.")}, meta)


def fixture_network(name, **arch) -> EDM2Denoiser:
    """Our network of a fixture, built from its arguments and EDM2's state dict directly (no pickle)."""
    kwargs, _, _, sd, _, _ = read_fixture(name)
    tensors = {k.removeprefix("unet."): v.float() for k, v in sd.items() if not k.startswith("logvar_")}
    return build_network(edm2_arch(kwargs) | arch, EDMSchedule(), tensors).eval()


def raw_output(net, x, sigma, y):
    """F(c_in x, log(sigma) / 4, y): the network inside the preconditioning."""
    c_in = 1 / (sigma**2 + net.sigma_data**2).sqrt()
    return net.unet(c_in[:, None, None, None] * x, sigma.log() / 4, y)


def test_fixtures_are_the_cases_and_small():
    assert [p.stem for p in FIXTURES] == sorted(f"edm2_{c}" for c in make_edm2_fixtures.CASES)  # regenerated
    assert sum(p.stat().st_size for p in FIXTURES) < 1.5e6
    archs = [fixture_network(c).arch for c in make_edm2_fixtures.CASES]
    assert {a["clip_act"] is None for a in archs} == {True, False} and {bool(a["label_dim"]) for a in archs} == {
        True, False} and {a["img_channels"] for a in archs} == {3, 4}


@pytest.mark.parametrize("case", make_edm2_fixtures.CASES)
def test_network_computes_what_edm2_computes(case):
    """EDM2's D(x; sigma, one_hot(y)) and its raw U-Net F at 8 noise levels from 0.002 to 80, each to 1e-5 of its
    size (fp32)."""
    net = fixture_network(case)
    t = read_fixture(case)[4]
    with torch.no_grad():
        assert_matches(net(t["x"], t["sigma"], t.get("labels")), t["out"])
        assert_matches(raw_output(net, t["x"], t["sigma"], t.get("labels")), t["raw"])


def test_clipping_acts_in_its_case():
    """latent_uncond_clip's activations reach its clip_act of 1.5: the case tests the clip, not a no-op."""
    t = read_fixture("latent_uncond_clip")[4]
    with torch.no_grad():
        clipped = fixture_network("latent_uncond_clip")(t["x"], t["sigma"])
        free = fixture_network("latent_uncond_clip", clip_act=None)(t["x"], t["sigma"])
    assert not torch.allclose(clipped, free, rtol=1e-3)


# ------------------------------------------------------------------ a stand-in of EDM2's pickles

def edm2_object(module, name: str = ""):
    """Our module as EDM2's object of the same class pickles: fp16 parameters and buffers, children, the attributes
    EDM2 records; a ModuleDict is a real torch.nn.ModuleDict holding the children's stand-ins."""
    children = OrderedDict((k, edm2_object(m, k)) for k, m in module.named_children())
    if isinstance(module, torch.nn.ModuleDict):
        container = torch.nn.ModuleDict().eval()
        container._modules.update(children)
        return container
    state = dict(training=False, _init_args=(), _init_kwargs={}, _modules=children,
                 _parameters=OrderedDict((k, torch.nn.Parameter(v.detach().half(), requires_grad=False))
                                         for k, v in module._parameters.items()),
                 _buffers=OrderedDict((k, v.half()) for k, v in module._buffers.items()))
    for attr in VERIFIED_ATTRS.get(type(module).__name__, ()):
        state[attr] = getattr(module, attr)
    if isinstance(module, EDM2Denoiser):  # EDM2's UNet: its label layer is None when unconditional
        state["_modules"].setdefault("emb_label", None)
        state |= dict(label_balance=module.label_balance, concat_balance=module.concat_balance)
    return Persistent("UNet" if isinstance(module, EDM2Denoiser) else type(module).__name__, state)


def mp_conv(cin, cout):
    return Persistent("MPConv", dict(_parameters=OrderedDict(weight=torch.randn(cout, cin).half()), _buffers={},
                                     _modules={}, out_channels=cout))


def write_edm2_pickle(net: EDM2Denoiser, path, kwargs: dict, latents=True, loss=None, change=None):
    """An EDM2 snapshot (a post-hoc EMA reconstruction has the same layout) of ``net`` as EDM2's code would pickle it,
    Precond constructor arguments ``kwargs``; with the StabilityVAEEncoder of ``net.latents`` (latents=False: none),
    an EDM2Loss (``loss``: P_mean, P_std); change(data) edits the tree first."""
    a = net.arch
    logvar = Persistent("MPFourier", dict(_parameters={}, _modules={}, _buffers=OrderedDict(
        freqs=torch.randn(16).half(), phases=torch.rand(16).half())))
    root = Persistent("Precond", dict(
        training=False, _parameters=OrderedDict(), _buffers=OrderedDict(), _init_args=(), _init_kwargs=dict(kwargs),
        _modules=OrderedDict(unet=edm2_object(net), logvar_fourier=logvar, logvar_linear=mp_conv(16, 1)),
        img_resolution=a["img_resolution"], img_channels=a["img_channels"], label_dim=a["label_dim"],
        use_fp16=kwargs.get("use_fp16", True), sigma_data=a["sigma_data"]))
    encoder = None
    if latents and net.latents is not None:
        scale, bias = (np.float32(v) for v in (net.latents.scale, net.latents.bias))
        encoder = Persistent("StabilityVAEEncoder", dict(vae_name=net.latents.vae, scale=scale, bias=bias, _vae=None,
                                                         batch_size=8, _init_args=(), _init_kwargs={}))
    elif latents:
        encoder = Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}))
    easydict = sys.modules["dnnlib.util"].EasyDict
    data = easydict(encoder=encoder, dataset_kwargs=easydict(path="datasets/x.zip", use_labels=bool(a["label_dim"])),
                    loss_fn=Persistent("EDM2Loss", dict(loss or make_edm2_fixtures.LOSS, sigma_data=0.5)), ema=root)
    if change:
        change(data)
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def guide_pickle(path, label_dim=0, img_resolution=16, seed=7):
    """An EDM2 pickle of a small random 3-channel network, to guide pix_cond's (EDM2's guidance)."""
    kwargs = dict(img_resolution=img_resolution, img_channels=3, label_dim=label_dim, model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    return write_edm2_pickle(random_network(kwargs, seed), path, kwargs)


def random_network(kwargs, seed):
    """Our EDM2 network of Precond arguments ``kwargs``, every parameter random (the zero-initialised gains too)."""
    torch.manual_seed(seed)
    net = build_network(edm2_arch(kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net.eval()


def fixture_pickle(case, path, **kw):
    """The stand-in pickle of a fixture (EDM2's weights, arguments and encoder)."""
    kwargs, encoder, _, _, _, _ = read_fixture(case)
    latents = {k: encoder[k] for k in ("scale", "bias")} | {"vae": encoder["vae_name"]} if "scale" in encoder else None
    return write_edm2_pickle(fixture_network(case, latents=latents), path, kwargs, **kw)


@pytest.mark.parametrize("case", make_edm2_fixtures.CASES)
def test_pickles_convert_without_edm2_code(case, edm_globals, tmp_path):  # noqa: F811
    """EDM2's weights in an EDM2-format pickle -> our network: EDM2's outputs, schedule, latents; dropout 0; the
    uncertainty head left out; the pickle's embedded source never executed."""
    kwargs, encoder, loss, _, t, _ = read_fixture(case)
    net = load_teacher_network(fixture_pickle(case, tmp_path / "net.pkl"))
    with torch.no_grad():
        assert_matches(net(t["x"], t["sigma"], t.get("labels")), t["out"])
    assert not net.training and net.arch["dropout"] == 0.0 and not any("logvar" in k for k in net.state_dict())
    assert net.schedule.config() == EDMSchedule(0.002, 80.0, loss["P_mean"], loss["P_std"]).config()
    if encoder["class"] == "StabilityVAEEncoder":  # EDM2's float32 scale and bias, exactly
        assert net.latents.config() == {"vae": "stabilityai/sd-vae-ft-mse", "scale": encoder["scale"],
                                        "bias": encoder["bias"]}
    else:
        assert net.latents is None
    assert not edm_globals.exists() and not any(m.startswith("_imported_module_") for m in sys.modules)


def test_pickle_variants(edm_globals, tmp_path):  # noqa: F811
    """Positional constructor arguments, no encoder or loss (EDM2's defaults), a kept dropout."""
    kwargs = read_fixture("pix_cond")[0]
    args = tuple(kwargs[k] for k in ("img_resolution", "img_channels", "label_dim"))
    rest = {k: v for k, v in kwargs.items() if k not in ("img_resolution", "img_channels", "label_dim")}

    def positional(data):
        data["ema"].state.update(_init_args=args, _init_kwargs=rest)
        del data["encoder"], data["loss_fn"]

    pkl = fixture_pickle("pix_cond", tmp_path / "p.pkl", change=positional)
    net = load_nvlabs_pickle(pkl, dropout=None)
    assert net.arch["dropout"] == 0.1 and net.latents is None
    assert (net.schedule.p_mean, net.schedule.p_std) == (-0.4, 1.0)  # EDM2Loss's defaults
    assert net.arch == fixture_network("pix_cond").arch | {"dropout": 0.1}


def test_real_edm2_pickles_are_read_as_edm2_writes_them(tmp_path):
    """A pickle EDM2's code wrote (its persistence, encoder, loss): skipped without its source (EDM2_ROOT)."""
    if not EDM2_ROOT:
        pytest.skip("set EDM2_ROOT to NVlabs/edm2's source to compare with EDM2's own pickles")
    modules = make_edm2_fixtures.import_edm2(EDM2_ROOT)
    networks, encoders, training_loop, dnnlib = modules
    for case in [*make_edm2_fixtures.CASES, *make_edm2_fixtures.LIVE_CASES]:
        theirs, kwargs, encoder_class = make_edm2_fixtures.make_case(networks, case, seed=5)
        x = make_edm2_fixtures.make_inputs(theirs, seed=6)
        ref = make_edm2_fixtures.edm2_outputs(theirs, x)
        data = dnnlib.EasyDict(encoder=encoder_class and getattr(encoders, encoder_class)(),
                               loss_fn=training_loop.EDM2Loss(**make_edm2_fixtures.LOSS), dataset_kwargs={})
        data.ema = theirs.eval().requires_grad_(False).half()
        pkl = tmp_path / f"{case}.pkl"
        pkl.write_bytes(pickle.dumps(data))
        ours = load_teacher_network(pkl)
        with torch.no_grad():
            assert_matches(ours(x["x"], x["sigma"], x.get("labels")), ref["out"])
            assert_matches(raw_output(ours, x["x"], x["sigma"], x.get("labels")), ref["raw"])


# ------------------------------------------------------------------ refusals

def block(data, name):
    """The stand-in of the UNet's module ``name`` (e.g. "dec.4x4_block0")."""
    node = data["ema"].state["_modules"]["unet"]
    for part in name.split("."):
        node = node._modules[part] if isinstance(node, torch.nn.ModuleDict) else node.state["_modules"][part]
    return node


def set_attr(name, attr, value):
    return lambda data: block(data, name).state.__setitem__(attr, value)


@pytest.mark.parametrize("change,message", [
    (set_attr("dec.4x4_block0", "res_balance", 0.5), "unet.dec.4x4_block0: res_balance 0.5 in the pickle, 0.3 in ours"),
    (set_attr("enc.4x4_block0", "num_heads", 1), "unet.enc.4x4_block0: num_heads 1 in the pickle, 2 in ours"),
    (set_attr("enc.8x8_down", "resample_mode", "keep"), "unet.enc.8x8_down: resample_mode keep in the pickle, down"),
    (set_attr("dec.16x16_up", "flavor", "enc"), "unet.dec.16x16_up: flavor enc in the pickle, dec in ours"),
    (set_attr("dec.4x4_in1", "clip_act", 128), "unet.dec.4x4_in1: clip_act 128 in the pickle, 256 in ours"),
    (set_attr("dec.8x8_up", "resample_filter", [1, 3, 3, 1]), "resample_filter [1, 3, 3, 1] in the pickle, [1, 1]"),
    (set_attr("enc.16x16_conv", "out_channels", 9), "unet.enc.16x16_conv: out_channels 9 in the pickle, 8 in ours"),
    (lambda d: setattr(block(d, "dec.4x4_in0"), "class_name", "UNetBlock"),
     "unet.dec.4x4_in0: a UNetBlock in the pickle, a Block in ours"),
    (lambda d: d["ema"].state["_init_kwargs"].update(resample_filter=[1, 3, 3, 1]),
     "not supported: resample_filter [1, 3, 3, 1] (every published EDM2 network uses [1, 1])"),
    (lambda d: d["ema"].state["_init_kwargs"].update(num_heads=4), "not supported: EDM2 arguments ['num_heads']"),
    (lambda d: d["ema"].state["_init_kwargs"].update(channel_mult=[1, 2]),
     "keys do not match the architecture"),
    (lambda d: d["ema"].state.__setitem__("sigma_data", 0.6),
     "sigma_data 0.6 in the pickle, 0.5 in its constructor arguments"),
    (lambda d: d["ema"].state["_modules"]["unet"].state.__setitem__("label_balance", 0.7),
     "unet.label_balance 0.7 in the pickle, 0.5 in its constructor arguments"),
    (lambda d: d["ema"].state["_modules"].__setitem__("extra", mp_conv(2, 2)),
     "not supported: a MPConv 'extra' in EDM2's Precond"),
    (lambda d: d["ema"].state["_modules"].pop("unet"),
     "not an EDM2 network: a Precond (EDM2's: a Precond with a UNet)"),
    (lambda d: block(d, "out_conv").state["_parameters"].__setitem__("weight", torch.zeros(3, 9, 3, 3).half()),
     "out_conv.weight has shape (3, 9, 3, 3), the architecture expects (3, 8, 3, 3)"),
    (lambda d: d.__setitem__("encoder", Persistent("PixelShuffleEncoder", {})),
     "not supported: encoder PixelShuffleEncoder"),
    (lambda d: d.__setitem__("loss_fn", Persistent("EDMLoss", {})), "not supported: loss_fn EDMLoss"),
    (lambda d: d["loss_fn"].state.__setitem__("P_std", -1.0), "its EDM2Loss has P_mean -0.8, P_std -1.0"),
])
def test_networks_that_would_compute_another_function_are_refused(change, message, edm_globals, tmp_path):  # noqa: F811
    pkl = fixture_pickle("pix_cond", tmp_path / "net.pkl", change=change)
    with pytest.raises(CheckpointError, match=re.escape(message)) as e:
        load_teacher_network(pkl)
    assert str(e.value).startswith(str(pkl)) and "\n" not in str(e.value)
    assert not edm_globals.exists()


def test_hostile_encoders_are_refused_unexecuted(edm_globals, tmp_path):  # noqa: F811
    """An encoder whose arrays are not numeric, or not plain ndarrays, or whose state calls a foreign global."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for value, message in ((np.array([1, "a"], dtype=object), "refuses a numpy array that is not numeric"),
                           (np.ma.masked_array([1.0, 2.0]), "refuses global numpy.ma.core"),
                           (Exploit(), r"refuses global (posix|os)\.system")):
        enc = lambda d, v=value: d["encoder"].state.__setitem__("scale", v)  # noqa: E731
        pkl = fixture_pickle("latent_cond", tmp_path / "e.pkl", change=enc)
        with pytest.raises(CheckpointError, match=message) as e:
            load_teacher_network(pkl)
        assert "\n" not in str(e.value)
    assert not marker.exists() and not edm_globals.exists()


# ------------------------------------------------------------------ our files, the conversion command

def test_network_file_round_trip_and_strict_keys(edm_globals, tmp_path, capsys):  # noqa: F811
    """edm_import writes our safetensors; it loads with the same arch (latents included), schedule and function;
    a file whose tensors do not fit its arch is refused."""
    pkl, out = fixture_pickle("latent_cond", tmp_path / "edm2-img512-tiny.pkl"), tmp_path / "net.safetensors"
    assert edm_import.main([str(pkl), str(out)]) == 0
    assert "edm2 network, edm preconditioning, 4x8x8, 1000 classes" in capsys.readouterr().out
    ours, ref = load_network(out), load_teacher_network(pkl)
    assert ours.arch == ref.arch and ours.schedule.config() == ref.schedule.config()
    assert isinstance(ours.latents, VAELatents) and ours.latents.config() == ref.latents.config()
    t = read_fixture("latent_cond")[4]
    with torch.no_grad():
        assert torch.equal(ours(t["x"], t["sigma"], t["labels"]), ref(t["x"], t["sigma"], t["labels"]))
    bad = fixture_network("latent_cond")
    bad.out_conv.weight = torch.nn.Parameter(torch.zeros(4, 8, 3, 3))
    save_network(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=re.escape("out_conv.weight has shape (4, 8, 3, 3), the architecture "
                                                        "expects (4, 16, 3, 3)")):
        load_network(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------ the network itself

def test_magnitude_preserving_primitives():
    """Unit-variance inputs give unit-variance outputs: normalize, mp_silu, mp_sum, mp_cat, MPConv."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 48, 16, 16, generator=g), torch.randn(64, 16, 16, 16, generator=g)
    assert normalize(3 * a, (1,)).square().mean(1).sub(1).abs().max() < 1e-3
    for out in (mp_silu(a), mp_sum(a, a.flip(0), 0.3), mp_cat(a, b, 0.4)):
        assert abs(float(out.square().mean()) - 1) < 0.02
    cat = mp_cat(a, b, 0.25)  # b's share of the magnitude is t^2 / ((1 - t)^2 + t^2)
    assert float(cat[:, 48:].square().sum() / cat.square().sum()) == pytest.approx(0.25**2 / (0.75**2 + 0.25**2),
                                                                                  rel=0.02)
    conv = MPConv(48, 32, (3, 3))
    with torch.no_grad():
        conv.weight.mul_(7.0)  # the stored scale does not matter
        assert abs(float(conv(a)[:, :, 1:-1, 1:-1].square().mean()) - 1) < 0.05  # away from the zero padding


def test_train_mode_leaves_the_weights_alone():
    """No forced weight normalisation: a train-mode forward and backward write no parameter (EDM2 would)."""
    net = fixture_network("pix_uncond_opts").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    t = read_fixture("pix_uncond_opts")[4]
    net(t["x"], t["sigma"]).square().mean().backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is not None for p in net.parameters())


def test_generator_and_student_start_as_the_teacher():
    """Step 0: g(z) = D_teacher(sigma* z, t*) and the student's D = the teacher's, exactly (train mode included)."""
    teacher = fixture_network("pix_cond")
    t_star = teacher.schedule.t_at_lambda(-4.0)
    generator, student = init_networks(teacher, t_star)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 3, 9, 3])
    x_t, t = torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0.01, 0.5, 3.0, 70.0])
    with torch.no_grad():
        assert generator.training and student.training
        assert torch.equal(generator(z, y), teacher(generator.sigma_star * z, torch.full((4,), t_star), y))
        assert torch.equal(student(x_t, t, y), teacher(x_t, t, y))


def test_any_schedule_computes_the_edm_network():
    """The network in a VP schedule at t is EDM2's at sigma/alpha on x_t/alpha (its preconditioning)."""
    net = fixture_network("latent_cond")
    t = read_fixture("latent_cond")[4]
    vp = VPCosine()
    tt = torch.linspace(0.05, 0.95, 8)
    alpha, sigma = vp.alpha_sigma(tt)
    with torch.no_grad():
        edm = net(t["x"], sigma / alpha, t["labels"])
        net.schedule = vp
        assert_matches(net(alpha[:, None, None, None] * t["x"], tt, t["labels"]), edm)


def test_bf16_autocast_stays_close():
    net = fixture_network("latent_cond")
    t = read_fixture("latent_cond")[4]
    with torch.no_grad():
        ref = raw_output(net, t["x"], t["sigma"], t["labels"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = raw_output(net, t["x"], t["sigma"], t["labels"])
    assert low.dtype == torch.bfloat16
    assert_matches(low.float(), ref, rtol=5e-2)


@pytest.mark.parametrize("config,millions", [("edm2-img512-xs", 125), ("edm2-img512-s", 280), ("edm2-img512-m", 498),
                                             ("edm2-img512-l", 777), ("edm2-img512-xl", 1119),
                                             ("edm2-img512-xxl", 1523), ("edm2-img64-s", 280)])
def test_published_sizes(config, millions):
    """The parameter counts of EDM2's paper (Table 2; its counts include a 128-parameter uncertainty head)."""
    with torch.device("meta"):
        net = build_network(EDM2_CONFIGS[config])
    assert round((sum(p.numel() for p in net.parameters()) + 128) / 1e6) == millions


@pytest.mark.parametrize("label_dim", [0, 10])
def test_guided_teacher_is_edm2_guidance(label_dim):
    """EDM2's D = g.lerp(D_net, w): an unconditional guide gets no labels, a conditional one (autoguidance) the
    teacher's."""
    net, guide = fixture_network("pix_cond"), random_network(dict(
        img_resolution=16, img_channels=3, label_dim=label_dim, model_channels=8, channel_mult=[1, 2], num_blocks=1,
        attn_resolutions=[4]), seed=3)
    teacher = GuidedNetworkTeacher(net, guide, 1.7, net.schedule, (3, 16, 16))
    t = read_fixture("pix_cond")[4]
    x, sigma, y = t["x"], t["sigma"], t["labels"]
    with torch.no_grad():
        g = guide(x, sigma, y if label_dim else None)
        assert_matches(teacher.denoise(x, sigma, y), g + 1.7 * (net(x, sigma, y) - g), rtol=1e-6)
    assert teacher.to_config()["guide_weight"] == 1.7 and teacher.to_config()["guide_arch"]["label_dim"] == label_dim


def guided_distiller():
    """Generator and student of a one-level EDM2 network (random: its blocks' kinds, few, keep the compilation short)
    under its guidance by a wider unconditional network (EDM2's classifier-free guidance)."""
    arch = dict(img_resolution=8, img_channels=4, channel_mult=[1], num_blocks=1, attn_resolutions=[8],
                channels_per_head=8)
    net = random_network(arch | dict(label_dim=10, model_channels=8), seed=2)
    guide = random_network(arch | dict(label_dim=0, model_channels=16), seed=3)
    teacher = GuidedNetworkTeacher(net, guide, 1.7, net.schedule, (4, 8, 8))
    generator, student = init_networks(net, net.schedule.t_at_lambda(-4.0))
    return Distiller(teacher, generator, student, EMDConfig(K=2), batch=3, lr_g=1e-3, lr_s=1e-3, sigma_data=0.5,
                     num_classes=10)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_guide_is_regional_equals_eager_and_never_recompiles(backend, tmp_path, monkeypatch):
    """--compile of a guided EDM2 teacher: the guide network is compiled as the teacher's network is, block by block
    (EDM2's Blocks are regions). Inductor, with Dynamo's traced-frame cache (TORCH_CACHING_PRECOMPILE=1, whose bundled
    AOTAutograd cache failed on a graph break in ``normalize``): the guided teacher D = g + w (D_net - g) equals the
    eager one on fresh inputs (forward graphs only: the C++ builds of the training graphs would take minutes).
    aot_eager (the same regions and Dynamo guards, no C++): three iterations give the eager losses, and nothing
    compiles after the first."""
    from emd_fast.execution.compiled import compile_count, compile_networks, is_compiled, regions

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with torch._dynamo.config.patch(caching_precompile=backend == "inductor"):
        torch._dynamo.reset()
        eager, comp = guided_distiller(), guided_distiller()
        report = compile_networks(comp, backend=backend)
        nets = {"generator": comp.generator, "student": comp.student, "teacher network": comp.teacher.net,
                "guide network": comp.teacher.guide}
        assert report.compiled == list(nets) and report.regions == {
            name: sum(isinstance(m, Block) for m in net.modules()) for name, net in nets.items()}, report
        guide = comp.teacher.guide  # its blocks compiled, the glue between them eager
        assert all(is_compiled(b) for b in regions(guide)) and guide._compiled_call_impl is None
        if backend == "inductor":
            g = torch.Generator().manual_seed(5)
            x, sigma, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.05, 1.3, 40.0]), torch.tensor([7, 0, 2])
            torch.testing.assert_close(comp.teacher.denoise(x, sigma, y), eager.teacher.denoise(x, sigma, y),
                                       rtol=1e-5, atol=1e-5)
            return
        counts = [compile_count()]
        for _ in range(3):
            a, b = eager.step(), comp.step()
            counts.append(compile_count())
            for k in ("loss_g", "loss_s"):
                torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        assert counts[1] > counts[0] and counts[-1] == counts[1], counts


# ------------------------------------------------------------------ latents and the VAE

def tiny_vae():
    """The fixture's tiny AutoencoderKL (EDM2's decoding of its latents is recorded with it)."""
    diffusers = pytest.importorskip("diffusers")
    _, _, _, _, t, meta = read_fixture(make_edm2_fixtures.DECODED_CASE)
    vae = diffusers.AutoencoderKL(**json.loads(meta["vae_config"])).eval()
    vae.load_state_dict({k[len("vae."):]: v for k, v in t.items() if k.startswith("vae.")})
    return vae


def test_latents_decode_as_edm2_decodes_them():
    """EDM2's StabilityVAEEncoder.decode (uint8 = floor(255 clamp(VAE((x - bias) / scale), 0, 1))) of the fixture's
    latents through the same VAE."""
    _, enc, _, _, t, _ = read_fixture("latent_cond")
    images = VAELatents(enc["vae_name"], enc["scale"], enc["bias"]).decode(tiny_vae(), t["x"][:2])
    assert images.shape == (2, 3, 64, 64) and images.device.type == "cpu"
    pixels = ((images + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    assert torch.equal(pixels, t["decoded"])


def vae_folder(path):
    tiny_vae().save_pretrained(path)
    return path


def latent_pickle(tmp_path, name="edm2-latent.pkl"):
    return fixture_pickle("latent_uncond_clip", tmp_path / name)


def final_tensors(out):
    return load_file(str(list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")))


def test_latent_teacher_trains_resumes_exactly_and_samples_images(edm_globals, tmp_path, capsys):  # noqa: F811
    """A latent EDM2 teacher with --vae: run, checkpoints, a resume that continues it bit for bit, decoded metrics,
    plots and samples; the VAE is hashed into the run."""
    pkl, vae = latent_pickle(tmp_path), vae_folder(tmp_path / "vae")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run = ["--teacher", str(pkl), "--vae", str(vae)]
    assert train.main(["--out", str(straight), *SMALL, *run]) == 0
    assert train.main(["--out", str(split), *SMALL, *run, "--steps", "2"]) == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((split / "config.json").read_text())
    assert len(cfg["vae_sha256"]) == 64 and cfg["teacher_info"]["arch"]["network"] == "edm2"
    lines = " ".join(json.loads((split / "summary.json").read_text())["summary_lines"])
    assert "Heun 32 steps" in lines and "latents" not in lines
    assert (straight / "samples" / "final.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    grid, arrays = tmp_path / "s.png", tmp_path / "s.npz"
    assert sample.main([str(split), "--n", "3", "--out", str(grid), str(arrays), "--uint8"]) == 0
    with np.load(arrays) as f:
        assert f["arr_0"].shape == (3, 64, 64, 3)  # decoded by the VAE: 8x the 8x8 latents
    assert grid.read_bytes()[:4] == b"\x89PNG"
    torch.manual_seed(1)  # another VAE in the run's VAE folder: a resume refuses it
    pytest.importorskip("diffusers").AutoencoderKL(**json.loads(read_fixture("latent_cond")[5]["vae_config"])
                                                   ).save_pretrained(vae)
    assert train.main(["--out", str(split), "--resume", "--steps", "6", "--quiet"]) == 2
    assert f"the vae file {vae} is not the one this run started from" in capsys.readouterr().err
    assert not edm_globals.exists()


def test_latent_teacher_without_vae_trains_and_says_so(edm_globals, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r"
    assert train.main(["--out", str(out), *SMALL, "--teacher", str(latent_pickle(tmp_path)), "--steps", "2"]) == 0
    captured = capsys.readouterr()
    assert "images are not decoded" in captured.err and "statistics of the latents" in captured.out
    assert (out / "samples" / "final.png").is_file()
    assert sample.main([str(out), "--n", "2", "--out", str(tmp_path / "l.npz")]) == 0
    with np.load(tmp_path / "l.npz") as f:
        assert f["images"].shape == (2, 4, 8, 8)
    assert sample.main([str(out), "--n", "2", "--out", str(tmp_path / "l.png")]) == 2
    assert "PNG output needs 1- or 3-channel images" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--guide", "{tmp}/pixel.pkl"], "--guide PKL and --guide-weight W go together"),
    (["--guide-weight", "2"], "--guide PKL and --guide-weight W go together"),
    (["--guide", "{tmp}/absent.pkl", "--guide-weight", "2"], "--guide {tmp}/absent.pkl: no such file"),
    (["--guide", "{tmp}/pixel.pkl", "--guide-weight", "2"],
     "--guide {tmp}/pixel.pkl: its samples are 3x8x8 pixels, the teacher's 4x8x8 latents of "
     "stabilityai/sd-vae-ft-mse"),
    (["--guide", "{tmp}/g5.pkl", "--guide-weight", "2", "--teacher", "{tmp}/cond.pkl"],
     "--guide {tmp}/g5.pkl: 5 classes, the teacher has 10 (a guide is unconditional or has the teacher's classes)"),
    (["--guide", "{tmp}/pixel.pkl", "--guide-weight", "2", "--preset", "ring2d"],
     "--guide applies to teacher network files"),
    (["--vae", "{tmp}/absent"], "--vae {tmp}/absent: not a directory"),
    (["--vae", "{tmp}/novae"], "config.json describes a UNet2DModel, not an AutoencoderKL"),
    (["--vae", "{tmp}/vae", "--teacher", "{tmp}/pixel.pkl"], "is a pixel model: its samples are images already"),
    (["--vae", "{tmp}/vae", "--preset", "ring2d"], "--vae applies to latent EDM2 teachers"),
    (["--fid-ref", "{tmp}/ref.npz", "--inception", "{tmp}/ref.npz"], "--fid-ref: the teacher's samples are latents"),
])
def test_bad_edm2_options_are_one_line_errors(args, message, edm_globals, tmp_path, capsys):  # noqa: F811
    latent_pickle(tmp_path, "latent.pkl")
    fixture_pickle("pix_uncond_opts", tmp_path / "pixel.pkl")
    fixture_pickle("pix_cond", tmp_path / "cond.pkl")
    guide_pickle(tmp_path / "g5.pkl", label_dim=5)
    vae_folder(tmp_path / "vae")
    (tmp_path / "novae").mkdir()
    (tmp_path / "novae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "ref.npz").write_bytes(b"")
    args = [a.format(tmp=tmp_path) for a in args]
    teacher = [] if "--teacher" in args or "--preset" in args else ["--teacher", str(tmp_path / "latent.pkl")]
    assert train.main(["--out", str(tmp_path / "r"), *SMALL, *teacher, *args]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ a pixel teacher: speed options

def test_guided_pixel_teacher_bf16_deferred_resumes_exactly(edm_globals, tmp_path):  # noqa: F811
    """A conditional pixel teacher guided by an unconditional network, bf16, deferred checks, channels_last: a run and
    a resume that continues it bit for bit; the guide is hashed into the run."""
    pkl = fixture_pickle("pix_cond", tmp_path / "edm2-img64-tiny.pkl")
    guide = guide_pickle(tmp_path / "edm2-img64-tiny-uncond.pkl")
    fast = ["--teacher", str(pkl), "--guide", str(guide), "--guide-weight", "1.4", "--precision", "bf16",
            "--finite-check", "deferred", "--channels-last"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--out", str(straight), *SMALL, *fast]) == 0
    assert train.main(["--out", str(split), *SMALL, *fast, "--steps", "2"]) == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet", "--finite-check", "deferred",
                       "--channels-last"]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(json.loads((split / "summary.json").read_text())["final"]["pixel_std"])
    cfg = json.loads((split / "config.json").read_text())
    assert len(cfg["guide_sha256"]) == 64 and cfg["teacher_info"]["guide_weight"] == 1.4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deferred_step_makes_no_host_sync(edm_globals, tmp_path, precision):  # noqa: F811
    """The --fast iteration on a guided EDM2 teacher (labels, deferred checks, channels_last) reads no tensor value on
    the host: it can be captured in a CUDA graph."""
    from emd_fast.training.build import Run

    args = ["--teacher", str(fixture_pickle("pix_cond", tmp_path / "t.pkl")), "--finite-check", "deferred",
            "--guide", str(guide_pickle(tmp_path / "g.pkl", label_dim=10)), "--guide-weight", "2",
            "--channels-last", "--precision", precision, "--batch", "3", "--out", str(tmp_path / "run")]
    run = Run(vars(train.build_parser().parse_args(args)), torch.device("cpu"), fit_teacher=False)
    assert run.distiller.deferred
    run.distiller.step()  # lazy state (optimizer moments) first
    with NoHostRead():
        run.distiller.step()
