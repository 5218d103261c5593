"""How a run meets its machine: stop signals at iteration boundaries, memory limits and the first iteration's
out-of-memory answer."""
from __future__ import annotations

import contextlib
import math
import resource
import signal
import threading

import torch

from ..checks import meminfo_bytes
from ..errors import STOP_SIGNALS, RunError, out_of_memory
from ..execution.distributed import Ranks
from .distiller import Distiller


class StopSignals:
    """While active, SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before a kill) only record
    that a stop was asked for (``signum``): the training loop finishes its iteration, writes a checkpoint and stops.
    Handlers can only be installed from the main thread; elsewhere the signals keep their behaviour, as do signals
    the process ignores (SIGINT in a shell's background job)."""

    def __enter__(self) -> "StopSignals":
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS
                             if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def _record(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def requested(self, ranks: Ranks) -> int | None:
        """The signal to stop on at this iteration boundary: this process's, or in a distributed run any rank's (an
        all-reduce: every rank asks at the same boundary, so all stop at the same one)."""
        return ranks.agree(self.signum)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def cpu_memory_limit(device: torch.device):
    """On a CPU (Linux), the process's address space limited to its size now plus 80% of the RAM available: an
    allocation beyond that fails (and is caught) instead of succeeding on overcommit and summoning the kernel's OOM
    killer, and the rest of the machine keeps some memory."""
    available = meminfo_bytes("/proc/meminfo", "MemAvailable:")
    used = meminfo_bytes("/proc/self/status", "VmSize:")
    if device.type != "cpu" or available is None or used is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + int(0.8 * available)
    limit = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def first_step(step, distiller: Distiller, device: torch.device):
    """The run's first iteration; an allocation failure becomes a RunError naming a batch that fits (measured by
    halving the batch until one eager iteration runs: the run is abandoned anyway)."""
    try:
        with cpu_memory_limit(device):
            return step()
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        asked = distiller.batch
    fits = asked // 2
    while fits >= 1:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        distiller.batch = fits
        try:
            with cpu_memory_limit(device):
                distiller.step()
            break
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
            if not out_of_memory(e):
                raise
            fits //= 2
    hint = f"batch {fits} ran one iteration here (measured): pass --batch {fits}" if fits else \
        "not even batch 1 fits"
    raise RunError(f"--batch {asked} does not fit in the memory of {device}: {hint}")


def check_batch_memory(distiller: Distiller, device: torch.device) -> None:
    """RunError if the batch cannot fit whatever the networks: an iteration holds at least six data-sized fp32
    tensors per example at once (z, x = g(z), eps, x_t and two denoiser outputs). Catches an absurd --batch at once;
    the first iteration measures the rest (first_step)."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = meminfo_bytes("/proc/meminfo", "MemAvailable:")
    need = 6 * 4 * math.prod(distiller.shape) * distiller.batch
    if available is not None and need > available:
        raise RunError(f"--batch {distiller.batch} needs at least {need / 2**30:.1f} GiB of memory for its samples and "
                       f"chains alone, {device} has {available / 2**30:.1f} GiB available: lower --batch (even "
                       f"{available // (6 * 4 * math.prod(distiller.shape))} would leave nothing for the networks)")
