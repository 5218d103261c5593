"""The package imports the same from anywhere: the top-level ``kernels/`` folder of the repo is installed and found as
``emd_fast.kernels`` and never shadows a distribution's own top-level ``kernels`` package (transformers >= 5 imports
PyPI's ``kernels``), even with the repo root first on ``sys.path`` (``python -m`` from the repo root does that)."""
import importlib.metadata
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_at_root(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -c code`` (or ``python args``) with ``cwd`` first on sys.path, as ``python -m`` from there does."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([sys.executable, *(args or ("-c", code))], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def kernels_distribution() -> str | None:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_repo_root_does_not_shadow_top_level_kernels():
    """From the repo root, ``import kernels`` is the installed distribution's package (or, without one, nothing of
    ours: at most an empty namespace that no distribution metadata backs), and ``emd_fast.kernels`` is the repo's."""
    code = ("import importlib.util, json; spec = importlib.util.find_spec('kernels'); "
            "import emd_fast.kernels.langevin as k; "
            "print(json.dumps({'origin': spec and spec.origin, 'locations': spec and "
            "list(spec.submodule_search_locations or []), 'ours': k.__file__}))")
    out = python_at_root(code)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert Path(found["ours"]) == ROOT / "kernels" / "langevin.py"
    if kernels_distribution() is not None:
        assert found["origin"] and not Path(found["origin"]).is_relative_to(ROOT / "kernels"), found
    else:  # PEP 420: a folder without __init__.py is only a namespace portion, never a regular package
        assert found["origin"] in (None, "namespace"), found
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.skipif(kernels_distribution() is None, reason="needs the PyPI `kernels` package (transformers >= 5)")
def test_transformers_kernels_integration_imports_from_repo_root():
    """The failure this guards against: transformers' hub-kernels integration importing names from our folder."""
    pytest.importorskip("transformers")
    out = python_at_root("import kernels, diffusers, transformers; from diffusers import UNet2DModel; "
                         "from transformers.integrations import hub_kernels; print(kernels.__file__)")
    assert out.returncode == 0, out.stderr
    assert not Path(out.stdout.strip()).is_relative_to(ROOT / "kernels")


def test_a_diffusers_teacher_trains_from_repo_root(tmp_path):
    """``python -m emd_fast.train --teacher <diffusers folder>`` run from the repo root, as the README shows."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                          norm_num_groups=4).save_pretrained(tmp_path / "teacher")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "teacher")
    out = python_at_root("", "-m", "emd_fast.train", "--teacher", str(tmp_path / "teacher"), "--out",
                         str(tmp_path / "run"), "--steps", "2", "--batch", "2", "--K", "1", "--eval-samples", "4",
                         "--quiet", "--device", "cpu", "--phase-every", "0")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


def all_modules() -> list[str]:
    import emd_fast.kernels

    return sorted(m.name for path, prefix in ((emd_fast.__path__, "emd_fast."),
                                              (emd_fast.kernels.__path__, "emd_fast.kernels."))
                  for m in pkgutil.walk_packages(path, prefix))


def test_every_module_imports_from_repo_root():
    """Each module of emd_fast (emd_fast.kernels.* among them) imports in a fresh interpreter at the repo root."""
    modules = all_modules()
    assert {"emd_fast.train", "emd_fast.kernels.langevin", "emd_fast.kernels.losses"} <= set(modules)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert out.returncode == 0, out.stderr
