"""``roofline.py``: its FLOPs are those of a real reference iteration, its floors follow from the stated rates, and
the CPU smoke run prints the floor table alone (nothing of EMD is timed)."""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from emd_fast.training.distiller import Execution

import roofline
import throughput


@pytest.mark.parametrize("problem,K", [("vector", 1), ("vector", 4), ("unet", 1), ("unet", 4)])
def test_iteration_flops_are_those_of_a_reference_iteration(problem, K):
    """The floor's composition (K x (teacher + student forward + generator VJP) + two training steps) counts
    exactly the network FLOPs FlopCounterMode sees in one eager reference iteration (smoke sizes)."""
    spec = throughput.problem_spec(problem, smoke=True)
    nets = throughput.build_networks(spec, torch.device("cpu"))
    distiller = throughput.make_distiller(copy.deepcopy(nets), spec["batch"], K, Execution(), torch.device("cpu"))
    counted = throughput.count_flops(distiller)
    cost = roofline.networks_cost(nets, spec["batch"], K)
    assert cost["flops"] == pytest.approx(counted, rel=1e-3)
    assert cost["bytes"] == cost["elementwise_bytes"] + cost["param_bytes"] > 0


def test_kernel_floor():
    nbytes, flops = roofline.kernel_cost("langevin_eps_step", 4096 * 64, 4)
    assert nbytes == 9 * 4096 * 64 * 4  # read eps, eta, D_T, D_psi, g; write eps', eta', v, x_t'
    h100 = roofline.floor_s(nbytes, flops, roofline.H100["copy_gbps"], roofline.H100["fp32_tflops"])
    assert h100 == pytest.approx(nbytes / 3.0e12)  # bandwidth-bound: the FLOPs take 70 ns at 60 TFLOP/s
    assert roofline.floor_s(1e9, 1e15, 1000.0, 1.0) == pytest.approx(1000.0)  # FLOP-bound


def test_smoke_run_prints_the_floor_table(capsys):
    assert roofline.main(["--real"]) == 0  # no real networks: test_real_adm_rows_and_training_seam has them
    text = capsys.readouterr().out
    assert "| langevin_eps_step | 4096x64 | fp32 | 9.44 | 4.19 | 3.15 |" in text
    assert text.count("| unet | ") == 3 and text.count("| vector | ") == 3
    assert "measured /" not in text and "x floor" not in text


def test_meta_counting_equals_real_tensors():
    """The real networks are counted on the meta device: the same FLOPs as on real CPU tensors (tiny ADM)."""
    spec = throughput.problem_spec("unet", smoke=True)
    _, _, student, _, _ = throughput.build_networks(spec, torch.device("cpu"))
    y = torch.tensor([3, 7])
    shape = (1, 8, 8)  # the tiny config's images
    x, t = torch.randn(2, *shape), torch.full((2,), 0.5)
    on_cpu = roofline.counted_flops(lambda: student(x, t, y)) / 2
    on_meta = roofline.network_flops(student, shape, lambda n: torch.zeros(n, dtype=torch.long, device="meta"))
    assert on_meta.forward == on_cpu > 0
    assert on_meta.forward < on_meta.vjp < on_meta.train < 3.5 * on_meta.forward


def test_real_adm_rows_and_training_seam(monkeypatch):
    """EDM's ImageNet-64 ADM at real size: its parameter count, the EMD-K/EMD-1 ratio from the iteration's
    composition, floors from the stated rates, and the seam LoRA rows use: a training function that leaves fewer
    parameters trainable gives fewer FLOPs and bytes per iteration."""
    def last_layer_only(net):
        net.requires_grad_(False)
        net.out_conv.requires_grad_(True)

    monkeypatch.setitem(roofline.TRAINING, "last-layer", last_layer_only)
    res = roofline.real_rows(["edm-imagenet64"], ks=(1, 8), training=("full", "last-layer"))
    full = {r["K"]: r for r in res["rows"] if r["training"] == "full"}
    part = {r["K"]: r for r in res["rows"] if r["training"] == "last-layer"}
    assert full[1]["params"] == full[1]["trainable"] == 295_899_267  # EDM's edm-imagenet-64x64-cond-adm.pkl
    assert part[1]["trainable"] == sum(p.numel() for p in roofline.real_networks("edm-imagenet64")[0]
                                       .net.out_conv.parameters())
    assert part[8]["flops"] < full[8]["flops"] and part[8]["param_bytes"] < full[8]["param_bytes"]
    # ratio = (8 (teacher + forward + vjp) + 2 train) / (1 (...) + 2 train): > 1, < 8
    assert full[8]["ratio_vs_K1"] == pytest.approx(full[8]["flops"] / full[1]["flops"])
    assert 3 < full[8]["ratio_vs_K1"] < 8
    r = full[8]
    assert r["h100_floor_ms"] == pytest.approx(1e3 * r["flops"] / 800e12)  # FLOP-bound at bf16
    assert r["h100_ceiling_images_s"] == pytest.approx(64 / (r["h100_floor_ms"] / 1e3))
    d = res["dmd2"]
    assert d["images_per_s_a100"] == pytest.approx(280 / 0.95 / 7)  # 7 A100s, batch 280, 0.95 s/iteration
    assert 0 < d["mfu"] < 1 and d["images_per_s_h100"] == pytest.approx(d["images_per_s_a100"] * 800 / 312)
    assert r["h100_goal_images_s"] == pytest.approx(d["mfu"] * 800e12 / r["flops_per_sample"])
    assert "| edm-imagenet64 | full | 8 |" in roofline.real_table(res)


def test_families_counted_from_their_own_networks(monkeypatch):
    """The later families (SDXL, SD3, FLUX, EDM2) are counted from their own networks called with keyword inputs:
    on the meta device the same FLOPs as a real CPU call; their teacher is TEACHER_CALLS forwards (classifier-free
    guidance: 2); a LoRA copy trains fewer parameters and moves fewer optimizer bytes; the data shape is that of
    the network's image input."""
    diffusers = pytest.importorskip("diffusers")
    import memory

    def tiny(name):
        torch.manual_seed(0)
        net = diffusers.UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                             norm_num_groups=4, attention_head_dim=4, cross_attention_dim=16,
                                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        return net, lambda b: ((), dict(sample=torch.randn(b, 4, 8, 8), timestep=torch.full((b,), 500.0),
                                        encoder_hidden_states=torch.randn(b, 5, 16))), True

    net, inputs, _ = tiny("x")
    args, kwargs = inputs(2)
    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused attention kernel is not counted; its math form is
        on_cpu = roofline.counted_flops(lambda: net(*args, **kwargs)) / 2
    counted = roofline.call_flops(net, inputs)
    assert counted.forward == on_cpu > 0 and counted.forward < counted.vjp < counted.train
    monkeypatch.setattr(memory, "network", tiny)
    monkeypatch.setitem(roofline.TEACHER_CALLS, "tiny-family", 2)
    monkeypatch.setitem(roofline.REAL_NETWORKS, "tiny-family", "a tiny SD-like UNet")
    monkeypatch.setattr(roofline, "LORA_RANK", 2)  # below the tiny layers' widths
    make, _, shape, teacher, teacher_params = roofline.real_counts("tiny-family")
    assert shape == (4, 8, 8) and teacher == 2 * on_cpu and teacher_params == sum(p.numel() for p in net.parameters())
    res = roofline.real_rows(["tiny-family"], ks=(1, 4), training=("full", "lora"))
    full = {r["K"]: r for r in res["rows"] if r["training"] == "full"}
    lora = {r["K"]: r for r in res["rows"] if r["training"] == "lora"}
    assert full[1]["flops_per_sample"] == 2 * on_cpu + counted.forward + counted.vjp + 2 * counted.train
    assert lora[4]["trainable"] < full[4]["trainable"] and lora[4]["param_bytes"] < full[4]["param_bytes"]
    assert "| tiny-family | lora | 4 |" in roofline.real_table(res)
