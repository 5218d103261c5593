"""The image U-Nets (ADM and DDPM++/NCSN++): shapes, preconditioning, EDM's layouts and counts, resampling, errors."""
import copy
import functools
import json
import math

import pytest
import torch

from emd_fast.checks import trusted_values
from emd_fast.nets.generator import Generator
from emd_fast.nets.unet import (
    UNET_CONFIGS,
    PositionalEmbedding,
    Resample,
    ResampleConv2d,
    SongUNetDenoiser,
    UNetBlock,
    UNetDenoiser,
    build_network,
    embed_labels,
)
from emd_fast.schedules import EDMSchedule, VPCosine


def randomize(module, seed=0):
    """Every parameter N(0, 0.2^2): EDM zero-initialises some layers, which would hide wiring bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module


def random_unet(schedule=None, seed=0, **overrides):
    """The "tiny" preset (1x8x8, 10 classes) with random weights, eval mode."""
    net = UNetDenoiser(schedule=schedule or EDMSchedule(), **(UNET_CONFIGS["tiny"] | overrides))
    return randomize(net, seed).eval()


SONG_TINY = dict(img_channels=1, img_resolution=8, label_dim=10, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4])
SONG_VARIANTS = {  # DDPM++, NCSN++ and the other encoder/decoder types, in several preconditionings
    "ddpmpp": {},
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1], precond={"type": "ve"}),
    "skip": dict(encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1], channel_mult=[1, 1, 2],
                 precond={"type": "vp"}),
    "residual-skip": dict(encoder_type="residual", decoder_type="skip"),
}


def random_song(variant="ddpmpp", schedule=None, seed=0, **overrides):
    """A 1x8x8, 10-class SongUNet of the variant with random weights, eval mode."""
    net = SongUNetDenoiser(schedule=schedule or EDMSchedule(), **(SONG_TINY | SONG_VARIANTS[variant] | overrides))
    return randomize(net, seed).eval()


NETS = {"adm": random_unet} | {f"song-{v}": functools.partial(random_song, v) for v in SONG_VARIANTS}


def inputs(n, seed=1, label_dim=10):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(label_dim, (n,), generator=g) if label_dim else None
    return torch.randn(n, 1, 8, 8, generator=g), 0.05 + 5 * torch.rand(n, generator=g), y


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("label_dim,n", [(10, 3), (0, 5)])
def test_output_shape(kind, label_dim, n):
    net = NETS[kind](label_dim=label_dim)
    out = net(*inputs(n, label_dim=label_dim))
    assert out.shape == (n, 1, 8, 8) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kind", NETS)
def test_backward_reaches_every_parameter(kind):
    net = NETS[kind]().train()
    net(*inputs(3)).square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())


@pytest.mark.parametrize("kind", NETS)
def test_small_noise_returns_the_input(kind):
    """c_skip -> 1, c_out -> 0 as sigma/alpha -> 0 (every preconditioning), so D(x_t) ~ x_t / alpha."""
    sch = VPCosine(t_min=1e-7)
    net = NETS[kind](sch)
    x_t, _, y = inputs(3)
    t = torch.full((3,), 1e-6)
    torch.testing.assert_close(net(x_t, t, y), x_t / sch.alpha(t)[:, None, None, None], atol=1e-4, rtol=1e-4)


def test_any_schedule_matches_edm_preconditioning():
    """D_vp(x_t, t) = D_edm(x_t / alpha_t, sigma = sigma_t / alpha_t) with the same weights; and D_edm is
    EDMPrecond's formula c_skip x + c_out F(c_in x, log(sigma) / 4)."""
    vp, edm = VPCosine(), EDMSchedule()
    net_vp = random_unet(vp)
    net_edm = copy.deepcopy(net_vp)
    net_edm.schedule = edm
    x_t, _, y = inputs(3)
    t = torch.tensor([0.1, 0.5, 0.9])
    alpha, sigma = (v[:, None, None, None] for v in vp.alpha_sigma(t))
    s = (sigma / alpha).flatten()
    torch.testing.assert_close(net_vp(x_t, t, y), net_edm(x_t / alpha, s, y))
    x, sd, sig = x_t / alpha, 0.5, sigma / alpha
    f = net_edm.unet(x / (sd**2 + sig**2).sqrt(), s.log() / 4, y)
    ref = sd**2 / (sig**2 + sd**2) * x + sig * sd / (sig**2 + sd**2).sqrt() * f
    torch.testing.assert_close(net_edm(x, s, y), ref)


def test_attention_matches_edm_softmax_attention():
    """EDM's UNetBlock attention, written out: qkv channels are (head, channel, q|k|v), softmax over keys."""
    block = randomize(UNetBlock(16, 16, emb_channels=8, num_heads=2))
    x = torch.randn(3, 16, 4, 2)
    n, c, h, w = x.shape
    q, k, v = block.qkv(block.norm2(x)).reshape(n * 2, c // 2, 3, h * w).unbind(2)
    wts = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c // 2)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", wts, v).reshape(n, c, h, w)
    torch.testing.assert_close(block.attention(x), x + block.proj(a))


def test_generator_starts_as_the_teacher_at_t_star():
    teacher = random_unet()
    gen = Generator.from_teacher(teacher, t_star=2.5)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(10, (5,), generator=g)
    assert torch.equal(gen(z, y), teacher(gen.sigma_star * z, torch.full((5,), 2.5), y))


@pytest.mark.parametrize("kind", NETS)
def test_channels_last_matches_contiguous(kind):
    net = NETS[kind]()
    x_t, t, y = inputs(3)
    ref = net(x_t, t, y)
    torch.testing.assert_close(net(x_t.to(memory_format=torch.channels_last), t, y), ref)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x_t.to(memory_format=torch.channels_last), t, y), ref, atol=1e-5, rtol=1e-4)


def test_imagenet64_preset_is_edm_adm():
    """EDM's ADM for ImageNet-64 has 295.90 M parameters (Karras et al. 2022, Table 7)."""
    with torch.device("meta"):
        net = UNetDenoiser(schedule=EDMSchedule(), **UNET_CONFIGS["edm-imagenet64-adm"])
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 295.90
    heads = {name: m.num_heads for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}
    assert heads["enc.32x32_block0"] == 6 and heads["dec.8x8_in0"] == 12 and "dec.64x64_block0" not in heads


X, T, Y = torch.zeros(3, 1, 8, 8), torch.ones(3), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("label_dim,args,match", [
    (10, (torch.zeros(3, 8, 8), T, Y), r"x_t must have shape \(N, 1, 8, 8\), got \(3, 8, 8\)"),
    (10, (torch.zeros(3, 1, 16, 16), T, Y), r"got \(3, 1, 16, 16\)"),
    (10, (X, torch.ones(3, 1), Y), r"t must have shape \(3,\)"),
    (10, (X, T, None), r"class-conditional \(label_dim=10\)"),
    (10, (X, T, torch.tensor([0, 10, 2])), r"must lie in \[0, 10\), got min 0, max 10"),
    (10, (X, T, torch.tensor([0, -1, 2])), r"must lie in \[0, 10\)"),
    (10, (X, T, torch.zeros(3)), r"integer class labels, got dtype torch.float32"),
    (10, (X, T, torch.zeros(2, dtype=torch.long)), r"y must have shape \(3,\)"),
    (0, (X, T, Y), r"unconditional U-Net"),
])
def test_bad_inputs(label_dim, args, match):
    net = UNetDenoiser(schedule=EDMSchedule(), **(UNET_CONFIGS["tiny"] | {"label_dim": label_dim}))
    with pytest.raises(ValueError, match=match):
        net(*args)


def test_label_range_check_is_skipped_only_for_trusted_values():
    """Inside ``trusted_values()`` (the training loop's deferred step, whose labels it drew itself) the label-range
    check, a host read, is skipped; outside, and after leaving a nested use, it is back."""
    net = UNetDenoiser(schedule=EDMSchedule(), **UNET_CONFIGS["tiny"])
    bad = torch.tensor([0, 10, 2])
    with trusted_values():
        with trusted_values():
            net.check_inputs(X, T, bad)
        net.check_inputs(X, T, bad)
    with pytest.raises(ValueError, match="must lie in"):
        net.check_inputs(X, T, bad)


@pytest.mark.parametrize("overrides,match", [
    ({"img_resolution": 6, "channel_mult": [1, 2, 2]}, r"img_resolution=6 is not divisible by 2\^2"),
    ({"channels_per_head": 128}, r"attention on 64 channels with channels_per_head=128 gives 0 heads"),
])
def test_bad_architecture(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetDenoiser(schedule=EDMSchedule(), **(UNET_CONFIGS["tiny"] | overrides))


@pytest.mark.parametrize("kind,overrides,match", [
    ("song", {"embedding_type": "sinusoidal"},
     r"embedding_type='sinusoidal'; choose one of \('positional', 'fourier'\)"),
    ("song", {"encoder_type": "fused"}, r"encoder_type='fused'; choose one of \('standard', 'skip', 'residual'\)"),
    ("song", {"decoder_type": "residual"}, r"decoder_type='residual'; choose one of \('standard', 'skip'\)"),
    ("song", {"img_resolution": 7}, r"img_resolution=7 is not divisible by 2\^1"),
    ("adm", {"sigma_data": 0.5, "precond": {"type": "edm", "sigma_data": 0.6}},
     r"sigma_data=0.5 but the edm preconditioning has sigma_data 0.6"),
    ("adm", {"precond": {"type": "edm", "beta_d": 1}}, r"bad edm preconditioning config"),
    ("adm", {"network": "song"}, r"UNetDenoiser builds network 'adm', not 'song'"),
])
def test_bad_architecture_arguments(kind, overrides, match):
    cls, arch = (UNetDenoiser, UNET_CONFIGS["tiny"]) if kind == "adm" else (SongUNetDenoiser, SONG_TINY)
    with pytest.raises(ValueError, match=match):
        cls(schedule=EDMSchedule(), **(arch | overrides))


def test_build_network_errors():
    with pytest.raises(ValueError, match=r"unknown network 'dit'; choose one of \('adm', 'song', 'edm2'\)"):
        build_network({"network": "dit"})
    with pytest.raises(ValueError, match="bad song architecture: .*unexpected keyword argument 'heads'"):
        build_network(SONG_TINY | {"network": "song", "heads": 2})
    with pytest.raises(ValueError, match="fused_resample is implemented for downsampling only"):
        ResampleConv2d(4, 4, 3, up=True, fused_resample=True)


@pytest.mark.parametrize("kind", NETS)
def test_arch_rebuilds_the_network(kind):
    """arch is JSON and complete: build_network(arch) is the same architecture, and with the state dict the same
    function (built without initialising weights, the resampling filters rebuilt from the arch)."""
    net = NETS[kind](VPCosine())
    arch = json.loads(json.dumps(net.arch, allow_nan=False))
    assert arch["network"] == net.network and arch["precond"] == net.precond.config()
    again = build_network(arch, VPCosine(), dict(net.state_dict()))
    assert again.arch == net.arch and type(again) is type(net)
    x_t, _, y = inputs(3)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(again(x_t, t, y), net(x_t, t, y))
    assert build_network(arch).arch == net.arch


def test_song_blocks_are_ddpmpp_blocks():
    """One head wherever there is attention; in the decoder only in a level's last block (and in0); skip_scale
    sqrt(1/2), GroupNorm eps 1e-6, the embedding as a shift (no adaptive scale), 1x1 projections on resampling skips."""
    net = random_song("skip", attn_resolutions=[8, 4])
    blocks = {name: m for name, m in net.named_modules() if isinstance(m, UNetBlock)}
    heads = {name for name, m in blocks.items() if m.num_heads}
    assert heads == {"enc.8x8_block0", "enc.4x4_block0", "dec.2x2_in0", "dec.4x4_block1", "dec.8x8_block1"}
    assert {m.num_heads for m in blocks.values()} == {0, 1}
    for m in blocks.values():
        assert (m.skip_scale, m.norm0.eps, m.adaptive_scale, m.affine.out_features) == (math.sqrt(0.5), 1e-6, False,
                                                                                       m.out_channels)
    assert isinstance(net.enc["4x4_down"].skip, ResampleConv2d) and net.enc["4x4_down"].skip.kernel_size == (1, 1)
    adm = random_unet()
    assert isinstance(adm.enc["4x4_down"].skip, Resample) and adm.enc["4x4_down"].norm0.eps == 1e-5
    assert list(net.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_aux_down", "4x4_aux_skip", "4x4_block0",
                             "2x2_down", "2x2_aux_down", "2x2_aux_skip", "2x2_block0"]
    assert [k for k in net.dec if "aux" in k] == ["2x2_aux_norm", "2x2_aux_conv", "4x4_aux_up", "4x4_aux_norm",
                                                  "4x4_aux_conv", "8x8_aux_up", "8x8_aux_norm", "8x8_aux_conv"]


@pytest.mark.parametrize("overrides,params", [
    # EDM's own counts (its code, CIFAR-10 and FFHQ configurations, augment_dim 9) minus map_augment's weights
    (dict(label_dim=10), 55_735_299 - 1_152),  # edm-cifar10-32x32-cond-vp (DDPM++): 55.73 M, EDM Table 7
    (dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1]),
     56_397_827 - 2_304),  # NCSN++, unconditional
    (dict(img_resolution=64, channel_mult=[1, 2, 2, 2]), 61_805_571 - 1_152),  # edm-ffhq-64x64-uncond-vp
])
def test_song_presets_are_edm_sized(overrides, params):
    with torch.device("meta"):
        net = SongUNetDenoiser(schedule=EDMSchedule(), **(dict(img_channels=3, img_resolution=32, model_channels=128,
                                                               channel_mult=[2, 2, 2]) | overrides))
    assert sum(p.numel() for p in net.parameters()) == params


def test_box_filter_is_edm_resampling():
    """The [1,1] filter as nearest upsampling / average pooling is EDM's (transposed) convolution with f f^T."""
    x = torch.randn(2, 3, 6, 4)
    f = torch.full((3, 1, 2, 2), 0.25)
    torch.testing.assert_close(Resample(down=True)(x), torch.nn.functional.conv2d(x, f, groups=3, stride=2))
    assert torch.equal(Resample(up=True)(x), torch.nn.functional.conv_transpose2d(x, 4 * f, groups=3, stride=2))


def test_1331_filter_is_separable_binomial():
    """[1,3,3,1] downsampling = the 1-D filter [1,3,3,1]/8 along H then W (zero padding 1, stride 2); upsampling is
    its transpose times 4."""
    x = torch.randn(2, 3, 8, 6)

    def along(v, dim):  # 1-D filtering of (N, C, H, W) along dim 2 or 3, stride 2, padding 1
        v = v.movedim(dim, -1)
        shape = v.shape
        out = torch.nn.functional.conv1d(v.reshape(-1, 1, shape[-1]), torch.tensor([[[1., 3., 3., 1.]]]) / 8,
                                         stride=2, padding=1)
        return out.reshape(*shape[:-1], -1).movedim(-1, dim)

    down = Resample(down=True, resample_filter=[1, 3, 3, 1])
    torch.testing.assert_close(down(x), along(along(x, 2), 3))
    up = Resample(up=True, resample_filter=[1, 3, 3, 1])
    y = torch.randn(2, 3, 4, 3)  # <up(y), x> = 4 <y, down(x)>
    torch.testing.assert_close((up(y) * x).sum(), 4 * (y * down(x)).sum())


def test_positional_embedding_endpoint():
    """Frequencies max_positions^(-i / (C/2)) (ADM) or max_positions^(-i / (C/2 - 1)) (endpoint: DDPM++)."""
    c = torch.tensor([1.0])
    for endpoint, last in ((False, 10000 ** -0.75), (True, 1e-4)):
        emb = PositionalEmbedding(8, endpoint=endpoint)(c)
        torch.testing.assert_close(emb[0, :4], torch.tensor([1.0, 10000 ** -(1 / (4 - endpoint)),
                                                             10000 ** -(2 / (4 - endpoint)), last]).cos())


def test_labels_are_one_hot_rows():
    """Integer labels give what EDM's Linear computes on gain * one-hot vectors (bias or not)."""
    y = torch.tensor([3, 0, 9])
    for layer, gain in ((torch.nn.Linear(10, 6), math.sqrt(10)), (torch.nn.Linear(10, 6, bias=False), 1.0)):
        torch.testing.assert_close(embed_labels(layer, y, gain),
                                   layer(gain * torch.nn.functional.one_hot(y, 10).float()))
