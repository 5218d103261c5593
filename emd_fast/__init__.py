"""emd_fast: EM Distillation of diffusion models into one-step generators."""
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
