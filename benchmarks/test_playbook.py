"""The GPU playbook's control flow on the CPU: priorities, time limits, skips and results kept when cut."""
import json
import sys

import playbook
from playbook import Stage

PY = sys.executable
CUT_AFTER_PARTIAL = """
import json, sys, time
out = sys.argv[1]
open(out, 'w').write(json.dumps({'rows': 1}))
try:
    time.sleep(60)
except KeyboardInterrupt:
    open(out, 'w').write(json.dumps({'rows': 1, 'interrupted': True}))
    sys.exit(1)
"""
IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"


def test_budget_cut_skip_and_partial_results(tmp_path):
    """Stages run in order; one past its cap gets SIGINT and keeps what it wrote; one that ignores SIGINT is killed
    after the grace period; a failing one is 'failed'; a stage with a missing feature, and one that needs more
    time than is left, are skipped with the reason; playbook.json records each stage and is valid throughout."""
    out = tmp_path / "out"
    plan = [
        Stage("a", "passes", [PY, "-c", "print('hello')"], 30, 0),
        Stage("b", "cut with partial results", [PY, "-c", CUT_AFTER_PARTIAL, str(out / "b.json")], 2, 0,
              ["b.json"]),
        Stage("c", "fails", [PY, "-c", "import sys; sys.exit(3)"], 30, 0),
        Stage("d", "missing feature", [PY, "-c", "1/0"], 30, 0, skip="the feature has not landed"),
        Stage("e", "ignores SIGINT", [PY, "-c", IGNORES_SIGINT], 1, 0),
        Stage("f", "needs more time than is left", [PY, "-c", "1/0"], 30, 1000),
    ]
    record = playbook.run(plan, out, budget_s=120, grace_s=2)
    got = {s["name"]: s for s in record["stages"]}
    assert [s["status"] for s in record["stages"]] == ["ok", "cut", "failed", "skipped", "cut", "skipped"]
    assert got["b"]["results"] == {"b.json": {"rows": 1, "interrupted": True}}  # SIGINT reached it; results kept
    assert not (out / "b.json").exists() and got["c"]["rc"] == 3  # moved into playbook.json
    assert got["d"]["why"] == "the feature has not landed" and got["f"]["why"].startswith("budget:")
    assert got["e"]["rc"] == -9 and 1 <= got["e"]["seconds"] < 10  # SIGKILL after the grace period
    assert json.loads((out / "playbook.json").read_text())["stages"] == record["stages"]
    assert record["elapsed_s"] < 60
    assert "===== c: exit 3" in (out / "playbook.log").read_text()


def test_cpu_smoke_run_every_stage(tmp_path):
    """The real stage list, each stage tiny (--cpu): every command runs and writes its results, LoRA's stage is
    skipped until it lands, and playbook.json records the machine."""
    out = tmp_path / "out"
    assert playbook.main(["--cpu", "--out", str(out), "--budget", "1500"]) == 0
    record = json.loads((out / "playbook.json").read_text())
    status = {s["name"]: s["status"] for s in record["stages"]}
    assert status == {"a-gpu-tests": "ok", "b-adm-real-size": "ok", "c-kernel-bandwidth": "ok",
                      "d-sd15-lora": "skipped" if "lora" not in playbook.sys.modules["roofline"].TRAINING else "ok",
                      "e-ddp-graph": "ok", "f-floors": "ok", "g-other-tests": "ok"}
    results = {name: r for s in record["stages"] for name, r in s["results"].items()}
    tests = [json.loads(line) for line in (out / "tests.jsonl").read_text().splitlines()]
    assert len(tests) >= 3 and all(t["outcome"] == "passed" for t in tests)
    assert [r["impl"] for r in results["adm.json"]["results"]] == ["eager-bf16"]  # graph-bf16 needs CUDA
    assert results["ddp.json"]["graph"]["why_not"].startswith("CUDA graphs need a CUDA")
    assert results["kernels.json"]["benchmarks"] and results["roofline.json"]["iterations"]
    assert record["machine"]["torch"]
    assert sorted(p.name for p in out.iterdir()) == ["playbook.json", "playbook.log", "tests.jsonl"]
