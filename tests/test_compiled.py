"""torch.compile of the networks (emd_fast.execution.compiled, ``--compile``): same results as eager, same checkpoints.

The equality tests compile with inductor (C++ code on the CPU: ~20 s on one thread for the MLP pair, about a minute
for the regional U-Net's few distinct blocks); the region, recompilation and CLI tests use the aot_eager backend
(EMD_COMPILE_BACKEND): it exercises the same in-place compile, Dynamo's sharing of block code and the same
state_dict path without C++ builds, and none of that depends on the backend.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emd_fast import train
from emd_fast.emd import EMDConfig
from emd_fast.execution import compiled
from emd_fast.execution.compiled import compile_count, compile_networks, networks, regions
from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.nets.unet import UNET_CONFIGS, UNetDenoiser
from emd_fast.problems import init_networks
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.teachers import NetworkTeacher
from emd_fast.training.checkpoint import list_checkpoints
from emd_fast.training.distiller import Distiller, Execution

from helpers import no_compile_cache_chosen, small_problem


def make(seed=0):
    teacher, gen, student = small_problem(seed=3, hidden=16)
    cfg = EMDConfig(K=2, gamma_eps=0.3, gamma_z=0.05)
    return Distiller(teacher, gen, student, cfg, batch=16, lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=2.0)


def params(distiller):
    return {k: v for k, v in distiller.state_tensors().items() if k != "rng"}


@pytest.fixture
def frame_cache():
    """Dynamo's traced-frame cache as it was before the test (``use_compile_cache`` turns it on for the process)."""
    was = torch._dynamo.config.caching_precompile
    yield
    torch._dynamo.config.caching_precompile = was


def test_compiled_iterations_equal_eager():
    """Inductor-compiled networks: losses and parameters equal the eager run within fp32 rounding, 5 iterations."""
    torch._dynamo.reset()
    eager, comp = make(), make()
    report = compile_networks(comp, backend="inductor")
    assert report.compiled == ["generator", "student"] and "teacher" in report.skipped, report
    for _ in range(5):
        a, b = eager.step(), comp.step()
        torch.testing.assert_close(b["loss_g"], a["loss_g"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b["loss_s"], a["loss_s"], rtol=1e-4, atol=1e-6)
    pa, pb = params(eager), params(comp)
    assert list(pa) == list(pb)  # same state_dict keys: no "_orig_mod." prefix
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5, msg=k)
    # state moves both ways between compiled and eager runs
    fresh = make()
    fresh.load_state_tensors(comp.state_tensors(), comp.step_count, "compiled")
    torch.testing.assert_close(fresh.step()["loss_g"], comp.step()["loss_g"], rtol=1e-4, atol=1e-6)


def test_compile_report_and_refusals(monkeypatch):
    sch = VPCosine()
    net = MLPDenoiser(2, sch, hidden=8, depth=1)
    teacher = NetworkTeacher(net, sch, (2,))
    _, gen, student = small_problem(hidden=8)
    distiller = Distiller(teacher, gen, student, EMDConfig(K=1), batch=4, lr_g=1e-3, lr_s=1e-3)
    found, skipped = networks(distiller)
    assert set(found) == {"generator", "student", "teacher network"} and not skipped
    with pytest.raises(ValueError, match="CUDA graphs"):
        compile_networks(distiller, mode="reduce-overhead")
    monkeypatch.setattr("emd_fast.execution.compiled.backend_unavailable", lambda backend, device: "no compiler here")
    report = compile_networks(distiller)
    assert report.compiled == [] and set(report.skipped) == {"generator", "student", "teacher network"}
    assert "no compiler here" in "\n".join(report.lines())
    distiller.step()  # left eager: still trains


SMALL = ["--teacher-fit-steps", "10", "--batch", "16", "--hidden", "16", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "100", "--ckpt-every", "3", "--K", "2", "--quiet", "--device", "cpu"]


def test_cli_compiled_checkpoint_resumes_eager(tmp_path, monkeypatch, capsys):
    """A checkpoint written by a --compile run loads into an eager run (--resume without --compile) and back."""
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *SMALL, "--steps", "3", "--compile"]) == 0
    err = capsys.readouterr().err
    assert "compiled generator, student" in err and "skipped teacher: GaussianMixtureTeacher is analytic" in err
    assert train.main(["--out", str(out), *SMALL, "--steps", "5", "--resume"]) == 0  # eager resume
    assert train.main(["--out", str(out), *SMALL, "--steps", "6", "--resume", "--compile"]) == 0  # compiled again
    assert [p.name for p in list_checkpoints(out / "checkpoints")][-1] == "step_0000006.json"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))
    assert "compile" not in json.loads((out / "config.json").read_text())  # a runtime option


# one level, no attention but the innermost block's: 5 blocks of 3 kinds (32 -> 32 plain twice, 32 with attention,
# 64 -> 32 twice), so blocks share compiled code within a network as well as across the three networks
ONE_LEVEL = dict(UNET_CONFIGS["tiny"], channel_mult=[1], attn_resolutions=[])


def unet_distiller(config: dict, execution=Execution(finite_check="deferred"), seed=0):
    """A class-conditional U-Net problem: teacher, generator and student of one architecture (random weights)."""
    torch.manual_seed(seed)
    net = UNetDenoiser(schedule=EDMSchedule(), **config)
    generator, student = init_networks(net, 0.5)
    c, r = config["img_channels"], config["img_resolution"]
    return Distiller(NetworkTeacher(net, net.schedule, (c, r, r)), generator, student, EMDConfig(K=2), batch=4,
                     lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=0.5, num_classes=config["label_dim"],
                     execution=execution)


WARM_PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from emd_fast.execution.compiled import compile_count, compile_networks, use_compile_cache
from test_compiled import ONE_LEVEL, unet_distiller
use_compile_cache(sys.argv[1])
distiller = unet_distiller(ONE_LEVEL)
compile_networks(distiller, backend="inductor")
losses = [float(distiller.step()["loss_g"]) for _ in range(2)]
print(json.dumps({"graphs": compile_count(), "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "frames_loaded": counters["dynamo_cache"]["dynamo_cache_hit"], "loss_g": losses}))
"""


def test_regional_compile_equals_eager_and_starts_warm_from_its_cache(tmp_path, monkeypatch, frame_cache):
    """Inductor, regional: each UNetBlock compiled, the glue eager; losses equal the eager run within fp32 rounding over
    3 iterations, and so do the parameters' updates: Adam divides by the gradient's size, so an element whose gradient
    is near zero turns rounding into a step of up to lr; hence each tensor's difference from the eager run is bounded by
    1e-3 of its update's norm and elementwise by a tenth of lr. With Dynamo's traced-frame cache
    (TORCH_CACHING_PRECOMPILE=1), a second process on the same cache directory builds and traces nothing: it loads the
    block's traced frames and their graphs (one per distinct block and call mode), and its iterations equal the eager
    ones too."""
    no_compile_cache_chosen(monkeypatch)
    cache = tmp_path / "cache"
    torch._dynamo.config.caching_precompile = True  # what TORCH_CACHING_PRECOMPILE=1 sets (restored: frame_cache)
    compiled.use_compile_cache(cache)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    eager, comp = unet_distiller(ONE_LEVEL), unet_distiller(ONE_LEVEL)
    start = {k: v.clone() for k, v in params(eager).items()}
    report = compile_networks(comp, backend="inductor")
    assert report.regions == {"generator": 5, "student": 5, "teacher network": 5}, report
    eager_losses = []
    for _ in range(3):
        a, b = eager.step(), comp.step()
        eager_losses.append(float(a["loss_g"]))
        for k in ("loss_g", "loss_s"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    ends = params(comp)
    for k, v in params(eager).items():
        if k in start and v.is_floating_point() and v.dim() > 0:  # the networks' tensors (not the step counts)
            diff = ends[k] - v
            assert diff.norm() <= 1e-3 * (v - start[k]).norm() + 1e-7 and diff.abs().max() <= 1e-4, k
    assert counters["inductor"]["fxgraph_cache_miss"] > 0
    compiled.save_traced_frames()
    assert (cache / "dynamo").is_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    env.pop(compiled.CACHE_ENV, None)
    env["TORCH_CACHING_PRECOMPILE"] = "1"
    proc = subprocess.run([sys.executable, "-c", WARM_PROCESS, str(cache)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warm = json.loads(proc.stdout.strip().splitlines()[-1])
    assert warm["graphs"] == 0 and warm["fx_miss"] == 0 and warm["frames_loaded"] >= 1, warm
    torch.testing.assert_close(torch.tensor(warm["loss_g"]), torch.tensor(eager_losses[:2]), rtol=1e-4, atol=1e-5)


def block_kinds(net, config: dict) -> set:
    """The distinct blocks of a network as its compiled code sees them: channels, heads, resampling and the input's
    resolution (recorded by hooks on one eager forward)."""
    kinds = set()
    hooks = [b.register_forward_pre_hook(lambda b, args: kinds.add((
        b.in_channels, b.out_channels, b.num_heads, getattr(b.conv0, "up", False), getattr(b.conv0, "down", False),
        args[0].shape[-1]))) for b in regions(net)]
    c, r = config["img_channels"], config["img_resolution"]
    net(torch.randn(2, c, r, r), torch.full((2,), 0.5), torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    return kinds


def test_regions_share_code_and_nothing_recompiles_after_warmup():
    """Regional compile of a one-level U-Net (5 blocks of 3 kinds): the first iteration compiles one graph per
    distinct block and call mode (3: the no-grad forward, shared by the teacher and the frozen student, the
    generator's VJP, training), shared by the blocks of a kind and by the three networks; the next iterations
    compile nothing. Whole-network scope compiles the networks, not their blocks."""
    torch._dynamo.reset()
    distiller = unet_distiller(ONE_LEVEL)
    blocks, kinds = len(regions(distiller.student)), block_kinds(distiller.student, ONE_LEVEL)
    report = compile_networks(distiller, backend="aot_eager")
    assert report.regions == {"generator": blocks, "student": blocks, "teacher network": blocks}
    counts = [compile_count()]
    for _ in range(4):
        distiller.step()
        counts.append(compile_count())
    warmup, after = counts[1] - counts[0], counts[-1] - counts[1]
    assert after == 0, counts  # no recompilation after the first iteration
    # 3 call modes per distinct block, shared by the networks (each on its own: 5 = 1 teacher + 2 + 2)
    assert warmup == 3 * len(kinds) and len(kinds) < blocks
    whole = unet_distiller(ONE_LEVEL)
    report = compile_networks(whole, backend="aot_eager", scope="whole")
    assert report.regions == {} and report.compiled == ["generator", "student", "teacher network"]
    assert not any(compiled.is_compiled(b) for b in regions(whole.student)) and compiled.is_compiled(whole.student)
    with pytest.raises(ValueError, match="scope"):
        compile_networks(unet_distiller(ONE_LEVEL), scope="blocks")


def test_regions_include_the_blocks_a_model_declares_repeated():
    """A diffusers model names its repeated blocks in ``_repeated_blocks`` (what its compile_repeated_blocks compiles):
    below it those classes are regions too, the outermost match winning; elsewhere they are not."""
    nn = torch.nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

    class Model(nn.Module):
        _repeated_blocks = ["Layer"]

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.out = nn.Linear(2, 2)

    class Outer(nn.Module):
        _repeated_blocks = ["Linear"]  # for its whole subtree; Model's names only below Model

        def __init__(self):
            super().__init__()
            self.model, self.other = Model(), Layer()

    model = Model()
    assert regions(model) == list(model.layers)
    outer = Outer()
    assert regions(outer) == [*outer.model.layers, outer.model.out, outer.other.inner]
    assert regions(nn.Sequential(Layer(), Layer())) == []


def test_traced_frame_cache_is_turned_off_where_a_network_is_compiled_whole(frame_cache):
    """TORCH_CACHING_PRECOMPILE=1 is kept for regional compilation and turned off, with a note, as soon as a network
    is compiled whole (torch 2.13 failed to load the traced frames of SD3's and FLUX's whole transformers warm)."""
    torch._dynamo.config.caching_precompile = True
    report = compile_networks(unet_distiller(ONE_LEVEL), backend="aot_eager")
    assert torch._dynamo.config.caching_precompile and "traced-frame cache" not in report.skipped
    report = compile_networks(make(), backend="aot_eager")  # MLPs: no blocks, compiled whole
    assert not torch._dynamo.config.caching_precompile
    assert report.skipped["traced-frame cache"].startswith("turned off: generator, student compiled whole")


def test_compile_cache_directory(tmp_path, monkeypatch, frame_cache):
    """The run's cache directory is used unless the user named one in $TORCHINDUCTOR_CACHE_DIR (torch's default
    there, which importing torch._dynamo puts into the environment, names none); one set by an earlier run of this
    process is replaced."""
    no_compile_cache_chosen(monkeypatch)
    line = compiled.use_compile_cache(tmp_path / "a")
    assert os.environ[compiled.CACHE_ENV] == str(tmp_path / "a") and (tmp_path / "a").is_dir() and "warm" in line
    compiled.use_compile_cache(tmp_path / "b")  # set by us before: a new run in this process uses its own
    assert os.environ[compiled.CACHE_ENV] == str(tmp_path / "b")
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "user"))
    assert "from $TORCHINDUCTOR_CACHE_DIR" in compiled.use_compile_cache(tmp_path / "c")
    assert os.environ[compiled.CACHE_ENV] == str(tmp_path / "user") and not (tmp_path / "c").exists()
    # torch's default, which importing torch._dynamo writes into the environment, is not a choice of the user's
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compiled.CACHE_ENV, default_cache_dir())
    compiled.use_compile_cache(tmp_path / "d")
    assert os.environ[compiled.CACHE_ENV] == str(tmp_path / "d")


def test_cli_compiled_run_reports_no_recompilation_after_warmup(tmp_path, monkeypatch, capsys):
    """A --compile run of 14 iterations keeps its compile cache (here --compile-cache) and reports the graphs built
    during the warm-up and none after it in summary.json."""
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")
    no_compile_cache_chosen(monkeypatch)
    torch._dynamo.reset()
    out, cache = tmp_path / "run", tmp_path / "shared_cache"
    assert train.main(["--out", str(out), *SMALL, "--steps", "14", "--compile", "--compile-cache", str(cache)]) == 0
    assert f"torch.compile cache: {cache}" in capsys.readouterr().err and cache.is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled_graphs"]["warmup"] > 0 and summary["compiled_graphs"]["after_warmup"] == 0
    assert summary["warmup_s"] > 0


def test_no_grad_calls_of_frozen_and_trained_blocks_share_one_graph():
    """torch.compile specialises on requires_grad (and on ``training`` where a block reads it): a block called
    without gradients as the frozen, eval-mode teacher's and as the trained, train-mode student's would build two
    graphs. Frozen (``emd.frozen``, as the E-step and sampling call them) and without dropout, both calls share one
    graph; trainable weights, or dropout in train mode, still build a graph of their own."""
    from emd_fast.emd import frozen
    from emd_fast.nets.unet import UNetBlock

    def graphs(calls, p):
        torch._dynamo.reset()
        torch.manual_seed(0)
        teacher = UNetBlock(12, 20, 16, num_heads=2, dropout=p).requires_grad_(False).eval()
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        student.compile(backend="eager", dynamic=False)
        teacher.compile(backend="eager", dynamic=False)
        x, emb = torch.randn(3, 12, 6, 6), torch.randn(3, 16)
        before = compile_count()
        with torch.no_grad():
            for name in calls:
                if name == "frozen student":
                    with frozen(student):
                        student(x, emb)
                else:
                    (teacher if name == "teacher" else student)(x, emb)
        assert all(p.requires_grad for p in student.parameters())  # unfrozen again
        return compile_count() - before

    assert graphs(["teacher", "frozen student", "teacher", "frozen student"], 0.0) == 1
    assert graphs(["teacher", "student"], 0.0) == 2  # trainable weights: a graph of their own
    assert graphs(["teacher", "frozen student"], 0.1) == 2  # dropout reads the mode: eval and train differ


def test_zero_rate_dropout_modules_do_not_split_the_no_grad_graph():
    """diffusers' ResnetBlock2D holds an nn.Dropout whatever its rate, which reads ``training``: the eval-mode teacher's
    and the frozen train-mode student's no-grad calls built two graphs. compile_networks replaces rate-0 dropouts by
    nn.Identity (drop_inert_dropout): one graph, the same outputs and state_dict; a non-zero rate stays. (A block
    with a shortcut convolution reads ``training`` itself, diffusers 0.42, and keeps its two graphs.)"""
    resnet = pytest.importorskip("diffusers.models.resnet")
    from emd_fast.emd import frozen

    def graphs(drop, p=0.0):
        torch._dynamo.reset()
        torch.manual_seed(0)
        teacher = resnet.ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4,
                                       dropout=p).requires_grad_(False).eval()
        student = copy.deepcopy(teacher).train()
        x, emb = torch.randn(3, 8, 6, 6), torch.randn(3, 16)
        with torch.no_grad():
            want = teacher(x, emb)
        keys = teacher.state_dict().keys()
        if drop:
            assert [compiled.drop_inert_dropout(m) for m in (teacher, student)] == [int(p == 0)] * 2
        assert teacher.state_dict().keys() == keys
        for m in (teacher, student):
            compiled.compile_in_place(m, backend="eager", dynamic=False)
        before = compile_count()
        with torch.no_grad():
            assert torch.equal(teacher(x, emb), want)
            with frozen(student):
                out = student(x, emb)
            assert torch.equal(out, want) or p > 0
        return compile_count() - before

    assert graphs(drop=False) == 2
    assert graphs(drop=True) == 1
    assert graphs(drop=True, p=0.1) == 2  # a real dropout keeps its train-mode graph
