"""The run directory: its lock, its creation, the metrics log.

    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, RunError
from ..files import write_text_atomic
from .checkpoint import list_checkpoints, remove_orphans, resume_checkpoint
from .distiller import Distiller


class RunLock:
    """An exclusive OS lock (flock) on ``<run directory>/.lock`` while a run uses the directory. The kernel releases it
    when the process ends, however it ends, so a killed run never leaves a stale lock; a second run on the same
    directory gets a RunError naming the holder's pid."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"

    def __enter__(self) -> "RunLock":
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunError(f"{self.path.parent} is in use by another run (pid {holder}): wait for it to finish, or "
                           f"choose another --out") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def check_free_space(out: Path, checkpoint_bytes: int) -> None:
    """RunError unless the file system of ``out`` has room for one more checkpoint (with a 10% margin): a new
    checkpoint is written in full before the oldest kept one is deleted."""
    free = shutil.disk_usage(out).free
    if free < 1.1 * checkpoint_bytes:
        raise RunError(f"--out {out}: {free / 2**20:.1f} MiB free on its file system, one checkpoint of this run "
                       f"needs {checkpoint_bytes / 2**20:.1f} MiB")


def open_run_directory(cfg: dict, lock: contextlib.ExitStack) -> tuple[bool, Path | None]:
    """Create (a new run) and lock the run directory (RunLock, held until ``lock`` closes), remove what a killed
    checkpoint write left behind. Returns (whether this call created the directory, the checkpoint to resume from or
    None); a directory it created is removed again if it fails."""
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    created = False
    if not cfg["resume"]:
        try:
            out.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise RunError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    try:
        if out.is_dir():
            lock.enter_context(RunLock(out))
        if not cfg["resume"] and list_checkpoints(ckpt_dir):
            raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                                  f"--out")
        remove_orphans(ckpt_dir)
        return created, resume_checkpoint(cfg, ckpt_dir) if cfg["resume"] else None
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


class MetricsLog:
    """metrics.jsonl, one line per iteration. The values stay on the device until ``sync`` reads all pending ones
    with one host sync (checking the deferred finite flag first); ``write`` appends them, evaluation metrics joined
    to the last one, and hands the lines to ``also`` (the loggers). path None (ranks other than 0): the values are
    checked, nothing is written."""

    def __init__(self, path: Path | None, distiller: Distiller, also=None):
        self.file, self.distiller, self.also = open(path, "a") if path else None, distiller, also
        self.pending: list[tuple[int, dict[str, torch.Tensor], dict[str, float]]] = []
        self.ready: list[dict] = []
        self.last: dict = {}

    def add(self, step: int, losses: dict[str, torch.Tensor], times: dict[str, float] | None = None) -> None:
        """Iteration ``step``'s values (device tensors) and ``times`` (host floats: when it ended)."""
        self.pending.append((step, losses, times or {}))

    def sync(self, check: bool = True) -> None:
        """Read the pending values (one host sync); with ``check``, raise if the deferred finite flag is set or
        (deferred checks: the Distiller checked the sync path itself) a value shows divergence."""
        records = []
        if self.pending:
            values = torch.stack([torch.stack(list(v.values())) for _, v, _ in self.pending]).tolist()
            records = [{"step": step, **dict(zip(losses, row)), **times}
                       for (step, losses, times), row in zip(self.pending, values)]
            self.pending.clear()
            self.ready += records
        if check and self.distiller.deferred:  # sync checks: the Distiller checked each iteration itself
            self.distiller.check_health(records)

    def write(self, metrics: dict | None = None) -> None:
        if metrics and self.ready:
            self.ready[-1] |= metrics
        if self.file:
            self.file.writelines(json.dumps(rec) + "\n" for rec in self.ready)
            self.file.flush()
            if self.also:
                self.also(self.ready)
        self.last = self.ready[-1] if self.ready else self.last
        self.ready.clear()

    def postfix(self) -> dict[str, str]:
        return {k: f"{self.last[k]:.3g}" for k in ("loss_g", "loss_s") if k in self.last}

    def close(self) -> None:
        self.write()
        if self.file:
            self.file.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (and a line torn by a kill), so the log matches an
    uninterrupted run; the shortened log replaces the old one atomically (a kill meanwhile loses nothing)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill or a full disk
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
