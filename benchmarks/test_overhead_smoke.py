"""``overhead.py``'s counting: deterministic, linear in K, host syncs only on the sync-checked path."""
import json
import types

import torch

import overhead
import throughput

ARGS = types.SimpleNamespace(iters=1, compile_backend="aot_eager")


def rows(paths, ks=(1, 2, 3)):
    spec = throughput.problem_spec("vector", smoke=True) | {"batch": 8}
    nets = throughput.build_networks(spec, torch.device("cpu"))
    return {(path, K): overhead.measure_path(nets, spec, path, K, torch.device("cpu"), ARGS)
            for path in paths for K in ks}


def test_counts_are_linear_in_K_and_only_eager_syncs():
    """Each further Langevin step dispatches the same operators (the counts of K = 1, 2, 3 are equally spaced);
    the eager path reads device values on the host (sync checks), the deferred path never does; the graphed path
    is a note with the reason on a CPU."""
    got = rows(["eager", "deferred", "graphed"])
    for path in ("eager", "deferred"):
        ops = [got[path, K]["ops"] for K in (1, 2, 3)]
        assert ops[1] - ops[0] == ops[2] - ops[1] > 0, (path, ops)
        assert got[path, 1]["top_ops"] <= ops[0] and got[path, 1]["launches"] is None
    assert got["eager", 1]["syncs"] >= 1 and all(got["deferred", K]["syncs"] == 0 for K in (1, 2, 3))
    assert got["graphed", 1]["skipped"].startswith("CUDA graphs need a CUDA device")


def test_counts_repeat_and_growth_is_flagged(tmp_path):
    """Two runs count the same operators; a baseline with fewer ops per iteration flags the row."""
    a, b = rows(["deferred"], ks=(1,)), rows(["deferred"], ks=(1,))
    assert a["deferred", 1]["ops"] == b["deferred", 1]["ops"]
    new = {"results": [a["deferred", 1]]}
    fewer = {"results": [a["deferred", 1] | {"ops": a["deferred", 1]["ops"] / 2}]}
    assert overhead.compare_counts(new, new, 0.02) == []
    assert overhead.compare_counts(fewer, new, 0.02) == [
        f"vector/1/deferred: {fewer['results'][0]['ops']:.0f} -> {new['results'][0]['ops']:.0f} ops per iteration"]
    json.dumps(new)  # the rows are JSON
