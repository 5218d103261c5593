"""The EMD iteration on the fused Triton backend against the reference path (CPU: Triton interpreter)."""
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emd_fast.emd import EMDConfig
from emd_fast.training.distiller import Distiller, Execution

from helpers import small_problem


def make(backend, variant="eps,z", cancel=True, kernel_noise=False, seed=0, device="cpu"):
    teacher, gen, student = small_problem(seed=3, hidden=16)
    cfg = EMDConfig(K=3, gamma_eps=0.3, gamma_z=0.05, variant=variant, cancel_noise=cancel)
    return Distiller(teacher, gen, student, cfg, batch=24, lr_g=1e-3, lr_s=1e-3, seed=seed, sigma_data=2.0,
                     execution=Execution(backend=backend, kernel_noise=kernel_noise), device=device)


def params(distiller):
    return {k: v for k, v in distiller.state_tensors().items() if not k.startswith(("rng", "noise_stream"))}


@pytest.mark.parametrize("variant, cancel", [("eps,z", True), ("x,z", True), ("eps", False)])
def test_fast_iterations_equal_reference(variant, cancel, kernel_device):
    """Same seed, same noise (kernel_noise=False): losses and parameters agree over several iterations (fp32)."""
    ref = make("reference", variant, cancel, device=kernel_device)
    fast = make("triton", variant, cancel, device=kernel_device)
    for _ in range(4):
        a, b = ref.step(), fast.step()
        torch.testing.assert_close(b["loss_g"], a["loss_g"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b["loss_s"], a["loss_s"], rtol=1e-4, atol=1e-7)
    pa, pb = params(ref), params(fast)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-6, msg=k)


def test_in_kernel_noise_is_reproducible_and_resumable(kernel_device):
    def fast(seed=0):
        return make("triton", kernel_noise=True, seed=seed, device=kernel_device)

    a, b = fast(), fast()
    for _ in range(2):
        la, lb = a.step(), b.step()
        assert torch.equal(la["loss_g"], lb["loss_g"])
    assert not torch.equal(fast(seed=1).step()["loss_g"], fast().step()["loss_g"])
    # a resumed run continues the noise stream exactly
    state, step = a.state_tensors(), a.step_count
    resumed = fast()
    resumed.load_state_tensors(state, step, "test")
    torch.testing.assert_close(resumed.step()["loss_g"], a.step()["loss_g"], rtol=0, atol=0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        make("cuda-magic")


def test_kernels_import_from_a_source_tree_without_install(tmp_path):
    """PYTHONPATH=<repo> (no pip install, as on a GPU machine without internet) finds kernels/ as emd_fast.kernels:
    run without site's .pth files, so an editable install cannot be what finds it."""
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, *{site.getsitepackages()!r}]; "
            "import emd_fast.kernels.langevin as k; print(k.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == root / "kernels" / "langevin.py"
