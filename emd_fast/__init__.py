"""emd_fast: EM Distillation of diffusion models into one-step generators."""
from pathlib import Path as _Path

# The Triton kernels live in the top-level kernels/ folder, installed as emd_fast.kernels (setup.py). Run from a
# source tree without installing (PYTHONPATH=.), the same folder is found through this package's search path.
_source_tree = _Path(__path__[0]).parent
if (_source_tree / "setup.py").is_file() and (_source_tree / "kernels" / "__init__.py").is_file():
    __path__.append(str(_source_tree))
from .distiller import Distiller
from .emd import EMD, VARIANTS, EMDConfig, EStep, ReferenceOps
from .mixtures import load_mixture, random_mixture
from .network_files import load_network, load_teacher_network, save_network
from .networks import Generator, MLPDenoiser
from .problems import MixtureProblem
from .schedules import EDMSchedule, Schedule, VPCosine, make_schedule
from .teachers import GaussianMixtureTeacher, NetworkTeacher, Teacher
from .unet import UNET_CONFIGS, SongUNetDenoiser, UNetDenoiser, build_network

__all__ = ["EMD", "EMDConfig", "EStep", "ReferenceOps", "VARIANTS", "Distiller", "Generator", "MLPDenoiser",
           "UNetDenoiser", "SongUNetDenoiser", "UNET_CONFIGS", "build_network", "load_network", "save_network",
           "load_teacher_network", "Schedule", "VPCosine", "EDMSchedule", "make_schedule", "GaussianMixtureTeacher",
           "NetworkTeacher", "Teacher", "MixtureProblem", "load_mixture", "random_mixture"]
