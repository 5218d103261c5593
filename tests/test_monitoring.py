"""Seeing a run: TensorBoard and W&B mirrors of metrics.jsonl (read back with their own readers, across a resume),
progress output, the cost in summary.json, the cached reference samples, the report command."""
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from emd_fast import progress, report, train
from emd_fast.evaluation import reference
from emd_fast.training.distiller import Distiller

SMALL = ["--teacher-fit-steps", "20", "--batch", "32", "--hidden", "16", "--depth", "1", "--eval-every", "3",
         "--eval-samples", "200", "--ckpt-every", "4", "--K", "2", "--quiet", "--device", "cpu", "--phase-every", "0"]
DIGITS = ["--preset", "digits", "--steps", "2", "--batch", "8", "--K", "1", "--eval-every", "2", "--eval-samples",
          "20", "--ckpt-every", "1", "--quiet", "--device", "cpu", "--phase-every", "0"]


def run(out, *extra):
    return train.main(["--out", str(out), *SMALL, *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- readers: TensorBoard's own, and the record format of W&B's run files ---------------------------------------

def tensorboard(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def wandb_records(path):
    """The records of a W&B run file (.wandb): W&B's leveldb-style log (a 7-byte header ':W&B', 0xBEE1, version 0;
    32 KiB blocks of records with a CRC-32, a length and a full/first/middle/last type), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(out):
    """{step: {key: value}} over every offline W&B run file of the run, oldest first, and the run ids; a step that
    two files hold is an error (a duplicate point)."""
    rows, ids = {}, set()
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "run":
                ids.add(record.run.run_id)
            if record.WhichOneof("record_type") == "history":
                row = {}
                for item in record.history.item:  # a media value comes as items under nested keys
                    *path, last = list(item.nested_key) or [item.key]
                    node = row
                    for key in path:
                        node = node.setdefault(key, {})
                    node[last] = json.loads(item.value_json)
                step = row.pop("_step")
                assert step not in rows, f"step {step} logged twice"
                rows[step] = row
    return rows, ids


# --- loggers -------------------------------------------------------------------------------------------------------

def test_loggers_mirror_the_log_and_a_killed_run_resumes_the_same_curves(tmp_path, monkeypatch):
    """A run dies at step 7 (its log and loggers at step 6, its checkpoint at 4) and resumes: TensorBoard purges
    steps 5-6 and gets them again, W&B keeps them and is not given them twice; both end equal to an undisturbed
    run's metrics.jsonl, step for step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(straight, "--steps", "10") == 0
    real_step = Distiller.step

    def dies(self):
        if self.step_count == 6:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", dies)
    assert run(broken, "--steps", "10", "--log", "tensorboard", "wandb", "--plot-every", "3") == 1
    monkeypatch.setattr(Distiller, "step", real_step)
    assert json.loads((broken / "loggers.json").read_text())["wandb"]["step"] == 6
    assert run(broken, "--resume", "--steps", "10", "--log", "tensorboard", "wandb", "--plot-every", "3") == 0

    truth = {r["step"]: r for r in metrics(straight)}
    assert [r["step"] for r in metrics(broken)] == list(range(11))
    acc = tensorboard(broken)
    for key, name in (("loss_g", "loss/generator"), ("grad_s", "grad_norm/student"), ("mode_tv", "eval/mode_tv")):
        points = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in points] == [s for s in truth if key in truth[s]], name  # each step once, none missing
        assert all(v == pytest.approx(truth[s][key], rel=1e-6) for s, v in points), name
    assert [e.step for e in acc.Scalars("final/mode_tv")] == [10]
    assert acc.Scalars("lr/generator")[-1].value == pytest.approx(1e-4)
    assert all(e.value > 0 for e in acc.Scalars("speed/iters_per_s"))
    assert [e.step for e in acc.Images("plot")] == [3, 6, 9, 10]  # --plot-every 3 and the final plot
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert b'"K": 2' in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0]

    rows, ids = wandb_history(broken)
    assert len(ids) == 1 and len(list((broken / "wandb").glob("offline-run-*"))) == 2  # one run, resumed
    assert sorted(rows) == list(range(11))
    for step, row in rows.items():
        for key in ("loss_g", "loss_s", "mode_tv"):
            if key in truth[step]:
                assert row[{"loss_g": "loss/generator", "loss_s": "loss/student"}.get(key, f"eval/{key}")] == \
                    pytest.approx(truth[step][key], rel=1e-6)
    assert "final/mode_tv" in rows[10] and all("plot" in rows[s] for s in (3, 6, 9, 10))


def test_a_logger_added_on_resume_gets_the_log_so_far(tmp_path):
    out = tmp_path / "r"
    assert run(out, "--steps", "4") == 0
    assert run(out, "--resume", "--steps", "6", "--log", "tensorboard") == 0
    assert [e.step for e in tensorboard(out).Scalars("loss/student")] == [1, 2, 3, 4, 5, 6]


def test_a_missing_logger_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    assert run(tmp_path / "r", "--steps", "2", "--log", "wandb") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --log wandb need wandb") and "pip install" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_image_runs_log_sample_grids_with_their_classes_as_captions(tmp_path):
    out = tmp_path / "d"
    assert train.main(["--out", str(out), *DIGITS, "--log", "tensorboard"]) == 0
    acc = tensorboard(out)
    grids = acc.Images("samples")
    assert [e.step for e in grids] == [2] and (grids[0].width, grids[0].height) == (8 * 9 - 1, 3 * 9 - 1)
    captions = acc.Tensors("samples/captions/text_summary")[0].tensor_proto.string_val[0].decode()
    lines = captions.splitlines()  # the 20 samples' labels, in grid order
    assert len(lines) == 20 and all(re.fullmatch(rf"{i}\. class \d", line) for i, line in enumerate(lines))


def test_wandb_without_a_server_logs_offline_and_training_goes_on(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb").teardown()  # an earlier test's W&B session would keep its settings
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored W&B credentials: an online run cannot start
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    out = tmp_path / "r"
    assert run(out, "--steps", "3", "--log", "wandb") == 0
    assert "W&B: cannot start an online run" in capsys.readouterr().err
    rows, ids = wandb_history(out)
    assert sorted(rows) == [0, 1, 2, 3] and len(ids) == 1


def test_text_to_image_samples_are_logged_with_their_prompts(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers_models import SMALL as DIFFUSERS
    from diffusers_models import latent_pipeline, prompts_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    folder = latent_pipeline(tmp_path / "pipe")
    out = tmp_path / "r"
    assert train.main(["--out", str(out), *DIFFUSERS, "--steps", "2", "--teacher", str(folder), "--prompts",
                       str(prompts_file(tmp_path)), "--plot-every", "2", "--log", "wandb", "tensorboard"]) == 0
    rows, _ = wandb_history(out)
    captioned = rows[2]["samples/captioned"]
    assert captioned["_type"] == "images/separated" and captioned["count"] == 6  # --eval-samples 6
    assert set(captioned["captions"]) <= {"a cat", "a red dog"} and len(captioned["captions"]) == 6
    assert (captioned["width"], captioned["height"]) == (16, 16)  # decoded by the VAE: 3 x 16 x 16
    grid = tensorboard(out).Images("samples")[0]
    assert (grid.width, grid.height) == (8 * 17 - 1, 16)  # 8 columns of 16 px and 1 px gaps; 6 samples: one row


# --- cost and time -------------------------------------------------------------------------------------------------

def test_cost_covers_every_session_and_the_log_carries_the_times(tmp_path):
    out = tmp_path / "r"
    assert run(out, "--steps", "4") == 0
    first = json.loads((out / "summary.json").read_text())["cost"]
    assert run(out, "--resume", "--steps", "8") == 0
    cost = json.loads((out / "summary.json").read_text())["cost"]
    assert cost["sessions"] == 2 and first["sessions"] == 1
    assert cost["samples_seen"] == 8 * 32 and cost["processes"] == 1 and cost["device"] == "cpu"
    assert cost["train_s"] > first["train_s"] and cost["setup_s"] > first["setup_s"]
    assert cost["setup_s"] + cost["train_s"] + cost["evaluation_s"] == pytest.approx(cost["wall_s"], abs=0.02)
    assert cost["device_hours"] == pytest.approx(cost["wall_s"] / 3600, abs=1e-4)
    assert sum(cost["device_hours_by_phase"].values()) == pytest.approx(cost["device_hours"], abs=3e-4)
    assert cost["iters_per_s"]["training"] == pytest.approx(8 / cost["train_s"], rel=0.01)
    times = [r["time_s"] for r in metrics(out)]
    walls = [r["wall_s"] for r in metrics(out)]
    assert times == sorted(times) and walls == sorted(walls) and times[-1] <= cost["train_s"] + 0.01
    assert all(t <= w for t, w in zip(times, walls))


# --- progress ------------------------------------------------------------------------------------------------------

def test_quiet_runs_print_summary_lines_and_terminals_get_one_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    assert run(tmp_path / "quiet", "--steps", "3") == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and lines[0].startswith("EMD: 1/3 it (33%)") and "left" in lines[0]
    assert lines[-1].startswith("EMD: 3/3 it (100%)") and " in " in lines[-1]
    assert any("loss_g" in line for line in lines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # a terminal, no --quiet: the bar
    assert train.main(["--out", str(tmp_path / "bar"), *[a for a in SMALL if a != "--quiet"], "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "3/3" in err and "it (" not in err


def test_progress_modes():
    bar = progress.Progress(4, "work", bar=True)
    assert bar.bar is not None
    bar.close()
    silent = progress.Progress(4, "work", enabled=False, every_s=0.0)
    silent.update(4)
    assert silent.lines == 0


# --- the teacher's reference samples -------------------------------------------------------------------------------

def counting_sampler(monkeypatch):
    calls = []
    real = reference.heun_sample

    def counted(*args, **kwargs):
        calls.append(args[2].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "heun_sample", counted)
    return calls


def test_reference_samples_are_drawn_once_per_teacher_seed_and_count(tmp_path, monkeypatch):
    monkeypatch.setenv("EMD_FAST_CACHE", str(tmp_path / "cache"))
    calls = counting_sampler(monkeypatch)
    a, b = tmp_path / "a", tmp_path / "b"
    assert train.main(["--out", str(a), *DIGITS]) == 0
    assert calls == [20, 20]  # fd_teacher's reference and the floor's independent set
    assert train.main(["--out", str(b), *DIGITS]) == 0  # a second run of the same teacher
    assert train.main(["--out", str(a), *DIGITS, "--resume", "--steps", "3"]) == 0  # a resume
    assert calls == [20, 20]
    assert json.loads((a / "summary.json").read_text())["exact_sample_floor"] == \
        json.loads((b / "summary.json").read_text())["exact_sample_floor"]
    assert train.main(["--out", str(tmp_path / "c"), *DIGITS, "--seed", "10"]) == 0  # another seed: drawn
    assert calls == [20, 20, 20, 20]


def test_reference_cache_is_checked_and_can_be_turned_off(tmp_path, monkeypatch):
    from emd_fast.problems.digits import DigitsProblem
    from emd_fast.schedules import EDMSchedule

    monkeypatch.setenv("EMD_FAST_CACHE", str(tmp_path / "cache"))
    calls = counting_sampler(monkeypatch)
    teacher = DigitsProblem(EDMSchedule(), {"seed": 0, "eval_samples": 4}).teacher
    y = torch.arange(5) % 10
    x = reference.reference_samples(teacher, 5, 7, y, 2, 3)
    assert x.shape == (5, 1, 8, 8) and calls == [3, 2]  # in chunks of 3
    assert torch.equal(reference.reference_samples(teacher, 5, 7, y, 2, 3), x) and len(calls) == 2
    assert not torch.equal(reference.reference_samples(teacher, 5, 8, y, 2, 3), x) and len(calls) == 4
    for path in (tmp_path / "cache" / "reference").iterdir():
        path.write_bytes(b"not a safetensors file")
    assert torch.equal(reference.reference_samples(teacher, 5, 7, y, 2, 3), x) and len(calls) == 6  # drawn again
    assert torch.equal(reference.reference_samples(teacher, 5, 7, y, 2, 3), x) and len(calls) == 6  # and replaced
    monkeypatch.setenv("EMD_FAST_CACHE", "off")
    assert reference.cache_folder() is None
    reference.reference_samples(teacher, 5, 7, y, 2, 3)
    assert len(calls) == 8


# --- the report ----------------------------------------------------------------------------------------------------

def test_report_of_finished_interrupted_and_running_runs(tmp_path, capsys, monkeypatch):
    a, b, c, d = (tmp_path / name for name in "abcd")
    assert run(a, "--steps", "6", "--plot-every", "3") == 0
    assert run(b, "--steps", "6", "--K", "3") == 0
    real_step = Distiller.step

    def interrupted(self):
        if self.step_count == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Distiller, "step", interrupted)
    assert run(c, "--steps", "6", "--seed", "1") == 130
    monkeypatch.setattr(Distiller, "step", real_step)
    shutil.copytree(b, d)  # b, as if it were still running: a live process holds its lock, a line half written
    (d / "summary.json").unlink()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (d / ".lock").write_text(f"{alive.pid}\n")
        with open(d / "metrics.jsonl", "a") as f:
            f.write('{"step": 7, "loss_g": 0.')
        out = tmp_path / "report"
        capsys.readouterr()
        assert report.main([str(a), str(b), str(c), str(d), "--out", str(out)]) == 0
    finally:
        alive.kill()
        alive.wait()
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    data = json.loads((out / "report.json").read_text())
    assert data["differing"] == ["K", "seed"]
    twice = f"{tmp_path.name}/b (K=3, seed=0)", f"{tmp_path.name}/d (K=3, seed=0)"
    assert [r["label"] for r in data["runs"]] == ["K=2, seed=0", twice[0], "K=2, seed=1", twice[1]]
    assert [r["status"] for r in data["runs"]] == ["finished", "finished", "interrupted", f"running (pid {alive.pid})"]
    assert [r["step"] for r in data["runs"]] == [6, 6, 4, 6]
    assert data["runs"][0]["final"]["mode_tv"] == json.loads((a / "summary.json").read_text())["final"]["mode_tv"]
    assert data["runs"][2]["cost"]["at_step"] == 4 and data["runs"][2]["cost"]["device_hours"] > 0
    sweep = data["sweep"]  # K against the seeds: equal iterations at the last step every run evaluated (3)
    assert sweep["key"] == "K" and sweep["metrics"] == ["energy_distance", "mode_tv"] and sweep["equal_step"] == 3
    first = {r["step"]: r for r in metrics(a)}[3]
    k2 = sweep["values"][0]
    assert k2["value"] == 2 and [r["at_step"]["mode_tv"] for r in k2["runs"]][0] == first["mode_tv"]
    for value in sweep["values"]:
        for r in value["runs"]:
            assert r["at_time"]["time_s"] <= sweep["equal_time_s"] and r["s_per_step"] > 0
    assert not (out / "samples_2.png").exists()  # c stopped before any plot
    for name in ("curves_steps.png", "curves_time.png", "sweep.png", "samples_0.png", "samples_3.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 6 and all(src.startswith("data:image/png;base64,") for src in sources)
    assert "device-hours" in page and "running (pid" in page and "interrupted" in page


def test_sweep_reads_equal_time_from_idle_seconds_per_step_when_given():
    """Runs timed on a shared machine: given the idle seconds per step of each value, the equal-time reading is
    steps x seconds per step, not the runs' own clocks (which here say the opposite)."""
    from emd_fast.evaluation.report import IDLE_TIME, RunDir, sweep

    def run(k, seed, steps, own_s_per_step):
        lines = [{"step": s, "time_s": s * own_s_per_step, "fd_real": 100.0 / (1 + s) + seed} for s in steps]
        return RunDir(Path(f"K{k}_{seed}"), {"K": k, "seed": seed}, lines, None, "finished", None, None)

    runs = [run(1, s, range(0, 41, 10), 5.0) for s in (0, 1)] + [run(4, s, range(0, 21, 5), 0.5) for s in (0, 1)]
    own = sweep(runs, "K", ["fd_real"])  # own clocks: K = 4 looks 10x cheaper per step
    assert own["equal_time_s"] == 10.0 and own["time"] != IDLE_TIME
    assert [r["at_time"]["step"] for v in own["values"] for r in v["runs"]] == [0, 0, 20, 20]
    idle = sweep(runs, "K", ["fd_real"], step_time={1: 1.0, 4: 3.0})
    assert idle["equal_time_s"] == 40.0 and idle["time"] == IDLE_TIME and idle["equal_step"] == 20
    one, four = idle["values"]
    assert [r["at_time"]["step"] for r in one["runs"]] == [40, 40] and [r["at_time"]["step"] for r in four["runs"]] == [
        10, 10]
    assert [r["at_time"]["time_s"] for r in four["runs"]] == [30.0, 30.0] and four["s_per_step"] == [3.0, 0.0]
    assert one["at_time"]["fd_real"][0] == 100.0 / 41 + 0.5 and four["at_step"]["fd_real"][0] == 100.0 / 21 + 0.5


def test_report_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "empty", tmp_path / "missing", tmp_path / "file"):
        assert report.main([str(target), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(target) in err, err
    assert "file is not a run directory (a regular file)" in err
    assert not (tmp_path / "r").exists()


def test_report_out_must_be_a_directory(tmp_path, capsys):
    """--out naming a file is one line (it was "[Errno 17] File exists"), and the file is left as it was."""
    out = tmp_path / "run"
    assert run(out, "--steps", "2") == 0
    (tmp_path / "afile").write_text("mine")
    capsys.readouterr()
    assert report.main([str(out), "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {tmp_path / 'afile'} exists and is not a directory (a regular file)\n", err
    assert (tmp_path / "afile").read_text() == "mine"
