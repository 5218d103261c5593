"""The whole iteration in one CUDA graph (``emd_fast.execution.graphs.GraphedStep``) against the eager iteration: GPU
only.

Replays must draw fresh noise (the run's registered torch.Generator; the NoiseStream's device counter), update the
parameters and optimizer state in place, skip non-finite updates on the device, and hand over to eager runs through
checkpoints. Skipped without CUDA (tests/test_fast_loop.py checks the capturable step itself on the CPU).
"""
import pytest
import torch

from emd_fast.emd import EMDConfig
from emd_fast.execution.compiled import compile_networks
from emd_fast.execution.graphs import GraphedStep
from emd_fast.training.distiller import Distiller, Execution

from helpers import network_params, small_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def make(seed=0, K=3, **execution):
    teacher, gen, student = small_problem(seed=3, hidden=32)
    cfg = EMDConfig(K=K, gamma_eps=0.3, gamma_z=0.05)
    return Distiller(teacher, gen, student, cfg, batch=48, lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=2.0,
                     execution=Execution(finite_check="deferred", **execution), device="cuda")


def losses(step, iters):
    out = []
    for _ in range(iters):
        x = step()
        out.append(torch.stack([x["loss_g"], x["loss_s"]]))
    return torch.stack(out)


def assert_same_run(a, b, la, lb, rtol=1e-5):
    torch.testing.assert_close(lb, la, rtol=rtol, atol=1e-7)
    pa, pb = network_params(a), network_params(b)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=rtol, atol=1e-6, msg=k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_graph_replays_equal_eager_iterations(backend):
    """3 eager warm-up iterations, capture, 17 replays == 20 eager iterations from the same seed (the replays draw
    the same Philox stream as eager calls; triton: the in-kernel noise counter advances on the device)."""
    eager, graphed = make(backend=backend), make(backend=backend)
    la = losses(eager.step, 20)
    lb = losses(GraphedStep(graphed, warmup=3), 20)
    assert graphed.step_count == 20
    assert_same_run(eager, graphed, la, lb)
    assert torch.equal(eager.rng.get_state(), graphed.rng.get_state())  # the host offset advanced per replay


def test_graphed_run_checkpoints_into_an_eager_run_and_back():
    graphed = make()
    step = GraphedStep(graphed)
    losses(step, 8)
    eager = make(seed=123)
    eager.load_state_tensors(graphed.state_tensors(), graphed.step_count, "graphed")
    assert_same_run(graphed, eager, losses(step, 3), losses(eager.step, 3))


def test_nonfinite_inside_the_graph_skips_updates_and_is_reported():
    distiller = make()
    step = GraphedStep(distiller)
    losses(step, 5)
    with torch.no_grad():
        next(distiller.student.parameters()).fill_(float("nan"))  # the student now outputs NaN in every replay
    before = {k: v for k, v in network_params(distiller).items() if k.startswith("generator.")}
    losses(step, 3)
    after = network_params(distiller)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    with pytest.raises(FloatingPointError, match="nan/inf at step 6"):
        distiller.raise_if_nonfinite()


def test_deferred_eager_step_does_not_sync():
    distiller = make(backend="triton")
    distiller.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        distiller.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_graph_tracks_fp32_graph():
    a, b = make(), make(precision="bf16")
    la, lb = losses(GraphedStep(a), 20), losses(GraphedStep(b), 20)
    torch.testing.assert_close(lb, la, rtol=2e-2, atol=1e-6)


def test_compiled_networks_inside_the_graph():
    eager, graphed = make(), make()
    report = compile_networks(graphed, backend="inductor")
    assert report.compiled == ["generator", "student"], report
    la, lb = losses(eager.step, 12), losses(GraphedStep(graphed, warmup=3), 12)
    assert_same_run(eager, graphed, la, lb, rtol=1e-4)
