"""Data-parallel runs on torch.distributed (gloo, CPU): processes forked here with torchrun's environment, and one
real torchrun launch. Equivalence with one process, rank-0 I/O, resume across numbers of processes, a signal to one
rank, a failure or a hang of one rank."""
import contextlib
import datetime
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from emd_fast import sample, train
from emd_fast.emd import EMDConfig
from emd_fast.execution.distributed import Ranks, data_parallel, fully_sharded, rank_seed
from emd_fast.ops import ReferenceOps
from emd_fast.training.build import Run, load_run
from emd_fast.training.checkpoint import list_checkpoints, load_checkpoint
from emd_fast.training.config import resolve
from emd_fast.training.distiller import Distiller, Execution

from helpers import small_problem

SMALL = ["--teacher-fit-steps", "20", "--batch", "24", "--hidden", "16", "--depth", "1", "--eval-every", "3",
         "--eval-samples", "201", "--ckpt-every", "4", "--K", "2", "--quiet", "--device", "cpu", "--keep", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    fn(rank, world, *args)


def launch(fn, world, *args, limit_s=120):
    """fn(rank, world, *args) in ``world`` processes with the environment torchrun gives its workers (started by a
    forkserver that has imported torch and emd_fast: fresh single-threaded processes, quickly). A test fails
    rather than hangs: the processes are killed after ``limit_s`` seconds."""
    mp.set_forkserver_preload(["torch", "emd_fast.train", "helpers"])
    context = mp.start_processes(_worker, args=(world, free_port(), fn, args), nprocs=world, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {world} processes did not finish in {limit_s} s")


def _cli(rank, world, out_dir, argv, patch=None):
    """train.main(argv) on one rank; its exit code, stdout and stderr go to out_dir/rank<r>.json."""
    if patch:
        patch(rank)
    stdout, stderr = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train.main(argv)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(
        {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "s": time.perf_counter() - t0}))


def run_cli(tmp_path, world, out, *extra, patch=None, base=SMALL) -> list[dict]:
    """The training CLI with ``base`` and ``extra`` options on ``world`` processes; per rank {"code", "out", "err",
    "s" (seconds)}."""
    log_dir = tmp_path / f"log_{out.name}_{time.monotonic_ns()}"
    log_dir.mkdir()
    launch(_cli, world, log_dir, ["--out", str(out), *base, *extra], patch)
    return [json.loads((log_dir / f"rank{r}.json").read_text()) for r in range(world)]


def records(out):
    """metrics.jsonl's records without their clock (time_s, wall_s): what the run computed, not when."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "wall_s")} for line in lines]


def tensors_at(out, step):
    return load_file(str(out / "checkpoints" / f"step_{step:07d}.safetensors"))


# --- the pieces ---------------------------------------------------------------------------------------------------

def test_rank_seeds_rows_and_environment(monkeypatch):
    assert rank_seed(7, 0) == 7  # a one-process run keeps its seed
    seeds = {rank_seed(7, r, s) for r in range(4) for s in (0, 100)} | {rank_seed(8, 1)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    for n, world in ((10, 3), (2, 3), (7, 2)):
        rows = [Ranks(r, world).rows(n) for r in range(world)]
        assert [i for s in rows for i in range(s.start, s.stop)] == list(range(n))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Ranks.from_env() == Ranks()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert Ranks.from_env() == Ranks(2, 3, 0, distributed=True)


@pytest.mark.parametrize("joined", [False, True])
def test_a_process_of_a_distributed_run_skips_the_interpreter_shutdown_with_its_output_flushed(joined):
    """A rank's leaked gloo threads can abort the interpreter's shutdown (distributed.joined_a_process_group); such a
    process ends with os._exit, with its exit code, its buffered output written and no atexit handler run."""
    code = ("import atexit, sys\n"
            "from emd_fast import cli\n"
            "from emd_fast.execution import distributed\n"
            f"distributed._joined = {joined}\n"
            "atexit.register(lambda: print('atexit ran'))\n"
            "def main():\n"
            "    print('summary', end='')\n"
            "    sys.stderr.write('note')\n"
            "    return 3\n"
            "cli.run_as_process(main)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 3
    assert out.stdout == ("summary" if joined else "summaryatexit ran\n") and out.stderr == "note"


def test_each_rank_has_its_own_streams_kernel_noise_included(tmp_path, kernel_device):
    """Rank r's torch.Generator and in-kernel NoiseStream start from rank_seed(seed, r); reseed restarts both."""
    parser = train.build_parser()
    argv = [*SMALL, "--backend", "triton", "--seed", "5", "--out", str(tmp_path / "r"), "--device", str(kernel_device)]
    cfg, device, _ = resolve(vars(parser.parse_args(argv)), train._explicit(parser, argv))
    states = []
    for rank in range(3):
        distiller = Run(cfg, device, fit_teacher=False, ranks=Ranks(rank, 3)).distiller
        assert distiller.batch == 8 and distiller.global_batch == 24
        want = torch.Generator(kernel_device).manual_seed(rank_seed(5, rank)).get_state()
        assert torch.equal(distiller.rng.get_state(), want)
        assert distiller.random_state()["noise_stream.state"].tolist() == [rank_seed(5, rank), 0]
        states.append(distiller.random_state())
        distiller.step()
        distiller.reseed(rank_seed(5, rank, 1))
        assert distiller.random_state()["noise_stream.state"].tolist() == [rank_seed(5, rank, 1), 0]
    assert len({s["noise_stream.state"][0].item() for s in states}) == 3 and states[0]["noise_stream.state"][0] == 5
    # a rank's share of fewer samples than ranks
    assert distiller.generate(torch.randn(0, 2, device=kernel_device), None).shape == (0, 2)


def test_global_batch_must_divide(tmp_path, capsys, monkeypatch):
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    assert train.main(["--out", str(tmp_path / "r"), *SMALL, "--batch", "25"]) == 2
    err = capsys.readouterr().err
    assert "--batch 25 is the global batch and must divide evenly across the 2 processes" in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


# --- equivalence: N ranks with B/N examples each take the update of one process with B ----------------------------

class SharedNoiseOps(ReferenceOps):
    """Langevin noise for the whole global batch from one stream every rank shares; this rank keeps its rows."""

    def __init__(self, rng, ranks):
        super().__init__(rng)
        self.ranks = ranks

    def randn_like(self, x):
        full = torch.randn((x.shape[0] * self.ranks.world, *x.shape[1:]), generator=self.rng, dtype=x.dtype)
        return full[self.ranks.rows(len(full))]


class SharedNoiseDistiller(Distiller):
    """Draws z, eps and t for the global batch from one stream shared by all ranks and keeps this rank's rows: the
    same per-example randomness whatever the number of processes."""

    def __init__(self, *args, ranks, **kw):
        super().__init__(*args, **kw)
        self.ranks = ranks
        self.emd.ops = SharedNoiseOps(self.rng, ranks)

    def _randn(self, n):
        full = super()._randn(n * self.ranks.world)
        return full[self.ranks.rows(len(full))]

    def _sample_t(self, n):
        full = super()._sample_t(n * self.ranks.world)
        return full[self.ranks.rows(len(full))]


BATCH, STEPS = 12, 4


def full(t):
    """A sharded tensor (DTensor) made whole (a collective: every rank calls it), or a copy of a plain one."""
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def trajectory(ranks, wrap=None, shard=None, ema=0.0, execution=Execution()):
    """Parameters and gradients of generator and student after each of STEPS iterations (fp32, ring2d, K=2), and
    with an EMA (half-life ``ema`` kimg) its parameters (gradient None); and the Distiller."""
    teacher, gen, student = small_problem(seed=0, hidden=16)
    distiller = SharedNoiseDistiller(teacher, gen, student, EMDConfig(K=2, gamma_eps=0.3, gamma_z=0.05),
                                batch=BATCH // ranks.world, global_batch=BATCH, lr_g=1e-3, lr_s=1e-3, seed=3,
                                sigma_data=2.0, data_parallel=wrap, shard=shard, ema_halflife_kimg=ema,
                                execution=execution, ranks=ranks)
    out = []
    for _ in range(STEPS):
        distiller.step()
        distiller.update_ema()
        nets = {"generator": distiller.generator, "student": distiller.student}
        nets |= {"ema": distiller.ema} if ema else {}
        out.append({f"{name}.{k}": (full(p), None if p.grad is None else full(p.grad))
                    for name, net in nets.items() for k, p in net.named_parameters()})
    return out, distiller


def _equivalence_worker(rank, world, path, how="ddp", ema=0.0):
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        ranks, cpu = Ranks(rank, world, rank, distributed=True), torch.device("cpu")
        if how == "ddp":
            result, _ = trajectory(ranks, data_parallel(cpu), ema=ema)
        else:  # "shard", or "shard_fused": fused Adam on the shards with its on-device skip flag (deferred checks)
            execution = Execution(finite_check="deferred" if how == "shard_fused" else "sync")
            result, distiller = trajectory(ranks, shard=fully_sharded(cpu, world), ema=ema, execution=execution)
            # each rank holds about 1/world of every network
            nets = (distiller.generator, distiller.student, distiller.ema)
            held = [sum(p.to_local().numel() for p in net.parameters()) / sum(p.numel() for p in net.parameters())
                    for net in nets]
            assert all(abs(h - 1 / world) < 0.1 for h in held), held
        torch.save(result, path / f"{how}_rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_the_one_process_update(tmp_path, world):
    one, _ = trajectory(Ranks())
    launch(_equivalence_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"ddp_rank{r}.pt") for r in range(world)]
    for r in range(1, world):  # every rank holds the same parameters, bit for bit
        assert all(torch.equal(per_rank[0][-1][k][0], per_rank[r][-1][k][0]) for k in per_rank[0][-1])
    worst_p = worst_g = 0.0
    for step, (a, b) in enumerate(zip(one, per_rank[0]), 1):
        for k in a:
            (p1, g1), (pn, gn) = a[k], b[k]
            worst_g = max(worst_g, float((g1 - gn).abs().max() / g1.abs().max()))
            worst_p = max(worst_p, float((p1 - pn).abs().max()))
            torch.testing.assert_close(gn, g1, rtol=1e-4, atol=1e-5 * float(g1.abs().max()), msg=f"{k} step {step}")
            torch.testing.assert_close(pn, p1, rtol=1e-5, atol=1e-5, msg=f"{k} step {step}")
    print(f"{world} processes vs 1: largest gradient difference {worst_g:.2e} of the largest gradient, largest "
          f"parameter difference {worst_p:.2e} after {STEPS} steps")
    # and the processes do not all see the same examples: a 2-process run without DDP would differ
    assert any(not torch.equal(one[0][k][1], per_rank[0][0][k][1]) for k in one[0])


def test_sharded_ranks_take_the_ddp_and_one_process_update(tmp_path):
    """FSDP2 (--shard): generator, student and EMA sharded over 2 processes follow the DDP run and the one-process
    run, fp32, up to the order of float additions (the EMA too: it is updated shard by shard)."""
    one, _ = trajectory(Ranks(), ema=0.01)
    for how in ("ddp", "shard", "shard_fused"):
        launch(_equivalence_worker, 2, tmp_path, how, 0.01)
    ddp, sharded, fused = (torch.load(tmp_path / f"{how}_rank0.pt") for how in ("ddp", "shard", "shard_fused"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(sharded[-1].values(),
                                                        torch.load(tmp_path / "shard_rank1.pt")[-1].values()))
    worst = {"ddp": 0.0, "one": 0.0}
    for step, (s, d, o) in enumerate(zip(sharded, ddp, one), 1):
        assert s.keys() == d.keys() == o.keys() and any(k.startswith("ema.") for k in s)
        for k in s:
            for ref, name in ((d, "ddp"), (o, "one")):
                (ps, gs), (pr, gr) = s[k], ref[k]
                worst[name] = max(worst[name], float((ps - pr).abs().max()))
                torch.testing.assert_close(ps, pr, rtol=1e-5, atol=1e-5, msg=f"{k} step {step} vs {name}")
                if gr is not None:
                    torch.testing.assert_close(gs, gr, rtol=1e-4, atol=1e-5 * float(gr.abs().max()),
                                               msg=f"{k} gradient step {step} vs {name}")
    for k, (p, _) in fused[-1].items():
        torch.testing.assert_close(p, sharded[-1][k][0], rtol=1e-5, atol=1e-6, msg=f"{k} fused Adam")
    assert not torch.equal(one[-1]["ema.denoiser.out.weight"][0], one[0]["ema.denoiser.out.weight"][0])
    print(f"sharded (2 processes): largest parameter difference after {STEPS} steps {worst['ddp']:.2e} vs DDP, "
          f"{worst['one']:.2e} vs one process")


# --- the run: rank-0 I/O, checkpoints, resume across world sizes ---------------------------------------------------

def test_torchrun_rank0_io_and_resume_across_world_sizes(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "emd_fast.train", "--out", str(out), *SMALL, "--steps", "4"],
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("run directory:") == 1 and "on cpu x 2 processes" in res.stdout
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    _, state = load_checkpoint(out / "checkpoints" / "step_0000004.json")
    two = tensors_at(out, 4)
    assert state["processes"] == 2 and not torch.equal(two["rng"], two["rank1.rng"])

    # the generator at initialisation is evaluated on the same samples, gathered from both ranks
    single = tmp_path / "single"
    assert train.main(["--out", str(single), *SMALL, "--steps", "1"]) == 0
    a, b = records(single)[0], records(out)[0]
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a)

    # 3 processes resume the 2-process checkpoint: parameters, EMA and optimizer state continue exactly, each rank's
    # streams are new ones derived from (seed, rank, step) (--ckpt-every 0: the checkpoint of step 4 is rewritten)
    logs = run_cli(tmp_path, 3, out, "--resume", "--steps", "4", "--ckpt-every", "0")
    assert [r["code"] for r in logs] == [0, 0, 0]
    three = tensors_at(out, 4)
    assert load_checkpoint(out / "checkpoints" / "step_0000004.json")[1]["processes"] == 3
    assert {k for k in two if "rng" not in k} == {k for k in three if "rng" not in k}
    assert all(torch.equal(two[k], three[k]) for k in two if "rng" not in k)
    for r, key in enumerate(("rng", "rank1.rng", "rank2.rng")):
        assert torch.equal(three[key], torch.Generator().manual_seed(rank_seed(0, r, 4)).get_state())

    assert not logs[1]["out"] and not logs[2]["out"] and not logs[1]["err"] and not logs[2]["err"]
    assert train.main(["--out", str(out), *SMALL, "--resume", "--steps", "6"]) == 0  # and one process
    assert [r["step"] for r in records(out)] == list(range(7))
    assert [p.name for p in (out / "samples").iterdir()] == ["final.png"]


def run_until(src, dst, step):
    """A copy of run directory ``src`` whose newest checkpoint is that of ``step`` (a run stopped there)."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").glob("step_*"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    return dst


def resumes_exactly_on_two_processes(tmp_path, argv: list[str], stop: int, end: int):
    """The training CLI with ``argv`` on 2 processes, straight to step ``end``, and a copy stopped at ``stop``
    resumed on 2 processes: asserts both end in the same checkpoint bit for bit; returns the straight run's
    directory and its tensors at ``end``."""
    straight = tmp_path / "straight"
    assert [r["code"] for r in run_cli(tmp_path, 2, straight, base=argv)] == [0, 0]
    again = run_until(straight, tmp_path / "again", stop)
    assert [r["code"] for r in run_cli(tmp_path, 2, again, "--resume", base=argv)] == [0, 0]
    a, b = tensors_at(straight, end), tensors_at(again, end)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight, a


def test_sharded_checkpoints_resume_on_any_number_of_processes_and_sample(tmp_path):
    """--shard on 2 processes: its checkpoints equal the DDP run's (full tensors, the same names); a sharded resume
    on 2 processes continues bit for bit; one process (sharded under torchrun, or not) loads them exactly and both
    continue alike; emd_fast.sample reads them in a plain process."""
    shard, ddp, ema = tmp_path / "shard", tmp_path / "ddp", ["--ema", "0.01", "--steps", "6"]
    assert [r["code"] for r in run_cli(tmp_path, 2, shard, "--shard", *ema)] == [0, 0]
    assert [r["code"] for r in run_cli(tmp_path, 2, ddp, *ema)] == [0, 0]
    for step in (4, 6):
        s, d = tensors_at(shard, step), tensors_at(ddp, step)
        assert s.keys() == d.keys() and any(k.startswith("ema.") for k in s) and any(k.startswith("opt_s.") for k in s)
        for k in s:
            torch.testing.assert_close(s[k], d[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(records(shard), records(ddp), strict=True):  # evaluations: every rank's share gathered on rank 0
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a)

    again = run_until(shard, tmp_path / "again", 4)
    assert [r["code"] for r in run_cli(tmp_path, 2, again, "--shard", "--resume", "--steps", "6")] == [0, 0]
    a, b = tensors_at(shard, 6), tensors_at(again, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(again) == records(shard)

    plain, sharded = run_until(shard, tmp_path / "plain", 4), run_until(shard, tmp_path / "one_sharded", 4)
    assert train.main(["--out", str(plain), *SMALL, "--resume", "--steps", "4", "--ckpt-every", "0"]) == 0
    four, reloaded = tensors_at(shard, 4), tensors_at(plain, 4)  # rewritten by a plain process: nothing changed
    assert all(torch.equal(four[k], reloaded[k]) for k in reloaded if "rng" not in k)
    assert train.main(["--out", str(plain), *SMALL, "--resume", "--steps", "6"]) == 0
    assert [r["code"] for r in run_cli(tmp_path, 1, sharded, "--shard", "--resume", "--steps", "6")] == [0]
    a, b = tensors_at(plain, 6), tensors_at(sharded, 6)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)

    npz = tmp_path / "s.npz"
    assert sample.main([str(shard), "--n", "9", "--out", str(npz)]) == 0 and npz.is_file()
    loaded, step, _ = load_run(shard, "cpu")
    assert step == 6 and all(torch.equal(v, a6) for v, a6 in
                             zip(loaded.distiller.sampler.state_dict().values(),
                                 [tensors_at(shard, 6)[f"ema.{k}"] for k in loaded.distiller.sampler.state_dict()]))


def test_shard_option_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert train.main(["--out", str(out), *SMALL, "--shard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --shard shards the networks across the processes of a torchrun launch") and \
        err.count("\n") == 1
    for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    for option in ("--cuda-graph", "--compile"):
        assert train.main(["--out", str(out), *SMALL, "--shard", option]) == 2
        assert capsys.readouterr().err == f"error: {option} is not supported with --shard (untested with FSDP2)\n"
    assert not out.exists()


# --- stopping: a signal to one rank, a failure of one rank, a hung rank --------------------------------------------

def _act_at_step(target_rank, target_step, action, rank):
    """On ``target_rank``: Distiller.step calls action() at the start of iteration ``target_step``."""
    if rank != target_rank:
        return
    real = Distiller.step

    def step(self):
        if self.step_count + 1 == target_step:
            action()
        return real(self)

    Distiller.step = step


def _on_rank_at_step(target_rank, target_step, action):
    return functools.partial(_act_at_step, target_rank, target_step, action)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _fail():
    raise FloatingPointError("generator loss is nan at step 3 (injected)")


def _hang():
    time.sleep(6)


def test_sigterm_to_one_rank_stops_all_at_one_boundary_and_resumes_exactly(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert [r["code"] for r in run_cli(tmp_path, 2, straight, "--steps", "7")] == [0, 0]
    logs = run_cli(tmp_path, 2, stopped, "--steps", "7", patch=_on_rank_at_step(1, 5, _sigterm))
    assert [r["code"] for r in logs] == [143, 143]
    assert logs[0]["err"].strip() == (f"stopped by SIGTERM after step 5: checkpoint written; continue with --resume "
                                      f"--out {stopped}") and not logs[1]["err"]
    assert list_checkpoints(stopped / "checkpoints")[-1].name == "step_0000005.json"
    assert [r["code"] for r in run_cli(tmp_path, 2, stopped, "--resume", "--steps", "7")] == [0, 0]
    a, b = tensors_at(straight, 7), tensors_at(stopped, 7)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["step"], r.get("loss_g")) for r in records(straight)] == \
        [(r["step"], r.get("loss_g")) for r in records(stopped)]


def test_an_exception_on_one_rank_stops_all_with_one_line_errors(tmp_path):
    out = tmp_path / "run"
    logs = run_cli(tmp_path, 2, out, "--steps", "50", "--dist-timeout", "60", patch=_on_rank_at_step(1, 3, _fail))
    assert [r["code"] for r in logs] == [2, 2]
    assert logs[1]["err"] == "error: generator loss is nan at step 3 (injected)\n"
    assert logs[0]["err"].startswith("error: process 0 of 2 stopped: another process of the run failed")
    assert logs[0]["err"].count("\n") == 1 and logs[0]["s"] < 30  # at once, not after the timeout
    assert not out.exists()  # failed before its first checkpoint: nothing half-made is left


def test_a_hung_rank_times_out(tmp_path):
    logs = run_cli(tmp_path, 2, tmp_path / "run", "--steps", "50", "--dist-timeout", "3",
                   patch=_on_rank_at_step(1, 2, _hang))
    assert [r["code"] for r in logs] == [2, 2]
    assert "hung past --dist-timeout" in logs[0]["err"] and logs[0]["err"].count("\n") == 1
