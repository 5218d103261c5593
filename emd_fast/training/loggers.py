"""Where people look at runs: TensorBoard and Weights & Biases (``--log tensorboard wandb``), rank 0 only.

metrics.jsonl stays the source of truth; a logger mirrors it. Each line of it becomes a point at its step (its
values under the tags of ``tag``), with, at every write of the log, the iterations/s and samples/s since the last
one and the learning rates; each plot (``--plot-every`` and the final one) is logged as images: the PNG figure and,
for image problems, a grid of the one-step samples (decoded from latents, captioned with their class or prompt);
the final metrics (FID included) as ``final/...``; the run's config as hyperparameters.

    <run>/tensorboard/     TensorBoard event files           tensorboard --logdir <run>
    <run>/wandb/           W&B run files (offline runs too)  wandb sync <run>/wandb/offline-run-*
    <run>/loggers.json     per logger: the last step it was given (and the W&B run id)

Resuming continues the same curves without duplicate or missing steps. A resumed run restarts from its checkpoint's
step S, the log cut back to S; a logger may have been given steps after S (a run killed between checkpoints).
TensorBoard purges what it holds after S (``purge_step``) and is given S+1... again; W&B cannot purge, so it resumes
the same run (its id is kept) and skips the steps it was already given (a resumed run redoes them bit for bit). A
logger that was not there before (``--log`` added on resume) is first given the log's lines so far.

W&B never blocks the training on the network: ``wandb.log`` hands its data to W&B's own process; if the server
cannot be reached when the run starts (within INIT_TIMEOUT_S), the run logs offline instead and says how to upload
it. ``WANDB_MODE=offline`` logs offline from the start; ``WANDB_PROJECT`` names the project (default emd_fast).
"""
from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from ..optional import require

LOGGERS = ("tensorboard", "wandb")
STATE_FILE = "loggers.json"
INIT_TIMEOUT_S = 30
SAMPLE_GRID = 64  # one-step samples in the logged grid (8 per row)
CAPTIONED = 16  # W&B: this many samples logged one by one with their captions
# metrics.jsonl keys -> tags; the per-step values of Distiller.step, grouped; every other key is an evaluation metric
TAGS = {"loss_g": "loss/generator", "loss_s": "loss/student", "grad_g": "grad_norm/generator",
        "grad_s": "grad_norm/student", "z_move": "e_step/z_move", "eps_move": "e_step/eps_move",
        "x_move": "e_step/x_move", "x_move_max": "e_step/x_move_max", "t_move_max": "e_step/t_move_max"}
NOT_LOGGED = ("step", "time_s", "wall_s")  # the x axes


def check_loggers(kinds) -> None:
    """The packages the chosen loggers need are there (MissingDependency, one line, before any work)."""
    for kind in kinds or ():
        require(kind, f"--log {kind}")


def tag(key: str) -> str:
    return TAGS.get(key) or f"eval/{key}"


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl line as {tag: value}: its numbers, without the step and the times."""
    return {tag(k): float(v) for k, v in record.items()
            if k not in NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in <run>/tensorboard. ``first``: the first step this session writes (what the files hold from it
    on is purged)."""

    def __init__(self, out: Path, first: int, config: dict, new: bool):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.first = first
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first if not new else None)
        if new:
            for summary in hparams({k: _hparam(v) for k, v in config.items()}, {tag("loss_g"): None,
                                                                                 tag("loss_s"): None}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def write(self, step: int, values: dict[str, float]) -> None:
        """One event holding every value of the step (what add_scalar writes, tag by tag, in one)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, simple_value=value)
                                                           for name, value in values.items()]), step)

    def images(self, step: int, name: str, grid: np.ndarray, captions: list[str] | None) -> None:
        self.writer.add_image(name, grid, step, dataformats="HWC")
        if captions:
            self.writer.add_text(f"{name}/captions", "\n".join(f"{i}. {c}" for i, c in enumerate(captions)), step)

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A W&B run whose files are in <run>/wandb; the same run (id) on every resume. ``first``: the first step this
    session gives it (earlier ones it has)."""

    def __init__(self, out: Path, first: int, config: dict, run_id: str | None):
        wandb = require("wandb", "--log wandb")
        self.wandb, self.first = wandb, first
        self.id = run_id or secrets.token_hex(4)  # W&B run ids: 8 characters [a-z0-9]
        options = dict(project=os.environ.get("WANDB_PROJECT") or "emd_fast", name=out.name, id=self.id,
                       resume="allow", dir=str(out), config=config)
        (out / "wandb").mkdir(exist_ok=True)
        try:
            self.run = wandb.init(**options, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, console="off"))
        except Exception as e:  # noqa: BLE001 - no server, no key, a timeout: whatever it is, train on, offline
            print(f"W&B: cannot start an online run ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
                  f"); logging offline to {out / 'wandb'}: upload it later with `wandb sync`", file=sys.stderr)
            self.run = wandb.init(**options, mode="offline", settings=wandb.Settings(console="off"))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def images(self, step: int, name: str, grid: np.ndarray, captions: list[str] | None,
               singles: list[np.ndarray] = ()) -> None:
        logged = {name: self.wandb.Image(grid)}
        if captions and len(singles):
            logged[f"{name}/captioned"] = [self.wandb.Image(a, caption=c) for a, c in zip(singles, captions)]
        self.run.log(logged, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def state(self) -> dict:
        return {"id": self.id}

    def close(self) -> None:
        self.run.finish()


def _hparam(value):
    """A config value as TensorBoard's hyperparameters take it (bool, int, float or str)."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def captions(out: Path, y) -> list[str]:
    """Captions of samples with labels y (N,): their prompts for a text-to-image run (from the prompt embeddings
    cached in the run directory), else their class."""
    from ..problems.diffusers_folder import EMBEDDINGS_FILE

    path = out / EMBEDDINGS_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            prompts = json.loads((f.metadata() or {}).get("prompts", "[]"))
        if prompts:
            return [prompts[int(i)] for i in y]
    return [f"class {int(i)}" for i in y]


def _read_lines(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Loggers:
    """The chosen loggers of a run (none: every call does nothing). ``out``: the run directory, its metrics.jsonl
    already cut back to the step the run continues from; ``config``: the hyperparameters; ``distiller``: for the
    learning rates and the batch."""

    def __init__(self, kinds, out: Path, config: dict, distiller):
        self.out, self.distiller, self.sinks, self.last_time, self.imaged = Path(out), distiller, {}, None, None
        if not kinds:
            return
        path = self.out / STATE_FILE
        state = json.loads(path.read_text()) if path.is_file() else {}
        history = _read_lines(self.out / "metrics.jsonl")
        resume_step = history[-1]["step"] if history else -1
        for kind in kinds:
            given = state.get(kind, {}).get("step")  # the last step this logger was given, None: a new one
            if kind == "tensorboard":
                first = 0 if given is None else min(given, resume_step) + 1
                self.sinks[kind] = TensorBoard(self.out, first, config, new=given is None)
            else:
                first = 0 if given is None else given + 1
                self.sinks[kind] = WandB(self.out, first, config, state.get(kind, {}).get("id"))
        self.given = {kind: state.get(kind, {}).get("step", -1) for kind in self.sinks}
        for record in history:  # what the log holds and a logger was not given yet
            self._write(record["step"], scalars(record))
        self.save_state()

    def _write(self, step: int, values: dict[str, float]) -> None:
        for kind, sink in self.sinks.items():
            if step >= sink.first:
                sink.write(step, values)
                self.given[kind] = max(self.given[kind], step)

    def save_state(self) -> None:
        state = {kind: {"step": self.given[kind], **sink.state()} for kind, sink in self.sinks.items()}
        (self.out / STATE_FILE).write_text(json.dumps(state))

    def records(self, records: list[dict]) -> None:
        """Lines just written to metrics.jsonl: each at its step; with the last, the speed since the previous write
        and the learning rates."""
        if not self.sinks or not records:
            return
        last = records[-1]
        for record in records[:-1]:
            self._write(record["step"], scalars(record))
        extra = {"lr/generator": self.distiller.opt_g.param_groups[0]["lr"],
                 "lr/student": self.distiller.opt_s.param_groups[0]["lr"]}
        if self.last_time is not None and "time_s" in last and last["time_s"] > self.last_time[1]:
            rate = (last["step"] - self.last_time[0]) / (last["time_s"] - self.last_time[1])
            extra |= {"speed/iters_per_s": rate, "speed/samples_per_s": rate * self.distiller.global_batch}
        if "time_s" in last:
            self.last_time = (last["step"], last["time_s"])
        self._write(last["step"], scalars(last) | extra)
        self.save_state()

    def images(self, step: int, figure_png: Path, samples, y, problem) -> None:
        """A plot: the PNG figure, and for image problems the first SAMPLE_GRID one-step samples (N, ...) as a grid
        of images, 8 a row (latents decoded by the problem), on W&B the first CAPTIONED one by one with their class
        or prompt (y (N,) or None) as caption."""
        if not self.sinks or step == self.imaged:  # the final plot of a run whose last step was just plotted
            return
        self.imaged = step
        from PIL import Image  # matplotlib's own dependency

        from ..evaluation.images import is_image_shape, tile, to_uint8

        with Image.open(figure_png) as img:
            figure = np.asarray(img.convert("RGB"))
        images = samples[:SAMPLE_GRID].detach().float().cpu()
        decode = getattr(problem, "decode", None)  # None: samples are images as they are
        if decode is not None:
            images = decode(images)
        grid = tile(images, 8) if is_image_shape(tuple(images.shape[1:])) else None
        shown = captions(self.out, y[:SAMPLE_GRID]) if y is not None else None
        for kind, sink in self.sinks.items():
            if step < sink.first:
                continue
            sink.images(step, "plot", figure, None)
            if grid is not None and kind == "wandb":
                sink.images(step, "samples", grid, shown, to_uint8(images[:CAPTIONED]))
            elif grid is not None:
                sink.images(step, "samples", grid, shown)

    def final(self, step: int, metrics: dict | None) -> None:
        """The final evaluation (FID included) as final/<metric> at the last step, and as W&B's run summary."""
        if not self.sinks or not metrics:
            return
        values = {f"final/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._write(step, values)
        if "wandb" in self.sinks:
            self.sinks["wandb"].summary(values)
        self.save_state()

    def close(self) -> None:
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.close()
