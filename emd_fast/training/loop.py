"""A distillation run described by a config (the training CLI's options as a dict): problem, networks, Distiller,
and the loop that writes the run directory.

    config.json  metrics.jsonl  checkpoints/step_*.{safetensors,json}  samples/*.png  summary.json

``train(cfg, explicit)`` resolves the config (preset defaults, --fast, a resumed run's own settings), checks it before
any expensive work, then trains; ``Run(cfg, device)`` rebuilds a run's objects (``emd_fast.sample`` uses it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import CheckpointError, RunError, Stopped
from ..execution.distributed import Ranks, communication_failed, rank_seed
from ..execution.profiling import PhaseTimer
from ..files import write_json_atomic
from .build import Run
from .checkpoint import config_differences, list_checkpoints, load_resume_checkpoint, save_checkpoint
from .config import DIST_TIMEOUT_S, GRAPHS_NOT_DISTRIBUTED, RUNTIME_KEYS, check_shard, file_hashes, jsonable, resolve
from .lifecycle import StopSignals, _first_step, check_batch_memory
from .rundir import MetricsLog, check_free_space, open_run_directory, truncate_metrics

LOG_EVERY = 25  # iterations between writes of metrics.jsonl (one host sync each), besides evaluations and checkpoints


WARM_ITERS = 10  # first iterations of a (re)started run left out of the steady throughput: compilation, graph capture


def train(cfg: dict, explicit: set[str] = frozenset()) -> dict | None:
    """Run (or resume) a distillation described by ``cfg`` (the CLI options as a dict). Returns the summary.

    The run directory is locked while the run uses it (RunLock). A run directory this call created that fails before
    its first checkpoint is removed again: nothing half-made is left. Launched by torchrun, this process is one rank
    of a data-parallel run (``emd_fast.execution.distributed``): rank 0 alone creates, locks and writes the directory and
    returns the summary (the others return None); when another rank fails or hangs, this one stops with a RunError.
    """
    ranks = Ranks.from_env()
    cfg, device, notes = resolve(cfg, explicit, ranks.distributed)
    ranks.per_rank_batch(cfg["batch"])
    check_shard(cfg, ranks)
    device = ranks.device(device)
    with ranks.process_group(device, cfg.get("dist_timeout", DIST_TIMEOUT_S)), contextlib.ExitStack() as lock:
        created = False
        try:
            created, latest = ranks.on_main(open_run_directory, cfg, lock)
            return _train(cfg, device, notes, latest, ranks)
        except BaseException as e:
            if created and ranks.main and not list_checkpoints(cfg["out"] / "checkpoints"):
                shutil.rmtree(cfg["out"], ignore_errors=True)
            if ranks.distributed and communication_failed(e):
                raise RunError(f"process {ranks.rank} of {ranks.world} stopped: another process of the run failed, "
                               f"died or hung past --dist-timeout ({str(e).splitlines()[0][:200]})") from None
            raise


def _train(cfg: dict, device: torch.device, notes: list[str], latest: Path | None, ranks: Ranks) -> dict | None:
    out = cfg["out"]
    ckpt_dir = out / "checkpoints"
    t0 = time.perf_counter()
    hashes = file_hashes(cfg)
    saved_cfg = {k: v for k, v in jsonable(cfg).items() if k not in RUNTIME_KEYS}
    if latest is not None:
        tensors, state = load_resume_checkpoint(cfg, latest)
        changed = [k for k, v in hashes.items() if state.get("config", {}).get(k) != v]
        if changed:
            raise CheckpointError(f"--resume: the {changed[0].removesuffix('_sha256')} file "
                                  f"{cfg[changed[0].removesuffix('_sha256')]} is not the one this run started from "
                                  f"(its SHA-256 differs)")
    saved_cfg |= hashes
    run = Run(cfg, device, fit_teacher=latest is None, ranks=ranks)
    dist = run.distiller
    check_free_space(out, dist.checkpoint_bytes())
    check_batch_memory(dist, device)
    fid = None
    if cfg.get("fid_ref") and ranks.main:
        from ..evaluation.image_metrics import FID

        fid = FID(cfg["inception"], cfg["fid_ref"], device)
    if cfg["compile"]:
        from ..execution.compiled import compile_networks

        notes += compile_networks(dist, mode=cfg["compile"]).lines()
    step = dist.step
    if cfg["cuda_graph"]:
        from ..execution.graphs import GraphedStep, graphs_unavailable

        if why := graphs_unavailable(dist) or (ranks.distributed and GRAPHS_NOT_DISTRIBUTED):
            raise RunError(f"--cuda-graph: {why}")
        step = GraphedStep(dist)
    if notes and ranks.main:
        print("\n".join(notes), file=sys.stderr)
    if latest is not None:
        if differences := config_differences(state.get("config"), saved_cfg):
            raise CheckpointError(f"{latest} was written by another config ({differences})")
        dist.load_state_tensors(ranks.own_view(tensors), state["step"], str(latest))
        if state.get("processes", 1) != ranks.world:  # new per-rank streams; parameters and optimizers continue
            dist.reseed(rank_seed(cfg["seed"], ranks.rank, state["step"]))
        if ranks.main:
            truncate_metrics(out / "metrics.jsonl", state["step"])
    else:
        init_metrics, _, _ = run.evaluate()  # the generator at initialisation (teacher denoiser at lambda*)
        if ranks.main:
            write_json_atomic(out / "config.json", {**saved_cfg, "t_star": run.t_star, **run.init_info,
                                                    "teacher_info": run.teacher.to_config(), "torch": torch.__version__})
            rec = {"step": 0, **{k: v for k, v in init_metrics.items() if k != "mode_weights"}}
            (out / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    setup_s = time.perf_counter() - t0

    def checkpoint_due() -> bool:
        return bool(cfg["ckpt_every"]) and dist.step_count % cfg["ckpt_every"] == 0

    def checkpoint():  # every rank calls it: gathering the ranks' random states is the barrier before the write
        random_states = ranks.gather_random_state(dist.random_state())
        tensors = dist.state_tensors() if ranks.main or dist.sharded else None  # sharded: gathered by all ranks
        if ranks.main:
            state = {"config": saved_cfg, "torch": torch.__version__, "processes": ranks.world}
            save_checkpoint(ckpt_dir, dist.step_count, tensors | random_states, state, keep=cfg["keep"])

    def fid_now() -> dict:  # every rank makes its share of the samples; rank 0 computes the FID
        batches = run.sample_batches(cfg["fid_samples"], run.fid_seed)
        if fid is None:
            for _ in batches:
                pass
            return {}
        value, n = fid(batches)
        return {"fid": value, "fid_samples": n}

    def plot(name, metrics, samples, y):
        if not ranks.main:
            return
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
        source = cfg.get("teacher") or cfg.get("mixture") or cfg["preset"]
        title = (f"EMD-{cfg['K']} ({cfg['variant']}, cancel={cfg['cancel_noise']}) on {Path(str(source)).name}, "
                 f"step {dist.step_count}")
        run.problem.plot(out / "samples" / name, samples, y, metrics, history, title)

    log = MetricsLog(out / "metrics.jsonl" if ranks.main else None, dist)
    bar = tqdm(total=cfg["steps"], initial=dist.step_count, disable=cfg["quiet"] or not ranks.main, desc="EMD",
               unit="it", dynamic_ncols=True)
    graphed = cfg["cuda_graph"]
    other_s, start_step, last = 0.0, dist.step_count, {}
    timer, timed_iters = PhaseTimer(device), 0
    loop_t0 = warm_t0 = time.perf_counter()
    warm_other_s = 0.0
    try:
        with StopSignals() as stop:
            while not (stopped := stop.requested(ranks)) and dist.step_count < cfg["steps"]:
                timed = cfg["phase_every"] and not graphed and (dist.step_count + 1) % cfg["phase_every"] == 0
                with timer if timed else contextlib.nullcontext():
                    first = dist.step_count == start_step and not ranks.distributed  # (halving the batch: 1 process)
                    losses = _first_step(step, dist, device) if first else step()
                dist.update_ema()
                timed_iters += bool(timed)
                n = dist.step_count
                if n - start_step == WARM_ITERS:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    warm_t0, warm_other_s = time.perf_counter(), other_s
                evaluate = cfg["eval_every"] and (n % cfg["eval_every"] == 0 or n == cfg["steps"])
                fid_due = cfg.get("fid_ref") and cfg["fid_every"] and n % cfg["fid_every"] == 0 and n < cfg["steps"]
                log.add(n, losses)
                if evaluate or fid_due or checkpoint_due() or n % LOG_EVERY == 0 or n == cfg["steps"]:
                    log.sync()  # one host sync; raises here, before any checkpoint, if a deferred check failed
                    ts = time.perf_counter()
                    metrics = None
                    if evaluate:
                        metrics, samples, y = run.evaluate()
                        last = metrics
                    if fid_due:
                        metrics = (metrics or {}) | fid_now()
                    log.write(metrics and {k: v for k, v in metrics.items() if k != "mode_weights"})
                    if evaluate and cfg["plot_every"] and n % cfg["plot_every"] == 0:
                        plot(f"step_{n:07d}.png", metrics, samples, y)
                    if checkpoint_due():
                        checkpoint()
                    other_s += time.perf_counter() - ts
                    bar.set_postfix(**log.postfix(), **(run.problem.progress(last) if last else {}), refresh=False)
                bar.update(1)
            if stopped:  # at an iteration boundary (the same on every rank): everything a resume needs is consistent
                bar.close()
                log.sync()
                if not checkpoint_due():
                    checkpoint()
                raise Stopped(stopped, f"stopped by {signal.Signals(stopped).name} after step {dist.step_count}: "
                                       f"checkpoint written; continue with --resume --out {out}" if ranks.main else "")
    except KeyboardInterrupt:  # raised outside the signal handlers' reach (e.g. not in the main thread)
        bar.close()
        log.sync()
        if ranks.distributed:  # the other ranks are not at a boundary: no consistent checkpoint to write
            raise
        checkpoint()
        print(f"interrupted at step {dist.step_count}: checkpoint written; continue with --resume --out {out}",
              file=sys.stderr)
        raise
    except FloatingPointError:
        log.sync(check=False)  # keep the losses logged before the failure
        raise
    finally:
        log.close()
        bar.close()  # before the error message, if any
    loop_end = time.perf_counter()
    train_s = loop_end - loop_t0 - other_s
    steady_s = loop_end - warm_t0 - (other_s - warm_other_s)
    if not checkpoint_due():  # the last step's checkpoint, unless the loop just wrote it
        checkpoint()
    final, samples, y = run.evaluate()
    fid_metrics = fid_now() if cfg.get("fid_ref") else {}
    if not ranks.main:
        return None
    final |= fid_metrics
    plot("final.png", final, samples, y)
    floor = run.problem.floor()
    steps_run = dist.step_count - start_step
    summary = {
        "out": str(out), "preset": cfg["preset"], "problem": type(run.problem).__name__, "steps": dist.step_count,
        "device": str(device), "processes": ranks.world,
        "execution": {**dataclasses.asdict(dist.execution), "compile": cfg["compile"], "cuda_graph": graphed},
        "setup_s": round(setup_s, 2), "train_s": round(train_s, 2),
        "iters_per_s": round(steps_run / train_s, 2) if train_s else None,
        "samples_per_s": round(steps_run * cfg["batch"] / train_s, 1) if train_s else None,
        "steady_iters_per_s": (round((steps_run - WARM_ITERS) / steady_s, 2)
                               if steps_run > WARM_ITERS and steady_s > 0 else None),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                if device.type == "cuda" else None),
        "phase_ms_per_iter": timer.summary(timed_iters), "phase_timed_iters": timed_iters,
        "phase_note": ("none: a CUDA-graph iteration is one launch (run with --no-cuda-graph to time phases)"
                       if graphed else f"every {cfg['phase_every']}-th iteration, device synchronised per phase"
                       if cfg["phase_every"] else "none (--phase-every 0)"),
        "final": final, "exact_sample_floor": floor, "summary_lines": run.problem.summary_lines(final, floor),
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
