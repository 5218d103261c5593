"""The errors a command turns into its exit code (see ``cli``): a problem with the input or the machine (one line,
exit 2), a stop on a signal (128 + its number). Light: no torch at import (the early signal handlers use it)."""
from __future__ import annotations

import signal
import sys


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


class FileRefused(ValueError):
    """A file or path that emd_fast will not read or write as it is: not a regular file (a FIFO, a device, a link to
    one), a symbolic link where a run writes, too large for what it should hold, malformed (one line, as is)."""


class RunError(ValueError):
    """A run cannot start or continue as asked (one line, said to the user as is)."""


class Stopped(Exception):
    """The run stopped on a signal at an iteration boundary, after writing a checkpoint; ``exit_code`` = 128 + it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, and what Slurm and Kubernetes send


def out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: CUDA's OutOfMemoryError or the CPU allocator's RuntimeError."""
    torch = sys.modules.get("torch")  # no torch imported: not torch's error
    return (torch is not None and isinstance(e, torch.OutOfMemoryError)) or "can't allocate memory" in str(e) \
        or "out of memory" in str(e)
