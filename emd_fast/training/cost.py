"""A run's cost as papers quote theirs (summary.json's ``cost``, the report's table)."""


def run_cost(totals: dict, step_count: int, batch: int, processes: int) -> dict:
    """What a run cost over all its sessions, as papers quote it, from ``Clock.totals`` (what a checkpoint records):
    device-hours (processes x wall time) split into set-up, training and evaluation, samples seen (global batch x
    steps), iterations/s by phase."""
    t = totals
    evaluation = t["wall_s"] - t["setup_s"] - t["train_s"]
    hours = {"setup": t["setup_s"], "training": t["train_s"], "evaluation": evaluation}
    return {
        "processes": processes, "sessions": t.get("sessions"),
        "device_hours": round(processes * t["wall_s"] / 3600, 6),
        "device_hours_by_phase": {k: round(processes * v / 3600, 6) for k, v in hours.items()},
        "wall_s": round(t["wall_s"], 3), "setup_s": round(t["setup_s"], 3), "train_s": round(t["train_s"], 3),
        "evaluation_s": round(evaluation, 3), "samples_seen": step_count * batch,
        "iters_per_s": {"training": round(step_count / t["train_s"], 3) if t["train_s"] else None,
                        "overall": round(step_count / t["wall_s"], 3) if t["wall_s"] else None},
    }
