"""The training loop: ``train(cfg, explicit)`` runs (or resumes) the distillation a config describes and writes its run
directory (``emd_fast.training.rundir``). It reads top to bottom: set-up, resume (or the record of the initial
generator), iterate, summary; the periodic work between iterations (metrics log, evaluations, FID, plots,
checkpoints) is ``Maintenance``, and the throughput and phase timing is ``Clock``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch

from ..errors import CheckpointError, RunError, Stopped
from ..execution.compiled import compile_count, default_backend, save_traced_frames
from ..execution.distributed import Ranks, communication_failed, rank_seed
from ..execution.profiling import PhaseTimer
from ..files import read_bytes, run_subdir, write_json_atomic, write_text_atomic
from ..progress import Progress
from .build import Run
from .checkpoint import (
    config_differences,
    list_checkpoints,
    load_resume_checkpoint,
    save_checkpoint,
    set_aside_later,
)
from .config import DIST_TIMEOUT_S, GRAPHS_NOT_DISTRIBUTED, RUNTIME_KEYS, check_shard, file_hashes, jsonable, resolve
from .cost import run_cost
from .lifecycle import StopSignals, check_batch_memory, first_step
from .loggers import Loggers
from .rundir import (
    METRICS_BYTES,
    MetricsLog,
    check_free_space,
    open_run_directory,
    remove_new_run,
    truncate_metrics,
)

LOG_EVERY = 25  # iterations between writes of metrics.jsonl (one host sync each), besides evaluations and checkpoints
WARM_ITERS = 10  # first iterations of a (re)started run left out of the steady throughput: compilation, graph capture


def train(cfg: dict, explicit: set[str] = frozenset()) -> dict | None:
    """Run (or resume) a distillation described by ``cfg`` (the CLI options as a dict). Returns the summary.

    The run directory is locked while the run uses it (RunLock). A run directory this call created that fails before
    its first checkpoint is removed again: nothing half-made is left. Launched by torchrun, this process is one rank
    of a data-parallel run (``emd_fast.execution.distributed``): rank 0 alone creates, locks and writes the directory
    and returns the summary (the others return None); when another rank fails or hangs, this one stops with a
    RunError.
    """
    ranks = Ranks.from_env()
    cfg, device, notes = resolve(cfg, explicit, ranks.distributed)
    ranks.per_rank_batch(cfg["batch"])
    check_shard(cfg, ranks)
    device = ranks.device(device)
    with ranks.process_group(device, cfg.get("dist_timeout", DIST_TIMEOUT_S)), contextlib.ExitStack() as lock:
        owned = False
        try:
            owned, latest = ranks.on_main(open_run_directory, cfg, lock)
            return _train(cfg, device, notes, latest, ranks)
        except BaseException as e:
            if owned and ranks.main and not list_checkpoints(cfg["out"] / "checkpoints"):
                remove_new_run(cfg["out"])  # still holding its lock
            if ranks.distributed and communication_failed(e):
                raise RunError(f"process {ranks.rank} of {ranks.world} stopped: another process of the run failed, "
                               f"died or hung past --dist-timeout ({str(e).splitlines()[0][:200]})") from None
            raise


def _train(cfg: dict, device: torch.device, notes: list[str], latest: Path | None, ranks: Ranks) -> dict | None:
    # --- set-up: the saved config, the run's objects, the speed options ------------------------------------------
    t0 = time.perf_counter()
    saved_cfg = {k: v for k, v in jsonable(cfg).items() if k not in RUNTIME_KEYS} | file_hashes(cfg)
    resumed = latest and load_resume_point(cfg, latest, saved_cfg)
    if resumed and resumed[1]["step"] > cfg["steps"]:
        if ranks.main:
            print(f"nothing left to do: the run in {cfg['out']} is at step {resumed[1]['step']}, past --steps "
                  f"{cfg['steps']} (a larger --steps continues it)", file=sys.stderr)
        return None
    run = Run(cfg, device, fit_teacher=latest is None, ranks=ranks,
              before_fit=lambda size: check_free_space(cfg["out"], size))
    distiller = run.distiller
    check_batch_memory(distiller, device)
    step = fastest_step(run, cfg, ranks, notes)
    if notes and ranks.main:
        print("\n".join(notes), file=sys.stderr)

    # --- resume, or record the generator at initialisation (the teacher's denoiser at lambda*) -------------------
    if resumed:
        restore(run, *resumed, latest, saved_cfg)
    else:
        record_start(run, saved_cfg)
    clock = Clock(cfg, device, distiller.step_count, started=t0, before=resumed and resumed[1].get("clock"))
    upkeep = Maintenance(run, saved_cfg, clock)

    # --- iterate ---------------------------------------------------------------------------------------------------
    with upkeep, StopSignals() as stop:
        while not (stopped := stop.requested(ranks)) and distiller.step_count < cfg["steps"]:
            with clock.iteration(distiller.step_count + 1):
                first = clock.first(distiller.step_count) and not ranks.distributed  # halving the batch: 1 process
                losses = first_step(step, distiller, device) if first else step()
            distiller.update_ema()
            upkeep.after_step(distiller.step_count, losses)
        if stopped:  # at an iteration boundary (the same on every rank): everything a resume needs is consistent
            upkeep.stop(stopped)
    clock.stop()

    # --- summary: the last checkpoint, the final evaluation and plot, summary.json ---------------------------------
    final = upkeep.finish()
    if not ranks.main:
        return None
    floor = run.problem.floor()
    summary = {
        "out": str(cfg["out"]), "preset": cfg["preset"], "problem": type(run.problem).__name__,
        "steps": distiller.step_count, "device": str(device), "processes": ranks.world,
        "execution": execution_record(cfg, distiller),
        **clock.summary(distiller.step_count, cfg["batch"]),
        "cost": clock.cost(distiller.step_count, cfg["batch"], ranks.world),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None),
        "final": final, "exact_sample_floor": floor, "summary_lines": run.problem.summary_lines(final, floor),
    }
    write_json_atomic(cfg["out"] / "summary.json", summary)
    return summary


# --- set-up and resume ---------------------------------------------------------------------------------------------

def execution_record(cfg: dict, distiller) -> dict:
    """How the iterations are computed beyond the saved config: the Distiller's Execution, --compile with its
    backend, --cuda-graph and the device type. A checkpoint records it, because these options are given anew to
    each resume (they are not in the config) and compiled, fused or NHWC code rounds differently from the eager
    default: a resume continues bit for bit when it repeats them."""
    return {**dataclasses.asdict(distiller.execution), "compile": cfg["compile"],
            "compile_backend": cfg["compile"] and default_backend(), "cuda_graph": cfg["cuda_graph"],
            "device": distiller.device.type}


def load_resume_point(cfg: dict, latest: Path, saved_cfg: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of the checkpoint a run resumes from, refused if a file the run reads changed since."""
    tensors, state = load_resume_checkpoint(cfg, latest)
    changed = [k for k, v in saved_cfg.items() if k.endswith("_sha256") and state.get("config", {}).get(k) != v]
    if changed:
        option = changed[0].removesuffix("_sha256")
        raise CheckpointError(f"--resume: the {option} file {cfg[option]} is not the one this run started from (its "
                              f"SHA-256 differs)")
    return tensors, state


def fastest_step(run: Run, cfg: dict, ranks: Ranks, notes: list[str]):
    """The iteration as the speed options ask: the networks compiled (--compile) and the whole iteration replayed as
    one CUDA graph (--cuda-graph), else ``Distiller.step``. What cannot be done here is added to ``notes``."""
    distiller = run.distiller
    if cfg["compile"]:
        from ..execution.compiled import compile_networks, use_compile_cache

        notes.append(use_compile_cache(cfg.get("compile_cache") or cfg["out"] / "compile_cache"))
        notes += compile_networks(distiller, mode=cfg["compile"]).lines()
    if not cfg["cuda_graph"]:
        return distiller.step
    from ..execution.graphs import GraphedStep, graphs_unavailable

    if why := graphs_unavailable(distiller) or (ranks.distributed and GRAPHS_NOT_DISTRIBUTED):
        raise RunError(f"--cuda-graph: {why}")
    return GraphedStep(distiller)


def restore(run: Run, tensors: dict[str, torch.Tensor], state: dict, latest: Path, saved_cfg: dict) -> None:
    """Continue from a checkpoint: every tensor of the Distiller, new random streams per process if the number of
    processes changed, the metrics log cut back to the checkpoint's step and later checkpoints set aside."""
    if differences := config_differences(state.get("config"), saved_cfg):
        raise CheckpointError(f"{latest} was written by another config ({differences})")
    ranks, distiller = run.ranks, run.distiller
    distiller.load_state_tensors(ranks.own_view(tensors), state["step"], str(latest))
    if state.get("processes", 1) != ranks.world:  # new per-rank streams; parameters and optimizers continue
        distiller.reseed(rank_seed(run.cfg["seed"], ranks.rank, state["step"]))
    if ranks.main:
        truncate_metrics(run.cfg["out"] / "metrics.jsonl", state["step"])
        folder, steps = set_aside_later(run.cfg["out"] / "checkpoints", state["step"])
        if folder:
            print(f"note: the run continues from step {state['step']}: its later checkpoints (step"
                  f"{'s' * (len(steps) > 1)} {', '.join(map(str, steps))}) are set aside in {folder}, where no "
                  f"--resume or sample looks; delete that folder if you do not need them", file=sys.stderr)
        written = state.get("execution")  # absent in checkpoints written before it was recorded
        if written and (changed := config_differences(written, execution_record(run.cfg, distiller))):
            print(f"note: {latest.name} was computed with other execution options than this resume has "
                  f"({changed}): the run continues, but compiled and eager, fused and plain code may round "
                  f"differently, so it need not continue it bit for bit (a resume with the checkpoint's options "
                  f"does)", file=sys.stderr)


def record_start(run: Run, saved_cfg: dict) -> None:
    """A new run: config.json, and the metrics of the generator at initialisation as metrics.jsonl's step 0."""
    init_metrics, _, _ = run.evaluate()
    if run.ranks.main:
        out = run.cfg["out"]
        write_json_atomic(out / "config.json", {**saved_cfg, "t_star": run.t_star, **run.init_info,
                                                "teacher_info": run.teacher.to_config(), "torch": torch.__version__})
        rec = {"step": 0, **{k: v for k, v in init_metrics.items() if k != "mode_weights"}, "time_s": 0.0,
               "wall_s": 0.0}
        write_text_atomic(out / "metrics.jsonl", json.dumps(rec) + "\n")


# --- between iterations --------------------------------------------------------------------------------------------

class Maintenance:
    """The periodic work between iterations: the metrics log (a host sync every LOG_EVERY steps), evaluations,
    FID, plots, checkpoints and the progress bar; on a stop signal or Ctrl-C, the checkpoint a resume needs. Used as
    a context manager around the loop: it closes the log and the bar however the loop ends."""

    def __init__(self, run: Run, saved_cfg: dict, clock: "Clock"):
        self.run, self.cfg, self.ranks, self.saved_cfg, self.clock = run, run.cfg, run.ranks, saved_cfg, clock
        self.distiller, self.out = run.distiller, run.cfg["out"]
        self.fid = None
        if self.cfg.get("fid_ref") and self.ranks.main:
            from ..evaluation.image_metrics import FID

            self.fid = FID(self.cfg["inception"], self.cfg["fid_ref"], self.distiller.device,
                           torchscript=self.cfg.get("inception_torchscript", False))
        with clock.maintenance():  # --log: TensorBoard, W&B (rank 0)
            self.loggers = Loggers(self.cfg.get("log") if self.ranks.main else (), self.out, saved_cfg, self.distiller)
        self.log = MetricsLog(self.out / "metrics.jsonl" if self.ranks.main else None, self.distiller,
                              also=self.loggers.records)
        self.bar = Progress(self.cfg["steps"], "EMD", initial=self.distiller.step_count, quiet=self.cfg["quiet"],
                            enabled=self.ranks.main)
        self.last: dict = {}

    def after_step(self, n: int, losses: dict[str, torch.Tensor]) -> None:
        """After iteration n: log its losses; on the steps due, sync the log, evaluate, compute the FID, plot and
        checkpoint."""
        cfg = self.cfg
        evaluate = cfg["eval_every"] and (n % cfg["eval_every"] == 0 or n == cfg["steps"])
        fid_due = cfg.get("fid_ref") and cfg["fid_every"] and n % cfg["fid_every"] == 0 and n < cfg["steps"]
        self.log.add(n, losses, self.clock.stamp())
        if evaluate or fid_due or self.checkpoint_due() or n % LOG_EVERY == 0 or n == cfg["steps"]:
            self.log.sync()  # one host sync; raises here, before any checkpoint, if a deferred check failed
            with self.clock.maintenance():
                metrics = None
                if evaluate:
                    metrics, samples, y = self.run.evaluate()
                    self.last = metrics
                if fid_due:
                    metrics = (metrics or {}) | self.fid_metrics()
                self.log.write(metrics and {k: v for k, v in metrics.items() if k != "mode_weights"})
                if evaluate and cfg["plot_every"] and n % cfg["plot_every"] == 0:
                    self.plot(f"step_{n:07d}.png", metrics, samples, y)
                if self.checkpoint_due():
                    self.checkpoint()
            self.bar.figures(**self.log.postfix(), **(self.run.problem.progress(self.last) if self.last else {}))
        self.bar.update(1)

    def checkpoint_due(self) -> bool:
        return bool(self.cfg["ckpt_every"]) and self.distiller.step_count % self.cfg["ckpt_every"] == 0

    def checkpoint(self) -> None:
        """Every rank calls it: gathering the ranks' random states is the barrier before rank 0 writes."""
        distiller, ranks = self.distiller, self.ranks
        random_states = ranks.gather_random_state(distiller.random_state())
        tensors = distiller.state_tensors() if ranks.main or distiller.sharded else None  # sharded: all ranks gather
        if ranks.main:
            state = {"config": self.saved_cfg, "torch": torch.__version__, "processes": ranks.world,
                     "execution": execution_record(self.cfg, distiller), "clock": self.clock.totals()}
            save_checkpoint(self.out / "checkpoints", distiller.step_count, tensors | random_states, state,
                            keep=self.cfg["keep"])

    def fid_metrics(self) -> dict:
        """Every rank makes its share of the samples; rank 0 computes the FID."""
        batches = self.run.sample_batches(self.cfg["fid_samples"], self.run.fid_seed)
        if self.fid is None:
            for _ in batches:
                pass
            return {}
        value, n = self.fid(batches)
        return {"fid": value, "fid_samples": n}

    def plot(self, name: str, metrics: dict, samples: torch.Tensor, y) -> None:
        if not self.ranks.main:
            return
        cfg = self.cfg
        history = [json.loads(line) for line in read_bytes(self.out / "metrics.jsonl", "metrics log",
                                                            METRICS_BYTES).splitlines() if line]
        source = cfg.get("teacher") or cfg.get("mixture") or cfg["preset"]
        title = (f"EMD-{cfg['K']} ({cfg['variant']}, cancel={cfg['cancel_noise']}) on {Path(str(source)).name}, "
                 f"step {self.distiller.step_count}")
        path = run_subdir(self.out / "samples") / name
        self.run.problem.plot(path, samples, y, metrics, history, title)
        self.loggers.images(self.distiller.step_count, path, samples, y, self.run.problem)

    def stop(self, signum: int) -> None:
        """A stop signal at an iteration boundary: write the checkpoint a resume needs, raise Stopped."""
        self.bar.close(done=False)
        self.log.sync()
        if not self.checkpoint_due():
            self.checkpoint()
        message = (f"stopped by {signal.Signals(signum).name} after step {self.distiller.step_count}: checkpoint "
                   f"written; continue with --resume --out {self.out}")
        raise Stopped(signum, message if self.ranks.main else "")

    def finish(self) -> dict | None:
        """After the last iteration: its checkpoint (unless just written), the final evaluation and FID (every rank
        takes part; rank 0 gets them), the final plot; the loggers are closed."""
        try:
            if not self.checkpoint_due():
                self.checkpoint()
            final, samples, y = self.run.evaluate()
            fid = self.fid_metrics() if self.cfg.get("fid_ref") else {}
            final = final | fid if final is not None else None
            if self.ranks.main:
                self.plot("final.png", final, samples, y)
                self.loggers.final(self.distiller.step_count, final)
            return final
        finally:
            self.loggers.close()

    def __enter__(self) -> "Maintenance":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is KeyboardInterrupt:  # raised outside the signal handlers' reach (e.g. not in the main thread)
                self.bar.close(done=False)
                self.log.sync()
                if not self.ranks.distributed:  # other ranks are not at a boundary: no consistent checkpoint then
                    self.checkpoint()
                    print(f"interrupted at step {self.distiller.step_count}: checkpoint written; continue with "
                          f"--resume --out {self.out}", file=sys.stderr)
            elif kind is not None and issubclass(kind, FloatingPointError):
                self.log.sync(check=False)  # keep the losses logged before the failure
        finally:
            self.log.close()
            if kind is not None:  # else finish() closes them, after the final plot
                self.loggers.close()
            self.bar.close(done=kind is None)  # before the error message, if any


class Clock:
    """Throughput of the iterations with the maintenance between them left out: over the whole loop and after the
    first WARM_ITERS iterations (compilation, graph capture), and phase times of every --phase-every-th iteration
    (the device synchronised at each phase boundary; none under a CUDA graph: one launch).

    It also keeps the run's cost over all its sessions (``before``: the totals a resumed run's checkpoint recorded):
    wall seconds split into set-up (building the run, the first evaluation), training (the iterations) and
    evaluation (everything else: evaluations, FID, plots, checkpoints, the final evaluation). Work redone after an
    interruption (the steps after the last checkpoint) is not counted twice: each session adds what it kept."""

    def __init__(self, cfg: dict, device: torch.device, start_step: int, started: float, before: dict | None = None):
        self.device, self.start_step, self.started = device, start_step, started
        self.t0 = self.warm_t0 = time.perf_counter()
        self.setup_s = self.t0 - started
        self.before = {k: float((before or {}).get(k, 0.0)) for k in ("setup_s", "train_s", "wall_s")}
        self.sessions = int((before or {}).get("sessions", 0)) + 1
        self.phase_every, self.graphed = cfg["phase_every"], cfg["cuda_graph"]
        self.timer, self.timed_iters = PhaseTimer(device), 0
        self.other_s = self.warm_other_s = 0.0
        self.end = None
        self.graphs = [compile_count()]  # graphs torch.compile built: at the start, after warm-up, at the end

    def first(self, step_count: int) -> bool:
        return step_count == self.start_step

    @contextlib.contextmanager
    def iteration(self, n: int):
        """Around iteration n: its phases timed if it is due."""
        timed = self.phase_every and not self.graphed and n % self.phase_every == 0
        with self.timer if timed else contextlib.nullcontext():
            yield
        self.timed_iters += bool(timed)
        if n - self.start_step == WARM_ITERS:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warm_t0, self.warm_other_s = time.perf_counter(), self.other_s
            self.graphs.append(compile_count())
            if self.graphs[-1] > self.graphs[0]:
                save_traced_frames()  # a warm start loads them instead of tracing

    @contextlib.contextmanager
    def maintenance(self):
        """Around work between iterations (evaluations, plots, checkpoints): not counted as training time."""
        t = time.perf_counter()
        yield
        self.other_s += time.perf_counter() - t

    def stop(self) -> None:
        self.end = time.perf_counter()
        self.graphs.append(compile_count())
        if self.graphs[-1] > self.graphs[-2]:
            save_traced_frames()

    def stamp(self) -> dict[str, float]:
        """{"time_s": training seconds, "wall_s": wall seconds} of the run so far (all sessions), for a metrics
        line. On a GPU the host runs ahead of the device by the queued work until the next log write syncs it."""
        totals = self.totals()
        return {"time_s": round(totals["train_s"], 3), "wall_s": round(totals["wall_s"], 3)}

    def totals(self) -> dict:
        """The run's seconds so far over all its sessions (what a checkpoint records): set-up, training, wall."""
        now = time.perf_counter()
        train = (self.end or now) - self.t0 - self.other_s
        return {"setup_s": self.before["setup_s"] + self.setup_s, "train_s": self.before["train_s"] + train,
                "wall_s": self.before["wall_s"] + now - self.started, "sessions": self.sessions}

    def cost(self, step_count: int, batch: int, processes: int) -> dict:
        """``run_cost`` of this run so far, with the device's name."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": name, **run_cost(self.totals(), step_count, batch, processes)}

    def summary(self, step_count: int, batch: int) -> dict:
        """This session's throughput and phase times."""
        steps = step_count - self.start_step
        train_s = self.end - self.t0 - self.other_s
        steady_s = self.end - self.warm_t0 - (self.other_s - self.warm_other_s)
        return {
            "setup_s": round(self.setup_s, 2), "train_s": round(train_s, 2),
            "iters_per_s": round(steps / train_s, 2) if train_s else None,
            "samples_per_s": round(steps * batch / train_s, 1) if train_s else None,
            "steady_iters_per_s": (round((steps - WARM_ITERS) / steady_s, 2)
                                   if steps > WARM_ITERS and steady_s > 0 else None),
            "warmup_s": round(self.warm_t0 - self.t0 - self.warm_other_s, 2) if len(self.graphs) == 3 else None,
            "compiled_graphs": {"warmup": self.graphs[1] - self.graphs[0],
                                "after_warmup": self.graphs[2] - self.graphs[1] if len(self.graphs) == 3 else None},
            "phase_ms_per_iter": self.timer.summary(self.timed_iters), "phase_timed_iters": self.timed_iters,
            "phase_note": ("none: a CUDA-graph iteration is one launch (run with --no-cuda-graph to time phases)"
                           if self.graphed else f"every {self.phase_every}-th iteration, device synchronised per phase"
                           if self.phase_every else "none (--phase-every 0)"),
        }
