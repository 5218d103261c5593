"""emd_fast: EM Distillation of diffusion models into one-step generators."""
from .distiller import Distiller
from .edm_import import load_unet, save_unet
from .emd import EMD, VARIANTS, EMDConfig, EStep, ReferenceOps
from .networks import Generator, MLPDenoiser
from .schedules import EDMSchedule, Schedule, VPCosine, make_schedule
from .teachers import GaussianMixtureTeacher, NetworkTeacher, Teacher
from .unet import UNET_CONFIGS, UNetDenoiser

__all__ = ["EMD", "EMDConfig", "EStep", "ReferenceOps", "VARIANTS", "Distiller", "Generator", "MLPDenoiser",
           "UNetDenoiser", "UNET_CONFIGS", "load_unet", "save_unet", "Schedule", "VPCosine", "EDMSchedule",
           "make_schedule", "GaussianMixtureTeacher", "NetworkTeacher", "Teacher"]
