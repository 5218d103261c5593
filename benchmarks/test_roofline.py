"""``roofline.py``: its FLOPs are those of a real reference iteration, its floors follow from the stated rates, and
the CPU smoke run prints the floor table alone (nothing of EMD is timed)."""
import copy

import pytest
import torch

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
    assert roofline.main([]) == 0
    text = capsys.readouterr().out
    assert "| langevin_eps_step | 4096x64 | fp32 | 9.44 | 4.19 | 3.15 |" in text
    assert text.count("| unet | ") == 3 and text.count("| vector | ") == 3
    assert "measured /" not in text and "x floor" not in text
