"""Preconditioning: EDM's three schemes (Karras et al. 2022, Table 1), supported ranges, configs, any schedule."""
import json
import math

import pytest
import torch

from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.nets.precond import EDMPrecond, VEPrecond, VPPrecond, make_precond, precondition
from emd_fast.schedules import EDMSchedule, VPCosine

S = torch.logspace(math.log10(0.002), math.log10(80.0), 9)


def vp_sigma(t, beta_d, beta_min):
    return math.sqrt(math.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def table1(precond, s: float) -> tuple[float, float, float, float]:
    """Karras et al. 2022, Table 1, in float64: (c_skip, c_out, c_in, c_noise) at sigma = s."""
    if isinstance(precond, EDMPrecond):
        sd = precond.sigma_data
        return sd**2 / (s**2 + sd**2), s * sd / math.sqrt(s**2 + sd**2), 1 / math.sqrt(s**2 + sd**2), math.log(s) / 4
    if isinstance(precond, VPPrecond):
        bd, bm = precond.beta_d, precond.beta_min
        t = (math.sqrt(bm**2 + 2 * bd * math.log(s**2 + 1)) - bm) / bd  # the t with vp_sigma(t) = s
        return 1.0, -s, 1 / math.sqrt(s**2 + 1), (precond.M - 1) * t
    return 1.0, s, 1.0, math.log(s / 2)


PRECONDS = [EDMPrecond(), EDMPrecond(sigma_data=0.7, sigma_min=0.01, sigma_max=50), VPPrecond(),
            VPPrecond(beta_d=18.0, beta_min=0.2, M=500, epsilon_t=1e-4), VEPrecond(), VEPrecond(0.01, 60.0)]


@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: json.dumps(p.config()))
def test_coefficients_are_table_1(precond):
    coeffs = precond(S)
    assert all(c.shape == S.shape and c.dtype == torch.float32 for c in coeffs)
    for i, s in enumerate(S.double().tolist()):
        # fp32 evaluation: VP's log(1 + s^2) loses digits at small s, as in EDM (atol on c_noise, up to 999 there)
        torch.testing.assert_close(torch.stack([c[i] for c in coeffs]).double(),
                                   torch.tensor(table1(precond, s), dtype=torch.float64), rtol=1e-5, atol=2e-3)


def test_vp_noise_level_is_ddpm_time():
    """c_noise = (M - 1) t for s = sigma(t): the VP preconditioning inverts its own noise schedule."""
    p = VPPrecond()
    t = torch.tensor([0.05, 0.2, 0.5, 1.0])
    s = torch.tensor([vp_sigma(v, p.beta_d, p.beta_min) for v in t.tolist()])
    torch.testing.assert_close(p(s)[3], (p.M - 1) * t, rtol=1e-5, atol=0)


def test_supported_ranges():
    p = VPPrecond()
    assert p.sigma_min == pytest.approx(vp_sigma(1e-5, 19.9, 0.1), rel=1e-9)  # expm1: no cancellation
    assert p.sigma_max == pytest.approx(vp_sigma(1.0, 19.9, 0.1), rel=1e-12)
    assert p.sigma_min == pytest.approx(1.0e-3, rel=1e-3) and p.sigma_max == pytest.approx(152.3, rel=1e-3)
    assert (VEPrecond().sigma_min, VEPrecond().sigma_max) == (0.02, 100.0)
    assert (EDMPrecond().sigma_min, EDMPrecond().sigma_max) == (0.0, math.inf)


@pytest.mark.parametrize("precond", PRECONDS, ids=lambda p: json.dumps(p.config()))
def test_config_round_trip(precond):
    cfg = json.loads(json.dumps(precond.config(), allow_nan=False))  # strict JSON: EDM's sigma_max=inf is null
    again = make_precond(cfg)
    assert type(again) is type(precond) and again.config() == precond.config()
    assert (again.sigma_min, again.sigma_max) == (precond.sigma_min, precond.sigma_max)
    assert all(torch.equal(a, b) for a, b in zip(again(S), precond(S)))


@pytest.mark.parametrize("cfg,match", [
    ({"type": "iddpm"}, r"unknown preconditioning type 'iddpm'; choose one of \('edm', 'vp', 've'\)"),
    ({"sigma_data": 0.5}, "unknown preconditioning type None"),
    ({"type": "ve", "sigma_data": 0.5}, r"bad ve preconditioning config .*sigma_data"),
])
def test_make_precond_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        make_precond(cfg)


@pytest.mark.parametrize("precond", PRECONDS[::2], ids=lambda p: p.type)
def test_any_schedule_is_the_same_denoiser(precond):
    """D in the VP cosine schedule at (x_t, t) = D in the EDM schedule at (x_t / alpha_t, sigma_t / alpha_t)."""
    def model(x, c_noise):
        return torch.tanh(x * c_noise[:, None])

    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(4, 3, generator=g), torch.tensor([0.1, 0.4, 0.7, 0.95])
    alpha, sigma = VPCosine().alpha_sigma(t)
    d_vp = precondition(precond, VPCosine(), x_t, t, model)
    torch.testing.assert_close(d_vp, precondition(precond, EDMSchedule(), x_t / alpha[:, None], sigma / alpha, model))
    c_skip, c_out, c_in, c_noise = (c[:, None] for c in precond(sigma / alpha))
    x = x_t / alpha[:, None]
    torch.testing.assert_close(d_vp, c_skip * x + c_out * model(c_in * x, c_noise.flatten()))


def test_mlp_uses_edm_preconditioning():
    net = MLPDenoiser(3, VPCosine(), hidden=16, depth=1, sigma_data=2.0)
    assert net.precond.config() == EDMPrecond(2.0).config()
    x_t, t = torch.randn(5, 3), torch.rand(5) * 0.9 + 0.05
    assert torch.equal(net(x_t, t), precondition(net.precond, net.schedule, x_t, t, net.mlp))
