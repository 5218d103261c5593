import os
import subprocess
import sys
import time

import torch

from emd_fast.execution import profiling


def test_phase_is_a_shared_noop_when_not_profiling():
    assert not profiling.NVTX  # the test environment does not set EMD_NVTX
    assert profiling.phase("a") is profiling.phase("b")


def test_phase_timer_accumulates_per_phase():
    timer = profiling.PhaseTimer(torch.device("cpu"))
    with timer:
        for _ in range(2):
            with profiling.phase("sleep"):
                time.sleep(0.01)
    with profiling.phase("sleep"):  # outside the timer: not counted
        time.sleep(0.01)
    assert timer.calls["sleep"] == 2
    assert 10 <= timer.summary(iterations=2)["sleep"] < 50


def test_nvtx_ranges_when_enabled():
    code = ("from emd_fast.execution import profiling\n"
            "assert profiling.NVTX\n"
            "with profiling.phase('teacher forward'):\n    pass\n"
            "t = profiling.PhaseTimer('cpu')\n"
            "with t, profiling.phase('x'):\n    pass\n"
            "assert t.calls['x'] == 1\n")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "EMD_NVTX": "1"}, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
