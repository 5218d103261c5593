"""`python -m emd_fast.train`: smoke run, run directory, exact resume, clear errors."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from emd_fast import train
from emd_fast.errors import CheckpointError
from emd_fast.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from emd_fast.training.distiller import Distiller

from helpers import assert_resumes_exactly, final_tensors, losses, train_cli

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "3",
         "--eval-samples", "200", "--ckpt-every", "4", "--K", "2", "--quiet", "--device", "cpu"]


run = train_cli(*SMALL)


def test_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "6", "--plot-every", "3") == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples/final.png", "samples/step_0000003.png"):
        assert (out / name).is_file(), name
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000004.json", "step_0000006.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["iters_per_s"] > 0
    assert summary["phase_timed_iters"] == 0  # --phase-every 50 > 6 steps
    assert {"modes_covered", "mode_tv", "energy_distance", "mean_loglik", "off_mode"} <= set(summary["final"])
    assert len(losses(out)) == 6
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "mode_tv" in first  # the generator at initialisation
    assert "modes covered" in capsys.readouterr().out
    assert (out / "samples/final.png").read_bytes()[:4] == b"\x89PNG"


def test_phase_timing(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--steps", "4", "--phase-every", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phase_ms_per_iter"]
    assert summary["phase_timed_iters"] == 2
    for name in ("teacher forward", "student forward", "generator forward", "generator VJP", "langevin eps update",
                 "langevin z update", "M-step forward", "generator backward", "generator optimizer",
                 "student DSM forward", "student backward", "student optimizer"):
        assert phases[name] > 0, name


def test_resume_continues_exactly(tmp_path):
    # the runtime options given again, the hyperparameters from the saved config
    assert_resumes_exactly(run, tmp_path / "straight", tmp_path / "split", steps=8, stop=5, resume_args=SMALL)


def test_interrupted_run_resumes(tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(straight, "--steps", "7") == 0
    real_step = Distiller.step

    def flaky(self):
        if self.step_count == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", flaky)
    assert run(broken, "--steps", "7") == 130
    monkeypatch.setattr(Distiller, "step", real_step)
    assert list_checkpoints(broken / "checkpoints")[-1].name == "step_0000005.json"
    assert run(broken, "--resume", "--steps", "7") == 0
    a, b = final_tensors(straight), final_tensors(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--steps", "4") == 0
    assert run(out, "--steps", "8") == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run(out, "--resume", "--steps", "8", "--K", "3") == 2
    assert "from another config (K: run has 2, asked 3)" in capsys.readouterr().err
    weights = list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert run(out, "--resume", "--steps", "8") == 2
    assert "is corrupt" in capsys.readouterr().err
    assert run(tmp_path / "empty", "--resume") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--K", "-1"], "K must be an integer >= 0"),
    (["--gamma-eps", "-0.5"], "gamma_eps must be > 0"),
    (["--lambda-star", "40"], "lambda*=40.0 is outside"),
    (["--lr-g", "0"], "--lr-g must be a positive number"),
    (["--betas-g", "0.9", "1.5"], "betas_g must lie in [0, 1)"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_hyperparameters_exit_cleanly(tmp_path, capsys, args, msg):
    assert run(tmp_path / "r", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    tensors = {"w": torch.randn(3, 3)}
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, tensors, {"config": {}}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004.json", "step_0000005.json"]
    assert not list(tmp_path.glob("*.tmp"))
    loaded, state = load_checkpoint(tmp_path / "step_0000005.json")
    assert state["step"] == 5 and torch.equal(loaded["w"], tensors["w"])


def test_help_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "emd_fast.train", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for opt in ("--K", "--gamma-eps", "--gamma-z", "--lambda-star", "--lr-g", "--lr-s", "--batch", "--betas-g",
                "--gen-weighting", "--variant", "--cancel-noise", "--seed", "--device", "--steps", "--out",
                "--resume"):
        assert opt in res.stdout


def write_mixture(path, **spec):
    spec = {"means": [[2.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 2.0, 1.0]], "weights": [0.5, 0.3, 0.2],
            "variances": [0.05, 0.1, 0.02], **spec}
    path.write_text(json.dumps(spec))
    return path


def test_user_mixture_run_resume_and_changed_file(tmp_path, capsys):
    mix = write_mixture(tmp_path / "three.json")
    straight, split = tmp_path / "straight", tmp_path / "split"

    def the_first_half_recorded_the_mixture():
        cfg = json.loads((split / "config.json").read_text())
        assert cfg["mixture"] == str(mix) and len(cfg["mixture_sha256"]) == 64
        assert cfg["teacher_info"]["weights"] == [0.5, 0.3, 0.2]
        summary = json.loads((split / "summary.json").read_text())
        assert summary["final"]["num_modes"] == 3 and summary["problem"] == "MixtureProblem"

    # the mixture comes from the saved config
    assert_resumes_exactly(run, straight, split, "--mixture", str(mix), steps=6, stop=4, resume_args=SMALL,
                           before_resume=the_first_half_recorded_the_mixture)
    write_mixture(mix, weights=[0.4, 0.4, 0.2])
    capsys.readouterr()
    assert run(split, "--resume", "--steps", "8") == 2
    assert "is not the one this run started from" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--mixture", "{bad}"], "weights must sum to 1"),
    (["--mixture", "{none}"], "no such file"),
    (["--preset", "gmm16d", "--mixture", "{good}"], "--preset gmm16d is an embedded teacher"),
    (["--preset", "edm-imagenet64"], "--preset edm-imagenet64 sets hyperparameters for a teacher file"),
    (["--labels", "3"], "--labels needs a class-conditional teacher"),
    (["--device", "nonsense"], "is not a device name"),
    (["--device", "mps"], "emd_fast runs on cpu or cuda devices"),
    (["--fid-ref", "{good}"], "--fid-ref needs --inception"),
    (["--eval-samples", "100000000000"], "error: --eval-samples 100000000000 of 2-D needs 2980.2 GiB of memory"),
])
def test_bad_problem_options_are_one_line_errors(tmp_path, capsys, args, msg):
    files = {"{bad}": write_mixture(tmp_path / "bad.json", weights=[0.5, 0.3, 0.3]),
             "{good}": write_mixture(tmp_path / "good.json"), "{none}": tmp_path / "none.json"}
    out = tmp_path / "r"
    assert run(out, *[str(files.get(a, a)) for a in args]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not out.exists()  # nothing half-made is left behind


def test_diverging_e_step_is_a_one_line_error_naming_the_knob(tmp_path, capsys):
    """Narrow modes far apart, the fixed z step: the chain explodes at low noise within the first E-step."""
    mix = tmp_path / "narrow.json"
    mix.write_text(json.dumps({"means": [[5.0, 0.0], [0.0, 5.0], [-5.0, 0.0], [0.0, -5.0]], "weights": [0.25] * 4,
                               "variances": [1e-4] * 4}))
    out = tmp_path / "r"
    assert run(out, "--mixture", str(mix), "--z-step", "fixed", "--K", "16", "--t-max", "0.002") == 2
    err = capsys.readouterr().err
    assert "the E-step" in err and "diverged" in err and "scaled z step" in err and err.count("\n") == 1
    assert not out.exists()
    assert run(out, "--mixture", str(mix), "--K", "16", "--t-max", "0.002", "--steps", "3") == 0  # scaled: fine


def test_divergence_guard():
    from emd_fast.training.health import DivergenceError, DivergenceGuard

    guard = DivergenceGuard()
    healthy = {"z_move": 0.3, "eps_move": 40.0, "x_move": 0.5, "x_move_max": 2.0, "t_move_max": 0.5, "grad_g": 1.0,
               "grad_s": 2.0}
    for step in range(1, 31):
        guard.check(step, healthy)
    with pytest.raises(DivergenceError, match=r"E-step diverging at step 31: the K Langevin steps moved x_t by 40 "
                                              r"data scales .* at noise level t = 0.001; mean moves of z 4e\+06, .* "
                                              r"use the noise-scaled z step \(--z-step scaled\)"):
        guard.check(31, healthy | {"x_move": 40.0, "x_move_max": 4e3, "t_move_max": 1e-3, "z_move": 4e6})
    with pytest.raises(DivergenceError, match="moved x_t by nan"):
        guard.check(31, healthy | {"x_move": float("nan")})
    with pytest.raises(DivergenceError, match="generator gradient norm jumped to 5e\\+03 at step 32, 5e\\+03x its "
                                              "running median 1"):
        guard.check(32, healthy | {"grad_g": 5e3})
    guard.check(33, healthy | {"grad_g": 500.0})  # large, but not a blow-up


def test_metrics_log_holds_the_health_values(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--steps", "3") == 0
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert {"grad_g", "grad_s", "z_move", "eps_move", "x_move", "x_move_max", "t_move_max"} <= set(rec)
    assert rec["grad_g"] > 0 and 0 < rec["z_move"] < rec["eps_move"] < 10 and 0 < rec["x_move"] < rec["x_move_max"]


def test_out_of_memory_at_the_first_iteration_names_a_batch_that_fits(tmp_path, capsys, monkeypatch):
    real_step = Distiller.step

    def limited(self):
        if self.batch > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", limited)
    out = tmp_path / "r"
    assert run(out, "--batch", "40", "--steps", "3") == 2
    err = capsys.readouterr().err
    assert "--batch 40 does not fit in the memory of cpu: batch 5 ran one iteration here (measured)" in err
    assert err.count("\n") == 1 and not out.exists()


def test_ema_follows_the_generator(tmp_path):
    from emd_fast.emd import EMDConfig

    from helpers import small_problem

    teacher, gen, student = small_problem()
    distiller = Distiller(teacher, gen, student, EMDConfig(K=1), batch=16, lr_g=1e-2, lr_s=1e-3, ema_halflife_kimg=0.1,
                     ema_rampup=0.0)
    before = {k: v.clone() for k, v in distiller.ema.state_dict().items()}
    distiller.step()
    distiller.update_ema()
    beta = 0.5 ** (16 / 100)
    for k, v in distiller.ema.state_dict().items():
        want = beta * before[k] + (1 - beta) * gen.state_dict()[k]
        torch.testing.assert_close(v, want)
    assert not torch.equal(distiller.ema.state_dict()["denoiser.out.weight"], gen.state_dict()["denoiser.out.weight"])
    assert distiller.sampler is distiller.ema and {f"ema.{k}" for k in before} <= set(distiller.state_tensors())
    ramped = Distiller(teacher, gen, student, EMDConfig(K=1), batch=16, lr_g=1e-2, lr_s=1e-3, ema_halflife_kimg=500,
                       ema_rampup=0.05)
    ramped.step_count = 10  # 160 samples seen: the half-life is 0.05 * 160 = 8 samples, not 500k
    snapshot = [p.clone() for p in ramped.ema.parameters()]
    ramped.update_ema()
    w = 1 - 0.5 ** (16 / 8)
    for p_ema, p0, p in zip(ramped.ema.parameters(), snapshot, gen.parameters()):
        torch.testing.assert_close(p_ema, p0 + w * (p - p0))


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test, also when pytest runs as a shell's background job (which ignores
    SIGINT; a run leaves ignored signals alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("signum, code, extra", [(signal.SIGTERM, 143, ()), (signal.SIGUSR1, 138, ()),
                                                 (signal.SIGINT, 130, ()),
                                                 (signal.SIGTERM, 143, ("--finite-check", "deferred"))])
def test_signals_stop_at_an_iteration_boundary_and_resume_exactly(tmp_path, capsys, monkeypatch, signum, code, extra):
    """The signal arrives in the middle of step 5 (a second one during it too): the step finishes, a checkpoint is
    written at that boundary, the exit code is 128 + the signal, and --resume ends where an undisturbed run does
    (eager checks, and the deferred checks with fused Adam)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run(straight, "--steps", "7", *extra) == 0
    real_step = Distiller.step

    def signalled(self):
        if self.step_count == 4:
            os.kill(os.getpid(), signum)
            os.kill(os.getpid(), signum)
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", signalled)
    assert run(stopped, "--steps", "7", *extra) == code
    monkeypatch.setattr(Distiller, "step", real_step)
    assert f"stopped by {signal.Signals(signum).name} after step 5: checkpoint written" in capsys.readouterr().err
    assert list_checkpoints(stopped / "checkpoints")[-1].name == "step_0000005.json"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert run(stopped, "--resume", "--steps", "7", *extra) == 0  # a runtime option: given again
    a, b = final_tensors(straight), final_tensors(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(stopped)


def test_default_run_names(tmp_path):
    from emd_fast.training.config import resolve

    def resolved(*argv):
        parser = train.build_parser()
        cfg, _, _ = resolve(vars(parser.parse_args(list(argv))), train._explicit(parser, list(argv)))
        return cfg

    cfg = resolved("--device", "cpu")
    assert cfg["preset"] == "ring2d" and str(cfg["out"]) == "runs/ring2d_K8_seed0"
    mix = write_mixture(tmp_path / "three.json")
    cfg = resolved("--device", "cpu", "--mixture", str(mix), "--K", "4", "--seed", "2")
    assert cfg["preset"] is None and str(cfg["out"]) == "runs/three_K4_seed2"


@pytest.mark.parametrize("spec", [
    {"means": [[-2.0], [1.5]], "weights": [0.3, 0.7], "variances": [0.1, 0.05]},  # 1-D
    {"means": [[0.5, 1.0, 2.0]], "weights": [1.0], "covs": [[[1.0, 0.2, 0.0], [0.2, 0.5, 0.0], [0.0, 0.0, 0.3]]]},
    {"means": [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]], "weights": [0.2, 0.3, 0.5],
     "variances": [[0.1, 0.2, 0.1, 0.3]] * 3},  # collinear means, diagonal covariances
], ids=["1d", "one-mode-3d", "collinear-4d"])
def test_odd_mixtures_run_and_plot(tmp_path, spec):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "r"
    assert run(out, "--mixture", str(path), "--steps", "3", "--plot-every", "3") == 0
    assert (out / "samples/final.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["final"]["num_modes"] == len(spec["weights"])


def test_run_directory_is_locked_while_in_use(tmp_path, capsys):
    import fcntl

    out = tmp_path / "r"
    assert run(out, "--steps", "2") == 0
    with open(out / ".lock", "a+") as held:  # another run holding the directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        assert run(out, "--resume", "--steps", "4") == 2
        err = capsys.readouterr().err
        assert "is in use by another run (pid 4242)" in err and err.count("\n") == 1
    assert run(out, "--resume", "--steps", "4") == 0  # released: the kernel drops the lock with its holder
    assert (out / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("args, msg", [
    (["--t-min", "0.9", "--t-max", "0.1"], "must be an increasing range inside the vp_cosine schedule's"),
    (["--t-min", "0.5", "--t-max", "0.5"], "must be an increasing range"),
    (["--t-min", "-1"], "must be an increasing range"),
    (["--t-max", "nan"], "must be an increasing range"),
    (["--seed", str(2**70)], "--seed must be in [0, 2**63)"),
])
def test_nonsense_ranges_are_refused(tmp_path, capsys, args, msg):
    assert run(tmp_path / "r", *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_checkpoint_integrity_and_recovery(tmp_path, capsys):
    """The step and config are covered by the checkpoint's hash; stray files are no checkpoints; orphans from a killed
    write (newer than every checkpoint) are removed; a corrupt newest checkpoint names the newest intact one and
    --resume-from continues from it, the later checkpoints set aside;
    a torn last line of metrics.jsonl does not block a resume; files follow the umask."""
    out = tmp_path / "r"
    assert run(out, "--steps", "8", "--keep", "0") == 0
    ckpts = out / "checkpoints"
    assert oct((ckpts / "step_0000008.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    meta = ckpts / "step_0000008.json"
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "step": 9}))
    with pytest.raises(CheckpointError, match="content does not match its SHA-256"):
        load_checkpoint(meta)
    meta.write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="is not an emd_fast checkpoint record"):
        load_checkpoint(meta)
    (ckpts / "step_latest.json").write_text("{}")  # a stray file, not a checkpoint
    (ckpts / "step_0000012.safetensors").write_bytes(b"half written")  # an orphan of a killed write
    (ckpts / "step_0000012.safetensors.tmp").write_bytes(b"x")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss_g": 0.1')  # torn
    capsys.readouterr()
    assert run(out, "--resume", "--steps", "10") == 2
    err = capsys.readouterr().err
    assert f"the newest intact checkpoint is {ckpts / 'step_0000004.json'}" in err and "--resume-from" in err
    assert not (ckpts / "step_0000012.safetensors").exists() and not (ckpts / "step_0000012.safetensors.tmp").exists()
    assert run(out, "--resume-from", str(ckpts / "step_0000004.json"), "--steps", "10") == 0
    aside = ckpts / "abandoned_after_step_0000004"  # the abandoned step 8, the corrupt one
    assert sorted(p.name for p in aside.iterdir()) == ["step_0000008.json", "step_0000008.safetensors"]
    assert "later checkpoints (step 8) are set aside in" in capsys.readouterr().err
    straight = tmp_path / "straight"
    assert run(straight, "--steps", "10") == 0
    a, b = final_tensors(straight), final_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r[0] for r in losses(out)] == list(range(1, 11))


def test_a_branch_from_an_earlier_checkpoint_is_what_resume_and_sample_continue(tmp_path, capsys):
    """--resume-from an earlier checkpoint abandons the later ones: they are set aside (not deleted, not pruned in
    place of the branch point), so the next --resume continues the branch, exactly as a straight run of the branch."""
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert run(out, "--steps", "8", "--ckpt-every", "2") == 0  # 4, 6, 8 kept
    assert run(out, "--resume-from", str(ckpts / "step_0000004.json"), "--steps", "5", "--ckpt-every", "2") == 0
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_0000004.json", "step_0000005.json"]
    assert run(out, "--resume", "--steps", "7", "--ckpt-every", "2") == 0
    assert [r[0] for r in losses(out)] == list(range(1, 8))
    straight = tmp_path / "straight"
    assert run(straight, "--steps", "5", "--ckpt-every", "2") == 0
    assert run(straight, "--resume", "--steps", "7", "--ckpt-every", "2") == 0
    a, b = final_tensors(straight), final_tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    aside = sorted(p.name for p in (ckpts / "abandoned_after_step_0000004").iterdir())
    assert aside == ["step_0000006.json", "step_0000006.safetensors", "step_0000008.json", "step_0000008.safetensors"]


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
