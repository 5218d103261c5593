"""The hostile-but-fair cases (bad input a user could give), run against the installed emd_fast as real processes:
each case, what is expected, what was observed (exit code, first line of stderr, seconds). Writes a markdown table.

    python benchmarks/hostile_cases.py --out benchmarks/results/hostile_cases.md

Signals at random moments and SIGKILL with exact resumes: tests/test_hostile_cli.py (EMD_FAST_SOAK=50 for the soak).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "100", "--quiet", "--device", "cpu", "--phase-every", "0", "--steps", "30",
         "--ckpt-every", "10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(module: str, *args: str, limit_file_size: int | None = None, stop_after: Path | None = None,
        stdin: str | None = None, timeout: float = 900, argv: list[str] | None = None):
    """(exit code, first stderr line, seconds, peak resident memory in MB) of ``python -m emd_fast.<module> args``
    (or of ``python argv``); optionally with file writes capped at ``limit_file_size`` bytes (a full disk: writes
    fail with EFBIG), a SIGINT once the run directory ``stop_after`` trains, ``stdin`` piped in. A process still
    running after ``timeout`` s is killed (exit -9)."""
    def cap():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job's shell ignores it: undo that for the child
        if limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *(argv or ["-m", f"emd_fast.{module}", *args])], env=ENV,
                            preexec_fn=cap, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop_after is not None:  # a run directory: SIGINT 2 s after its metrics.jsonl appears (training started)
        while not (stop_after / "metrics.jsonl").exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    if stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory (ru_maxrss)
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in err.splitlines() if line.strip()]
    first = "Traceback ... " + lines[-1] if "Traceback" in err else (lines[0] if lines else "")
    return proc.returncode, first, time.perf_counter() - t0, usage.ru_maxrss / 1024


def cases(tmp: Path):
    """(case, expected, thunk returning cli's result)."""
    run = tmp / "run"
    good = ["--out", str(run), *SMALL]
    yield "a finished run (set-up for the cases below)", "0", lambda: cli("train", *good)
    yield "--device cuda on a CPU machine", "2, before any work", lambda: cli("train", *SMALL, "--device", "cuda",
                                                                           "--out", str(tmp / "a"))
    yield "--device mps", "2", lambda: cli("train", *SMALL, "--device", "mps", "--out", str(tmp / "a"))
    yield "--device nonsense", "2", lambda: cli("train", *SMALL, "--device", "nonsense", "--out", str(tmp / "a"))
    (tmp / "file").write_text("x")
    yield "--out is a file", "2", lambda: cli("train", *SMALL, "--out", str(tmp / "file"))
    yield "--out under /proc", "2", lambda: cli("train", *SMALL, "--out", "/proc/emd_fast_run")
    yield "disk full while writing a checkpoint (file size capped at 20 kB)", "2, older checkpoint intact", \
        lambda: cli("train", *SMALL, "--out", str(tmp / "full"), limit_file_size=20_000)
    yield "--batch 10**12", "2, before the first iteration", \
        lambda: cli("train", *SMALL, "--batch", str(10**12), "--out", str(tmp / "a"))
    yield "--t-min 0.9 --t-max 0.1", "2, before the teacher fit", \
        lambda: cli("train", *SMALL, "--t-min", "0.9", "--t-max", "0.1", "--out", str(tmp / "a"))
    yield "--t-min 0.5 --t-max 0.5", "2", lambda: cli("train", *SMALL, "--t-min", "0.5", "--t-max", "0.5",
                                                      "--out", str(tmp / "a"))
    yield "--t-min -1", "2", lambda: cli("train", *SMALL, "--t-min", "-1", "--out", str(tmp / "a"))
    yield "--t-max nan", "2", lambda: cli("train", *SMALL, "--t-max", "nan", "--out", str(tmp / "a"))
    yield "--seed 2**64", "2", lambda: cli("train", *SMALL, "--seed", str(2**64), "--out", str(tmp / "a"))
    yield "a second run on a directory in use", "2, names the holder's pid", lambda: second_run(tmp)
    yield "Ctrl-C 2 s into training, then --resume", "130, then 0", lambda: interrupted(tmp)

    def checkpoint_json(content):
        ckpt = sorted((run / "checkpoints").glob("step_*.json"))[-1]
        saved = ckpt.read_text()
        ckpt.write_text(content(json.loads(saved)))
        try:
            return cli("train", "--out", str(run), "--resume", "--steps", "40", "--quiet")
        finally:
            ckpt.write_text(saved)

    yield "checkpoint JSON is a list", "2", lambda: checkpoint_json(lambda r: "[1, 2]")
    yield "checkpoint JSON without step", "2", \
        lambda: checkpoint_json(lambda r: json.dumps({k: v for k, v in r.items() if k != "step"}))
    yield "checkpoint step edited", "2 (hash covers it)", \
        lambda: checkpoint_json(lambda r: json.dumps({**r, "step": r["step"] + 1}))
    yield "a stray step_latest.json, an orphan tensors file", "0, orphan removed", lambda: stray_files(run)
    yield "torn last line of metrics.jsonl", "0", lambda: torn_metrics(run)
    yield "sample: --device nonsense", "2", lambda: cli("sample", str(run), "--device", "nonsense")
    yield "sample: run without checkpoints", "2", lambda: cli("sample", str(tmp))
    yield "sample: --out x.jpg", "2", lambda: cli("sample", str(run), "--out", str(tmp / "x.jpg"))
    yield "edm_import: not a pickle", "2", lambda: cli("edm_import", str(tmp / "file"), str(tmp / "o.safetensors"))
    yield "pretrain: --teacher-steps 0", "2", lambda: cli("pretrain", "--teacher-steps", "0", "--out", str(tmp / "p"))


def second_run(tmp: Path):
    out = tmp / "busy"
    first = subprocess.Popen([sys.executable, "-m", "emd_fast.train", "--out", str(out), *SMALL, "--steps", "100000"],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / ".lock").exists():
        time.sleep(0.05)
    try:
        return cli("train", "--out", str(out), "--resume", "--quiet")
    finally:
        first.kill()
        first.wait()


def interrupted(tmp: Path):
    out = tmp / "ctrl-c"
    code, line, s, _ = cli("train", "--out", str(out), *SMALL, "--steps", "2000", "--ckpt-every", "500",
                           stop_after=out)
    again = cli("train", "--out", str(out), "--resume", "--steps", "2000", "--quiet")
    return f"{code}, then {again[0]}", line, s + again[2], again[3]


def stray_files(run: Path):
    (run / "checkpoints" / "step_latest.json").write_text("{}")
    orphan = run / "checkpoints" / "step_0000099.safetensors"
    orphan.write_bytes(b"half")
    result = cli("train", "--out", str(run), "--resume", "--steps", "35", "--quiet")
    return result[0], f"{result[1] or '(nothing on stderr)'}; orphan left: {orphan.exists()}", *result[2:]


def torn_metrics(run: Path):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 999, "loss_g"')
    return cli("train", "--out", str(run), "--resume", "--steps", "40", "--quiet")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: print only)")
    args = p.parse_args()
    print_table(cases, args.out)


def print_table(cases, out: Path | None, peak: bool = False) -> None:
    """Run each (case, expected, thunk) of ``cases(tmp)`` and print (and write to ``out``) the markdown table; with
    ``peak`` a column of each process's peak resident memory."""
    rows = ["| case | expected | exit | first line of stderr | s |" + (" peak MB |" if peak else ""),
            "|---|---|---|---|---|" + ("---|" if peak else "")]
    d = tempfile.mkdtemp()
    try:
        for case, expected, thunk in cases(Path(d)):
            code, line, seconds, mb = thunk()
            line = line.replace(d, "<tmp>").replace("|", "/")
            rows.append(f"| {case} | {expected} | {code} | {line[:160]} | {seconds:.1f} |" +
                        (f" {mb:.0f} |" if peak else ""))
            print(rows[-1], flush=True)
    finally:  # rm, not shutil.rmtree: a case leaves a few thousand nested folders (Python's recursion limit)
        subprocess.run(["rm", "-rf", d], check=False)
    if out:
        out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
