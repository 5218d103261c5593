import pytest
import torch

from emd_fast.nets.mlp import MLPDenoiser
from emd_fast.schedules import EDMSchedule, VPCosine
from emd_fast.teachers import NetworkTeacher, score_from_denoiser
from emd_fast.teachers.mixture import GaussianMixtureTeacher


def random_mixture(schedule, m=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(m, d, generator=g, dtype=torch.float64)
    a = torch.randn(m, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) * 0.3 + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianMixtureTeacher(means, covs, torch.rand(m, generator=g, dtype=torch.float64) + 0.2, schedule)


@pytest.mark.parametrize("schedule", [VPCosine(), EDMSchedule()], ids=["vp", "edm"])
def test_score_is_gradient_of_exact_log_density(schedule):
    teacher = random_mixture(schedule)
    g = torch.Generator().manual_seed(1)
    t = schedule.sample_t(64, g, "cpu").double()
    x = teacher.sample_t(t.float(), g).double().requires_grad_(True)
    (grad,) = torch.autograd.grad(teacher.log_prob_t(x, t).sum(), x)
    torch.testing.assert_close(teacher.score(x.detach(), t), grad, rtol=1e-9, atol=1e-10)


def test_denoiser_is_posterior_mean():
    """Monte-Carlo check of Tweedie: E[x | x_t] from importance weights over exact samples."""
    sch = VPCosine()
    teacher = random_mixture(sch, m=3, d=2, seed=3)
    g = torch.Generator().manual_seed(0)
    x, _ = teacher.sample(400_000, g)
    x = x.double()
    t = torch.tensor([0.6], dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    x_t = a * x[:1] + s * torch.randn(1, 2, generator=g, dtype=torch.float64)
    logw = -((x_t - a * x) ** 2).sum(1) / (2 * s**2)
    post = (torch.softmax(logw, 0)[:, None] * x).sum(0)
    torch.testing.assert_close(teacher.denoise(x_t, t)[0], post, atol=0.02, rtol=0)


def test_clean_log_prob_and_isotropic_covs():
    sch = VPCosine()
    teacher = GaussianMixtureTeacher([[0.0, 0.0]], [0.25], [1.0], sch)
    x = torch.randn(10, 2, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                      0.25 * torch.eye(2, dtype=torch.float64)).log_prob(x)
    torch.testing.assert_close(teacher.log_prob(x), expected)
    torch.testing.assert_close(teacher.mahalanobis2(x)[:, 0], (x**2).sum(1) / 0.25)


def test_sample_statistics():
    teacher = random_mixture(VPCosine(), m=2, d=2, seed=5)
    x, labels = teacher.sample(200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=2).double() / len(labels)
    torch.testing.assert_close(freq, teacher.weights, atol=5e-3, rtol=0)
    torch.testing.assert_close(x.double().mean(0), (teacher.weights[:, None] * teacher.means).sum(0), atol=0.03,
                               rtol=0)


def test_network_teacher_score_matches_denoiser():
    sch = VPCosine()
    net = MLPDenoiser(3, sch, hidden=16, depth=1)
    teacher = NetworkTeacher(net, sch, (3,))
    x, t = torch.randn(5, 3), torch.rand(5) * 0.8 + 0.1
    torch.testing.assert_close(teacher.score(x, t), score_from_denoiser(sch, x, t, net(x, t)))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_bad_mixture_inputs():
    sch = VPCosine()
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixtureTeacher(torch.zeros(3), [1.0], [1.0], sch)
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixtureTeacher(torch.zeros(2, 3), torch.ones(2, 2, 2), [1.0, 1.0], sch)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixtureTeacher(torch.zeros(1, 2), -torch.eye(2)[None], [1.0], sch)
    with pytest.raises(ValueError, match="positive numbers"):
        GaussianMixtureTeacher(torch.zeros(2, 2), [1.0, 1.0], [1.0, -1.0], sch)
    teacher = GaussianMixtureTeacher(torch.zeros(2, 2), [1.0, 1.0], [1.0, 1.0], sch)
    with pytest.raises(ValueError, match=r"x_t must have shape \(N, 2\)"):
        teacher.score(torch.zeros(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must have shape \(4,\)"):
        teacher.score(torch.zeros(4, 2), torch.rand(5))


@pytest.mark.parametrize("schedule", [VPCosine(), EDMSchedule()], ids=["vp", "edm"])
def test_heun_sampler_with_exact_denoiser_samples_the_mixture(schedule):
    from emd_fast.evaluation.heun import heun_sample
    from emd_fast.evaluation.mixture_metrics import mixture_metrics
    from emd_fast.teachers.mixture import ring2d

    teacher = ring2d(schedule)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    x = heun_sample(teacher.denoise, schedule, noise, num_steps=30)
    exact, _ = teacher.sample(1000, g)
    m = mixture_metrics(x, teacher, exact)
    assert m["modes_covered"] == 8 and m["mode_tv"] < 0.06 and m["off_mode"] < 0.03
