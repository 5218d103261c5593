"""The security cases (files a user points emd_fast at, run as a hostile user and a cluster would) as real
processes: each case, what is expected, what was observed (exit code, first line of stderr, seconds, the process's
peak resident memory), and for files that must survive, whether they did. Writes the markdown table
docs/security.md points to.

    PYTHONPATH=. python benchmarks/security_cases.py --out benchmarks/results/security_cases.md

The crafted files are built here (tiny models, nothing downloaded); the regression tests of the same cases are
tests/test_security.py and tests/test_hostile_files.py.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path

import torch

from hostile_cases import ENV, cli, print_table

TESTS = Path(__file__).resolve().parents[1] / "tests"
SMALL = ["--teacher-fit-steps", "2", "--batch", "8", "--hidden", "8", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "50", "--quiet", "--device", "cpu", "--phase-every", "0"]


def edm_stand_ins() -> None:
    """torch_utils.persistence and dnnlib.util in sys.modules, so that the tests' stand-in objects pickle as EDM's."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only pickled here")

    class EasyDict(dict):
        pass

    util = types.ModuleType("dnnlib.util")
    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    persistence._reconstruct_persistent_obj, util.EasyDict = _reconstruct_persistent_obj, EasyDict
    for module in (types.ModuleType("torch_utils"), persistence, types.ModuleType("dnnlib"), util):
        sys.modules[module.__name__] = module


def with_victim(run, victim: Path, content: bytes, mode: int):
    """run()'s result with ', victim intact' or ', VICTIM CHANGED' appended to its line."""
    code, line, seconds, peak = run()
    intact = victim.read_bytes() == content and stat.S_IMODE(victim.stat().st_mode) == mode
    return code, f"{line}; victim {'intact' if intact else 'CHANGED'}", seconds, peak


def victim_file(tmp: Path, name: str) -> Path:
    victim = tmp / name
    victim.write_bytes(b"precious")
    os.chmod(victim, 0o600)
    return victim


def planted(tmp: Path, name: str):
    out, victim = tmp / f"planted-{name.replace('/', '_')}", victim_file(tmp, f"victim-{name.replace('/', '_')}")
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(victim)
    return with_victim(lambda: cli("train", "--out", str(out), *SMALL, "--steps", "1"), victim, b"precious", 0o600)


def signal_at(tmp: Path, sig: signal.Signals, delay: float):
    """train started, ``sig`` sent ``delay`` s later."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "emd_fast.train", "--out", str(tmp / f"sig{delay}"), *SMALL,
                             "--steps", "100000"], env=ENV, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    lines = [x for x in err.splitlines() if x.strip()]
    first = "Traceback ... " + lines[-1] if "Traceback" in err else f"{lines[0] if lines else ''} ({len(lines)} line)"
    return proc.returncode, first, time.perf_counter() - t0, 0.0


RACER = (TESTS / "test_security.py").read_text().split("RACER = textwrap.dedent('''")[1].split("''')")[0]


def race(tmp: Path, wait_for: str, steps: str):
    """test_security's lock race, widened: A made the directory and locks it only once B wrote ``wait_for``."""
    import textwrap

    out = tmp / f"race-{wait_for}"
    a = subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACER), str(out), wait_for, *SMALL, "--steps", "2"],
                         env=ENV, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while not out.exists() and a.poll() is None:
        time.sleep(0.05)
    b = subprocess.Popen([sys.executable, "-m", "emd_fast.train", "--out", str(out), *SMALL, "--steps", steps],
                         env=ENV, stderr=subprocess.DEVNULL)
    err = a.communicate()[1].strip().splitlines()
    if wait_for == "summary.json":
        b.wait()
    b.kill()
    b.wait()
    kept = (out / "config.json").is_file()
    return a.returncode, f"{err[0] if err else ''}; B's run {'intact' if kept else 'DELETED'}", \
        time.perf_counter() - t0, 0.0


def pickles(tmp: Path) -> dict[str, Path]:
    """The crafted EDM pickles (S4, F10), written with tests/test_hostile_files.py's builders."""
    sys.path.insert(0, str(TESTS))
    edm_stand_ins()
    import test_hostile_files as h
    from test_edm_import import Persistent

    Persistent.module_src = "raise RuntimeError('module_src was executed')\n"  # the tests' fixture sets it there

    files = {"memo": h.MEMO_BOMB,
             "stride0": pickle.dumps({"ema": [h.tensor(h.storage_bytes(h.legacy_storage(torch.zeros(1))),
                                                       (2**16, 2**16), (0, 0)) for _ in range(20)]}),
             "deflated": pickle.dumps({"ema": h.storage_bytes(h.deflated_torch_file(torch.zeros(2**24)))}),
             "dag": pickle.dumps(h.edm_root(h.dag_tree(20))),
             "code": pickle.dumps({"ema": h.Reduce(os.system, "touch " + str(tmp / "pwned"))})}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp / f"{name}.pkl"
        paths[name].write_bytes(data)
    return paths


def json_pixel_folder(tmp: Path, name: str, **unet) -> Path:
    sys.path.insert(0, str(TESTS))
    from test_hostile_files import pixel_folder_json

    return pixel_folder_json(tmp / name, unet=unet)


def cases(tmp: Path):
    run = tmp / "run"
    yield "a finished run (set-up)", "0", lambda: cli("train", "--out", str(run), *SMALL, "--steps", "30",
                                                      "--ckpt-every", "10")
    files = pickles(tmp)
    pipe = latent_folder(tmp)
    (tmp / "prompts.txt").write_text("a cat\n")
    yield "S1 auto_map tokenizer and text encoder, 'y' piped to stdin", "0, the folder's code never runs", \
        lambda: with_marker(cli("train", "--teacher", str(pipe), "--prompts", str(tmp / "prompts.txt"), "--out",
                                str(tmp / "s1"), *SMALL, "--steps", "1", "--batch", "2", stdin="y\n" * 100),
                            tmp / "folder_code_ran")
    writer = writer_file(tmp)
    victim = tmp / "victim-s2"
    yield "S2 --inception <TorchScript that writes a file>: fid ref", "2, victim intact", \
        lambda: with_victim(lambda: cli("fid", "ref", str(tmp), str(tmp / "o.npz"), "--inception", str(writer)),
                            victim, b"safe", 0o644)
    yield "S2 --inception <the same>: train --preset digits", "2, victim intact", \
        lambda: with_victim(lambda: cli("train", "--preset", "digits", "--inception", str(writer), "--out",
                                        str(tmp / "s2"), "--steps", "1", "--quiet"), victim, b"safe", 0o644)
    yield f"S3 torch {torch.__version__}: user torch files", "read as data, never torch.load", \
        lambda: cli("edm_import", str(files["code"]), str(tmp / "o.safetensors"))
    for name, what in (("memo", "9-byte pickle, memo index 2^27"), ("stride0", "stride-0 tensors (20 x 16 GiB)"),
                       ("deflated", "a deflated record (64 MiB inflated)"), ("dag", "module DAG, 2^20 paths")):
        yield f"S4 {what} ({files[name].stat().st_size} bytes)", "2 within seconds, small", \
            lambda n=name: cli("edm_import", str(files[n]), str(tmp / "o.safetensors"))
    for part in ("scheduler/scheduler_config.json", "vae/config.json"):
        broken = tmp / f"zero-{part.split('/')[0]}"
        shutil.copytree(pipe, broken)
        (broken / part).unlink()
        (broken / part).symlink_to("/dev/zero")
        yield f"S4 {part} -> /dev/zero", "2 at once", \
            lambda b=broken: cli("train", "--teacher", str(b), "--prompts", str(tmp / "prompts.txt"), "--out",
                                 str(tmp / "zero"), *SMALL, timeout=120)
    for name in (".lock", "metrics.jsonl", "metrics.jsonl.tmp", "config.json.tmp", "summary.json.tmp",
                 "samples/final.png"):
        yield f"S5 planted link {name}", "2, victim intact (content, mode 0600)", lambda n=name: planted(tmp, n)
    fifo_run = tmp / "fifo-run"
    shutil.copytree(run, fifo_run)
    newest = sorted((fifo_run / "checkpoints").glob("step_*.json"))[-1]
    newest.unlink()
    os.mkfifo(newest)
    os.mkfifo(tmp / "fifo.json")
    yield "S6 FIFO named checkpoints/step_*.json, --resume", "2 at once", \
        lambda: cli("train", "--out", str(fifo_run), "--resume", "--steps", "40", "--quiet", timeout=120)
    yield "S6 --resume-from FIFO", "2 at once", \
        lambda: cli("train", "--out", str(run), "--resume-from", str(tmp / "fifo.json"), "--quiet", timeout=120)
    fifo_weights, zero_weights = json_pixel_folder(tmp, "fifo-w"), json_pixel_folder(tmp, "zero-w")
    for folder, make in ((fifo_weights, os.mkfifo), (zero_weights, lambda p: p.symlink_to("/dev/zero"))):
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        make(folder / "diffusion_pytorch_model.safetensors")
    yield "S6 diffusers weights a FIFO", "2 at once", \
        lambda: cli("train", "--teacher", str(fifo_weights), "--out", str(tmp / "f"), *SMALL, timeout=120)
    yield "S6 diffusers weights -> /dev/zero", "2 at once", \
        lambda: cli("train", "--teacher", str(zero_weights), "--out", str(tmp / "f"), *SMALL, timeout=120)
    yield "D1 race: A made the directory, B locks and trains first", "A: 2, B's run intact", \
        lambda: race(tmp, "config.json", "100000")
    yield "D1 race: widened until B finished its whole run", "A: 2, B's run intact", \
        lambda: race(tmp, "summary.json", "2")
    src = tmp / "src.pkl"
    src.write_bytes(b"precious")
    os.chmod(src, 0o600)
    yield "D2 edm_import SRC SRC", "2, SRC intact", \
        lambda: with_victim(lambda: cli("edm_import", str(src), str(src)), src, b"precious", 0o600)
    for sig, delay in ((signal.SIGINT, 0.2), (signal.SIGTERM, 0.5), (signal.SIGUSR1, 1.0), (signal.SIGINT, 1.5)):
        yield f"F7 {sig.name} {delay} s after start", f"{128 + sig}, one line", \
            lambda s=sig, d=delay: signal_at(tmp, s, d)
    yield "F8 1 kB free disk, --teacher-fit-steps 3000", "2 before the fit (seconds)", lambda: cli(
        "", argv=["-c", "import shutil, sys; real = shutil.disk_usage; shutil.disk_usage = lambda p: "
                        "real(p)._replace(free=1000); from emd_fast import train; sys.exit(train.main(sys.argv[1:]))",
                  "--out", str(tmp / "f8"), *SMALL, "--teacher-fit-steps", "3000"])
    yield from f9_f10(tmp, run, pipe)


def f9_f10(tmp: Path, run: Path, pipe: Path):
    out = ["--out", str(tmp / "r"), *SMALL, "--steps", "1"]
    for args in (["--K", "1000000"], ["--gamma-z", "nan", "--variant", "eps"], ["--guidance-scale", "nan"],
                 ["--device", "cpu:5"], ["--inception", str(tmp / "prompts.txt")],
                 ["--fid-ref", str(tmp / "prompts.txt"), "--inception", str(tmp / "prompts.txt")]):
        yield f"F9 train {' '.join(args).replace(str(tmp), '<tmp>')}", "2", lambda a=args: cli("train", *out, *a)
    yield "F9 --resume --steps 5 on a run at step 30", "0, one-line note", \
        lambda: cli("train", "--out", str(run), "--resume", "--steps", "5")
    yield "F9 sample --seed -1", "2", lambda: cli("sample", str(run), "--seed", "-1")
    yield "F9 pretrain --seed -1", "2", lambda: cli("pretrain", "--seed", "-1", "--out", str(tmp / "p"))
    yield "F9 sample --uint8 on 2-D data", "2", lambda: cli("sample", str(run), "--uint8", "--out", str(tmp / "u.npz"))
    tiny = {"means": [[0, 0], [1, 1]], "weights": [0.5, 0.5], "variances": [1e-300, 1.0]}
    (tmp / "tiny.json").write_text(json.dumps(tiny))
    n = 10**5
    (tmp / "modes.json").write_text(json.dumps({"means": [[i, 0] for i in range(n)], "weights": [1 / n] * n,
                                                "variances": [1.0] * n}))
    for name, what in (("tiny", "variances 1e-300"), ("modes", "10^5 modes")):
        yield f"F9 a mixture with {what}", "2", lambda m=name: cli("train", "--mixture", str(tmp / f"{m}.json"), *out)
    (tmp / "many.txt").write_text("a cat\n" * 10**5)
    sd = tmp / "sd-dims"
    shutil.copytree(pipe, sd)
    config = json.loads((sd / "text_encoder" / "config.json").read_text())
    (sd / "text_encoder" / "config.json").write_text(json.dumps(config | {"hidden_size": 768,
                                                                          "max_position_embeddings": 77}))
    unet = json.loads((sd / "unet" / "config.json").read_text())  # the UNet takes that width (checked from JSON)
    (sd / "unet" / "config.json").write_text(json.dumps(unet | {"cross_attention_dim": 768}))
    yield "F9 10^5 prompts, SD-1.5's 77 x 768 embeddings (23.7 GB)", "2 unless a quarter of RAM holds them", \
        lambda: cli("train", "--teacher", str(sd), "--prompts", str(tmp / "many.txt"), *out)
    with open(tmp / "big.txt", "w") as f:
        f.truncate(100 << 20)
    yield "F9 a 100 MB prompt file", "2", \
        lambda: cli("train", "--teacher", str(pipe), "--prompts", str(tmp / "big.txt"), *out)
    sys.path.insert(0, str(TESTS))
    import test_hostile_files as h

    cycle = tmp / "cycle.pkl"
    torch.nn.modules.container.ModuleDict, saved = h.SelfContaining, torch.nn.modules.container.ModuleDict
    h.SelfContaining.__module__, h.SelfContaining.__qualname__ = "torch.nn.modules.container", "ModuleDict"
    cycle.write_bytes(pickle.dumps(h.edm_root(h.SelfContaining())))
    torch.nn.modules.container.ModuleDict = saved
    yield "F10 a pickle cycle", "2", lambda: cli("edm_import", str(cycle), str(tmp / "o.safetensors"))
    yield from f10_files(tmp, h)
    yield "F10 sample --seed 1e23", "2, one line", lambda: cli("sample", str(run), "--seed", str(10**23))
    yield "F10 a 2000-deep --out (4 kB, within PATH_MAX)", "0, a run", \
        lambda: cli("train", "--out", str(tmp / ("a/" * 2000)), *SMALL, "--steps", "1")
    yield "F10 a 3000-deep --out (6 kB, past PATH_MAX)", "2, one line", \
        lambda: cli("train", "--out", str(tmp / ("a/" * 3000)), *SMALL, "--steps", "1")
    os.mkfifo(tmp / "m.json")
    yield "F10 --mixture <a FIFO>", "2, names what it is", lambda: cli("train", "--mixture", str(tmp / "m.json"), *out)
    bad_ref = tmp / "ref-run"
    shutil.copytree(run, bad_ref)
    newest = sorted((bad_ref / "checkpoints").glob("step_*.json"))[-1]
    record = json.loads(newest.read_text()) | {"tensors_file": "../config.json"}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from emd_fast.training.checkpoint import _state_hash

    record["state_sha256"] = _state_hash(record)
    newest.write_text(json.dumps(record))
    yield "F10 a checkpoint naming ../config.json", "2, says so", \
        lambda: cli("train", "--out", str(bad_ref), "--resume-from", str(newest), "--steps", "40")
    yield "F10 no space left (file size capped at 20 kB)", "2, names the file", \
        lambda: cli("train", "--out", str(tmp / "full"), *SMALL, "--steps", "30", "--ckpt-every", "10",
                    limit_file_size=20_000)
    yield "F10 sample RUN/metrics.jsonl", "2, not a checkpoint", lambda: cli("sample", str(run / "metrics.jsonl"))
    yield "F10 --K 2.5", "2, one line", lambda: cli("train", *out, "--K", "2.5")


def f10_files(tmp: Path, h):
    """F10's teacher files: safetensors metadata, diffusers configs, a mixture nested 100k deep, a hostile .bin."""
    sys.path.insert(0, str(TESTS))
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_unet import random_song

    from emd_fast.teachers.network_file import save_network

    good = tmp / "song.safetensors"
    save_network(random_song(), good, "song")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    arch = json.loads(meta["arch"])
    for name, value in (("arch []", "[]"), ("arch nested 100k deep", "[" * 100_000 + "]" * 100_000),
                        ("negative channels", json.dumps(arch | {"model_channels": -16}))):
        path = tmp / f"meta-{name.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path), metadata=meta | {"arch": value})
        yield f"F10 safetensors {name}", "2", lambda p=path: cli("train", "--teacher", str(p), "--out",
                                                                 str(tmp / "r"), *SMALL, "--steps", "1")
    for key, value in (("quantization_config", {"quant_method": "bitsandbytes"}), ("norm_num_groups", 0),
                       ("layers_per_block", -1), ("sample_size", -8)):
        folder = json_pixel_folder(tmp, f"bad-{key}", **{key: value})
        yield f"F10 diffusers {key} {value}", "2", lambda f=folder: cli("train", "--teacher", str(f), "--out",
                                                                        str(tmp / "r"), *SMALL, "--steps", "1")
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    yield "F10 a mixture JSON nested 100k deep", "2", \
        lambda: cli("train", "--mixture", str(tmp / "deep.json"), "--out", str(tmp / "r"), *SMALL)
    pipe = tmp / "bin-pipe"
    shutil.copytree(tmp / "latent", pipe)
    text = pipe / "text_encoder"
    for f in text.glob("model*.safetensors"):
        f.unlink()
    buf = io.BytesIO()
    torch.save(OrderedDict(w=h.Reduce(os.system, "touch " + str(tmp / "pwned-bin"))), buf)
    (text / "pytorch_model.bin").write_bytes(buf.getvalue())
    yield "F10 a text encoder .bin that is a code pickle", "2, nothing runs", \
        lambda: with_marker(cli("train", "--teacher", str(pipe), "--prompts", str(tmp / "prompts.txt"), "--out",
                                str(tmp / "r"), *SMALL), tmp / "pwned-bin")


def with_marker(result, marker: Path):
    code, line, seconds, peak = result
    return code, f"{line}; code ran: {marker.exists()}", seconds, peak


def latent_folder(tmp: Path) -> Path:
    """test_diffusers' tiny Stable-Diffusion-style pipeline, its tokenizer and text encoder pointing (auto_map) at
    Python files of the folder that would leave a marker if they ever ran."""
    sys.path.insert(0, str(TESTS))
    from diffusers_models import latent_pipeline

    folder = latent_pipeline(tmp / "latent")
    code = f"import pathlib\npathlib.Path({str(tmp / 'folder_code_ran')!r}).touch()\nclass Evil: pass\n"
    for part, key in (("tokenizer", "AutoTokenizer"), ("text_encoder", "AutoModel")):
        (folder / part / "evil.py").write_text(code)
        config = folder / part / ("tokenizer_config.json" if part == "tokenizer" else "config.json")
        cfg = json.loads(config.read_text())
        config.write_text(json.dumps(cfg | {"auto_map": {key: ["evil.Evil", None] if part == "tokenizer" else
                                                         "evil.Evil"}}))
    return folder


def writer_file(tmp: Path) -> Path:
    """test_security's TorchScript archive whose loading overwrites tmp/victim-s2."""
    source = (TESTS / "test_security.py").read_text().split("WRITER = '''")[1].split("'''")[0]
    (tmp / "writer.py").write_text(source)
    sys.path.insert(0, str(tmp))
    from writer import Writer

    victim = tmp / "victim-s2"
    victim.write_bytes(b"safe")
    os.chmod(victim, 0o644)
    path = tmp / "writer.pt"
    torch.jit.script(Writer(str(victim))).save(str(path))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: print only)")
    print_table(cases, p.parse_args().out, peak=True)


if __name__ == "__main__":
    main()
