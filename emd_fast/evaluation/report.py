"""A report of run directories (``python -m emd_fast.report``): curves against steps and against wall time (runs
overlaid, labelled by what differs in their configs), a sweep figure when the runs vary one numeric option over
seeds (a metric against it at equal iterations and at equal training time, and seconds per step: the EMD paper's K
ablation), the last sample grid of each run, tables of final metrics and of cost; PNG files, one self-contained HTML
page (images embedded as data URIs) and report.json with the numbers.

A run directory is read as it is: finished (summary.json), interrupted, or still running (metrics.jsonl read up to
its last complete line; a run is running while the pid in its .lock file is alive).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import statistics
import time
from pathlib import Path

from ..files import describe, make_dirs
from ..training.cost import run_cost
from ..training.loggers import TAGS
from .images import figure, save_figure

TIMES = ("step", "time_s", "wall_s")
STEP_KEYS = tuple(TAGS)  # the per-iteration values of metrics.jsonl; every other number is an evaluation metric
CURVE_STEP_KEYS = ("loss_g", "loss_s", "grad_g", "grad_s", "x_move")
NOT_HYPERPARAMETERS = ("teacher_info", "torch", "t_star", "teacher_fit_loss")  # config.json keys that describe
SWEEP_METRICS = ("fid", "fd_real", "recall", "energy_distance", "mode_tv", "pixel_std")  # default, by preference


class NotARun(ValueError):
    """A directory that is not an emd_fast run directory (one line, exit 2)."""


def _numbers(record: dict, keys=None) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if (keys is None or k in keys) and k not in TIMES
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass
class RunDir:
    """One run directory as found: its config, its log lines, its summary (None until it finishes)."""

    path: Path
    config: dict
    lines: list[dict]
    summary: dict | None
    status: str
    grid: Path | None
    checkpoint: dict | None
    label: str = ""

    @classmethod
    def read(cls, path: Path) -> "RunDir":
        path = Path(path)
        if not path.is_dir():
            raise NotARun(f"{path} is not a run directory ({describe(path)})")
        config = _read_json(path / "config.json")
        if not isinstance(config, dict) or not (path / "metrics.jsonl").is_file():
            raise NotARun(f"{path} is not an emd_fast run directory (no readable config.json and metrics.jsonl; a "
                          f"new run writes them after its set-up)")
        lines = []
        for line in (path / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a running (or killed) run is writing
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                lines.append(rec)
        summary = _read_json(path / "summary.json")
        step = lines[-1]["step"] if lines else 0
        holder = (path / ".lock").read_text().strip() if (path / ".lock").is_file() else ""
        if holder.isdigit() and int(holder) != os.getpid() and _pid_alive(int(holder)):
            status = f"running (pid {holder})"
        elif isinstance(summary, dict) and summary.get("steps") == step:
            status = "finished"
        else:
            status, summary = "interrupted", None
        grids = [*path.glob("samples/step_*.png"), *path.glob("samples/final.png")]
        grid = max(grids, key=lambda p: p.stat().st_mtime) if grids else None  # the newest plot
        checkpoints = sorted(path.glob("checkpoints/step_*.json"))
        return cls(path, config, lines, summary if status == "finished" else None, status, grid,
                   _read_json(checkpoints[-1]) if checkpoints else None)

    @property
    def step(self) -> int:
        return self.lines[-1]["step"] if self.lines else 0

    @property
    def evals(self) -> list[dict]:
        """The lines with evaluation metrics (step 0, every --eval-every steps, the last)."""
        return [r for r in self.lines if set(_numbers(r)) - set(STEP_KEYS)]

    def final(self) -> dict[str, float]:
        """The final metrics (summary.json), or those of the last evaluation so far."""
        if self.summary:
            return _numbers(self.summary.get("final") or {})
        last = self.evals[-1] if self.evals else {}
        return {k: v for k, v in _numbers(last).items() if k not in STEP_KEYS}

    def cost(self) -> dict:
        """summary.json's cost; for an unfinished run the totals its newest checkpoint recorded."""
        if self.summary and "cost" in self.summary:
            return {**self.summary["cost"], "at_step": self.step}
        clock = (self.checkpoint or {}).get("clock")
        if not clock:
            return {}
        step, processes = self.checkpoint["step"], self.checkpoint.get("processes", 1)
        return {**run_cost(clock, step, self.config["batch"], processes), "at_step": step}


def hyperparameters(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_HYPERPARAMETERS and not k.endswith("_sha256")}


def differing_keys(runs: list[RunDir]) -> list[str]:
    """The hyperparameters whose values differ between the runs, in config order."""
    configs = [hyperparameters(r.config) for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def label_runs(runs: list[RunDir]) -> list[str]:
    """Each run's label: what differs ("K=4, seed=1"), else its directory name."""
    keys = differing_keys(runs)
    for run in runs:
        run.label = ", ".join(f"{k}={run.config.get(k)}" for k in keys) if keys else run.path.name
    twice = {label for label in (r.label for r in runs) if [r.label for r in runs].count(label) > 1}
    for run in runs:  # the same config twice: the directories tell them apart
        if run.label in twice:
            run.label = f"{run.path.parent.name}/{run.path.name}" + (f" ({run.label})" if keys else "")
    return keys


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def curve_keys(runs: list[RunDir], metrics=None) -> list[str]:
    """The panels: the main per-step values, then every evaluation metric that changes (or ``metrics``)."""
    if metrics:
        return list(metrics)
    seen = {}
    for run in runs:
        for rec in run.evals:
            for k, v in _numbers(rec).items():
                if k not in STEP_KEYS:
                    seen.setdefault(k, set()).add(v)
    return [k for k in CURVE_STEP_KEYS if any(k in r for run in runs for r in run.lines[:2])] + \
        [k for k, values in seen.items() if len(values) > 1]


def draw_curves(runs: list[RunDir], keys: list[str], x: str, path: Path) -> bool:
    """One panel per key: every run's values against x ("step" or "wall_s"); per-step values as a running mean.
    False (nothing drawn) when no run has x."""
    if not any(x in r for run in runs for r in run.lines):
        return False
    slots = len(keys) + (len(runs) > 1)  # a panel for the legend
    cols = min(4, slots)
    rows = -(-slots // cols)
    fig = figure((4.3 * cols, 3.1 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    hours = x == "wall_s" and max(r.get("wall_s", 0) for run in runs for r in run.lines) > 2 * 3600
    for ax, key in zip(axes, keys):
        for run, colour in zip(runs, _colours(len(runs))):
            points = [(r[x], r[key]) for r in run.lines if x in r and isinstance(r.get(key), (int, float))]
            if not points:
                continue
            xs, ys = zip(*points)
            xs = [v / 3600 if hours else v / 60 if x == "wall_s" else v for v in xs]
            if key in STEP_KEYS:
                ys = running_mean(list(ys), max(1, len(ys) // 50))
            ax.plot(xs, ys, color=colour, label=run.label, lw=1.2, marker="" if key in STEP_KEYS else ".")
        ax.set_title(key + (" (running mean)" if key in STEP_KEYS else ""), fontsize=9)
        ax.set_xlabel("step" if x == "step" else f"wall time ({'h' if hours else 'min'})", fontsize=8)
        ax.tick_params(labelsize=7)
        if key.startswith(("loss", "grad", "fd", "fid", "energy", "mode_tv", "x_move")):
            ax.set_yscale("log")
    for ax in axes[len(keys):]:
        ax.axis("off")
    if len(runs) > 1:
        axes[len(keys)].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=7,
                               ncol=1 + len(runs) // 12)
    title = "against steps" if x == "step" else "against wall time (set-up and evaluations included)"
    save_figure(fig, path, f"curves {title}")
    return True


IDLE_TIME = "steps x idle seconds per step, measured apart"  # a sweep's training time from step_time


def own_clock(record: dict) -> float:
    """A metrics.jsonl record's training time by the run's own clock (inf if it has none)."""
    return record.get("time_s", math.inf)


def _at(run: RunDir, step: int | None = None, time_s: float | None = None, clock=own_clock) -> dict | None:
    """The run's evaluation at ``step`` (the last at or before it), or the last one at training time <= time_s
    (``clock(record)``: a record's training time)."""
    evals = [r for r in run.evals if (step is None or r["step"] <= step) and (time_s is None or clock(r) <= time_s)]
    return evals[-1] if evals else None


def sweep(runs: list[RunDir], key: str, metrics: list[str], step_time: dict | None = None) -> dict:
    """Metrics against ``key`` over the other differing options (seeds): at equal iterations (the last step every
    run evaluated) and at equal training time (the shortest training time of the runs: each run's last evaluation
    at or before it), with the seconds per training step. The training time is the runs' own clock (time_s), or,
    given ``step_time`` ({value of key: seconds per step}, measured apart on an idle machine), steps x seconds per
    step: runs that shared a machine with other work have clocks that measure the load as much as the option.
    Returns the numbers (report.json's "sweep")."""
    def clock(run: RunDir):
        if step_time is None:
            return own_clock
        return lambda r: r["step"] * step_time[run.config.get(key)]

    equal_step = min(run.evals[-1]["step"] for run in runs)
    timed = [run for run in runs if step_time is not None or "time_s" in run.lines[-1]]
    equal_time = min(clock(run)(run.lines[-1]) for run in timed) if len(timed) == len(runs) else None
    groups: dict = {}
    for run in runs:
        value = run.config.get(key)
        at_step = _at(run, step=equal_step)
        at_time = _at(run, time_s=equal_time, clock=clock(run)) if equal_time else None
        last = run.lines[-1]
        per_step = step_time[value] if step_time is not None else (
            last["time_s"] / last["step"] if last.get("time_s") and last["step"] else None)
        groups.setdefault(value, []).append({
            "run": str(run.path), "seed": run.config.get("seed"),
            "at_step": {"step": at_step["step"], **{m: at_step.get(m) for m in metrics}} if at_step else None,
            "at_time": ({"step": at_time["step"], "time_s": clock(run)(at_time),
                         **{m: at_time.get(m) for m in metrics}} if at_time else None),
            "s_per_step": per_step})
    floor = next((r.summary.get("exact_sample_floor") for r in runs if r.summary), None) or {}
    return {"key": key, "metrics": metrics, "equal_step": equal_step, "equal_time_s": equal_time,
            "time": "the runs' own clocks" if step_time is None else IDLE_TIME,
            "floor": {m: floor.get(m) for m in metrics}, "values": [
                {"value": v, "runs": rs, **_mean_std(rs, metrics)} for v, rs in sorted(groups.items())]}


def _mean_std(runs: list[dict], metrics: list[str]) -> dict:
    """Mean and standard deviation over the seeds of each metric at equal steps / time, and of s_per_step."""
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

    out = {"s_per_step": stats([r["s_per_step"] for r in runs])}
    for where in ("at_step", "at_time"):
        out[where] = {m: stats([(r[where] or {}).get(m) for r in runs]) for m in metrics}
    return out


def draw_sweep(data: dict, path: Path) -> None:
    """Each metric against the swept option at equal iterations and at equal training time, and the seconds per
    step: mean +- std over seeds (bars), each seed a dot, the teacher's own value dashed."""
    key, metrics, values = data["key"], data["metrics"], data["values"]
    panels = [(m, "at_step") for m in metrics] + [(m, "at_time") for m in metrics if data["equal_time_s"]]
    panels.append(("s_per_step", None))
    fig = figure((4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    xs = [v["value"] for v in values]
    log2 = all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) >= 8
    for ax, (metric, where) in zip(axes, panels):
        for v in values:
            dots = [r["s_per_step"] if where is None else (r[where] or {}).get(metric) for r in v["runs"]]
            ax.scatter([v["value"]] * len(dots), [d if d is not None else math.nan for d in dots], s=10,
                       color="0.6", zorder=2)
        stats = [v["s_per_step"] if where is None else v[where][metric] for v in values]
        shown = [(x, s) for x, s in zip(xs, stats) if s is not None]
        if shown:
            ax.errorbar([x for x, _ in shown], [s[0] for _, s in shown], yerr=[s[1] for _, s in shown], marker="o",
                        capsize=3, color="tab:blue", zorder=3)
        if where is not None and data["floor"].get(metric) is not None:
            ax.axhline(data["floor"][metric], color="tab:green", ls="--", lw=1, label="teacher (many steps)")
            ax.legend(fontsize=7)
        if log2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(key)
        idle = " (idle, measured apart)" if data.get("time") == IDLE_TIME else ""
        title = {"at_step": f"{metric} at step {data['equal_step']} (equal iterations)",
                 "at_time": f"{metric} at {data['equal_time_s'] or 0:.0f} s of training{idle} (equal time)",
                 None: f"training seconds per step{idle}"}[where]
        ax.set_title(title, fontsize=9)
    counts = sorted({len(v["runs"]) for v in values})
    runs = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    save_figure(fig, path, f"{key} sweep: mean ± std over {runs} runs (seeds) per value, each run a grey dot")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}" alt="{path.name}">'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def make_report(paths: list[Path], out: Path, metrics: list[str] | None = None, sweep_key: str | None = None,
                step_time: dict | None = None) -> Path:
    """Write the report of the run directories ``paths`` into ``out``; returns its index.html. NotARun for a
    directory that is not a run's. step_time: the sweep's seconds per step per value, measured apart (``sweep``)."""
    runs = [RunDir.read(p) for p in paths]
    keys = label_runs(runs)
    try:
        make_dirs(out)
    except OSError as e:
        raise NotARun(f"--out {e}") from None
    figures = {}
    panels = curve_keys(runs, metrics)
    for name, x in (("curves_steps.png", "step"), ("curves_time.png", "wall_s")):
        if draw_curves(runs, panels, x, out / name):
            figures[name] = x
    candidates = [k for k in keys if k != "seed"]
    key = sweep_key or (candidates[0] if len(candidates) == 1 else None)
    sweep_data = None
    if key and all(isinstance(r.config.get(key), (int, float)) for r in runs) and all(r.evals for r in runs):
        chosen = metrics or [m for m in SWEEP_METRICS if all(m in r.final() for r in runs)][:2]
        if chosen:
            sweep_data = sweep(runs, key, chosen, step_time)
            draw_sweep(sweep_data, out / "sweep.png")
    for i, run in enumerate(runs):
        if run.grid is not None:
            (out / f"samples_{i}.png").write_bytes(run.grid.read_bytes())

    finals = [run.final() for run in runs]
    metric_names = list(dict.fromkeys(k for f in finals for k in f))
    floor = next((r.summary.get("exact_sample_floor") for r in runs if r.summary), None)
    final_rows = [[run.label, run.status, run.step, *[f.get(m) for m in metric_names]] for run, f in zip(runs, finals)]
    if floor:
        final_rows.append(["teacher (many steps) / exact samples", "", "", *[floor.get(m) for m in metric_names]])
    costs = [run.cost() for run in runs]
    cost_rows = [[run.label, c.get("device"), c.get("processes"), c.get("at_step"), c.get("device_hours"),
                  *[(c.get("device_hours_by_phase") or {}).get(k) for k in ("setup", "training", "evaluation")],
                  c.get("samples_seen"), (c.get("iters_per_s") or {}).get("training"),
                  (c.get("iters_per_s") or {}).get("overall")] for run, c in zip(runs, costs)]
    report = {"made": time.strftime("%Y-%m-%d %H:%M:%S"), "differing": keys,
              "runs": [{"path": str(r.path), "label": r.label, "status": r.status, "step": r.step, "final": f,
                        "cost": c} for r, f, c in zip(runs, finals, costs)],
              "floor": floor, "sweep": sweep_data}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    parts = [f"<h1>emd_fast report: {len(runs)} run{'s' * (len(runs) > 1)}</h1>",
             f"<p>made {report['made']}; runs labelled by what differs in their configs"
             f"{': ' + html.escape(', '.join(keys)) if keys else ' (nothing: by directory)'}.</p>",
             "<h2>Runs</h2>", _table(["label", "directory", "status", "step"],
                                     [[r.label, str(r.path), r.status, r.step] for r in runs]),
             "<h2>Final metrics</h2><p>finished runs: the final evaluation (summary.json); others: their last "
             "evaluation so far.</p>", _table(["run", "status", "step", *metric_names], final_rows),
             "<h2>Cost</h2><p>device-hours = processes x wall time, split into set-up, training and evaluation "
             "(evaluations, FID, plots, checkpoints); unfinished runs: at their newest checkpoint.</p>",
             _table(["run", "device", "processes", "at step", "device-hours", "set-up", "training", "evaluation",
                     "samples seen", "it/s (training)", "it/s (overall)"], cost_rows)]
    if sweep_data:
        rows = []
        for v in sweep_data["values"]:
            row = [v["value"], len(v["runs"])]
            for where in ("at_step", "at_time"):
                row += [f"{s[0]:.4g} ± {s[1]:.2g}" if (s := v[where][m]) else None for m in sweep_data["metrics"]]
            rows.append(row + [f"{v['s_per_step'][0]:.3g} ± {v['s_per_step'][1]:.2g}" if v["s_per_step"] else None])
        header = [sweep_data["key"], "runs", *[f"{m} @ step {sweep_data['equal_step']}" for m in sweep_data["metrics"]],
                  *[f"{m} @ {sweep_data['equal_time_s'] or 0:.0f} s" for m in sweep_data["metrics"]], "s / step"]
        parts += [f"<h2>{html.escape(sweep_data['key'])} sweep</h2>",
                  f"<p>training time: {html.escape(sweep_data['time'])}</p>", _img(out / "sweep.png"),
                  _table(header, rows)]
    for name, x in figures.items():
        parts += [f"<h2>Curves against {'steps' if x == 'step' else 'wall time'}</h2>", _img(out / name)]
    parts.append("<h2>Last samples</h2>")
    for i, run in enumerate(runs):
        if run.grid is not None:
            parts += [f"<h3>{html.escape(run.label)}: {html.escape(run.grid.name)}</h3>",
                      _img(out / f"samples_{i}.png")]
    style = ("body{font-family:sans-serif;margin:1em auto;max-width:1600px}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}td{text-align:right}"
             "td:first-child{text-align:left}img{max-width:100%}")
    index = out / "index.html"
    index.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>emd_fast report</title>'
                     f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return index

