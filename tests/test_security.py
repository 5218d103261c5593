"""No code, no unbounded work and no lost data from anything a user points emd_fast at: code in tokenizer folders and
TorchScript files never runs unasked, FIFOs and /dev/zero are refused instead of read, planted links in a run
directory are refused instead of followed, a run that loses the race for a new directory deletes nothing, an output
that is its own input is refused, stop signals are handled from the first instant of every command, and the inputs
the issue found silently accepted or reported as bugs are one-line refusals (exit 2)."""
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from emd_fast import edm_import, fid, pretrain, sample, train
from emd_fast.errors import FileRefused
from emd_fast.evaluation.image_metrics import InceptionFeatures
from emd_fast.training.checkpoint import _state_hash, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
SMALL = ["--teacher-fit-steps", "2", "--batch", "8", "--hidden", "8", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "50", "--quiet", "--device", "cpu", "--phase-every", "0"]


def exit_code(main, argv) -> int:
    """main(argv)'s exit code, also where argparse exits (a usage error)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line_exit_2(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("security") / "run"
    assert train.main(["--out", str(out), *SMALL, "--steps", "3"]) == 0
    return out


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


# --- code never runs unasked --------------------------------------------------------------------------------------

def test_auto_map_tokenizer_runs_nothing_even_when_stdin_says_yes(tmp_path, monkeypatch, capsys):
    """A pipeline whose tokenizer and text-encoder configs point (auto_map) at Python files of the folder: with "y"
    on stdin, the CLIP classes emd_fast names load the folder and never import those files; a tokenizer or text
    encoder class other than the pipeline's own (an Auto* class would follow auto_map) is refused in one line."""
    pytest.importorskip("diffusers")
    from emd_fast.teachers.diffusers_folder import encode_prompts, inspect_folder

    from diffusers_models import latent_pipeline

    folder = latent_pipeline(tmp_path / "pipe")
    marker = tmp_path / "folder_code_ran"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Evil: pass\n"
    for part, key in (("tokenizer", "AutoTokenizer"), ("text_encoder", "AutoModel")):
        (folder / part / "evil.py").write_text(code)
        config = folder / part / ("tokenizer_config.json" if part == "tokenizer" else "config.json")
        cfg = json.loads(config.read_text())
        cfg["auto_map"] = {key: ["evil.Evil", None] if part == "tokenizer" else "evil.Evil"}
        config.write_text(json.dumps(cfg))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\n" * 10))
    emb = encode_prompts(inspect_folder(folder), ["a cat"])
    assert emb.embeds.shape == (1, 8, 16) and not marker.exists()
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"tokenizer_class": "Evil"}))
    assert encode_prompts(inspect_folder(folder), ["a cat"]).embeds.shape == (1, 8, 16)  # the pipeline's own class
    index = folder / "model_index.json"
    for named in (["evil", "Evil"], ["transformers", "AutoTokenizer"]):
        index.write_text(json.dumps(json.loads(index.read_text()) | {"tokenizer": named}))
        with pytest.raises(ValueError, match=f"tokenizer is a {named[1]}: not supported") as e:
            encode_prompts(inspect_folder(folder), ["a cat"])
        assert "\n" not in str(e.value)
    index.write_text(json.dumps(json.loads(index.read_text()) | {"tokenizer": ["transformers", "CLIPTokenizer"]}))
    for named in (["transformers", "AutoModel"], ["evil", "Evil"], ["transformers", "CLIPVisionModel"]):
        index.write_text(json.dumps(json.loads(index.read_text()) | {"text_encoder": named}))
        with pytest.raises(ValueError, match=f"text_encoder is {named[1]}, not the CLIPTextModel") as e:
            encode_prompts(inspect_folder(folder), ["a cat"])
        assert "\n" not in str(e.value)
    assert not marker.exists()


WRITER = '''
import torch
from typing import Tuple


class Writer(torch.nn.Module):
    """A TorchScript module that overwrites ``victim`` when it is loaded: its __setstate__ runs at torch.jit.load."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.weight = torch.nn.Parameter(torch.zeros(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.victim, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.victim = state[0]
        self.training = state[2]
        t = torch.from_file(self.victim, True, 4, dtype=torch.uint8)
        self.weight = state[1] + t.fill_(88).float().sum() * 0

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]
'''


def test_a_writing_torchscript_file_is_read_as_data_unless_asked(tmp_path, monkeypatch, capsys):
    """--inception FILE reads tensors only: the crafted archive is refused (it holds no Inception weights) and its
    victim file is untouched; only --inception-torchscript runs it, and then it writes (the risk the flag's help
    names)."""
    (tmp_path / "writer.py").write_text(WRITER)
    monkeypatch.syspath_prepend(str(tmp_path))
    from writer import Writer

    victim = tmp_path / "victim"
    victim.write_text("safe")
    torch.jit.script(Writer(str(victim))).save(str(tmp_path / "evil.pt"))
    with pytest.raises(Exception, match="not the weights of Inception-v3") as e:
        InceptionFeatures(tmp_path / "evil.pt")
    assert "\n" not in str(e.value) and victim.read_text() == "safe"
    (tmp_path / "images").mkdir()
    one_line_exit_2(capsys, fid.main(["ref", str(tmp_path / "images"), str(tmp_path / "o.npz"), "--inception",
                                      str(tmp_path / "evil.pt")]))
    assert victim.read_text() == "safe"
    InceptionFeatures(tmp_path / "evil.pt", torchscript=True)
    assert victim.read_text() == "XXXX"


# --- FIFOs, devices and links to them are refused, never read -------------------------------------------------------

def test_fifos_and_dev_zero_are_refused_without_blocking(finished_run, tmp_path, capsys):
    """Every user path is checked before it is opened (a FIFO would block the open, /dev/zero would be read until
    memory runs out): one line, at once."""
    pytest.importorskip("diffusers")
    from test_hostile_files import bounded, pixel_folder_json

    run = tmp_path / "run"
    __import__("shutil").copytree(finished_run, run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    folder = pixel_folder_json(tmp_path / "folder")
    cases = {
        "--teacher FIFO": (train.main, ["--teacher", str(fifo(tmp_path / "t.pkl")), "--out", str(tmp_path / "a")]),
        "--mixture FIFO": (train.main, ["--mixture", str(fifo(tmp_path / "m.json")), "--out", str(tmp_path / "a")]),
        "--inception FIFO": (train.main, ["--preset", "digits", "--inception", str(fifo(tmp_path / "i.pt")),
                                          "--out", str(tmp_path / "a")]),
        "--fid-ref FIFO": (train.main, ["--teacher", str(folder), "--inception", str(folder / "config.json"),
                                        "--fid-ref", str(fifo(tmp_path / "r.npz")), "--out", str(tmp_path / "a")]),
        "--prompts FIFO": (train.main, ["--teacher", str(folder), "--prompts", str(fifo(tmp_path / "p.txt")),
                                        "--out", str(tmp_path / "a")]),
        "--resume-from FIFO": (train.main, ["--out", str(run), "--resume-from",
                                            str(fifo(run / "checkpoints" / "step_0000099.json")), "--steps", "4"]),
        "fid --inception FIFO": (fid.main, ["ref", str(tmp_path), str(tmp_path / "o.npz"), "--inception",
                                            str(tmp_path / "i.pt")]),
    }
    for name, (main, argv) in cases.items():
        with bounded(seconds=20):
            err = one_line_exit_2(capsys, main([*argv, *(SMALL if main is train.main else [])]))
        assert "FIFO" in err, (name, err)
    newest.unlink()  # the newest checkpoint record replaced by a FIFO: --resume refuses it and names the older one
    fifo(newest)
    with bounded(seconds=20):
        err = one_line_exit_2(capsys, train.main(["--out", str(run), "--resume", "--steps", "4", "--quiet"]))
    assert "FIFO" in err
    for name, target in (("diffusion_pytorch_model.safetensors", None), ("diffusion_pytorch_model.safetensors",
                                                                           "/dev/zero"),
                         ("scheduler_config.json", "/dev/zero"), ("config.json", "/dev/zero")):
        broken = pixel_folder_json(tmp_path / f"f-{name}-{target}".replace("/", "_"))
        (broken / name).unlink()
        fifo(broken / name) if target is None else (broken / name).symlink_to(target)
        with bounded(seconds=20):
            err = one_line_exit_2(capsys, train.main(["--teacher", str(broken), "--out", str(tmp_path / "b"),
                                                      *SMALL]))
        assert "FIFO" in err or "character device" in err, (name, err)


# --- planted links in a run directory --------------------------------------------------------------------------------

@pytest.mark.parametrize("planted", [".lock", "metrics.jsonl", "metrics.jsonl.tmp", "config.json.tmp",
                                     "summary.json.tmp", "samples/final.png", "samples", "checkpoints"])
def test_planted_links_in_a_run_directory_are_refused(planted, tmp_path, capsys):
    """A link where the run writes: refused in one line; the file (or folder) it points to keeps its content and
    mode (never written, never chmod-ed)."""
    victim = tmp_path / "victim"
    victim.mkdir() if planted in ("samples", "checkpoints") else victim.write_text("precious")
    os.chmod(victim, 0o700 if victim.is_dir() else 0o600)
    out = tmp_path / "run"
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / planted).symlink_to(victim)
    err = one_line_exit_2(capsys, train.main(["--out", str(out), *SMALL, "--steps", "1"]))
    assert "link" in err, err
    assert stat.S_IMODE(victim.stat().st_mode) == (0o700 if victim.is_dir() else 0o600)
    assert (list(victim.iterdir()) == []) if victim.is_dir() else victim.read_text() == "precious"


# --- no lost data -------------------------------------------------------------------------------------------------

RACER = textwrap.dedent('''
    import sys, time, pathlib
    from emd_fast.training import rundir
    out, wait_for = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[1]) / sys.argv[2]
    take = rundir.RunLock.__enter__
    def late(self):  # the window between creating the run directory and locking it, widened
        deadline = time.monotonic() + 300
        while not wait_for.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return take(self)
    rundir.RunLock.__enter__ = late
    from emd_fast import train
    sys.exit(train.main(["--out", str(out), *sys.argv[3:]]))
''')


@pytest.mark.parametrize("wait_for, steps", [("config.json", "100000"), ("summary.json", "2")])
def test_a_new_run_that_loses_the_race_for_its_directory_deletes_nothing(wait_for, steps, tmp_path):
    """A creates the run directory and is held before its lock until B (which found the directory made) is
    training (config.json: B holds the lock) or has finished (summary.json): A then fails in one line and B's
    directory, its run in it, is intact."""
    out = tmp_path / "run"
    a = subprocess.Popen([sys.executable, "-c", RACER, str(out), wait_for, *SMALL, "--steps", "2"], env=ENV,
                         stderr=subprocess.PIPE, text=True)
    while not out.exists():
        assert a.poll() is None, a.communicate()[1]
        time.sleep(0.05)
    b = subprocess.Popen([sys.executable, "-m", "emd_fast.train", "--out", str(out), *SMALL, "--steps", steps],
                         env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        err_a = a.communicate(timeout=600)[1]
        assert a.returncode == 2 and err_a.count("\n") == 1, err_a
        assert ("in use by another run" if wait_for == "config.json" else "already holds checkpoints") in err_a
        assert (out / "config.json").is_file()
        if wait_for == "summary.json":
            assert b.wait(timeout=600) == 0 and (out / "summary.json").is_file() and list_checkpoints(
                out / "checkpoints")
    finally:
        b.kill()
        b.communicate()
    assert out.is_dir() and (out / "config.json").is_file()


def test_outputs_that_are_their_input_are_refused(tmp_path, capsys):
    src = tmp_path / "net.pkl"
    src.write_bytes(b"precious")
    (tmp_path / "link.pkl").symlink_to(src)
    for dst in (src, tmp_path / "link.pkl", tmp_path / "." / "net.pkl"):
        assert "is the source file" in one_line_exit_2(capsys, edm_import.main([str(src), str(dst)]))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    assert "is the source file" in one_line_exit_2(capsys, fid.main(["convert", str(weights), str(weights)]))
    assert src.read_bytes() == b"precious" and weights.read_bytes() == b"weights"


# --- stop signals from the first instant ------------------------------------------------------------------------------

def caught_signals(pid: int) -> int:
    """The mask of signals process ``pid`` has handlers for (/proc/<pid>/status SigCgt), 0 if it is gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1], 16)


SIGNAL_CASES = [  # (command line, signal, seconds after start, not before emd_fast's handlers are installed)
    (["-m", "emd_fast.train"], signal.SIGINT, 0.0),
    (["-m", "emd_fast.train"], signal.SIGTERM, 0.2),
    (["-m", "emd_fast.train"], signal.SIGUSR1, 0.5),
    (["-m", "emd_fast.train"], signal.SIGINT, 1.0),
    (["-m", "emd_fast.train"], signal.SIGTERM, 1.5),
    (["-m", "emd_fast.sample", "nowhere"], signal.SIGUSR1, 0.0),
    (["-m", "emd_fast.fid", "ref", "nowhere", "x.npz", "--inception", "x.pt"], signal.SIGTERM, 0.0),
    (["-m", "emd_fast.pretrain", "--teacher-steps", "1", "--out", "p"], signal.SIGINT, 0.0),
    (["-m", "emd_fast.edm_import", "nowhere.pkl", "x.safetensors"], signal.SIGTERM, 0.0),
    (["-c", "from emd_fast.entry import train; train()"], signal.SIGINT, 0.2),  # the console script emd-train
]


@pytest.mark.parametrize("argv, sig, delay", SIGNAL_CASES)
def test_stop_signals_from_the_first_instant(argv, sig, delay, tmp_path):
    """The signal at ``delay`` s after the start (and not before the process has reached emd_fast's first line, a
    few tens of ms of interpreter start-up: SigCgt shows SIGTERM caught), mostly while torch is still importing:
    exit 128 + signal, one line, no traceback, no run directory left."""
    out = tmp_path / "run"
    extra = ["--out", str(out), *SMALL, "--steps", "100000"] if argv[-1].endswith(("train", "train()")) else []
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *argv, *extra], env=ENV, cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not caught_signals(proc.pid) & (1 << (signal.SIGTERM - 1)):
        assert proc.poll() is None and time.monotonic() - t0 < 60, proc.communicate()[1]
        time.sleep(0.002)
    time.sleep(max(0.0, delay - (time.monotonic() - t0)))
    proc.send_signal(sig)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err and err.count("\n") == 1 and f"stopped by {sig.name}" in err, err
    assert not out.exists() or list_checkpoints(out / "checkpoints")  # a new run: gone, or resumable


# --- refused, not silently accepted or reported as a bug ------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--K", "1000000"], "--K must be at most 1000"),
    (["--gamma-z", "nan", "--variant", "eps"], "--gamma-z must be a finite number"),
    (["--guidance-scale", "nan"], "--guidance-scale must be finite"),
    (["--guidance-scale", "2"], "--guidance-scale applies to text-to-image diffusers teachers"),
    (["--compile-cache", "{dir}"], "--compile-cache keeps the artefacts of --compile (or --fast), which is not given"),
    (["--inception-torchscript"], "--inception-torchscript says how to read --inception, which is not given"),
    (["--device", "cpu:5"], "there is one cpu device"),
    (["--inception", "{file}"], "FID is for image runs"),
    (["--fid-ref", "{file}", "--inception", "{file}"], "FID is for image runs"),
    (["--K", "2.5"], "argument --K: invalid int value"),
    (["--out", "{deep}"], "cannot create the run directory"),
    (["--eval-samples", "1000000000000"], "--eval-samples 1000000000000 of 2-D needs 29802.3 GiB of memory"),
    (["--out", ""], "argument --out: an empty path (an unset shell variable?)"),
    (["--out", " "], "argument --out: an empty path"),
    (["--mixture", ""], "argument --mixture: an empty path"),
    (["--mixture", "{dir}"], "a directory, not a regular file"),
])
def test_bad_training_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "file").write_bytes(b"x")
    subs = {"{file}": str(tmp_path / "file"), "{dir}": str(tmp_path), "{deep}": str(tmp_path / ("a/" * 3000))}
    argv = [subs.get(a, a) for a in args]
    out = ["--out", str(tmp_path / "run")] if "--out" not in args else []
    try:
        assert message in one_line_exit_2(capsys, exit_code(train.main, [*out, *SMALL, "--steps", "1", *argv]))
    finally:
        remove_deep_chain(tmp_path, "a")


def test_a_new_run_never_writes_into_a_folder_that_is_not_a_run(tmp_path, capsys):
    """A new run takes a new or empty directory, or a run directory (one without checkpoints starts again there);
    a folder of the user's (files named as a run's among them) is refused in one line and left as it was."""
    folder = tmp_path / "project"
    (folder / "samples").mkdir(parents=True)
    files = {"config.json": b'{"my": "settings"}', "metrics.jsonl": b"x", "samples/final.png": b"png", "notes": b"n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    err = one_line_exit_2(capsys, exit_code(train.main, ["--out", str(folder), *SMALL, "--steps", "1"]))
    assert "is neither empty nor a run directory (it holds config.json, metrics.jsonl, notes and 1 more)" in err
    assert {name: (folder / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.jsonl", "notes", "samples"]
    empty, stopped = tmp_path / "empty", tmp_path / "stopped"
    empty.mkdir()
    stopped.mkdir()
    (stopped / ".lock").touch()  # what a run stopped before its first checkpoint leaves, with its config and log
    (stopped / "config.json").write_text("{}")
    for out in (empty, stopped):
        assert exit_code(train.main, ["--out", str(out), *SMALL, "--steps", "1"]) == 0
        assert list_checkpoints(out / "checkpoints")


def test_a_failed_resume_deletes_nothing(finished_run, tmp_path, capsys):
    """--resume that finds no checkpoint record deletes nothing (a tensors file without its record is no orphan to
    clean while nothing is resumed); a resume removes only what a killed write left: temporary files, and a tensors
    file newer than every record."""
    import shutil

    out = shutil.copytree(finished_run, tmp_path / "run")
    ckpts = out / "checkpoints"
    newest = list_checkpoints(ckpts)[-1]
    records = tmp_path / "records"
    records.mkdir()
    for meta in list_checkpoints(ckpts):
        meta.rename(records / meta.name)
    kept = sorted(p.name for p in ckpts.iterdir())
    assert "no checkpoint" in one_line_exit_2(capsys, exit_code(train.main, ["--out", str(out), "--resume"]))
    assert sorted(p.name for p in ckpts.iterdir()) == kept
    for meta in records.iterdir():
        meta.rename(ckpts / meta.name)
    step = int(newest.stem[5:])
    older = ckpts / f"step_{step - 1:07d}.safetensors"  # its record gone (moved away by the user): left in place
    older.write_bytes(b"weights")
    killed = ckpts / f"step_{step + 2:07d}.safetensors"  # the newest write, killed before its record
    killed.write_bytes(b"half")
    (ckpts / "x.tmp").write_bytes(b"t")
    assert exit_code(train.main, ["--out", str(out), "--resume", "--steps", str(step + 1)]) == 0
    assert older.read_bytes() == b"weights" and not killed.exists() and not (ckpts / "x.tmp").exists()


def remove_deep_chain(top, name: str) -> None:
    """Remove top/name/name/... (the folders an over-long --out made on the way, too deep for a recursive delete:
    pytest's own clean-up would hit Python's recursion limit), one level at a time from the top."""
    while (top / name).is_dir():
        if (top / name / name).is_dir():
            (top / name / name).rename(top / "next")
            (top / name).rmdir()
            (top / "next").rename(top / name)
        else:
            (top / name).rmdir()


def test_resume_past_the_target_says_nothing_is_left(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    __import__("shutil").copytree(finished_run, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train.main(["--out", str(run), "--resume", "--steps", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing left to do" in err and "step 3, past --steps 1" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_bad_sample_and_pretrain_input_is_one_line(finished_run, tmp_path, capsys):
    for argv, message in (([str(finished_run), "--seed", "-1"], "--seed must be in [0, 2**63)"),
                          ([str(finished_run), "--seed", str(10**23)], "--seed must be in [0, 2**63)"),
                          ([str(finished_run), "--uint8", "--out", str(tmp_path / "x.npz")], "--uint8"),
                          ([str(finished_run / "metrics.jsonl")], "not a checkpoint"),
                          ([str(finished_run), "--seed", "1e23"], "invalid int value")):
        assert message in one_line_exit_2(capsys, exit_code(sample.main, argv))
    assert "--seed must be in" in one_line_exit_2(capsys, pretrain.main(["--seed", "-1", "--out", str(tmp_path)]))


def test_a_checkpoint_naming_a_file_elsewhere_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    __import__("shutil").copytree(finished_run, run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    record = json.loads(newest.read_text()) | {"tensors_file": "../config.json"}
    record["state_sha256"] = _state_hash(record)
    newest.write_text(json.dumps(record))
    err = one_line_exit_2(capsys, train.main(["--out", str(run), "--resume-from", str(newest), "--steps", "5"]))
    assert "names tensors file '../config.json', not a file beside it" in err


def test_prompt_files_and_their_embeddings_are_checked_against_the_machine(tmp_path, monkeypatch):
    """A 100 MB prompt file is refused before it is read; 10^5 SD-1.5 prompts (23.7 GB of embeddings) on a 64 GB
    machine are refused before any encoding, 1000 are not."""
    from emd_fast.teachers import diffusers_folder as df

    big = tmp_path / "prompts.txt"
    with open(big, "w") as f:
        f.truncate(100 << 20)
    with pytest.raises(FileRefused, match="more than the 4 MiB"):
        df.read_prompts(big)
    clip = df.folder.TextEncoder("text_encoder", tmp_path, tmp_path, "CLIPTextModel",
                                 {"max_position_embeddings": 77, "hidden_size": 768})
    folder = df.TeacherFolder(tmp_path, "sd", tmp_path, "UNet2DConditionModel", {}, tmp_path, {},
                              text_encoders=(clip,))
    pages = {"SC_PHYS_PAGES": (64 << 30) // 4096, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(df.prompts.os, "sysconf", pages.__getitem__)
    with pytest.raises(ValueError, match=r"100000 prompts make 22\.0 GiB of text embeddings .* a quarter of this"):
        df.check_prompt_budget(folder, 100_000, None, tmp_path)
    df.check_prompt_budget(folder, 1000, None, tmp_path)
