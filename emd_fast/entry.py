"""The first instant of every command: stop signals handled before anything heavy (torch) is imported.

``python -m emd_fast.<command>`` imports the package first, while CPython has set ``sys.argv[0]`` to "-m" (it does
so while it locates the module), and ``emd_fast/__init__`` calls ``stop_signals_if_a_command_starts``; the console
scripts (``emd-train``, ...) are the functions below, which do the same before importing their command. Until the
command installs its own handlers (``cli.run_command``), SIGINT, SIGTERM and SIGUSR1 end the process at once with one
line and exit 128 + the signal (130, 143, 138): nothing has been written yet. ``import emd_fast`` in any other
program changes no signal handler.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

from .errors import STOP_SIGNALS

COMMANDS = ("train", "sample", "fid", "pretrain", "edm_import", "report", "export")


def _stop_now(signum, frame) -> None:
    os.write(2, f"stopped by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def stop_signals_now() -> None:
    """SIGINT, SIGTERM and SIGUSR1 end the process at once (one line, exit 128 + signal); a signal the process
    ignores (SIGINT in a shell's background job) stays ignored."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _stop_now)


def module_run_by_python_m() -> str | None:
    """The module ``python -m`` is locating right now (sys.argv[0] is "-m" only then), else None."""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = getattr(sys, "orig_argv", [])
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m":
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("-m"):
            return arg[2:]
    return None


def stop_signals_if_a_command_starts() -> None:
    """Called by ``emd_fast/__init__``: stop_signals_now if this process is ``python -m emd_fast.<command>``."""
    if module_run_by_python_m() in {f"{__package__}.{c}" for c in COMMANDS}:
        stop_signals_now()


def _console(command: str) -> None:
    stop_signals_now()
    importlib.import_module(f"{__package__}.{command}").console()


def train() -> None:
    """``emd-train``: ``python -m emd_fast.train``."""
    _console("train")


def sample() -> None:
    """``emd-sample``: ``python -m emd_fast.sample``."""
    _console("sample")


def fid() -> None:
    """``emd-fid``: ``python -m emd_fast.fid``."""
    _console("fid")


def pretrain() -> None:
    """``emd-pretrain``: ``python -m emd_fast.pretrain``."""
    _console("pretrain")


def edm_import() -> None:
    """``emd-edm-import``: ``python -m emd_fast.edm_import``."""
    _console("edm_import")


def report() -> None:
    """``emd-report``: ``python -m emd_fast.report``."""
    _console("report")


def export() -> None:
    """``emd-export``: ``python -m emd_fast.export``."""
    _console("export")
