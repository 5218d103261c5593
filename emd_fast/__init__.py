"""emd_fast: EM Distillation of diffusion models into one-step generators."""
import importlib.machinery as _machinery
import importlib.util as _util
import sys as _sys
from pathlib import Path as _Path


def _find_kernels_in_a_source_tree() -> None:
    """The Triton kernels live in the repo's top-level kernels/ folder: modules without an __init__.py, so that from
    the repo root (first on sys.path under ``python -m``) it can never shadow another distribution's top-level
    ``kernels`` package. setup.py installs the folder as emd_fast.kernels (a wheel, or an editable install's finder);
    run from a source tree without installing (PYTHONPATH=.), the folder is registered here as that namespace."""
    folder = _Path(__path__[0]).parent / "kernels"
    if (folder.parent / "setup.py").is_file() and (folder / "langevin.py").is_file() and \
            _util.find_spec(f"{__name__}.kernels") is None:
        spec = _machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        _sys.modules[spec.name] = globals()["kernels"] = _util.module_from_spec(spec)


_find_kernels_in_a_source_tree()
from .emd import EMD, VARIANTS, EMDConfig, EStep, ReferenceOps
from .nets.generator import Generator
from .nets.mlp import MLPDenoiser
from .nets.unet import UNET_CONFIGS, SongUNetDenoiser, UNetDenoiser, build_network
from .problems.mixture import MixtureProblem
from .schedules import EDMSchedule, Schedule, VPCosine, make_schedule
from .teachers import NetworkTeacher, Teacher
from .teachers.mixture import GaussianMixtureTeacher, load_mixture, random_mixture
from .teachers.network_file import load_network, load_teacher_network, save_network
from .training.distiller import Distiller

__all__ = ["EMD", "EMDConfig", "EStep", "ReferenceOps", "VARIANTS", "Distiller", "Generator", "MLPDenoiser",
           "UNetDenoiser", "SongUNetDenoiser", "UNET_CONFIGS", "build_network", "load_network", "save_network",
           "load_teacher_network", "Schedule", "VPCosine", "EDMSchedule", "make_schedule", "GaussianMixtureTeacher",
           "NetworkTeacher", "Teacher", "MixtureProblem", "load_mixture", "random_mixture"]
