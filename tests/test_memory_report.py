"""benchmarks/memory.py against real CPU allocations of small networks: the saved-for-backward bytes it counts on fake
tensors, its static model (weights, gradients, Adam, EMA, frozen base) after one real optimizer step, full and LoRA,
and the linear batch model it extrapolates from. (The real-size rows: benchmarks/results/memory_report.json.)"""
import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from emd_fast.nets.lora import LoraSettings, adapt, lora_networks  # noqa: E402
from emd_fast.nets.unet import UNET_CONFIGS, build_network  # noqa: E402

from diffusers_models import tiny_cond_unet  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("memory", BENCH / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)


def unet_inputs(b):
    g = torch.Generator().manual_seed(b)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g) * 999,
            torch.randn(b, 8, 16, generator=g)), {}


def state_bytes(*tensors) -> int:
    """Bytes of the distinct storages among tensors."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def real_and_fake(build):
    """build() made twice: with real tensors (seed 0), and with fake ones (returned with their FakeTensorMode)."""
    torch.manual_seed(0)
    real = build()
    with torch.device("meta"):
        fake = build()
    mode = FakeTensorMode()
    memory.to_fake(fake, mode)
    return real, fake, mode


def assert_counted(real, fake, mode, inputs, checkpoint) -> None:
    """The fake count at batch 2 is the real forward's saved bytes within 2%, and the line through batch 1 and 2
    (constant + per image) gives batch 3."""
    counted = memory.saved_bytes(fake, mode, inputs, 2)
    assert memory.saved_bytes(real, contextlib.nullcontext(), inputs, 2) == pytest.approx(counted, rel=0.02)
    constant, per_image = memory.activations(fake, mode, inputs, checkpoint)
    assert per_image > 0 and memory.saved_bytes(fake, mode, inputs, 3) == constant + 3 * per_image


@pytest.mark.parametrize("lora", [None, 4])
def test_fake_count_is_the_real_forwards_saved_bytes(lora):
    """Fake tensors count what a real bf16-autocast forward saves (full and LoRA over a bf16 base), within 2%;
    checkpointing saves less; the activations are linear in the batch (constant + per image: the line through
    batch 1 and 2 gives batch 3)."""
    def net():
        unet = tiny_cond_unet()
        if lora:
            unet.to(torch.bfloat16)
            adapt(unet, LoraSettings(lora))
        return unet

    real, fake, mode = real_and_fake(net)
    for ckpt in (False, True):
        real.enable_gradient_checkpointing() if ckpt else real.disable_gradient_checkpointing()
        fake.enable_gradient_checkpointing() if ckpt else fake.disable_gradient_checkpointing()
        assert_counted(real, fake, mode, unet_inputs, ckpt)
    assert memory.activations(fake, mode, unet_inputs, True)[1] < memory.activations(fake, mode, unet_inputs,
                                                                                     False)[1]


def adam_step(nets):
    """One real Adam step of the trainable parameters of nets; returns the optimizer (its state now allocated)."""
    params = [p for n in nets for p in n.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    for n in nets:
        r = n.img_resolution
        x = torch.randn(2, n.img_channels, r, r)
        n(x, torch.full((2,), 0.5), torch.tensor([1, 3])).square().mean().backward()
    opt.step()
    return opt, params


@pytest.mark.parametrize("lora", [None, 2])
def test_static_model_is_the_real_allocation_after_one_step(lora):
    """The static bytes memory.py assigns (fp32 teacher as EDM's) equal the distinct storages held after one real
    Adam step of generator and student (weights, gradients, two moments), an fp32 EMA of the trained parameters and
    the teacher: full copies, and LoRA over one shared base with peft's adapters (counted exactly as --lora makes
    them, lora_networks)."""
    torch.manual_seed(0)
    teacher = build_network(dict(UNET_CONFIGS["tiny"]))
    params = sum(p.numel() for p in teacher.parameters())
    if lora:
        generator, student, info = lora_networks(teacher, 2.5, LoraSettings(lora), (1, 2))
        generator = generator.denoiser
        probe = build_network(dict(UNET_CONFIGS["tiny"]))
        assert memory.trainable(adapt(probe, LoraSettings(lora))) == info["lora_parameters"]
    else:
        generator, student = (build_network(dict(UNET_CONFIGS["tiny"])) for _ in range(2))
        teacher.requires_grad_(False)
    opt, trained = adam_step([generator, student])
    gen_trained = [p for p in generator.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in gen_trained]
    held = [*teacher.parameters(), *generator.parameters(), *student.parameters(), *ema,
            *(p.grad for p in trained), *(v for s in opt.state.values() for v in (s["exp_avg"], s["exp_avg_sq"]))]
    adapters = None if lora is None else sum(p.numel() for p in gen_trained)
    assert state_bytes(*held) == memory.static_bytes(params, 4, adapters)


@pytest.mark.parametrize("name,millions", [("edm2-img512-s", 280), ("edm2-img512-xxl", 1523)])
def test_edm2_rows_count_the_published_networks(name, millions):
    """EDM2's networks of the report at their published sizes (EDM2's Table 2, with its 128-parameter uncertainty
    head), fp32 teachers like EDM's."""
    net, inputs, is_diffusers = memory.network(name)
    assert round((sum(p.numel() for p in net.parameters()) + 128) / 1e6) == millions and not is_diffusers
    assert net.img_channels == 4 and net.img_resolution == 64 and net.label_dim == 1000


@pytest.mark.parametrize("lora", [None, 4])
def test_edm2_fake_count_is_the_real_forwards_saved_bytes(lora):
    """The same for a small EDM2 network, full and with its LoRA layers (which build W + s B A for the forward:
    counted in the constant)."""
    arch = dict(network="edm2", img_channels=4, img_resolution=8, label_dim=10, model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16)

    def net():
        edm2 = build_network(dict(arch))
        return adapt(edm2, LoraSettings(lora)) if lora else edm2

    def inputs(b):
        g = torch.Generator().manual_seed(b)
        return (torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g) + 0.1, torch.arange(b) % 10), {}

    assert_counted(*real_and_fake(net), inputs, None)
