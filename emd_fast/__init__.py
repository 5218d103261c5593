"""emd_fast: EM Distillation of diffusion models into one-step generators."""
from .emd import EMD, VARIANTS, EMDConfig, EStep, ReferenceOps
from .distiller import Distiller
from .networks import Generator, MLPDenoiser
from .schedules import EDMSchedule, Schedule, VPCosine, make_schedule
from .teachers import GaussianMixtureTeacher, NetworkTeacher, Teacher

__all__ = ["EMD", "EMDConfig", "EStep", "ReferenceOps", "VARIANTS", "Distiller", "Generator", "MLPDenoiser",
           "Schedule", "VPCosine", "EDMSchedule", "make_schedule", "GaussianMixtureTeacher", "NetworkTeacher",
           "Teacher"]
