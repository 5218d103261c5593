"""Every command against hostile-but-fair use: bad arguments and files are one line on stderr and exit 2 (a bug is
one line and exit 1; --debug shows tracebacks), a random fuzz of the training options, and signals at random moments
of real processes, after which --resume ends where an undisturbed run does."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from emd_fast import edm_import, fid, pretrain, sample, train
from emd_fast.checks import meminfo_bytes
from emd_fast.errors import out_of_memory
from emd_fast.training.build import load_run
from emd_fast.training.checkpoint import list_checkpoints
from emd_fast.training.lifecycle import cpu_memory_limit

from helpers import final_tensors, one_line_error

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "100", "--quiet", "--device", "cpu", "--phase-every", "0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert train.main(["--out", str(out), *SMALL, "--steps", "2"]) == 0
    return out


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "mps"], "emd_fast runs on cpu or cuda devices"),
    (["--device", "nonsense"], "is not a device name"),
    (["--out", "/proc/emd_fast_run"], "/proc/emd_fast_run: cannot create the run directory"),
    (["--out", "/dev/null"], "exists and is not a directory"),
    (["--K", "-1"], "K must be an integer >= 0"),
    (["--gamma-eps", "1.5"], "gamma_eps must be < 1"),
    (["--lr-g", "nan"], "--lr-g must be a positive number"),
    (["--lambda-star", "40"], "lambda*=40.0 is outside"),
    (["--t-min", "0.9", "--t-max", "0.1"], "must be an increasing range"),
    (["--mixture", "/nonexistent.json"], "no such file"),
    (["--labels", "3"], "--labels needs a class-conditional teacher"),
    (["--batch", str(10**12)], "GiB of memory for its samples and chains alone"),
])
def test_train_refuses_bad_arguments_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    """Each refused without a run directory left behind, and all but the batch (which needs the networks) before
    the teacher fit, the only expensive set-up of a mixture run."""
    from emd_fast.problems import mixture

    def no_fit(*a, **k):
        raise AssertionError("the teacher fit ran before the error")

    if "--batch" not in args:
        monkeypatch.setattr(mixture, "fit_denoiser", no_fit)
    out = tmp_path / "r"
    argv = ["--out", str(out), *SMALL, *args] if "--out" not in args else [*SMALL, *args]
    assert message in one_line_error(capsys, train.main(argv))
    assert not out.exists()


def test_checkpoint_record_that_is_not_a_record(finished_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    newest = list_checkpoints(out / "checkpoints")[-1]
    for content in ("[1, 2]", json.dumps({k: v for k, v in json.loads(newest.read_text()).items() if k != "step"})):
        newest.write_text(content)
        err = one_line_error(capsys, train.main(["--out", str(out), "--resume", "--steps", "3"]))
        assert str(newest) in err
        one_line_error(capsys, sample.main([str(out)]))


def test_a_run_from_before_an_option_existed_resumes(tmp_path, capsys):
    """A checkpoint written before an option was added (its config lacks the key) resumes at the option's default
    and ends where an undisturbed run does; a checkpoint whose config differs is refused, naming the key."""
    from emd_fast.training.checkpoint import _state_hash

    straight, old = tmp_path / "straight", tmp_path / "old"
    assert train.main(["--out", str(straight), *SMALL, "--steps", "6"]) == 0
    assert train.main(["--out", str(old), *SMALL, "--steps", "4"]) == 0
    meta = list_checkpoints(old / "checkpoints")[-1]
    record = json.loads(meta.read_text())
    config = json.loads((old / "config.json").read_text())
    assert "guidance_scale" in record["config"]
    for cfg in (record["config"], config):
        del cfg["guidance_scale"]  # an option this run's version did not have
    (old / "config.json").write_text(json.dumps(config))
    record.pop("state_sha256")
    meta.write_text(json.dumps({**record, "state_sha256": _state_hash(record)}))
    assert train.main(["--out", str(old), "--resume", "--steps", "6", "--quiet"]) == 0
    want, got = final_tensors(straight), final_tensors(old)
    assert all(torch.equal(want[k], got[k]) for k in want)
    capsys.readouterr()
    meta = list_checkpoints(old / "checkpoints")[-1]
    record = json.loads(meta.read_text())
    record["config"]["gamma_eps"] = 0.2
    record.pop("state_sha256")
    meta.write_text(json.dumps({**record, "state_sha256": _state_hash(record)}))
    err = one_line_error(capsys, train.main(["--out", str(old), "--resume", "--steps", "8", "--quiet"]))
    assert "was written by another config (gamma_eps: checkpoint 0.2, run 0.3)" in err


def test_not_enough_disk_for_a_checkpoint(tmp_path, capsys, monkeypatch):
    from emd_fast.training import rundir

    real = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    err = one_line_error(capsys, train.main(["--out", str(tmp_path / "r"), *SMALL, "--steps", "2"]))
    assert "MiB free on its file system, one checkpoint of this run needs" in err


def test_a_full_disk_during_a_checkpoint_write(tmp_path, capsys):
    """Files capped at 20 kB (writes beyond fail as on a full disk): the step-20 checkpoint write fails with one line,
    the step-10 checkpoint stays intact, no temporary file is left, and a resume ends as an undisturbed run."""
    import resource

    straight, out = tmp_path / "straight", tmp_path / "full"
    budget = ["--steps", "30", "--ckpt-every", "10"]
    assert train.main(["--out", str(straight), *SMALL, *budget]) == 0
    assert train.main(["--out", str(out), *SMALL, "--steps", "10"]) == 0
    capsys.readouterr()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
    try:
        code = train.main(["--out", str(out), "--resume", "--quiet", *budget])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert "cannot write" in one_line_error(capsys, code)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000010.json"]
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert train.main(["--out", str(out), "--resume", "--quiet", *budget]) == 0
    want, got = final_tensors(straight), final_tensors(out)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_checkpoint_size_estimate_is_what_is_written(finished_run):
    run, _, ckpt = load_run(finished_run, "cpu")
    written = (ckpt.with_suffix(".safetensors")).stat().st_size
    estimate = run.distiller.checkpoint_bytes()  # a fresh Distiller: no Adam moments yet, they are counted
    assert abs(estimate / written - 1) < 0.05, (estimate, written)


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux: reads /proc/meminfo")
def test_cpu_allocations_beyond_the_available_ram_fail_instead_of_overcommitting():
    """Two untouched allocations of half the available RAM each: the kernel grants both (overcommit; touching them
    would summon the OOM killer); under cpu_memory_limit (80% of it) the second fails as an allocation error."""
    n = int(0.5 * meminfo_bytes("/proc/meminfo", "MemAvailable:"))
    a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    del a, b
    with cpu_memory_limit(torch.device("cpu")):
        a = torch.empty(n, dtype=torch.uint8)
        with pytest.raises(RuntimeError) as e:
            torch.empty(n, dtype=torch.uint8)
        assert out_of_memory(e.value)
        del a
    torch.empty(n, dtype=torch.uint8)  # the limit is lifted again: this allocation succeeds


@pytest.mark.parametrize("command, args, message", [
    (sample.main, ["{run}", "--device", "nonsense"], "is not a device name"),
    (sample.main, ["{tmp}/absent"], "does not exist"),
    (sample.main, ["{run}", "--out", "{tmp}/x.jpg"], "give a .png"),
    (sample.main, ["{run}", "--batch", "0"], "--batch must be >= 1"),
    (pretrain.main, ["--teacher-steps", "0", "--out", "{tmp}/p"], "--teacher-steps must be >= 1"),
    (pretrain.main, ["--device", "nonsense", "--out", "{tmp}/p"], "is not a device name"),
    (edm_import.main, ["{tmp}/absent.pkl", "{tmp}/o.safetensors"], "absent.pkl"),
    (edm_import.main, ["{run}/config.json", "{tmp}/o.safetensors"], "config.json"),
    (fid.main, ["calc", "{run}", "--ref", "{tmp}/r.npz", "--inception", "{tmp}/i.pt"], "r.npz: no such file"),
])
def test_every_command_fails_in_one_line(finished_run, tmp_path, capsys, command, args, message):
    argv = [a.format(run=finished_run, tmp=tmp_path) for a in args]
    assert message in one_line_error(capsys, command(argv))


def test_a_stop_signal_wrapped_in_another_error_is_still_a_stop(tmp_path, capsys, monkeypatch):
    """Python turns an exception raised in ``__set_name__`` (a Ctrl-C landing in a class body during an import)
    into a RuntimeError; the command still reports the stop, exit 130, not an internal error."""
    from emd_fast.cli import Interrupted

    def interrupted_import(*args, **kwargs):
        try:
            raise Interrupted(signal.SIGINT)
        except Interrupted as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e

    monkeypatch.setattr(train, "train", interrupted_import)
    assert train.main(["--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "stopped by SIGINT\n"


def test_a_bug_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("unexpected")

    monkeypatch.setattr(train, "train", broken)
    assert train.main(["--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: TypeError: unexpected") and err.count("\n") == 1
    with pytest.raises(TypeError):
        train.main(["--out", str(tmp_path / "r"), "--debug"])


# values a hostile user types, per option: some valid, most not
FUZZ = {
    "--K": ["0", "1", "3", "-2", "1e9", "x"], "--batch": ["1", "7", "0", "-5", "2.5"],
    "--steps": ["1", "3", "0", "-1", "nan"], "--gamma-eps": ["0.1", "0", "1", "-0.3", "nan", "inf"],
    "--gamma-z": ["0.001", "0", "2", "nan"], "--lambda-star": ["0", "-4", "99", "nan", "-inf"],
    "--t-min": ["0.01", "0.5", "-1", "nan", "2"], "--t-max": ["0.9", "0.02", "1.5", "inf"],
    "--lr-g": ["1e-3", "0", "-1", "inf"], "--ema": ["0", "0.1", "-1", "nan"], "--seed": ["0", "-1", str(2**64)],
    "--variant": ["eps", "x", "eps,z", "bogus"], "--eval-every": ["1", "0", "-3"], "--eval-samples": ["7", "0"],
    "--ckpt-every": ["1", "0", "-1"], "--keep": ["1", "0", "-1"], "--hidden": ["8", "0"], "--depth": ["1", "0"],
    "--schedule": ["vp_cosine", "edm", "nope"], "--preset": ["ring2d", "gmm16d", "digits", "edm-cifar10", "nope"],
    "--precision": ["fp32", "bf16", "fp8"], "--z-step": ["fixed", "scaled", "wrong"],
}


def test_fuzzed_training_options(tmp_path, capsys):
    """Random combinations of valid and hostile values: exit 0 or 2, never a traceback, an error is one line."""
    rng = random.Random(2026)
    outcomes = {0: 0, 2: 0}
    for case in range(24):
        picks = rng.sample(sorted(FUZZ), rng.randint(1, 4))
        args = [a for opt in picks for a in (opt, rng.choice(FUZZ[opt]))]
        if "--steps" not in picks:
            args += ["--steps", "2"]
        out = tmp_path / f"case{case}"
        try:
            code = train.main(["--out", str(out), *SMALL, *args])
        except SystemExit as e:  # argparse: not a number, not a choice
            code = e.code
        captured = capsys.readouterr()
        assert code in (0, 2), (args, captured.err)
        assert "Traceback" not in captured.err, (args, captured.err)
        if code == 2 and not captured.err.startswith("usage:"):
            assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, (args, captured.err)
        if code == 2:
            assert not out.exists(), args
        outcomes[code] += 1
    assert outcomes[0] >= 3 and outcomes[2] >= 3, outcomes  # the fuzz exercised both


def spawn(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "emd_fast.train", "--out", str(out), *SMALL, "--steps", "40",
                             "--ckpt-every", "10", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)


def default_sigint():
    """In the child: SIGINT back to its default (a shell's background job, as CI may run us, ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGKILL: 137}
SOAK = int(os.environ.get("EMD_FAST_SOAK", "3"))  # stopped runs; the soak: EMD_FAST_SOAK=50 pytest -s -k signals


def stop_at_random(out: Path, rng: random.Random) -> tuple[signal.Signals, int, str]:
    """A training process given one signal (twice, sometimes) at a random moment once its run directory exists:
    during the teacher fit, training, a checkpoint write or the final evaluation. Returns the signal, the exit code
    as a shell reports it and stderr."""
    signum = rng.choice(list(EXIT))
    proc = spawn(out)
    while not out.exists() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 4))
    if proc.poll() is None:
        proc.send_signal(signum)
        if rng.random() < 0.3:
            proc.send_signal(signum)
    printed, err = proc.communicate(timeout=300)
    code = proc.returncode
    if code < 0:  # killed: only SIGKILL may (the command ignores stop signals once it has ended)
        assert signum == signal.SIGKILL, (signum, code, err)
        code = 128 - code
    return signum, code, err


def test_signals_at_random_moments_then_resume(tmp_path):
    """Runs stopped at random moments (SIGINT, SIGTERM, SIGUSR1, SIGKILL): the exit code is 0 (finished first) or
    128 + the signal, no traceback; a stopped run resumes to the same final state as an undisturbed run, or left no
    checkpoint (stopped during set-up: the directory is gone unless SIGKILL left it) and starts again."""
    straight = tmp_path / "straight"
    proc = spawn(straight)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    want = final_tensors(straight)
    rng = random.Random(int(os.environ.get("EMD_FAST_SOAK_SEED", "7")))
    tally = {"finished first": 0, "stopped in set-up": 0, "resumed exactly": 0}
    for case in range(SOAK):
        out = tmp_path / f"stopped{case}"
        signum, code, err = stop_at_random(out, rng)
        assert code in (0, EXIT[signum]) and "Traceback" not in err, (signum, code, err)
        if code and not list_checkpoints(out / "checkpoints"):
            assert signum == signal.SIGKILL or not out.exists(), err  # nothing half-made is left
            restarted = spawn(out)
            assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
            tally["stopped in set-up"] += 1
        elif code:
            resumed = spawn(out, "--resume")
            assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
            tally["resumed exactly"] += 1
        else:
            tally["finished first"] += 1
        got = final_tensors(out)
        assert all(torch.equal(want[k], got[k]) for k in want)
    print(f"signals at random moments: {SOAK} runs, " + ", ".join(f"{k} {v}" for k, v in tally.items()))
