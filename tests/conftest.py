"""Test set-up: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton is first imported, so it is set here, at collection time.
"""
import os
import tempfile

import torch

# the teacher's reference samples are cached on disk (emd_fast.evaluation.reference): the tests use a fresh folder
os.environ.setdefault("EMD_FAST_CACHE", tempfile.mkdtemp(prefix="emd_fast_cache_"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device the machine has: cpu always, cuda where present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def no_periodic_progress_lines(monkeypatch):
    """In-process runs print no periodic one-line summaries (emd_fast.progress) unless a test asks for them: on a
    slow machine a run past LINE_EVERY_S would put a summary line into the stderr a test reads for one error line."""
    from emd_fast import progress

    monkeypatch.setattr(progress, "LINE_EVERY_S", float("inf"))


@pytest.fixture
def kernel_device():
    """Where Triton kernels run: the GPU if there is one, else the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny Stable-Diffusion-style pipeline folder (``diffusers_models.latent_pipeline``), made once for every test
    that reads it: copy it before changing it."""
    from diffusers_models import latent_pipeline

    return latent_pipeline(tmp_path_factory.mktemp("sd") / "pipe")
