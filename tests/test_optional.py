"""Optional dependencies: a missing, too old or broken package is one line naming it, its version and what to install;
through a command, exit 2 (never "internal error")."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emd_fast.optional import MissingDependency, require, third_party_import_error, version_tuple

ROOT = Path(__file__).resolve().parents[1]


def test_version_tuple():
    assert version_tuple("0.30.2") == (0, 30, 2)
    assert version_tuple("2.11.0+cu128") == (2, 11, 0)
    assert version_tuple("3.6.0rc1") == (3, 6, 0)
    assert version_tuple("1.10") > version_tuple("1.9.9")


def test_missing_package_is_named_with_what_to_install():
    with pytest.raises(MissingDependency, match=r"^widgets need emd_no_such_package: it is not installed; pip install"):
        require("emd_no_such_package", "widgets")


def test_too_old_package_names_both_versions():
    import numpy

    with pytest.raises(MissingDependency, match=rf"need numpy >= 999.0, {numpy.__version__} is installed"):
        require("numpy", "widgets", minimum="999.0")


def broken_package(directory: Path, name: str, error: str = "raise ImportError('cannot import name X from y')") -> Path:
    (directory / name).mkdir()
    (directory / name / "__init__.py").write_text(error + "\n")
    return directory


def test_broken_package_says_it_fails_to_import(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_package(tmp_path, "emd_broken_pkg")))
    with pytest.raises(MissingDependency, match="fails to import .cannot import name X from y.") as e:
        require("emd_broken_pkg", "widgets")
    assert "\n" not in str(e.value)


def test_broken_lazy_attribute_is_caught(tmp_path, monkeypatch):
    code = "def __getattr__(name):\n    raise RuntimeError(f'Failed to import {name}: cannot import name Z')"
    monkeypatch.syspath_prepend(str(broken_package(tmp_path, "emd_lazy_pkg", code)))
    require("emd_lazy_pkg", "widgets")  # the package itself imports
    with pytest.raises(MissingDependency, match="Failed to import Model"):
        require("emd_lazy_pkg", "widgets", names=("Model",))


def test_own_import_errors_are_bugs_not_dependencies():
    assert third_party_import_error(ImportError("x", name="emd_fast.nope")) is None
    assert third_party_import_error(ValueError("x")) is None
    assert "not installed" in third_party_import_error(ModuleNotFoundError("No module named 'zzz'", name="zzz"))


def test_broken_diffusers_through_the_command_is_one_line_exit_2(tmp_path):
    """A diffusers that fails to import (as when another package shadowed one of its imports) under the training
    command: one line naming diffusers, exit 2."""
    pytest.importorskip("diffusers")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3, '
                                         '"out_channels": 3}')
    (teacher / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    (teacher / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "site").mkdir()
    fake = broken_package(tmp_path / "site", "diffusers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}
    out = subprocess.run([sys.executable, "-m", "emd_fast.train", "--teacher", str(teacher), "--out",
                          str(tmp_path / "run"), "--steps", "1", "--device", "cpu", "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "diffusers" in out.stderr and "fails to import" in out.stderr, out.stderr


def test_the_default_run_needs_no_triton_and_the_triton_backend_says_it_is_missing(tmp_path):
    """triton is an optional extra (the fused kernels): with it absent, the training command imports and runs on the
    reference backend, and --backend triton is one line naming triton, exit 2."""
    code = ("import sys\n"
            "sys.modules['triton'] = None  # import triton fails as where it is not installed\n"
            "from emd_fast import train\n"
            "sys.exit(train.main(sys.argv[1:]))\n")
    run = [sys.executable, "-c", code, "--steps", "3", "--batch", "16", "--teacher-fit-steps", "5", "--eval-samples",
           "50", "--eval-every", "0", "--quiet", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    out = subprocess.run([*run, "--out", str(tmp_path / "ref")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*run, "--out", str(tmp_path / "fused"), "--backend", "triton"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "triton" in out.stderr, out.stderr
