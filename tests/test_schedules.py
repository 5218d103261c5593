import math

import pytest
import torch

from emd_fast.schedules import WEIGHTINGS, EDMSchedule, VPCosine, make_schedule

SCHEDULES = [VPCosine(), EDMSchedule()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_lambda_inverse_roundtrip(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 101, dtype=torch.float64)
    torch.testing.assert_close(sch.t_from_lambda(sch.lam(t)), t, rtol=1e-9, atol=1e-12)
    lo, hi = sch.lambda_range
    assert lo < hi
    assert sch.t_at_lambda(0.5 * (lo + hi)) == pytest.approx(float(sch.t_from_lambda(torch.tensor(0.5 * (lo + hi)))))


def test_vp_is_variance_preserving_and_monotone():
    sch = VPCosine()
    t = torch.rand(1000, dtype=torch.float64) * 0.99 + 0.005
    a, s = sch.alpha_sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
    lam = sch.lam(torch.sort(t).values)
    assert bool((lam[1:] < lam[:-1]).all())


def test_edm_is_variance_exploding():
    sch = EDMSchedule()
    t = torch.tensor([0.01, 1.0, 50.0])
    assert torch.equal(sch.alpha(t), torch.ones(3)) and torch.equal(sch.sigma(t), t)
    torch.testing.assert_close(sch.lam(t), -2 * t.log())


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.name)
def test_sample_t_in_range(sch):
    g = torch.Generator().manual_seed(0)
    t = sch.sample_t(5000, g, "cpu")
    assert t.shape == (5000,) and float(t.min()) >= sch.t_min and float(t.max()) <= sch.t_max
    t = sch.sample_t(5000, g, "cpu", 0.2, 0.4)
    lo, hi = torch.tensor([0.2, 0.4])  # t is fp32: compare with the fp32-rounded bounds
    assert bool(t.min() >= lo) and bool(t.max() <= hi)


@pytest.mark.parametrize("kind", WEIGHTINGS)
def test_weightings_positive_and_consistent(kind):
    sch = VPCosine()
    t = torch.linspace(0.05, 0.95, 19)
    w = sch.weight(kind, t, sigma_data=0.7)
    assert w.shape == t.shape and bool((w > 0).all())
    if kind == "snr":
        torch.testing.assert_close(w * sch.weight("inv_snr", t), torch.ones_like(t))


def test_bad_input_errors():
    with pytest.raises(ValueError, match="lambda\\*=50"):
        VPCosine().t_at_lambda(50.0)
    with pytest.raises(ValueError, match="unknown weighting"):
        VPCosine().weight("nope", torch.rand(3))
    with pytest.raises(ValueError, match="0 < t_min < t_max < 1"):
        VPCosine(t_min=0.5, t_max=0.2)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("linear")
    assert math.isfinite(VPCosine().lambda_range[0])
