"""torch.compile of the networks (emd_fast.execution.compiled, ``--compile``): same results as eager, same checkpoints.

The equality test compiles with inductor (C++ code on the CPU, ~20 s on one thread for the MLP pair); the CLI
checkpoint test uses the aot_eager backend (EMD_COMPILE_BACKEND): it exercises the same in-place compile and the
same state_dict path without a second C++ build, and checkpoint keys do not depend on the backend.
"""
import json

import pytest
import torch

from emd_fast import train
from emd_fast.emd import EMDConfig
from emd_fast.execution.compiled import compile_networks, networks
from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.schedules import VPCosine
from emd_fast.teachers import NetworkTeacher
from emd_fast.training.checkpoint import list_checkpoints
from emd_fast.training.distiller import Distiller

from helpers import small_problem


def make(seed=0):
    teacher, gen, student = small_problem(seed=3, hidden=16)
    cfg = EMDConfig(K=2, gamma_eps=0.3, gamma_z=0.05)
    return Distiller(teacher, gen, student, cfg, batch=16, lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=2.0)


def params(distiller):
    return {k: v for k, v in distiller.state_tensors().items() if k != "rng"}


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
