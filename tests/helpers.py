"""Small building blocks shared by the tests."""
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from emd_fast.nets.generator import Generator
from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.schedules import VPCosine
from emd_fast.teachers.mixture import ring2d


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
