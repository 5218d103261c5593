"""The fused Langevin kernels against their PyTorch twins, and the statistics of the in-kernel noise.

Runs in the Triton interpreter on the CPU (sizes kept small) and on the GPU where there is one.
"""
import math

import pytest
import torch
import triton
import triton.language as tl

from emd_fast import ops
from emd_fast.execution.backends import triton_available
from emd_fast.kernels import _common
from emd_fast.kernels._common import tile
from emd_fast.kernels.langevin import NoiseStream, _cos_sin_turn, _normals, langevin_eps_step, langevin_z_step

SHAPES = [(7, 33), (3, 5, 7, 9), (1, 1), (3, 1500), (5, 24), (3, 512), (3, 2, 32, 32)]
# alpha, sigma per element: (7, 33), (3, 5, 7, 9), (1, 1), bf16 (3, 1500); per 16-byte vector: (5, 24), fp32
# (3, 1500), bf16 (3, 512); per program (rows of whole tiles): (3, 2, 32, 32), fp32 (3, 512). (3, 1500) spans
# programs and ends inside a tile.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GAMMA = 0.037


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _step_inputs(shape, dtype, device, seed=0):
    """eps, eta, d_teacher, d_student, noise, g (random, in dtype) and alpha, sigma (fp32, (N,))."""
    gen = torch.Generator().manual_seed(seed)
    data = [_randn(shape, dtype, device, gen) for _ in range(6)]
    alpha = (0.5 + 0.5 * torch.rand(shape[0], generator=gen)).to(device)
    sigma = (0.2 + 0.8 * torch.rand(shape[0], generator=gen)).to(device)
    return data, alpha, sigma


def _assert_outputs_match(got, want, rtol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        atol = rtol * max(1.0, b.float().abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def test_kernels_can_run_here():
    assert triton_available()  # conftest: a GPU, or the interpreter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eps_step_matches_reference(shape, dtype, kernel_device):
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs(shape, dtype, kernel_device)
    got = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise=noise, g=g)
    want = ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise, g=g)
    _assert_outputs_match(got, want, RTOL[dtype])


@pytest.mark.parametrize("with_eta,with_g", [(False, True), (True, False), (False, False)])
def test_eps_step_optional_outputs(with_eta, with_g, kernel_device):
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs((7, 33), torch.float32, kernel_device)
    eta, g = (eta if with_eta else None), (g if with_g else None)
    got = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise=noise, g=g)
    _assert_outputs_match(got, ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise, g=g), 1e-5)


def test_eps_step_mixed_dtypes(kernel_device):
    """fp32 chain state with bf16 denoiser outputs (a teacher under autocast) and fp64 alpha, sigma."""
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs((3, 5, 7, 9), torch.float32, kernel_device)
    dt, ds, alpha, sigma = dt.bfloat16(), ds.bfloat16(), alpha.double(), sigma.double()
    got = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise=noise, g=g)
    _assert_outputs_match(got, ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise, g=g), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_z_step_matches_reference(dtype, kernel_device):
    (z, jtv, noise, *_), _, _ = _step_inputs((3, 1500), dtype, kernel_device)
    got = langevin_z_step(z, jtv, 0.21, noise=noise)
    _assert_outputs_match([got], [ops.langevin_z_step(z, jtv, 0.21, noise)], RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 33), (3, 1500), (3, 512), (3, 2, 32, 32)], ids=str)
def test_z_step_per_example_gamma_matches_reference(shape, dtype, kernel_device):
    """Per-example step sizes (the noise-scaled z step), rows inside and across blocks, given or in-kernel noise."""
    (z, jtv, noise, *_), _, _ = _step_inputs(shape, dtype, kernel_device)
    gamma = (1e-4 + 0.3 * torch.rand(shape[0], generator=torch.Generator().manual_seed(3))).to(kernel_device)
    got = langevin_z_step(z, jtv, gamma, noise=noise)
    _assert_outputs_match([got], [ops.langevin_z_step(z, jtv, gamma, noise)], RTOL[dtype])
    drawn = _draw(NoiseStream(9, kernel_device), shape).reshape(shape).to(dtype)
    got = langevin_z_step(z, jtv, gamma, stream=NoiseStream(9, kernel_device))
    _assert_outputs_match([got], [ops.langevin_z_step(z, jtv, gamma, drawn)], RTOL[dtype])


def _nan_empty(monkeypatch):
    """Make torch.empty return NaN-filled floating tensors, so an element a kernel fails to write shows."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)


def test_outputs_fully_written(monkeypatch, kernel_device):
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs((3, 1500), torch.float16, kernel_device)
    _nan_empty(monkeypatch)
    assert torch.empty(3, device=kernel_device).isnan().all()
    for kwargs in ({"noise": noise}, {"stream": NoiseStream(0, kernel_device)}):
        outs = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, g=g, **kwargs)
        outs += (langevin_z_step(eps, dt, GAMMA, **kwargs), langevin_z_step(eps, dt, alpha, **kwargs))
        for out in outs:
            assert torch.isfinite(out).all()


def test_non_contiguous_inputs(kernel_device):
    """Transposed and sliced views are copied, channels_last is read in place: all match the reference."""
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs((7, 33), torch.float32, kernel_device)
    eps_t = eps.t().contiguous().t()
    ds_sliced = torch.stack([ds, torch.randn_like(ds)], dim=-1)[..., 0]
    assert not eps_t.is_contiguous() and not ds_sliced.is_contiguous()
    got = langevin_eps_step(eps_t, eta, dt, ds_sliced, alpha, sigma, GAMMA, noise=noise, g=g)
    _assert_outputs_match(got, ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise, g=g), 1e-5)


@pytest.mark.parametrize("all_channels_last", [True, False])
def test_channels_last(all_channels_last, kernel_device):
    tensors, alpha, sigma = _step_inputs((3, 5, 7, 9), torch.float32, kernel_device)
    cl = [t.to(memory_format=torch.channels_last) for t in tensors]
    if not all_channels_last:
        cl[2] = tensors[2]  # d_teacher contiguous: copied into the channels_last order of eps
    eps, eta, dt, ds, noise, g = cl
    got = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise=noise, g=g)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in got)
    want = ops.langevin_eps_step(*tensors[:4], alpha, sigma, GAMMA, tensors[4], g=tensors[5])
    _assert_outputs_match(got, want, 1e-5)


# ---- in-kernel noise -------------------------------------------------------------------------------------

def _draw(stream, shape=(64, 1000)):
    """Standard normals from the stream: a z-step from z = jtv = 0 with gamma = 1/2 returns the noise."""
    z = torch.zeros(shape, device=stream.device)
    return langevin_z_step(z, z, 0.5, stream=stream).flatten().double()


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_noise_is_standard_normal(kernel_device):
    x = _draw(NoiseStream(1234, kernel_device))
    n = x.numel()
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # Gaussian kurtosis
    p = math.erf(1 / math.sqrt(2))  # P(|x| < 1)
    assert abs(float((x.abs() < 1).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_noise_is_uncorrelated(kernel_device):
    stream = NoiseStream(7, kernel_device)
    x, y = _draw(stream), _draw(stream)
    bound = 5 / math.sqrt(x.numel() - 2048)
    assert abs(_corr(x, y)) < bound  # consecutive calls
    # 1: the two normals of one Box-Muller pair; 2: another pair of the same Philox counter; 4, 8: the next
    # counters; 512, 2048: a tile apart
    for lag in (1, 2, 4, 8, 512, 2048):
        assert abs(_corr(x[:-lag], x[lag:])) < bound, lag
        assert abs(_corr(x[:-lag] ** 2, x[lag:] ** 2)) < bound, lag


def test_noise_stream_reproducible_and_advancing(kernel_device):
    a, b = NoiseStream(5, kernel_device), NoiseStream(5, kernel_device)
    first = _draw(a, (3, 700))
    assert torch.equal(first, _draw(b, (3, 700)))  # same seed, same draws
    assert int(a.state[1]) == math.ceil(2100 / 4)  # a Philox counter (4 normals) per 4 elements
    assert not torch.equal(first, _draw(a, (3, 700)))  # the next call draws afresh
    assert not torch.equal(first, _draw(NoiseStream(6, kernel_device), (3, 700)))  # another seed


def test_noise_does_not_depend_on_dtype_or_tiling(kernel_device):
    """Element e takes word e % 4 of Philox counter (counter + e // 4): the same normals whatever the dtype and
    so the tiling (fp32: programs of 128 vectors of 4 elements, bf16: of 8)."""
    shape = (3, 2100)
    want = _draw(NoiseStream(8, kernel_device), shape)
    z = torch.zeros(shape, device=kernel_device, dtype=torch.bfloat16)
    got = langevin_z_step(z, z, 0.5, stream=NoiseStream(8, kernel_device)).flatten().double()
    torch.testing.assert_close(got, want, rtol=2**-7, atol=0)  # bf16 rounding; other normals would differ by O(1)
    assert _common.tiling(6300, 2100, z).block == 2 * _common.tiling(6300, 2100, z.float()).block


@triton.jit
def _normals_kernel(state_ptr, out_ptr, R: tl.constexpr, V: tl.constexpr):
    _, starts, o = tile(R, V, False)
    tl.store(out_ptr + o, _normals(state_ptr, starts, R, V))


def test_noise_tails(kernel_device):
    """2^24 draws of the kernels' generator (its Box-Muller cannot reach beyond 6.77): the fractions beyond 4 and
    5 standard deviations are within 5 binomial standard errors of the normal's (expected counts about 1063
    and 9.6)."""
    n = 2**24
    tile_numel = 2**18 if kernel_device.type == "cpu" else 2**12  # interpreter: few programs; GPU: fits registers
    state = torch.tensor([2024, 0], dtype=torch.int64, device=kernel_device)
    x = torch.empty(n, device=kernel_device)
    _normals_kernel[(n // tile_numel,)](state, x, R=tile_numel // 4, V=4)
    x = x.abs()
    assert float(x.max()) < 6.77
    for k in (4.0, 5.0):
        p = math.erfc(k / math.sqrt(2))  # P(|x| > k)
        count = int((x > k).sum())
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (k, count, n * p)


@triton.jit
def _cos_sin_kernel(k_ptr, cos_ptr, sin_ptr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cos, sin = _cos_sin_turn(tl.load(k_ptr + o))
    tl.store(cos_ptr + o, cos)
    tl.store(sin_ptr + o, sin)


def test_cos_sin_polynomial_accuracy(kernel_device):
    """The Box-Muller angle's cos and sin against float64 at every one of the 2^24 angles."""
    k = torch.arange(2**24, dtype=torch.int32, device=kernel_device)
    cos, sin = torch.empty(2**24, device=kernel_device), torch.empty(2**24, device=kernel_device)
    block = 2**20 if k.device.type == "cpu" else 1024  # interpreter: few programs; GPU: a tile that fits registers
    _cos_sin_kernel[(2**24 // block,)](k, cos, sin, BLOCK=block)
    angle = k.double() * (2 * math.pi / 2**24)
    assert float((cos.double() - angle.cos()).abs().max()) < 3e-7
    assert float((sin.double() - angle.sin()).abs().max()) < 3e-7


def test_noise_stream_state_dict_round_trip(kernel_device):
    stream = NoiseStream(11, kernel_device)
    _draw(stream, (5, 10))
    saved = stream.state_dict()
    assert saved["state"].device.type == "cpu" and saved["state"].tolist() == [11, math.ceil(50 / 4)]
    expected = _draw(stream, (5, 10))
    other = NoiseStream(0, kernel_device)
    other.load_state_dict(saved)
    assert torch.equal(_draw(other, (5, 10)), expected)


def test_noise_uses_the_high_counter_bits(kernel_device):
    """Counters 2**32 apart must give different draws (the counter's high word feeds Philox)."""
    low, high = NoiseStream(3, kernel_device), NoiseStream(3, kernel_device)
    high.load_state_dict({"state": torch.tensor([3, 2**32])})
    x, y = _draw(low, (4, 100)), _draw(high, (4, 100))
    assert abs(_corr(x, y)) < 5 / math.sqrt(x.numel())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_noise_stream_in_a_cuda_graph():
    """A captured step reads the counter on the device and advances it there: every replay draws afresh,
    exactly the draws of the same calls made eagerly."""
    stream, eager = NoiseStream(9, "cuda"), NoiseStream(9, "cuda")
    z = torch.zeros(4, 3000, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernel before capture
        langevin_z_step(z, z, 0.5, stream=stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = langevin_z_step(z, z, 0.5, stream=stream)
    stream.load_state_dict({"state": torch.tensor([9, 0])})  # in place: the graph still reads this tensor
    for _ in range(2):
        graph.replay()
        assert torch.equal(out, langevin_z_step(z, z, 0.5, stream=eager))
    assert torch.equal(stream.state, eager.state)


def test_eps_step_with_stream_is_a_langevin_step(kernel_device):
    """With in-kernel noise, eps' and eta' carry the same noise n: recover n from eta', then the reference
    with that n reproduces every output; and the draws do not depend on which outputs are asked for."""
    (eps, eta, dt, ds, _, g), alpha, sigma = _step_inputs((3, 5, 7, 9), torch.float32, kernel_device)
    stream = NoiseStream(42, kernel_device)
    saved = stream.state_dict()
    got = langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, g=g, stream=stream)
    noise = (got[1] - (1 - GAMMA) * eta) / math.sqrt(2 * GAMMA)
    assert abs(float(noise.std()) - 1) < 0.2
    _assert_outputs_match(got, ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, GAMMA, noise, g=g), 1e-4)
    stream.load_state_dict(saved)
    again = langevin_eps_step(eps, None, dt, ds, alpha, sigma, GAMMA, stream=stream)
    assert again[1] is None and again[3] is None
    torch.testing.assert_close(again[0], got[0], rtol=0, atol=0)


# ---- boundary errors -------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(kernel_device, monkeypatch):
    (eps, eta, dt, ds, noise, g), alpha, sigma = _step_inputs((7, 33), torch.float32, kernel_device)

    def step(**over):
        args = dict(eps=eps, eta=eta, d_teacher=dt, d_student=ds, alpha=alpha, sigma=sigma, gamma=GAMMA,
                    noise=noise, g=g)
        return langevin_eps_step(**{**args, **over})

    with pytest.raises(ValueError, match=r"d_teacher has shape \(7, 32\) but eps has \(7, 33\)"):
        step(d_teacher=dt[:, :32])
    with pytest.raises(ValueError, match=r"sigma must have shape \(7,\)"):
        step(sigma=sigma[:3])
    with pytest.raises(TypeError, match="g has dtype torch.int32"):
        step(g=g.int())
    with pytest.raises(ValueError, match="gamma_eps must be a Python number > 0, got 0"):
        step(gamma=0)
    with pytest.raises(ValueError, match="gamma_z must be a Python number > 0, got -0.1"):
        langevin_z_step(eps, dt, -0.1, noise=noise)
    with pytest.raises(ValueError, match="exactly one of noise"):
        step(stream=NoiseStream(0, kernel_device))
    with pytest.raises(ValueError, match="exactly one of noise"):
        langevin_z_step(eps, dt, 0.1)
    with pytest.raises(ValueError, match="stream is on meta but z is on"):
        langevin_z_step(eps, dt, 0.1, stream=NoiseStream(0, "meta"))
    with pytest.raises(ValueError, match=r"eps is empty \(shape \(0, 33\)\)"):
        langevin_eps_step(*(t[:0] for t in (eps, eta, dt, ds)), alpha[:0], sigma[:0], GAMMA, noise=noise[:0])
    with pytest.raises(ValueError, match=r"NoiseStream state must be an int64 tensor of shape \(2,\)"):
        NoiseStream(0, kernel_device).load_state_dict({"state": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="seed must be in"):
        NoiseStream(-1, kernel_device)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors but z is on cpu"):
        langevin_z_step(eps.cpu(), dt.cpu(), 0.1, noise=noise.cpu())
