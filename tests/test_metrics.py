import torch

from emd_fast.evaluation.mixture_metrics import chi2_quantile, energy_distance, mixture_metrics, reference_metrics
from emd_fast.schedules import VPCosine
from emd_fast.teachers.mixture import gmm16d, ring2d


def test_exact_samples_score_perfectly():
    teacher = ring2d(VPCosine())
    m = reference_metrics(teacher, 4000, torch.Generator().manual_seed(0))
    assert m["modes_covered"] == 8 and m["mode_tv"] < 0.04 and m["off_mode"] < 0.01
    assert m["energy_distance"] < 0.01
    assert 0.9 < m["mode_spread"] < 1.05


def test_collapse_and_blur_are_penalised():
    teacher = ring2d(VPCosine())
    exact, _ = teacher.sample(2000, torch.Generator().manual_seed(0))
    collapsed = teacher.means[7].float() + 0.05 * torch.randn(2000, 2)
    m = mixture_metrics(collapsed, teacher, exact)
    assert m["modes_covered"] == 1 and m["mode_tv"] > 0.7
    assert m["mode_spread"] < 0.1  # std 0.05 around a mode of std 0.2: under-dispersed
    blurred = exact + 0.6 * torch.randn_like(exact)  # mass smeared between the modes
    m = mixture_metrics(blurred, teacher, exact)
    assert m["off_mode"] > 0.3 and m["mode_tv"] > 0.3 and m["mean_loglik"] < -3


def test_energy_distance_properties():
    x = torch.randn(500, 3)
    assert abs(energy_distance(x, x)) < 1e-9
    assert energy_distance(x, x + 1.0) > 0.5


def test_chi2_quantile():
    assert abs(chi2_quantile(2) - 13.8155) < 1e-3
    assert abs(chi2_quantile(16) - 39.25) < 0.3  # tabulated chi2(16) 99.9% quantile is 39.252


def test_high_dimensional_preset():
    teacher = gmm16d(VPCosine())
    m = reference_metrics(teacher, 3000, torch.Generator().manual_seed(1))
    assert teacher.dim == 16 and m["modes_covered"] == 10 and m["off_mode"] < 0.01
