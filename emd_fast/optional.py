"""Optional dependencies (diffusers, transformers, triton, ...): imported where a feature needs them, and a one-line
``MissingDependency`` (a ValueError: exit 2 in the commands) naming the package, the version found and what to install
when one is missing, older than the feature needs, or installed but failing to import."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

# the extra of setup.py that installs each optional package
EXTRAS = {"diffusers": "diffusers", "transformers": "diffusers", "triton": "triton", "peft": "lora",
          "tensorboard": "tensorboard", "wandb": "wandb"}


class MissingDependency(ValueError):
    """An optional package is missing, too old or broken (one line, said to the user as is)."""


def installed_version(package: str) -> str | None:
    """The installed distribution's version, None if there is none."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: '0.30.2' -> (0, 30, 2), '2.11.0+cu128' -> (2, 11, 0)."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def declared_minimum(package: str) -> str | None:
    """The lower bound setup.py declares for ``package`` (from the installed emd_fast's metadata; None in a source
    tree that was not installed, or where none is declared)."""
    try:
        requirements = importlib.metadata.requires("emd_fast") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        found = re.match(rf"{re.escape(package)}\s*>=\s*([\w.]+)", requirement)
        if found:
            return found.group(1)
    return None


def install_hint(package: str, minimum: str | None = None) -> str:
    extra = EXTRAS.get(package)
    spec = f"{package}>={minimum}" if minimum else package
    return f"pip install '{spec}'" + (f" (or the project's extra: pip install 'emd_fast[{extra}]')" if extra else "")


def require(package: str, purpose: str, minimum: str | None = None, names: tuple[str, ...] = ()) -> ModuleType:
    """``import package`` for ``purpose`` (e.g. "diffusers teachers"); ``names``: attributes to resolve now (packages
    that import their classes lazily fail only there when broken); ``minimum``: the version the purpose needs, by
    default the lower bound setup.py declares. MissingDependency if the package cannot be used."""
    minimum = minimum or declared_minimum(package)
    version = installed_version(package)
    if version is not None and minimum and version_tuple(version) < version_tuple(minimum):
        raise MissingDependency(f"{purpose} need {package} >= {minimum}, {version} is installed: "
                                f"{install_hint(package, minimum)}")
    try:
        module = importlib.import_module(package)
        for name in names:
            getattr(module, name)
    except Exception as e:  # noqa: BLE001 - whatever a broken install raises, the user gets one line
        if version is None and isinstance(e, ModuleNotFoundError) and e.name == package:
            found = "it is not installed"
        else:
            found = f"{package} {version or '(no version)'} is installed but fails to import ({_first_line(e)})"
        raise MissingDependency(f"{purpose} need {package}{f' >= {minimum}' if minimum else ''}: {found}; "
                                f"{install_hint(package, minimum)}") from None
    return module


def third_party_import_error(e: BaseException) -> str | None:
    """One line for an ImportError raised by a package that is not emd_fast (a missing or broken dependency met
    outside ``require``), None for anything else (an ImportError of emd_fast's own code is a bug)."""
    if not isinstance(e, ImportError):
        return None
    module = (e.name or "").split(".")[0]
    if not module or module == "emd_fast":
        return None
    version = installed_version(module)
    found = "is not installed" if version is None else f"{version} is installed but fails to import"
    return f"{module} {found} ({_first_line(e)}): {install_hint(module)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
