"""Small building blocks shared by the tests: tiny problems and networks, and the training command's runs."""
import json

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from emd_fast import train
from emd_fast.nets.generator import Generator
from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.schedules import VPCosine
from emd_fast.teachers.mixture import ring2d
from emd_fast.training.checkpoint import list_checkpoints


class LinearGenerator(nn.Module):
    """g(z) = A z + b, (N, D) -> (N, D)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.as_tensor(a)), nn.Parameter(torch.as_tensor(b))

    def forward(self, z, y=None):
        return z @ self.a.T + self.b


class ExactDenoiser(nn.Module):
    """Wraps an analytic teacher's denoiser as a student network D(x_t, t, y)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x_t, t, y=None):
        return self.teacher.denoise(x_t, t)


def network_params(distiller):
    """Copies of a Distiller's generator and student parameters, by state-dict name."""
    return {k: v.clone() for k, v in distiller.state_tensors().items() if k.startswith(("generator.", "student."))}


def small_problem(seed=0, hidden=32):
    """(teacher, generator, student) on ring2d with small random MLPs."""
    torch.manual_seed(seed)
    sch = VPCosine()
    teacher = ring2d(sch)
    gen = Generator(MLPDenoiser(2, sch, hidden=hidden, depth=2, sigma_data=2.0), t_star=0.9)
    student = MLPDenoiser(2, sch, hidden=hidden, depth=2, sigma_data=2.0)
    return teacher, gen, student


class FakeInception(nn.Module):
    """Same calling convention as the TorchScript Inception file: uint8 RGB in, (N, 2048) features out."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048]


def fake_inception_file(directory):
    """A TorchScript file with the Inception file's interface (the real one is never downloaded)."""
    path = directory / "inception.pt"
    torch.jit.script(FakeInception()).save(str(path))
    return path


class NoHostRead(TorchDispatchMode):
    """Raises on every operator that reads a tensor's value on the host or sizes its output from the data: what a
    CUDA-graph capture forbids. At the dispatcher, so reads inside C++ (t[i] with a tensor i, if t:) are caught too."""
    SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.masked_select.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNC:
            raise AssertionError(f"host sync inside step(): {func}")
        return func(*args, **(kwargs or {}))


# --- runs of ``python -m emd_fast.train`` ---------------------------------------------------------------------------

def train_cli(*small: str):
    """``train_main(out, *args)``: the exit code of ``python -m emd_fast.train --out OUT *small *args`` (``small``:
    a test file's options for a tiny, quick run)."""

    def train_main(out, *args: str) -> int:
        return train.main(["--out", str(out), *small, *args])

    return train_main


def final_tensors(out) -> dict[str, torch.Tensor]:
    """The tensors of the newest checkpoint of the run directory ``out``."""
    return load_file(str(list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")))


def losses(out) -> list[tuple[int, float, float]]:
    """(step, loss_g, loss_s) of every training step in ``out``'s metrics.jsonl."""
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss_g"], r["loss_s"]) for r in records if r["step"] > 0]


def one_line_error(capsys, code: int, expected: int = 2) -> str:
    """The stderr of a command that returned ``code``, checked to be ``expected`` and one line ``error: ...``."""
    err = capsys.readouterr().err
    assert code == expected, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def assert_resumes_exactly(train_main, straight, split, *args: str, steps: int = 4, stop: int = 2,
                           straight_args=(), resume_args=("--quiet", "--device", "cpu"), before_resume=None) -> None:
    """What every teacher kind must do: a run of ``steps`` iterations (``train_main(straight, *args,
    *straight_args)``), and one stopped after ``stop`` and continued with ``--resume`` (its hyperparameters from the
    saved config: only ``resume_args`` given again) end in the same checkpoint, tensor for tensor, after the same
    losses. ``before_resume()`` runs between the halves."""
    assert train_main(straight, *args, *straight_args, "--steps", str(steps)) == 0
    assert train_main(split, *args, "--steps", str(stop)) == 0
    if before_resume is not None:
        before_resume()
    assert train.main(["--out", str(split), "--resume", "--steps", str(steps), *resume_args]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys() and any(k.startswith("generator.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert losses(straight) == losses(split) and len(losses(straight)) == steps


def no_compile_cache_chosen(monkeypatch) -> None:
    """As in a fresh process: no torch.compile cache directory named by the user ($TORCHINDUCTOR_CACHE_DIR) or put
    into the environment by an earlier run of this process (``use_compile_cache``); both restored after the test."""
    from emd_fast.execution import compiled

    monkeypatch.delenv(compiled.CACHE_ENV, raising=False)
    monkeypatch.setattr(compiled, "_cache_set", None)
