"""The fused loss Functions against autograd through their PyTorch twins (value and gradients)."""
import pytest
import torch

from emd_fast import ops
from emd_fast.kernels.losses import dsm_loss, generator_loss

SHAPES = [(7, 33), (3, 5, 7, 9), (1, 1), (3, 1500), (3, 2, 32, 32)]  # the last: rows of whole blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _inputs(shape, dtype, device, n_data, seed=0):
    """n_data random (N, ...) tensors in dtype (the first requires grad) and alpha, sigma, weight (N,)."""
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(n_data)]
    data[0].requires_grad_(True)
    per_example = [(lo + (1 - lo) * torch.rand(shape[0], generator=gen)).to(device) for lo in (0.5, 0.2, 0.1)]
    return data, per_example


def _value_and_grads(loss_fn, tensors, grad_scale):
    """loss_fn(*tensors) and the gradients of grad_scale * loss wrt the tensors that require grad."""
    value = loss_fn(*tensors)
    leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    return value.detach(), torch.autograd.grad(value * grad_scale, leaves)


def _assert_matches(kernel_fn, ref_fn, tensors, rtol, value_rtol=1e-5, grad_scale=1.7):
    (v, grads), (v_ref, grads_ref) = (_value_and_grads(f, tensors, grad_scale) for f in (kernel_fn, ref_fn))
    assert v.dtype == torch.float32 and v.shape == ()
    torch.testing.assert_close(v, v_ref, rtol=value_rtol, atol=0)
    for grad, ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape
        torch.testing.assert_close(grad.float(), ref.float(), rtol=rtol, atol=rtol * ref.float().abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_generator_loss_matches_reference(shape, dtype, kernel_device):
    (g, eps, eta), (alpha, sigma, weight) = _inputs(shape, dtype, kernel_device, 3)
    tensors = (g, eps, eta, alpha, sigma, weight)
    _assert_matches(generator_loss, ops.generator_loss, tensors, GRAD_RTOL[dtype], value_rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dsm_loss_matches_reference(shape, dtype, kernel_device):
    (d, x), (_, _, weight) = _inputs(shape, dtype, kernel_device, 2)
    _assert_matches(dsm_loss, ops.dsm_loss, (d, x, weight), GRAD_RTOL[dtype])


def test_generator_loss_without_cancellation(kernel_device):
    (g, eps), (alpha, sigma, weight) = _inputs((3, 1500), torch.float32, kernel_device, 2)
    _assert_matches(generator_loss, ops.generator_loss, (g, eps, None, alpha, sigma, weight), 1e-5, 1e-4)


def test_dsm_loss_gradient_wrt_x(kernel_device):
    """If the clean sample x also requires grad, it gets -dL/dd (as autograd through the twin gives)."""
    (d, x), (_, _, weight) = _inputs((7, 33), torch.bfloat16, kernel_device, 2)
    x = x.float().requires_grad_(True)
    _assert_matches(dsm_loss, ops.dsm_loss, (d, x, weight), 1e-2)


def test_gradient_only_for_g(kernel_device):
    (g, eps, eta), (alpha, sigma, weight) = _inputs((7, 33), torch.float32, kernel_device, 3)
    eps.requires_grad_(True)
    loss = generator_loss(g, eps, eta, alpha, sigma, weight)
    grad_g, grad_eps = torch.autograd.grad(loss, (g, eps), allow_unused=True)
    assert grad_g is not None and grad_eps is None  # eps enters the loss under stop-gradient


def test_non_contiguous_and_channels_last(kernel_device):
    (g, eps, eta), (alpha, sigma, weight) = _inputs((3, 5, 7, 9), torch.float32, kernel_device, 3)
    g_cl = g.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    eps_t = eps.transpose(2, 3).contiguous().transpose(2, 3)  # neither contiguous nor channels_last
    grad = torch.autograd.grad(generator_loss(g_cl, eps_t, eta, alpha, sigma, weight), g_cl)[0]
    assert grad.is_contiguous(memory_format=torch.channels_last)
    _assert_matches(generator_loss, ops.generator_loss, (g_cl, eps_t, eta, alpha, sigma, weight), 1e-5, 1e-4)
    (d, x), (weight, *_) = _inputs((33, 7), torch.float16, kernel_device, 2)
    d_t = d.detach().t().requires_grad_(True)
    _assert_matches(dsm_loss, ops.dsm_loss, (d_t, x.t(), weight[:7]), 1e-2)


def test_outputs_fully_written(monkeypatch, kernel_device):
    """torch.empty poisoned with NaN: no partial sum or gradient element may be left unwritten."""
    (g, eps, eta), (alpha, sigma, weight) = _inputs((3, 1500), torch.bfloat16, kernel_device, 3)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    for loss in (generator_loss(g, eps, eta, alpha, sigma, weight), dsm_loss(g, eps, weight)):
        grad = torch.autograd.grad(loss, g)[0]
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_reduction_is_deterministic(kernel_device):
    (d, x), (_, _, weight) = _inputs((3, 1500), torch.float32, kernel_device, 2)
    values = [dsm_loss(d, x, weight) for _ in range(3)]
    assert all(torch.equal(v, values[0]) for v in values)


def test_bad_inputs_raise_clear_errors(kernel_device):
    (g, eps, eta), (alpha, sigma, weight) = _inputs((7, 33), torch.float32, kernel_device, 3)
    with pytest.raises(ValueError, match=r"eta has shape \(7, 32\) but g has \(7, 33\)"):
        generator_loss(g, eps, eta[:, :32], alpha, sigma, weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(7,\) to match g"):
        generator_loss(g, eps, eta, alpha, sigma, weight[:6])
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        dsm_loss(g, eps.double(), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(7,\) to match d"):
        dsm_loss(g, eps, weight[None])
