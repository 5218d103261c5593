"""The fast training loop's execution options against the reference iteration: deferred finite checks (the sync-free
step a CUDA graph captures), bf16 autocast, channels_last, and the --fast / --cuda-graph CLI switches (CPU)."""
import json

import pytest
import torch

from emd_fast import train
from emd_fast.emd import EMD, EMDConfig
from emd_fast.execution.graphs import GraphedStep, graphs_unavailable
from emd_fast.nets.unet import UNET_CONFIGS, UNetDenoiser
from emd_fast.problems import init_networks
from emd_fast.schedules import make_schedule
from emd_fast.teachers import NetworkTeacher
from emd_fast.training.distiller import Distiller, Execution

from helpers import NoHostRead, assert_resumes_exactly, network_params, small_problem, train_cli

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "3",
         "--eval-samples", "200", "--ckpt-every", "4", "--K", "2", "--quiet", "--device", "cpu"]


def make(seed=0, device="cpu", **execution):
    teacher, gen, student = small_problem(seed=3, hidden=32)
    cfg = EMDConfig(K=3, gamma_eps=0.3, gamma_z=0.05)
    return Distiller(teacher, gen, student, cfg, batch=48, lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=2.0,
                     execution=Execution(**execution), device=device)


def run_both(a, b, iters):
    """Step two runs side by side; returns their losses per iteration, (iters, 2) each."""
    la, lb = [], []
    for _ in range(iters):
        x, y = a.step(), b.step()
        la.append(torch.stack([x["loss_g"], x["loss_s"]]))
        lb.append(torch.stack([y["loss_g"], y["loss_s"]]))
    return torch.stack(la), torch.stack(lb)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deferred_fast_iteration_equals_reference_over_20_steps(backend, kernel_device):
    """The capturable step (deferred checks, fused Adam; triton: the fused kernels with the run's noise) gives the
    reference path's losses and parameters within fp32 rounding over 20 iterations from the same seed (where the
    kernels run: the GPU if there is one)."""
    ref = make(device=kernel_device)
    fast = make(device=kernel_device, backend=backend, kernel_noise=False, finite_check="deferred")
    la, lb = run_both(ref, fast, 20)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-7)
    pa, pb = network_params(ref), network_params(fast)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-5, atol=1e-6, msg=k)
    fast.raise_if_nonfinite()  # all finite: no error
    assert int(fast.finite_steps) == 20


def test_deferred_step_makes_no_host_sync():
    """No value of a tensor is read on the host during a deferred step (what CUDA-graph capture requires); the
    same probe does catch the sync checks, so the probe works."""
    sync_free, checked = make(finite_check="deferred"), make()
    sync_free.step(), checked.step()  # lazy state (optimizer moments) exists before the probe
    with NoHostRead():
        sync_free.step()
    with pytest.raises(AssertionError, match="host sync"), NoHostRead():
        checked.step()


def test_deferred_unet_step_with_labels_bf16_channels_last_makes_no_host_sync():
    """The image path of a --fast run (class labels, bf16 autocast, channels_last) is sync-free too."""
    d = unet_distiller(True, finite_check="deferred", precision="bf16")
    d.step()
    with NoHostRead():
        d.step()


class PoisonAfter:
    """The exact teacher, whose denoiser returns NaN from call ``n`` on."""

    def __init__(self, teacher, n):
        self.teacher, self.n, self.calls = teacher, n, 0
        self.schedule, self.data_shape = teacher.schedule, teacher.data_shape

    def denoise(self, x_t, t, y=None):
        self.calls += 1
        d = self.teacher.denoise(x_t, t, y)
        return d * float("nan") if self.calls >= self.n else d


def test_deferred_nonfinite_update_is_skipped_and_reported_later():
    teacher, gen, student = small_problem(seed=1, hidden=16)
    cfg = EMDConfig(K=2)
    distiller = Distiller(PoisonAfter(teacher, 2 * 2 + 1), gen, student, cfg, batch=16, lr_g=1e-3, lr_s=1e-3,
                     execution=Execution(finite_check="deferred"))
    distiller.step(), distiller.step()
    before = network_params(distiller)
    distiller.step(), distiller.step()  # the teacher is NaN from iteration 3: no exception inside step()
    after = network_params(distiller)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} was updated by a non-finite step"
    assert all(torch.isfinite(v).all() for v in after.values())
    with pytest.raises(FloatingPointError, match="nan/inf at step 3"):
        distiller.raise_if_nonfinite()
    assert int(distiller.opt_g.state_dict()["state"][0]["step"]) == 2  # skipped steps do not count in Adam either


def test_bf16_autocast_tracks_fp32():
    """bf16 network calls with fp32 masters: 20 iterations stay within 2% of fp32 in the losses and 5% in the
    parameter updates (measured: 0.3% and 0.7%); the networks really run in bf16, the exact teacher does not."""
    fp32, bf16 = make(), make(precision="bf16")
    seen = []
    bf16.student.out.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    p0 = network_params(fp32)
    la, lb = run_both(fp32, bf16, 20)
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(lb, la, rtol=2e-2, atol=1e-6)
    pa, pb = network_params(fp32), network_params(bf16)
    ua = torch.cat([(pa[k] - p0[k]).flatten() for k in p0])
    ub = torch.cat([(pb[k] - p0[k]).flatten() for k in p0])
    assert float((ub - ua).norm() / ua.norm()) < 5e-2
    assert all(p.dtype == torch.float32 for p in bf16.generator.parameters())  # fp32 master weights
    x, t = torch.randn(64, 2), torch.rand(64) * 0.9 + 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = bf16.teacher.denoise(x, t)
    assert exact.dtype == torch.float32 and torch.equal(exact, bf16.teacher.denoise(x, t))


def unet_distiller(channels_last: bool, seed=0, **execution):
    torch.manual_seed(seed)
    sch = make_schedule("edm")
    net = UNetDenoiser(schedule=sch, **UNET_CONFIGS["tiny"])
    gen, student = init_networks(net, sch.t_at_lambda(-4.0))
    teacher = NetworkTeacher(net, sch, (1, 8, 8))
    return Distiller(teacher, gen, student, EMDConfig(K=2), batch=5, lr_g=1e-3, lr_s=1e-3, num_classes=10,
                     sigma_data=0.5, execution=Execution(channels_last=channels_last, **execution))


def test_channels_last_equals_contiguous():
    nchw, nhwc = unet_distiller(False), unet_distiller(True)
    convs = [m.weight for m in nhwc.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    la, lb = run_both(nchw, nhwc, 4)
    assert nhwc._randn(5).is_contiguous(memory_format=torch.channels_last)  # (draws: after the comparison)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-6)
    pa, pb = network_params(nchw), network_params(nhwc)
    for k in pa:  # NHWC convolutions sum in another order; Adam (beta1=0) turns a rounding-level difference of a
        # near-zero gradient into an update difference up to ~lr = 1e-3: seen 7e-5 on 7 of 0.5M weights
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=2e-4, msg=k)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal (tests/test_graphs.py covers the GPU)")
def test_graphs_refused_with_reason_without_cuda():
    assert "need a CUDA device" in graphs_unavailable(make(finite_check="deferred"))
    with pytest.raises(ValueError, match="need a CUDA device"):
        GraphedStep(make(finite_check="deferred"))


def test_cli_fast_on_cpu_says_what_it_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMD_COMPILE_BACKEND", "aot_eager")  # inductor's C++ build is slow; same in-place compile
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *SMALL, "--steps", "5", "--fast"]) == 0
    err = capsys.readouterr().err
    assert "--fast: skipped CUDA graphs: no CUDA device" in err and "skipped fused Triton kernels" in err
    assert "compiled generator, student" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["execution"]["finite_check"] == "deferred" and summary["execution"]["compile"] == "default"
    assert summary["execution"]["cuda_graph"] is False and summary["iters_per_s"] > 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_graph_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "r"), *SMALL, "--steps", "2", "--cuda-graph",
                       "--finite-check", "deferred"]) == 2
    assert "error: --cuda-graph: CUDA graphs need a CUDA device" in capsys.readouterr().err


def test_cli_deferred_nan_stops_before_a_bad_checkpoint(tmp_path, monkeypatch, capsys):
    """With deferred checks a non-finite loss stops the run at the next log sync: exit 2, one-line error, and no
    checkpoint after the failure (the last one holds finite parameters)."""
    real = EMD.generator_loss
    calls = {"n": 0}

    def poisoned(self, es, y=None):
        calls["n"] += 1
        loss = real(self, es, y)
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(EMD, "generator_loss", poisoned)
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *SMALL, "--steps", "12", "--finite-check", "deferred"]) == 2
    assert "nan/inf at step 6" in capsys.readouterr().err
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.json"))
    assert ckpts == ["step_0000004.json"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:6] == [0, 1, 2, 3, 4, 5]


def test_cli_deferred_resume_is_exact(tmp_path):
    args = [*SMALL, "--finite-check", "deferred"]
    assert_resumes_exactly(train_cli(*args), tmp_path / "straight", tmp_path / "split", steps=8, stop=4,
                           resume_args=args)
