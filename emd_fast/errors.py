"""The errors a command turns into its exit code (see ``cli``): a problem with the input or the machine (one line,
exit 2), a stop on a signal (128 + its number)."""
from __future__ import annotations

import signal

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


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
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)
