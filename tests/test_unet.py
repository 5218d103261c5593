"""The image U-Net denoiser: shapes, EDM preconditioning, EDM's attention layout, generator initialisation, errors."""
import copy
import math

import pytest
import torch

from emd_fast.networks import Generator
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.unet import UNET_CONFIGS, UNetBlock, UNetDenoiser


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


def inputs(n, seed=1, label_dim=10):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(label_dim, (n,), generator=g) if label_dim else None
    return torch.randn(n, 1, 8, 8, generator=g), 0.05 + 5 * torch.rand(n, generator=g), y


@pytest.mark.parametrize("label_dim,n", [(10, 3), (0, 5)])
def test_output_shape(label_dim, n):
    net = random_unet(label_dim=label_dim)
    out = net(*inputs(n, label_dim=label_dim))
    assert out.shape == (n, 1, 8, 8) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_backward_reaches_every_parameter():
    net = random_unet().train()
    net(*inputs(3)).square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())


def test_small_noise_returns_the_input():
    """c_skip -> 1, c_out -> 0 as sigma/alpha -> 0, so D(x_t) ~ x_t / alpha."""
    sch = VPCosine(t_min=1e-7)
    net = random_unet(sch)
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
    block = randomize(UNetBlock(16, 16, emb_channels=8, heads=2))
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


def test_channels_last_matches_contiguous():
    net = random_unet()
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
    heads = {name: m.heads for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.heads}
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


@pytest.mark.parametrize("overrides,match", [
    ({"img_resolution": 6, "channel_mult": [1, 2, 2]}, r"img_resolution=6 is not divisible by 2\^2"),
    ({"channels_per_head": 128}, r"attention on 64 channels with channels_per_head=128 gives 0 heads"),
])
def test_bad_architecture(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetDenoiser(schedule=EDMSchedule(), **(UNET_CONFIGS["tiny"] | overrides))
