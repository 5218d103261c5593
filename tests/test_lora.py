"""LoRA generator and student (``--lora``): one frozen base (the teacher's network) and two peft adapter sets.

Step 0 is the full-copy path exactly; the base is stored once and never changes; checkpoints hold adapters and their
optimizer state only and resume bit for bit; the composition with torch.compile (no recompilation per role or per
iteration), bf16, activation checkpointing, DDP and --shard (gloo, 2 processes); bad options."""
import datetime
import itertools
import json

import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

from test_distributed import SharedNoiseDistiller, launch, resumes_exactly_on_two_processes  # noqa: E402
from test_memory_report import memory  # noqa: E402

from emd_fast import train  # noqa: E402
from emd_fast.emd import EMDConfig  # noqa: E402
from emd_fast.execution.compiled import compile_networks  # noqa: E402
from emd_fast.execution.distributed import Ranks, data_parallel, fully_sharded  # noqa: E402
from emd_fast.nets.lora import (  # noqa: E402
    LORA_TARGETS,
    LoraSettings,
    TargetRule,
    lora_layers,
    lora_networks,
    target_layers,
)
from emd_fast.nets.mlp import MLPDenoiser  # noqa: E402
from emd_fast.nets.unet import UNET_CONFIGS, SongUNetDenoiser, build_network  # noqa: E402
from emd_fast.problems import init_networks  # noqa: E402
from emd_fast.schedules import EDMSchedule, VPCosine  # noqa: E402
from emd_fast.teachers import NetworkTeacher  # noqa: E402
from emd_fast.teachers.diffusers_folder import DiffusersDenoiser, DiscreteSchedule, PromptTable  # noqa: E402
from emd_fast.teachers.network_file import save_network  # noqa: E402
from emd_fast.training.build import Run, load_run  # noqa: E402
from emd_fast.training.checkpoint import list_checkpoints  # noqa: E402
from emd_fast.training.config import resolve  # noqa: E402
from emd_fast.training.distiller import Distiller  # noqa: E402

from diffusers_models import (  # noqa: E402
    SD_BETAS,
    latent_pipeline,
    prompts_file,
    scheduler,
    tiny_cond_unet,
    tiny_unet,
)
from helpers import one_line_error  # noqa: E402

MIXTURE = ["--teacher-fit-steps", "10", "--hidden", "16", "--depth", "1", "--batch", "8", "--K", "1", "--eval-every",
           "2", "--eval-samples", "50", "--ckpt-every", "2", "--quiet", "--device", "cpu", "--phase-every", "0"]
IMAGES = ["--batch", "3", "--K", "1", "--eval-every", "2", "--eval-samples", "6", "--ckpt-every", "2", "--quiet",
          "--device", "cpu", "--phase-every", "0", "--keep", "0"]


def randomize(net: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (the U-Nets zero some layers at initialisation, which would hide the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6 / max(1, p[0].numel()) ** 0.5)
    return net


def tiny_adm(label_dim=10):
    return randomize(build_network(UNET_CONFIGS["tiny"] | dict(model_channels=8, channels_per_head=8,
                                                               label_dim=label_dim)))


def tiny_song():
    return randomize(SongUNetDenoiser(1, 8, EDMSchedule(), model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                      attn_resolutions=(4,), label_dim=10))


def sd_schedule():
    return DiscreteSchedule(scheduler(**SD_BETAS).alphas_cumprod)


# kind -> (network, t*, inputs (x_t, t, y) of 3 examples)
def network(kind: str):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(10, (3,), generator=g)
    if kind == "mlp":
        return randomize(MLPDenoiser(2, VPCosine(), hidden=16, depth=2)), 0.9, (torch.randn(3, 2, generator=g),
                                                                                torch.rand(3, generator=g), None)
    if kind in ("adm", "song"):
        net = tiny_adm() if kind == "adm" else tiny_song()
        return net, 2.5, (torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g) * 5 + 0.1, labels)
    x = torch.randn(3, *((3, 8, 8) if kind == "pixel" else (4, 8, 8)), generator=g)
    t = torch.rand(3, generator=g) * 900 + 50
    if kind == "pixel":
        return DiffusersDenoiser(tiny_unet(num_class_embeds=10), sd_schedule(), "epsilon"), 700.0, (x, t, labels)
    prompts = PromptTable(torch.randn(3, 8, 16, generator=g))
    return (DiffusersDenoiser(tiny_cond_unet(), sd_schedule(), "v_prediction", prompts), 700.0,
            (x, t, torch.tensor([2, 0, 1])))


KINDS = ("mlp", "adm", "song", "pixel", "sd")


def perturb(module: nn.Module, seed: int) -> None:
    """Random adapters (B != 0): what training makes of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_at_step_zero_the_lora_networks_compute_exactly_what_full_copies_compute(kind):
    net, t_star, (x, t, y) = network(kind)
    full_g, full_s = init_networks(net, t_star)
    g, s, info = lora_networks(net, t_star, LoraSettings(4), (1, 2))
    z = torch.randn_like(x)
    with torch.no_grad():
        teacher = net(x, t, y)
        assert torch.equal(g(z, y), full_g(z, y)) and torch.equal(s(x, t, y), full_s(x, t, y))
        assert info["lora_layers"] == len(lora_layers(g)) == len(lora_layers(s)) > 0
        perturb(g, 3)  # the generator's adapters move: the generator does, the student and the teacher do not
        assert not torch.allclose(g(z, y), full_g(z, y))
        assert torch.equal(s(x, t, y), full_s(x, t, y)) and torch.equal(net(x, t, y), teacher)
    trained = [name for name, p in itertools.chain(g.named_parameters(), s.named_parameters()) if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(p.dtype == torch.float32 for p in g.parameters() if p.requires_grad)


def test_default_targets_per_architecture_and_a_new_one_in_one_entry(monkeypatch):
    adm = target_layers(tiny_adm(), LoraSettings(4))
    assert not any("map_label" in n for n in adm)  # read through .weight: an adapter there would never run
    net = tiny_adm()
    assert all(type(net.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in adm)  # no ResampleConv2d
    assert {"map_layer0", "enc.8x8_conv", "enc.8x8_block0.conv0", "enc.4x4_block0.qkv", "out_conv"} <= set(adm)
    sd = target_layers(network("sd")[0], LoraSettings(4))
    assert {"unet.conv_in", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "unet.time_embedding.linear_1", "unet.conv_out"} <= set(sd)
    assert sd["unet.conv_out"] == 4 and sd["unet.conv_in"] == 4
    mlp = target_layers(network("mlp")[0], LoraSettings(8))
    assert mlp["inp"] == 2 and mlp["out"] == 2 and mlp["blocks.0"] == 8  # layers narrower than the rank: full width
    g, _, info = lora_networks(network("mlp")[0], 0.9, LoraSettings(8, alpha=4.0), (1, 2))
    assert info["lora_narrow_layers"] == {"inp": 2, "out": 2}
    assert {m.scaling["default"] for m in lora_layers(g).values()} == {0.5}  # one scale alpha / rank everywhere

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    assert set(target_layers(Custom(), LoraSettings(2))) == {"a", "b"}  # unknown: every Linear / Conv2d
    monkeypatch.setitem(LORA_TARGETS, "Custom", TargetRule(include=("a",)))
    assert set(target_layers(Custom(), LoraSettings(2))) == {"a"}
    assert set(target_layers(Custom(), LoraSettings(2, targets="b"))) == {"b"}


def teacher_file(tmp_path, net=None):
    path = tmp_path / "teacher.safetensors"
    save_network(net or tiny_adm(), path)
    return path


def run_of(argv):
    """A Run built as ``python -m emd_fast.train argv`` builds it (its run directory made)."""
    parser = train.build_parser()
    cfg, device, _ = resolve(vars(parser.parse_args(argv)), train._explicit(parser, argv))
    cfg["out"].mkdir(parents=True, exist_ok=True)
    return Run(cfg, device, fit_teacher=True)


def storages(*modules):
    return {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}


def test_the_base_is_stored_once_and_never_changes(tmp_path):
    argv = ["--teacher", str(teacher_file(tmp_path)), "--out", str(tmp_path / "r"), *IMAGES, "--lora", "4"]
    d = run_of(argv).distiller
    base = {k: v.clone() for k, v in d.teacher.net.state_dict().items()}
    adapters = [p for p in d.generator.parameters() if p.requires_grad]
    base_count = len(storages(d.teacher))
    assert len(storages(d.teacher, d.generator, d.student, d.ema)) == base_count + 3 * len(adapters)
    full = run_of([*argv[:-2], "--out", str(tmp_path / "f")]).distiller
    assert len(storages(full.teacher, full.generator, full.student, full.ema)) == 4 * base_count
    for _ in range(3):
        d.step()
        d.update_ema()
    assert all(torch.equal(v, d.teacher.net.state_dict()[k]) for k, v in base.items())
    assert not torch.equal(adapters[1], torch.zeros_like(adapters[1]))  # a lora_B moved
    ema = [p for n, p in d.ema.named_parameters() if "lora_" in n]
    assert len(ema) == len(adapters) and not torch.equal(ema[1], adapters[1])


def test_lora_run_checkpoints_adapters_only_and_resumes_bit_for_bit(tmp_path):
    teacher = teacher_file(tmp_path)
    args = ["--teacher", str(teacher), *IMAGES, "--steps", "4"]
    straight, split, full = tmp_path / "straight", tmp_path / "split", tmp_path / "full"
    assert train.main(["--out", str(straight), *args, "--lora", "2"]) == 0
    assert train.main(["--out", str(split), *args, "--lora", "2", "--steps", "2"]) == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    assert train.main(["--out", str(full), *args]) == 0
    last = list_checkpoints(straight / "checkpoints")[-1].with_suffix(".safetensors")
    a, b = load_file(str(last)), load_file(str(list_checkpoints(split / "checkpoints")[-1].with_suffix(".safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    nets = [k for k in a if k.startswith(("generator.", "student.", "ema."))]
    assert nets and all(".lora_A." in k or ".lora_B." in k for k in nets)
    adapters = sum(k.startswith("generator.") for k in nets)
    assert adapters == sum(k.startswith("student.") for k in nets) == sum(k.startswith("ema.") for k in nets)
    assert len({k.rsplit(".", 1)[0] for k in a if k.startswith("opt_g.")}) == adapters  # Adam: the adapters'
    tensor_bytes = sum(t.numel() * t.element_size() for t in a.values())
    assert tensor_bytes < last.stat().st_size < tensor_bytes + 200 * len(a) + 4096  # adapters, Adam, random state
    full_size = list_checkpoints(full / "checkpoints")[-1].with_suffix(".safetensors").stat().st_size
    assert last.stat().st_size < full_size / 2
    config = json.loads((straight / "config.json").read_text())
    assert config["lora"] == 2 and config["lora_layers"] > 0


def test_lora_dropout_resumes_bit_for_bit(tmp_path):
    args = [*MIXTURE, "--lora", "4", "--lora-dropout", "0.3", "--steps", "4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--out", str(straight), *args]) == 0
    assert train.main(["--out", str(split), *args, "--steps", "2"]) == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    a = load_file(str(list_checkpoints(straight / "checkpoints")[-1].with_suffix(".safetensors")))
    b = load_file(str(list_checkpoints(split / "checkpoints")[-1].with_suffix(".safetensors")))
    assert "dropout_rng" in a and all(torch.equal(a[k], b[k]) for k in a)


def distiller_of(kind: str, lora: bool):
    net, t_star, _ = network(kind)
    shape = (2,) if kind == "mlp" else (1, 8, 8)
    teacher = NetworkTeacher(net, net.schedule, shape)
    gen, student = (lora_networks(net, t_star, LoraSettings(4), (1, 2))[:2] if lora else init_networks(net, t_star))
    return Distiller(teacher, gen, student, EMDConfig(K=2), batch=4, lr_g=1e-3, lr_s=1e-3, sigma_data=0.5,
                     num_classes=0 if kind == "mlp" else 10, ema_halflife_kimg=0.01)


@pytest.mark.parametrize("kind", ["mlp", "adm"])
def test_compiled_lora_networks_compile_as_the_full_copies_and_never_again(kind):
    """Graphs compiled per iteration (CompileCounter backend): none after the first iteration, and in the first the
    full-copy path's plus the teacher's own no-grad graphs: full copies share theirs with the frozen generator's and
    student's no-grad calls (one graph per network class, or per distinct block of the U-Net, whose 3 call modes all
    networks share), LoRA trees cannot (their adapters are part of the graph); the trees do not recompile one
    another's graphs otherwise (no recompilation per role)."""
    from torch._dynamo.testing import CompileCounter

    counts = {}
    for lora in (False, True):
        torch._dynamo.reset()
        counter, d = CompileCounter(), distiller_of(kind, lora)
        compile_networks(d, backend=counter)
        counts[lora] = []
        for _ in range(3):
            d.step()
            d.update_ema()
            counts[lora].append(counter.frame_count)
    torch._dynamo.reset()
    teacher_graphs = 1 if kind == "mlp" else counts[False][0] // 3
    assert counts[True][0] == counts[False][0] + teacher_graphs and counts[True][2] == counts[True][0], counts
    assert counts[False][2] == counts[False][0] > 0, counts


def test_fast_lora_run_resumes_eagerly(tmp_path, monkeypatch):
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    out = tmp_path / "r"
    assert train.main(["--out", str(out), *MIXTURE, "--lora", "4", "--steps", "2", "--fast"]) == 0
    assert train.main(["--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return latent_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def sd_run(folder, tmp_path, name, *extra):
    return run_of(["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path)), "--out", str(tmp_path / name),
                   *IMAGES, *extra])


def test_bf16_base_is_the_bf16_teacher_and_lora_starts_as_the_full_bf16_path(sd_folder, tmp_path):
    lora = sd_run(sd_folder, tmp_path, "lora", "--precision", "bf16", "--lora", "4").distiller
    full = sd_run(sd_folder, tmp_path, "full", "--precision", "bf16").distiller
    base = {id(p) for p in lora.teacher.net.parameters()}
    assert all(p.dtype == torch.bfloat16 for p in lora.teacher.net.parameters())
    frozen = [p for p in lora.generator.parameters() if not p.requires_grad]
    assert frozen and all(id(p) in base for p in frozen)
    assert all(p.dtype == torch.float32 for p in lora.generator.parameters() if p.requires_grad)
    z, y = lora.sample_inputs(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (d.emd._net(None, d.generator, z, y) for d in (lora, full))
    assert torch.equal(a, b)
    lora.step()
    out = lora.step()
    assert all(bool(torch.isfinite(v)) for v in out.values())


def test_grad_checkpointing_leaves_the_lora_updates_unchanged(sd_folder, tmp_path):
    runs = [sd_run(sd_folder, tmp_path, name, "--lora", "4", *extra).distiller
            for name, extra in (("plain", []), ("ckpt", ["--grad-checkpoint"]))]
    assert runs[1].generator.denoiser.unet.is_gradient_checkpointing
    for d in runs:
        d.step()
        d.step()
    a, b = (d.state_tensors() for d in runs)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("generator.", "student.")))


BATCH, STEPS = 12, 3


def lora_trajectory(ranks, wrap=None, shard=None):
    """LoRA over a network teacher (ring2d's MLP shapes, an EMA): the checkpoint tensors of generator, student, EMA
    and both Adam states after each of STEPS iterations (every rank calls it; sharded, only rank 0's are filled),
    the base (checked unchanged) and the Distiller."""
    torch.manual_seed(0)
    net = randomize(MLPDenoiser(2, VPCosine(), hidden=16, depth=2))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    teacher = NetworkTeacher(net, net.schedule, (2,))
    gen, student, _ = lora_networks(net, 0.9, LoraSettings(4), (1, 2))
    d = SharedNoiseDistiller(teacher, gen, student, EMDConfig(K=2),
                             batch=BATCH // ranks.world, global_batch=BATCH, lr_g=1e-3, lr_s=1e-3, seed=3,
                             sigma_data=2.0, data_parallel=wrap, shard=shard, ema_halflife_kimg=0.01, ranks=ranks)
    out = []
    for _ in range(STEPS):
        d.step()
        d.update_ema()
        out.append({k: v.clone() for k, v in d.state_tensors().items() if not k.endswith("rng")})
    assert all(torch.equal(v, base[k]) for k, v in net.state_dict().items())  # the frozen base never changes
    return out, base, d


def _lora_worker(rank, world, path, how):
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        ranks, cpu = Ranks(rank, world, rank, distributed=True), torch.device("cpu")
        if how == "ddp":
            out, base, _ = lora_trajectory(ranks, data_parallel(cpu))
        else:  # the adapters sharded (FSDP2); the base whole and the teacher's own tensors in all three networks
            out, base, d = lora_trajectory(ranks, shard=fully_sharded(cpu, world))
            own = {id(t): t for t in (*d.teacher.parameters(), *d.teacher.buffers())}
            for net in (d.generator, d.student, d.ema):
                adapters = [p for n, p in net.named_parameters() if "lora_" in n]
                frozen = [t for n, t in (*net.named_parameters(), *net.named_buffers()) if "lora_" not in n]
                assert adapters and all(isinstance(p, DTensor) and p.to_local().numel() <= -(-p.shape[0] // world)
                                        * p.shape[1] for p in adapters)
                assert len(frozen) == len(own) and all(own.get(id(t)) is t for t in frozen)
            # per process: the whole base, 1/world of the adapters, their gradients, Adam moments and EMA
            # (benchmarks/memory.py's --lora --shard rows)
            trained = [p for net in (d.generator, d.student) for p in net.parameters() if p.requires_grad]
            shards = [*trained, *(p.grad for p in trained), *d.ema.parameters(),
                      *(v for opt in (d.opt_g, d.opt_s) for st in opt.state.values()
                        for v in (st["exp_avg"], st["exp_avg_sq"]))]
            base_bytes = sum(t.numel() * t.element_size() for t in d.teacher.parameters())
            held = base_bytes + sum(t.to_local().numel() * t.element_size() for t in shards if isinstance(t, DTensor))
            adapters = sum(p.numel() for p in d.generator.parameters() if p.requires_grad)
            assert held == memory.static_bytes(base_bytes // 4, 4, adapters, world)
        torch.save((out, base), path / f"{how}_rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("how", ["ddp", "shard"])
def test_lora_on_two_processes_takes_the_one_process_update(tmp_path, how):
    """DDP, and --shard (the adapters, their Adam state and EMA sharded, the base whole and shared): 2 processes on
    half the batch each follow one process on the whole batch, fp32, up to the order of float additions."""
    (one, base, _), world = lora_trajectory(Ranks()), 2
    launch(_lora_worker, world, tmp_path, how)
    ranks = [torch.load(tmp_path / f"{how}_rank{r}.pt") for r in range(world)]
    for _, rank_base in ranks:
        assert all(torch.equal(rank_base[k], base[k]) for k in base)
    if how == "ddp":  # ranks agree (sharded: rank 0 alone gathers the checkpoint tensors)
        assert all(torch.equal(ranks[1][0][-1][k], ranks[0][0][-1][k]) for k in ranks[0][0][-1])
    nets = [k for k in one[-1] if k.startswith(("generator.", "student.", "ema."))]
    assert any(k.startswith("ema.") for k in nets) and all(".lora_" in k for k in nets)  # adapters only
    worst = 0.0
    for step, (a, b) in enumerate(zip(one, ranks[0][0], strict=True), 1):
        assert a.keys() == b.keys()
        for k in a:
            worst = max(worst, float((b[k] - a[k]).abs().max()))
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{k} step {step}")
    print(f"LoRA {how}, 2 processes vs 1: largest difference of an adapter, Adam moment or EMA after {STEPS} steps "
          f"{worst:.1e}")


def test_sharded_lora_run_checkpoints_adapters_only_and_resumes_bit_for_bit(tmp_path):
    """--lora --shard under torchrun (2 processes, an EDM ADM teacher): the checkpoints hold the adapters of
    generator, student and EMA and their Adam states only; a sharded resume continues bit for bit; a plain process
    loads them exactly."""
    argv = ["--teacher", str(teacher_file(tmp_path)), *IMAGES, "--batch", "4", "--steps", "4", "--ema", "0.01",
            "--lora", "2", "--shard"]
    straight, a = resumes_exactly_on_two_processes(tmp_path, argv, stop=2, end=4)
    nets = [k for k in a if k.startswith(("generator.", "student.", "ema."))]
    assert nets and all(".lora_A." in k or ".lora_B." in k for k in nets)
    adapters = sum(k.startswith("generator.") for k in nets)
    assert adapters == sum(k.startswith("student.") for k in nets) == sum(k.startswith("ema.") for k in nets)
    assert len({k.rsplit(".", 1)[0] for k in a if k.startswith("opt_g.")}) == adapters
    loaded, step, _ = load_run(straight, "cpu", training_state=True)
    state = {k: v for k, v in loaded.distiller.state_tensors().items() if k.startswith(("generator.", "student.",
                                                                                        "ema.", "opt_"))}
    assert step == 4 and state.keys() == {k for k in a if k.startswith(("generator.", "student.", "ema.", "opt_"))}
    assert all(torch.equal(v, a[k]) for k, v in state.items())


@pytest.mark.parametrize("args,message", [
    (["--lora", "0"], "--lora 0: the adapters' rank must be >= 1"),
    (["--lora", "-2"], "--lora -2: the adapters' rank must be >= 1"),
    (["--lora", "17"], "--lora 17 is larger than the layers it adapts: the widest"),
    (["--lora", "4", "--lora-targets", "nope"], "--lora-targets 'nope' matches no module of the MLPDenoiser"),
    (["--lora", "4", "--lora-targets", "inp,embed.0"], "'embed.0' matches RandomFourierFeatures modules only"),
    (["--lora", "4", "--lora-targets", "inp,,out"], "an empty name"),
    (["--lora-alpha", "2"], "--lora-alpha sets the LoRA adapters: add --lora RANK"),
    (["--lora-targets", "inp"], "--lora-targets sets the LoRA adapters: add --lora RANK"),
    (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--lora", "4", "--lora-dropout", "1"], "--lora-dropout must lie in [0, 1)"),
])
def test_bad_lora_options_are_one_line_errors(args, message, tmp_path, capsys):
    rc = train.main(["--out", str(tmp_path / "r"), *MIXTURE, *args])
    assert message in one_line_error(capsys, rc)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_adapters_that_never_run_and_a_missing_peft_are_one_line_errors(tmp_path, capsys, monkeypatch):
    args = ["--out", str(tmp_path / "r"), "--teacher", str(teacher_file(tmp_path)), *IMAGES, "--lora", "2"]
    rc = train.main([*args, "--lora-targets", "map_label,map_layer0"])
    assert "LoRA adapters of 1 layer(s) never run (their weight is read directly, not called): map_label" in \
        one_line_error(capsys, rc)
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    assert "LoRA adapters (--lora) need peft" in one_line_error(capsys, train.main(args))
