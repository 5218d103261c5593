"""The run directory: its lock, its creation, the metrics log.

    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json

Every file of it is written without following a link (``emd_fast.files``); a planted link is refused in one line.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
from pathlib import Path

import torch

from ..errors import CheckpointError, FileRefused, RunError
from ..files import describe, make_dirs, open_append, read_bytes, refuse_link, run_subdir, write_text_atomic
from .checkpoint import list_checkpoints, remove_orphans, resume_checkpoint
from .distiller import Distiller


class RunLock:
    """An exclusive OS lock (flock) on ``<run directory>/.lock`` while a run uses the directory. The kernel releases it
    when the process ends, however it ends, so a killed run never leaves a stale lock; a second run on the same
    directory gets a RunError naming the holder's pid. The lock file is opened without following a link (a planted
    link is refused) and created with the umask's mode."""

    NAME = ".lock"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.NAME

    def __enter__(self) -> "RunLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
        except OSError as e:
            refuse_link(self.path)
            raise RunError(f"--out {self.path.parent}: cannot create its lock file ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileRefused(f"{self.path}: {describe(self.path)}, not the run's lock file; remove it")
        os.set_blocking(fd, True)
        self.file = os.fdopen(fd, "r+")
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


METRICS_BYTES = 1 << 30  # metrics.jsonl read back on a resume: a line per step, ~300 bytes each


def check_free_space(out: Path, checkpoint_bytes: int) -> None:
    """RunError unless the file system of ``out`` has room for one more checkpoint (with a 10% margin): a new
    checkpoint is written in full before the oldest kept one is deleted."""
    free = shutil.disk_usage(out).free
    if free < 1.1 * checkpoint_bytes:
        raise RunError(f"--out {out}: {free / 2**20:.1f} MiB free on its file system, one checkpoint of this run "
                       f"needs {checkpoint_bytes / 2**20:.1f} MiB")


def open_run_directory(cfg: dict, lock: contextlib.ExitStack) -> tuple[bool, Path | None]:
    """Create (a new run) and lock the run directory (RunLock, held until ``lock`` closes), remove what a killed
    checkpoint write left behind. Returns (whether this run owns a directory it created, the checkpoint to resume from
    or None).

    The lock comes first: nothing that can fail happens before it is held. A new run owns the directory only if its
    own mkdir made it and the directory holds nothing but the lock once the lock is held (another run may have taken
    the lock in between and used the directory); only an owned directory may be removed, by the owner, while it holds
    the lock (``remove_new_run``). A process that made the directory but cannot take its lock removes it only while
    it is empty."""
    out = cfg["out"]
    made = False
    if not cfg["resume"]:
        try:
            made = make_dirs(out)
        except OSError as e:
            raise RunError(f"--out {out}: cannot create the run directory ({e.strerror or e})") from None
    if not out.is_dir():
        raise CheckpointError(f"--resume: {out} is not a run directory ({describe(out)})")
    if not made and not cfg["resume"]:
        check_run_directory(out)
    try:
        lock.enter_context(RunLock(out))
    except BaseException:
        if made:  # only if still empty: another run that took the lock meanwhile has its .lock in it
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    owned = made and {p.name for p in out.iterdir()} == {".lock"}
    ckpt_dir = out / "checkpoints"
    if os.path.lexists(ckpt_dir):
        run_subdir(ckpt_dir)  # a link there would put (and clean) checkpoints elsewhere
    if not cfg["resume"] and list_checkpoints(ckpt_dir):
        raise CheckpointError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    resume_from = resume_checkpoint(cfg, ckpt_dir) if cfg["resume"] else None  # a failed resume deletes nothing
    remove_orphans(ckpt_dir)
    return owned, resume_from


def check_run_directory(out: Path) -> None:
    """RunError unless an existing ``out`` may take a new run: empty, or a run directory (it holds the .lock every run
    makes: a run stopped before its first checkpoint starts again there). Anything else is the user's, never written
    over (``--out .`` in a project folder, an unset shell variable)."""
    found = sorted(os.listdir(out))
    if found and RunLock.NAME not in found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise RunError(f"--out {out} is neither empty nor a run directory (it holds {shown}): choose a new or empty "
                       f"directory")


def remove_new_run(out: Path) -> None:
    """Remove a run directory this process created and has held the lock on since (see open_run_directory); links
    inside are removed, never followed."""
    shutil.rmtree(out, ignore_errors=True)


class MetricsLog:
    """metrics.jsonl, one line per iteration. The values stay on the device until ``sync`` reads all pending ones
    with one host sync (checking the deferred finite flag first); ``write`` appends them, evaluation metrics joined
    to the last one, and hands the lines to ``also`` (the loggers). path None (ranks other than 0): the values are
    checked, nothing is written."""

    def __init__(self, path: Path | None, distiller: Distiller, also=None):
        self.path, self.file, self.distiller, self.also = path, open_append(path) if path else None, distiller, also
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
            try:
                self.file.writelines(json.dumps(rec) + "\n" for rec in self.ready)
                self.file.flush()
            except OSError as e:
                raise OSError(f"cannot write {self.path}: {e.strerror or e}") from None
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
    if not os.path.lexists(path):
        return
    kept = []
    for line in read_bytes(path, "metrics log", METRICS_BYTES).decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a kill or a full disk
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))
