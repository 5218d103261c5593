"""Hostile files for every reader: crafted pickles and torch files, and a fuzz of the configs and metadata of every
teacher format (EDM pickles, our safetensors, diffusers folders, mixture files). Each is refused with one line (exit 2
in the commands) or read correctly, within seconds and without a large allocation (the address space is capped with
RLIMIT_AS while it is read); nothing in any of them runs. Files are built here: nothing is downloaded."""
import contextlib
import copyreg
import io
import json
import math
import pickle
import random
import resource
import signal
import struct
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_edm_import import Persistent, edm_globals, write_edm_pickle  # noqa: F401 (edm_globals: a fixture)
from test_unet import random_song

from emd_fast import edm_import, train
from emd_fast.checks import meminfo_bytes
from emd_fast.errors import CheckpointError
from emd_fast.safe_pickle import load_torch_file
from emd_fast.teachers.edm_pickle import load_edm_pickle
from emd_fast.teachers.mixture import MixtureError, load_mixture
from emd_fast.teachers.network_file import load_network, save_network

CAP = 768 << 20  # address space a refusal may add: far below what the bombs ask for (GBs)
SMALL = ["--teacher-fit-steps", "2", "--batch", "8", "--hidden", "8", "--depth", "1", "--eval-every", "0",
         "--eval-samples", "50", "--quiet", "--device", "cpu", "--phase-every", "0", "--steps", "1"]


@contextlib.contextmanager
def bounded(extra: int = CAP, seconds: int = 30):
    """The block runs with the address space capped at its size now + ``extra`` and must end within ``seconds``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = meminfo_bytes("/proc/self/status", "VmSize:")

    def too_long(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def refused(fn, *args, match: str = ""):
    """fn(*args) raises one line (CheckpointError / ValueError), bounded; returns the message."""
    with bounded(), pytest.raises((CheckpointError, ValueError), match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def one_line_exit_2(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


# --- crafted pickles ----------------------------------------------------------------------------------------------

class Reduce:
    """Pickles as fn(*args)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def storage_bytes(payload: bytes):
    """What a torch storage pickles as: torch.storage._load_from_bytes(payload)."""
    return Reduce(torch.storage._load_from_bytes, payload)


def legacy_storage(values: torch.Tensor) -> bytes:
    """The legacy torch record a float tensor's storage pickles with."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated: it is what such pickles hold
        torch.save(values.storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def tensor(storage, size, stride, offset=0):
    return Reduce(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, OrderedDict())


MEMO_BOMB = b"\x80\x02Nr" + struct.pack("<I", 2**27) + b"."  # 9 bytes: memo index 2^27 (C unpickler: 2.3 GB)


def deflated_torch_file(values: torch.Tensor) -> bytes:
    """torch.save's zip format with its storage record compressed (a zip bomb's shape: the record's size is not the
    bytes the file holds)."""
    plain, out = io.BytesIO(), io.BytesIO()
    torch.save(values, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    return out.getvalue()


def huge_length_header() -> bytes:
    """A legacy storage record whose length header claims 2^40 elements (the old loader allocated that first)."""
    data = legacy_storage(torch.zeros(1))
    return data[:-12] + struct.pack("<q", 2**40) + data[-4:]


def dag_tree(levels: int):
    """Modules whose every level holds the next one twice: 2^levels paths through a small pickle."""
    node = Persistent("Linear", dict(_parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict()))
    for _ in range(levels):
        node = Persistent("UNetBlock", dict(_parameters=OrderedDict(), _buffers=OrderedDict(),
                                            _modules=OrderedDict(a=node, b=node)))
    return node


def edm_root(model):
    return {"ema": Persistent("EDMPrecond", dict(_init_kwargs=dict(img_resolution=8, img_channels=1), _init_args=(),
                                                 _parameters=OrderedDict(), _buffers=OrderedDict(),
                                                 _modules=OrderedDict(model=model)))}


def chain(depth: int):
    node = None
    for _ in range(depth):
        node = Persistent("UNetBlock", dict(_modules=OrderedDict(x=node) if node else OrderedDict()))
    return node


class SelfContaining:
    """A torch.nn.ModuleDict (as pickled) whose modules include itself: a cycle."""

    def __reduce__(self):  # as torch pickles a module: NEWOBJ, then its state
        return copyreg.__newobj__, (type(self),), {"_modules": {"me": self}}


def nested_list(depth: int) -> bytes:
    """{'ema': [[[...]]]} nested ``depth`` deep, as raw opcodes (pickle.dumps would recurse)."""
    return b"\x80\x02}X\x03\x00\x00\x00ema" + b"]" * depth + b"a" * (depth - 1) + b"s."


HOSTILE_PICKLES = {  # name -> (pickle bytes or a function of edm_globals' stand-ins, what the refusal names)
    "code": (lambda: pickle.dumps({"ema": Reduce(eval, "1 + 1")}), "refuses global builtins.eval"),
    "memo": (lambda: MEMO_BOMB, "memo index 134217728"),
    "memo in a storage": (lambda: pickle.dumps({"ema": tensor(storage_bytes(MEMO_BOMB), (1,), (1,))}), "memo index"),
    "stride 0": (lambda: pickle.dumps({"ema": tensor(storage_bytes(legacy_storage(torch.zeros(1))), (2**17, 2**17),
                                                     (0, 0))}), "overlap"),
    "overlapping": (lambda: pickle.dumps({"ema": tensor(storage_bytes(legacy_storage(torch.zeros(64))), (2**20, 8),
                                                        (1, 1))}), "overlap"),
    "past its storage": (lambda: pickle.dumps({"ema": tensor(storage_bytes(legacy_storage(torch.zeros(4))), (5,),
                                                             (1,))}), "reaches past its storage"),
    "deflated record": (lambda: pickle.dumps({"ema": storage_bytes(deflated_torch_file(torch.zeros(2**18)))}),
                        "no legacy magic"),
    "length header": (lambda: pickle.dumps({"ema": storage_bytes(huge_length_header())}), "length header"),
    "DAG": (lambda: pickle.dumps(edm_root(dag_tree(20))), "appears twice"),
    "cycle": (lambda: pickle.dumps(edm_root(SelfContaining())), "appears twice"),
    "deep modules": (lambda: pickle.dumps(edm_root(chain(100))), "nested more than"),
    "deep list": (lambda: nested_list(100_000), "nested more than 64 deep"),
    "truncated": (lambda: pickle.dumps(edm_root(dag_tree(2)))[:-40], "not a readable EDM network pickle"),
}


@pytest.mark.parametrize("name", HOSTILE_PICKLES)
def test_hostile_edm_pickles_are_refused_fast_and_small(name, request, tmp_path, capsys, monkeypatch):
    """Each refused by the reader (one line, bounded) and by edm_import (exit 2, one line); nothing executed."""
    executed = request.getfixturevalue("edm_globals")  # what would appear if a pickle's module_src ran
    make, message = HOSTILE_PICKLES[name]
    if name == "cycle":  # pickle writes the stand-in under ModuleDict's name
        monkeypatch.setattr(torch.nn.modules.container, "ModuleDict", SelfContaining)
        SelfContaining.__module__, SelfContaining.__qualname__ = "torch.nn.modules.container", "ModuleDict"
    pkl = tmp_path / "hostile.pkl"
    pkl.write_bytes(make())
    monkeypatch.undo()
    t0 = time.perf_counter()
    refused(load_edm_pickle, pkl, match=message)
    with bounded():
        one_line_exit_2(capsys, edm_import.main([str(pkl), str(tmp_path / "out.safetensors")]))
    assert time.perf_counter() - t0 < 20 and not executed.exists() and not (tmp_path / "out.safetensors").exists()


def test_torch_files_read_as_data_refuse_the_same_bombs(tmp_path):
    """load_torch_file (Inception weights, state dicts): the memo bomb, a deflated record, a stride-0 view, code."""
    (tmp_path / "memo.pt").write_bytes(MEMO_BOMB)
    (tmp_path / "deflated.pt").write_bytes(deflated_torch_file(torch.zeros(2**20)))
    torch.save(Reduce(eval, "1"), tmp_path / "code.pt")
    big = torch.zeros(1).expand(2**16, 2**16)  # torch.save keeps the stride-0 view: one element of storage
    torch.save({"w": big}, tmp_path / "stride0.pt")
    for name, message in (("memo.pt", "memo index"), ("deflated.pt", "compressed"), ("code.pt", "refuses global"),
                          ("stride0.pt", "overlap")):
        refused(load_torch_file, tmp_path / name, "weights", match=message)


def test_legitimate_views_and_legacy_files_still_read(tmp_path):
    """Transposed and offset views, parameters, the legacy format: read as torch reads them."""
    base = torch.arange(24.0).reshape(4, 6)
    state = OrderedDict(t=base.t(), part=base[1:, 2:], p=torch.nn.Parameter(torch.ones(3)), i=torch.arange(5))
    for legacy in (False, True):
        path = tmp_path / f"sd{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        with bounded():
            got = load_torch_file(path, "weights")
        assert all(torch.equal(got[k], v) for k, v in state.items())


# --- fuzz: configs and metadata of every teacher format ----------------------------------------------------------

STRANGE = [-1, 0, 2**40, 1e308, math.nan, math.inf, "x" * 50, None, [], [[[1]]], {"a": {"b": 1}}, True, [1] * 100,
           "", 3.5]


def mutations(keys, n: int, seed: int):
    """n (key, value) pairs drawn from keys x STRANGE with a fixed seed."""
    rng = random.Random(seed)
    pairs = [(k, v) for k in keys for v in STRANGE]
    return rng.sample(pairs, min(n, len(pairs)))


@pytest.fixture(scope="module")
def song():
    return random_song()


def test_fuzz_edm_pickle_arguments(song, request, tmp_path):
    """An EDM pickle whose recorded constructor arguments are mutated: converted (a valid value) or refused in one
    line, bounded, never an unexpected exception."""
    executed = request.getfixturevalue("edm_globals")
    keys = ["img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult", "num_blocks",
            "attn_resolutions", "dropout", "embedding_type", "channel_mult_noise", "encoder_type", "resample_filter",
            "sigma_min", "sigma_data", "model_type", "augment_dim"]
    outcomes = set()
    for i, (key, value) in enumerate(mutations(keys, 36, seed=0)):
        pkl = write_edm_pickle(song, tmp_path / f"m{i}.pkl",
                               lambda root, k=key, v=value: root.state["_init_kwargs"].update({k: v}))
        try:
            with bounded():
                load_edm_pickle(pkl)
            outcomes.add("converted")
        except (CheckpointError, ValueError) as e:
            assert "\n" not in str(e), (key, value, str(e))
            outcomes.add("refused")
    assert "refused" in outcomes and not executed.exists()


def test_fuzz_safetensors_metadata(song, tmp_path):
    good = tmp_path / "good.safetensors"
    save_network(song, good, "song")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    arch = json.loads(meta["arch"])
    cases = [{"arch": json.dumps(arch | {k: v})} for k, v in mutations(arch, 30, seed=1)]
    cases += [{"arch": "[]"}, {"arch": "[" * 100_000}, {"arch": "[" * 50 + "]" * 50}, {"arch": "{"},
              {"schedule": "[]"}, {"schedule": json.dumps({"name": "edm", "t_min": "x"})}, {"arch": "null"},
              {"arch": json.dumps(arch | {"model_channels": -4})}, {"arch": json.dumps(arch | {"img_channels": 0})}]
    for i, change in enumerate(cases):
        path = tmp_path / f"m{i}.safetensors"
        save_file(tensors, str(path), metadata={**meta, **change})
        try:
            with bounded():
                load_network(path)
        except CheckpointError as e:
            assert "\n" not in str(e), (change, str(e))


def mixture(**arrays):
    base = dict(means=[[0.0, 0.0], [3.0, 0.0]], weights=[0.5, 0.5], variances=[0.1, 0.2])
    return {k: v for k, v in (base | arrays).items() if v is not ...}


def test_fuzz_mixture_files(tmp_path, capsys):
    """Mutated mixture JSON/npz files: refused with a MixtureError (one line), bounded; a few through the CLI."""
    schedule = __import__("emd_fast.schedules", fromlist=["VPCosine"]).VPCosine()
    cases = [mixture(**{k: v}) for k, v in mutations(["means", "weights", "variances"], 30, seed=2)]
    cases += [mixture(variances=[1e-300, 1.0]), mixture(covs=[[[1, 0], [0, 1]]] * 2, variances=...),
              mixture(means=[[1e200, 0], [0, 0]]), mixture(means=[[0, 0], [1]]), mixture(weights=[1.0, 0.0])]
    paths = []
    for i, spec in enumerate(cases):
        paths.append(tmp_path / f"m{i}.json")
        paths[-1].write_text(json.dumps(spec))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    np.savez(tmp_path / "modes.npz", means=np.zeros((10_001, 1)), weights=np.full(10_001, 1 / 10_001),
             variances=np.ones(10_001))
    paths += [tmp_path / "deep.json", tmp_path / "modes.npz"]
    for path in paths:
        try:
            with bounded():
                load_mixture(path, schedule)
        except MixtureError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
    for path in (tmp_path / "deep.json", tmp_path / "m30.json", tmp_path / "modes.npz"):
        one_line_exit_2(capsys, train.main(["--mixture", str(path), "--out", str(tmp_path / "run"), *SMALL]))
    assert not (tmp_path / "run").exists()


def pixel_folder_json(path: Path, unet: dict | None = None, scheduler: dict | None = None) -> Path:
    """A UNet2DModel folder with config.json, scheduler_config.json and a weights file that is not one: the JSON
    alone decides the refusals."""
    path.mkdir(parents=True, exist_ok=True)
    base = dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D"])
    (path / "config.json").write_text(json.dumps(base | (unet or {})))
    (path / "scheduler_config.json").write_text(json.dumps(dict(_class_name="DDPMScheduler",
                                                                num_train_timesteps=1000) | (scheduler or {})))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    return path


def test_fuzz_diffusers_folder_configs(tmp_path, capsys):
    """Mutated UNet and scheduler configs (and whole files that are not objects, too deep or too large): exit 2 in one
    line from train, bounded; none reaches a traceback."""
    unet_keys = ["sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups",
                 "block_out_channels", "_class_name", "time_embedding_type", "num_class_embeds", "quantization_config"]
    sched_keys = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "trained_betas", "_class_name", "timestep_type"]
    folders = [pixel_folder_json(tmp_path / f"u{i}", unet={k: v}) for i, (k, v) in
               enumerate(mutations(unet_keys, 16, seed=3))]
    folders += [pixel_folder_json(tmp_path / f"s{i}", scheduler={k: v}) for i, (k, v) in
                enumerate(mutations(sched_keys, 12, seed=4))]
    folders += [pixel_folder_json(tmp_path / "steps", scheduler={"num_train_timesteps": 10**9}),
                pixel_folder_json(tmp_path / "groups", unet={"norm_num_groups": 0}),
                pixel_folder_json(tmp_path / "layers", unet={"layers_per_block": -1}),
                pixel_folder_json(tmp_path / "size", unet={"sample_size": -8})]
    for name, text in (("list", "[]"), ("deep", "[" * 100_000), ("garbage", "\x00\xff")):
        folders.append(pixel_folder_json(tmp_path / name))
        (folders[-1] / "config.json").write_text(text, errors="surrogateescape")
    for name, index in (("index_list", []), ("index_number", {"unet": 5, "scheduler": ["x", "y"]}),
                        ("index_deep", {"unet": [[[["UNet2DModel"]]]]})):
        folders.append(tmp_path / name)
        pixel_folder_json(folders[-1] / "unet")
        (folders[-1] / "scheduler").mkdir()
        (folders[-1] / "model_index.json").write_text(json.dumps(index))
    big = pixel_folder_json(tmp_path / "big")
    with open(big / "scheduler_config.json", "r+") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that read as NUL bytes
    folders.append(big)
    for i, folder in enumerate(folders):
        with bounded(seconds=60):
            code = train.main(["--teacher", str(folder), "--out", str(tmp_path / f"run{i}"), *SMALL])
        one_line_exit_2(capsys, code)


def test_input_file_hashes_are_reused_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """sha256_file(reuse=True) reads a file once per process while it is unchanged (a run's set-up names its teacher
    file in several places), reads it again once it changed, and a plain call (checkpoint checks) always reads."""
    import hashlib
    import os
    import time
    import types

    from emd_fast import files

    made = []
    monkeypatch.setattr(files, "hashlib", types.SimpleNamespace(sha256=lambda: made.append(1) or hashlib.sha256()))
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(os.urandom(3000))
    first = files.sha256_file(path, reuse=True)
    assert files.sha256_file(path, reuse=True) == first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(made) == 1
    assert files.sha256_file(path) == first and len(made) == 2
    time.sleep(0.05)  # past the file system's time granularity
    path.write_bytes(os.urandom(3000))  # the same size, new content
    assert files.sha256_file(path, reuse=True) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    assert len(made) == 3
