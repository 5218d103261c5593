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

from .entry import stop_signals_if_a_command_starts as _stop_signals  # noqa: E402 (light: signal, sys)

_stop_signals()  # python -m emd_fast.<command>: stop signals handled from the first instant (see entry.py)

# The public names, imported on first use (``import emd_fast`` stays light: no networks, diffusers or matplotlib)
_EXPORTS = {
    "EMD": "emd", "EMDConfig": "emd", "EStep": "emd", "VARIANTS": "emd", "ReferenceOps": "ops", "Ops": "ops",
    "Distiller": "training.distiller", "Execution": "training.distiller",
    "Schedule": "schedules", "VPCosine": "schedules", "EDMSchedule": "schedules", "make_schedule": "schedules",
    "Teacher": "teachers", "NetworkTeacher": "teachers", "GaussianMixtureTeacher": "teachers.mixture",
    "load_mixture": "teachers.mixture", "random_mixture": "teachers.mixture",
    "load_network": "teachers.network_file", "save_network": "teachers.network_file",
    "load_teacher_network": "teachers.network_file",
    "Generator": "nets.generator", "MLPDenoiser": "nets.mlp", "UNetDenoiser": "nets.unet",
    "SongUNetDenoiser": "nets.unet", "UNET_CONFIGS": "nets.unet", "build_network": "nets.unet",
    "Problem": "problems", "MixtureProblem": "problems.mixture",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
