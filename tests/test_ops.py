"""The reference elementwise ops: formulas, dtypes and boundary errors (the kernels are tested against these)."""
import math

import pytest
import torch

from emd_fast import ops


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_langevin_eps_step_formula():
    n, d, gamma = 5, 7, 0.2
    eps, eta, dt, ds, noise, g = (rand(n, d, seed=i) for i in range(6))
    alpha, sigma = torch.rand(n) + 0.1, torch.rand(n) + 0.1
    eps2, eta2, v, x2 = ops.langevin_eps_step(eps, eta, dt, ds, alpha, sigma, gamma, noise, g)
    a, s = alpha[:, None], sigma[:, None]
    delta = a * (dt - ds) / s**2
    torch.testing.assert_close(eps2, eps + gamma * (s * delta - eps) + math.sqrt(2 * gamma) * noise)
    torch.testing.assert_close(eta2, (1 - gamma) * eta + math.sqrt(2 * gamma) * noise)
    torch.testing.assert_close(v, a * delta)
    torch.testing.assert_close(x2, a * g + s * eps2)
    _, none_eta, _, none_x = ops.langevin_eps_step(eps, None, dt, ds, alpha, sigma, gamma, noise)
    assert none_eta is None and none_x is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    n, d = 4, 9
    args = [rand(n, d, seed=i) for i in range(5)]
    alpha, sigma = torch.rand(n) + 0.5, torch.rand(n) + 0.5
    low = [a.to(dtype) for a in args]
    out = ops.langevin_eps_step(low[0], low[1], low[2], low[3], alpha, sigma, 0.3, low[4])
    ref = ops.langevin_eps_step(*[a.float() for a in low[:4]], alpha, sigma, 0.3, low[4].float())
    for o, r in zip(out[:3], ref[:3]):
        assert o.dtype == dtype
        torch.testing.assert_close(o.float(), r, rtol=1e-2, atol=1e-2)


def test_langevin_z_step_per_example_gamma():
    """A (N,) gamma steps each row as a float gamma would (the noise-scaled z step)."""
    z, jtv, noise = rand(5, 3, 4, seed=1), rand(5, 3, 4, seed=2), rand(5, 3, 4, seed=3)
    gamma = torch.tensor([1e-6, 0.01, 0.1, 0.3, 0.9])
    got = ops.langevin_z_step(z, jtv, gamma, noise)
    for i, gi in enumerate(gamma.tolist()):
        want = z[i] + gi * (jtv[i] - z[i]) + math.sqrt(2 * gi) * noise[i]
        torch.testing.assert_close(got[i], want)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        ops.langevin_z_step(z, jtv, gamma[:4], noise)


def test_losses_value_and_gradient():
    n, d = 6, 5
    g = rand(n, d, seed=1).requires_grad_(True)
    eps, eta = rand(n, d, seed=2), rand(n, d, seed=3)
    alpha, sigma, w = torch.rand(n) + 0.1, torch.rand(n) + 0.1, torch.rand(n) + 0.5
    loss = ops.generator_loss(g, eps, eta, alpha, sigma, w)
    r = eps - eta
    torch.testing.assert_close(loss, (w[:, None] * r**2).mean() / 2)
    (grad,) = torch.autograd.grad(loss, g)
    torch.testing.assert_close(grad, -w[:, None] * alpha[:, None] * r / (sigma[:, None] * g.numel()))
    d_out = rand(n, d, seed=4).requires_grad_(True)
    x = rand(n, d, seed=5)
    loss = ops.dsm_loss(d_out, x, w)
    torch.testing.assert_close(loss, (w[:, None] * (d_out - x) ** 2).mean())


def test_boundary_errors():
    a, b = rand(4, 3), rand(4, 5)
    v = torch.rand(4)
    with pytest.raises(ValueError, match=r"d_teacher has shape \(4, 5\) but eps has \(4, 3\)"):
        ops.langevin_eps_step(a, a, b, a, v, v, 0.1, a)
    with pytest.raises(ValueError, match=r"alpha must have shape \(4,\)"):
        ops.langevin_eps_step(a, a, a, a, torch.rand(3), v, 0.1, a)
    with pytest.raises(TypeError, match="noise has dtype torch.int64"):
        ops.langevin_eps_step(a, a, a, a, v, v, 0.1, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="gamma_eps must be > 0"):
        ops.langevin_eps_step(a, a, a, a, v, v, -0.1, a)
    with pytest.raises(ValueError, match="gamma_z must be > 0"):
        ops.langevin_z_step(a, a, 0.0, a)
    with pytest.raises(ValueError, match=r"x has shape \(4, 5\) but d has \(4, 3\)"):
        ops.dsm_loss(a, b, v)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        ops.generator_loss(a, a, None, v, v, torch.rand(4, 1))
