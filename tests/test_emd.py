"""Mathematical properties of the reference EMD iteration."""
import copy

import pytest
import torch

from emd_fast.emd import EMD, EMDConfig
from emd_fast.execution.backends import NetworkCall
from emd_fast.ops import ReferenceOps
from emd_fast.schedules import VPCosine, expand_like
from emd_fast.teachers import score_from_denoiser
from emd_fast.teachers.mixture import GaussianMixtureTeacher, data_std
from emd_fast.training.distiller import Distiller

from helpers import ExactDenoiser, LinearGenerator, small_problem


def make_emd(cfg, seed=0, problem=None):
    teacher, gen, student = problem or small_problem(seed)
    return EMD(teacher, gen, student, cfg, ReferenceOps(torch.Generator().manual_seed(seed + 100)), sigma_data=2.0)


def inputs(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), 0.1 + 0.8 * torch.rand(n, generator=g)


def test_k1_cancelled_gradient_equals_diff_instruct():
    """EMD-1 on eps with noise cancellation: grad = gamma_eps * Diff-Instruct grad E[w alpha J^T (s_psi - s_T)]."""
    cfg = EMDConfig(K=1, gamma_eps=0.2, variant="eps", cancel_noise=True)
    emd = make_emd(cfg)
    z, eps, t = inputs()
    loss = emd.generator_loss(emd.e_step(z, eps, t))
    params = list(emd.generator.parameters())
    got = torch.autograd.grad(loss, params)

    # Diff-Instruct, computed independently: scores at x_t = alpha g(z) + sigma eps_0
    sch = emd.schedule
    g = emd.generator(z)
    alpha, sigma = (expand_like(v, g) for v in sch.alpha_sigma(t))
    x_t = (alpha * g + sigma * eps).detach()
    with torch.no_grad():
        delta = emd.teacher.score(x_t, t) - score_from_denoiser(sch, x_t, t, emd.student(x_t, t))
    w = expand_like(sch.weight(cfg.gen_weighting, t, 2.0), g)
    surrogate = (w * alpha * (-delta) * g).sum() / g.numel()  # d/dtheta = E[w alpha (s_psi - s_T) dg/dtheta]
    want = torch.autograd.grad(surrogate, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, cfg.gamma_eps * b, rtol=1e-5, atol=1e-8)
    assert max(float(a.abs().max()) for a in got) > 0


class RecordingTeacher:
    def __init__(self, teacher):
        self.teacher, self.schedule, self.data_shape, self.seen = teacher, teacher.schedule, teacher.data_shape, []

    def denoise(self, x_t, t, y=None):
        self.seen.append(x_t.clone())
        return self.teacher.denoise(x_t, t)


@pytest.mark.parametrize("variant", ["eps,z", "eps"])
def test_cancellation_removes_exactly_the_bookkept_noise(variant):
    """eps_K - eta_K = sum_k gamma (1 - gamma)^(K-1-k) sigma delta_k: only the drift survives."""
    teacher, gen, student = small_problem()
    rec = RecordingTeacher(teacher)
    K, gamma = 5, 0.3
    emd = make_emd(EMDConfig(K=K, gamma_eps=gamma, gamma_z=0.05, variant=variant), problem=(rec, gen, student))
    z, eps, t = inputs()
    es = emd.e_step(z, eps, t)
    sigma = es.sigma[:, None]
    drift = torch.zeros_like(eps)
    with torch.no_grad():
        for x_t in rec.seen:
            delta = teacher.score(x_t, t) - score_from_denoiser(teacher.schedule, x_t, t, student(x_t, t))
            drift = (1 - gamma) * drift + gamma * sigma * delta
    assert len(rec.seen) == K
    torch.testing.assert_close(es.eps - es.eta, drift, rtol=1e-4, atol=1e-5)
    assert float((es.eps - drift).abs().mean()) > 0.1  # the noise that cancellation removes is not small


def test_x_and_eps_chains_coincide_when_z_is_fixed():
    z, eps, t = inputs()
    out = {}
    for variant in ("x", "eps"):
        emd = make_emd(EMDConfig(K=4, gamma_eps=0.25, variant=variant))
        es = emd.e_step(z, eps, t)
        out[variant] = (es, emd.generator_loss(es))
    torch.testing.assert_close(out["x"][0].eps, out["eps"][0].eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x"][1], out["eps"][1], rtol=1e-5, atol=1e-7)


def test_k0_with_cancellation_gives_zero_gradient():
    emd = make_emd(EMDConfig(K=0, variant="eps,z"))
    z, eps, t = inputs()
    loss = emd.generator_loss(emd.e_step(z, eps, t))
    assert all(float(g.abs().max()) == 0 for g in torch.autograd.grad(loss, list(emd.generator.parameters())))


@pytest.mark.parametrize("t_level", [0.5, 1e-3])
@pytest.mark.parametrize("variant", ["eps,z", "x,z"])
def test_langevin_with_exact_scores_keeps_the_target_invariant(variant, t_level):
    """Linear generator, Gaussian teacher, exact student: the (x_t, z) target p_T(x_t) p_theta(z | x_t) is Gaussian
    and known; started there, K Langevin steps (both variables, the noise-scaled z step) must leave it invariant.
    Checked in the target's whitened coordinates, so that at t = 1e-3 (where z | x_t is very narrow and a fixed
    z step would diverge) the chain's small absolute moves are still measured against the target's own scale."""
    sch = VPCosine()
    a = torch.tensor([[1.0, 0.3], [-0.2, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.5, -0.3], dtype=torch.float64)
    mu = torch.tensor([-0.4, 0.6], dtype=torch.float64)
    s_cov = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)
    teacher = GaussianMixtureTeacher(mu[None], s_cov[None], [1.0], sch)
    p_theta = GaussianMixtureTeacher(b[None], (a @ a.T)[None], [1.0], sch)  # law of g(z) = A z + b
    gen = LinearGenerator(a.float(), b.float())
    n = 40_000
    t = torch.full((n,), t_level)
    al, si = (float(v) for v in sch.alpha_sigma(torch.tensor(t_level, dtype=torch.float64)))
    g = torch.Generator().manual_seed(0)
    # exact sample of the target: x_t ~ p_T,t ; z | x_t ~ N(m, P^-1) under p_theta
    x_t = teacher.sample_t(t, g).double()
    prec = torch.eye(2, dtype=torch.float64) + (al / si) ** 2 * a.T @ a
    cov_post = torch.linalg.inv(prec)
    gain = cov_post @ a.T * al / si**2  # E[z | x_t] = gain (x_t - alpha b)
    m = (x_t - al * b) @ gain.T
    z = m + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_post).T
    eps = (x_t - al * (z @ a.T + b)) / si
    # the target's exact mean and covariance of (x_t, z), and its whitening
    cov_x = al**2 * s_cov + si**2 * torch.eye(2, dtype=torch.float64)
    mean = torch.cat([al * mu, gain @ (al * mu - al * b)])
    cov = torch.cat([torch.cat([cov_x, cov_x @ gain.T], 1),
                     torch.cat([gain @ cov_x, gain @ cov_x @ gain.T + cov_post], 1)])
    white = torch.linalg.inv(torch.linalg.cholesky(cov))

    def whitened(x, zz):
        return (torch.cat([x.double(), zz.double()], 1) - mean) @ white.T

    cfg = EMDConfig(K=40, gamma_eps=0.02, gamma_z=0.02, variant=variant)
    emd = EMD(teacher, gen, ExactDenoiser(p_theta), cfg, ReferenceOps(torch.Generator().manual_seed(1)))
    es = emd.e_step(z.float(), eps.float(), t)
    x_k = es.x_t if variant == "x,z" else al * gen(es.z).detach() + si * es.eps
    before, after = whitened(x_t, z), whitened(x_k, es.z)
    assert (after - before).norm(dim=1).mean() > 0.3  # the chain really moved, on the target's scale
    torch.testing.assert_close(before.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(after.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(after.T.cov(), torch.eye(4, dtype=torch.float64), atol=0.05, rtol=0)


def ill_conditioned_mixture(sch):
    """4 modes of std 0.01 at distance 5 from the origin (2-D): narrow modes far apart."""
    means = 5.0 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    return GaussianMixtureTeacher(means, torch.full((4,), 1e-4), torch.ones(4), sch)


@pytest.mark.parametrize("variant", ["eps,z", "x,z"])
def test_scaled_z_step_is_stable_at_low_noise_where_a_fixed_step_diverges(variant):
    """Exact teacher scores of an ill-conditioned mixture, exact scores of a linear generator's Gaussian law with
    ||J_g|| = sigma_data: at t = 1e-3 the scaled z chain stays bounded; the fixed step (the same gamma_z) explodes."""
    sch = VPCosine()
    teacher = ill_conditioned_mixture(sch)
    sd = data_std(teacher)
    gen = LinearGenerator(sd * torch.eye(2), torch.zeros(2))
    student = ExactDenoiser(GaussianMixtureTeacher(torch.zeros(1, 2), torch.full((1,), sd**2), [1.0], sch))
    g = torch.Generator().manual_seed(0)
    z, eps, t = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g), torch.full((512,), 1e-3)
    moves = {}
    for z_step in ("scaled", "fixed"):
        cfg = EMDConfig(K=16, gamma_z=0.01, z_step=z_step, variant=variant)
        emd = EMD(teacher, gen, student, cfg, ReferenceOps(torch.Generator().manual_seed(1)), sigma_data=sd,
                  call=NetworkCall(check=False))
        es = emd.e_step(z, eps, t)
        moves[z_step] = float((es.z - z).norm(dim=1).max())
    assert moves["scaled"] < 3  # bounded: of the order of the prior's scale
    assert not moves["fixed"] < 1e3  # the fixed step overshoots by orders of magnitude (or turns into inf/nan)


def test_z_step_size_scales_with_the_noise_level():
    emd = make_emd(EMDConfig(gamma_z=0.02))
    alpha, sigma = emd.schedule.alpha_sigma(torch.tensor([1e-3, 0.5, 0.999]))
    got = emd.z_step_size(alpha, sigma)
    want = 0.02 * sigma**2 / (sigma**2 + (2.0 * alpha) ** 2)
    torch.testing.assert_close(got, want)
    assert float(got[0]) < 1e-7 and abs(float(got[2]) - 0.02) < 1e-6  # tiny at low noise, gamma_z at high noise
    assert make_emd(EMDConfig(gamma_z=0.02, z_step="fixed")).z_step_size(alpha, sigma) == 0.02


def test_more_langevin_steps_move_the_fit_towards_maximum_likelihood():
    """A Gaussian generator g(z) = s z (1-D) cannot represent a two-mode teacher (modes at +-2, std 0.3). With an
    exact student, EMD-1 (Diff-Instruct: the integrated reverse KL) is stationary at s ~ 1.83, maximum likelihood
    (forward KL, at every noise level: the moment-matching s = sqrt(4.09) ~ 2.02) wants s wider. At s = 1.86 the
    EMD-1 gradient narrows s; those of EMD-4, 8 and 16 widen it, more with every K: the E-step moves the M-step's
    fixed point from the mode-seeking fit towards the mass-covering one. With z fixed the shift is smaller (the
    eps chain alone), but in the same direction."""
    sch = VPCosine()
    teacher = GaussianMixtureTeacher(torch.tensor([[-2.0], [2.0]]), torch.full((2,), 0.09), torch.ones(2), sch)
    s = 1.86
    gen = LinearGenerator(torch.tensor([[s]]), torch.zeros(1))
    student = ExactDenoiser(GaussianMixtureTeacher(torch.zeros(1, 1), torch.tensor([s**2]), [1.0], sch))
    g = torch.Generator().manual_seed(0)
    n = 1 << 18
    z, eps, t = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g), sch.sample_t(n, g, "cpu")

    def grad_s(K, variant):  # dL/ds of the M-step loss after the E-step
        emd = EMD(teacher, gen, student, EMDConfig(K=K, variant=variant),
                  ReferenceOps(torch.Generator().manual_seed(1)))
        return float(torch.autograd.grad(emd.generator_loss(emd.e_step(z, eps, t)), gen.a)[0])

    # seed to seed (4 seeds tried) the gradients vary by ~1e-3; the gaps asserted are >= 3e-3
    grads = {K: grad_s(K, "eps,z") for K in (1, 4, 8, 16)}
    assert grads[1] > 2.5e-3, grads  # > 0: gradient descent narrows s, towards the reverse-KL fit
    assert grads[8] < -5e-3, grads  # < 0: widens it, towards maximum likelihood
    assert grads[1] - 3e-3 > grads[4] > grads[8] + 3e-3 > grads[16] + 6e-3, grads
    assert grad_s(16, "eps") < grad_s(1, "eps") - 3e-3


def test_bad_hyperparameters():
    for kwargs, msg in [({"K": -1}, "K must be"), ({"gamma_eps": -0.1}, "gamma_eps must be > 0"),
                        ({"gamma_eps": 1.5}, "gamma_eps must be < 1"), ({"gamma_z": 0.0}, "gamma_z must be in"),
                        ({"variant": "z"}, "variant must be"), ({"gen_weighting": "x"}, "gen_weighting"),
                        ({"z_step": "adaptive"}, "z_step must be one of")]:
        with pytest.raises(ValueError, match=msg):
            EMDConfig(**kwargs).validate()
    EMDConfig(variant="eps", gamma_z=0.0).validate()  # gamma_z unused when z is fixed


class NaNTeacher(RecordingTeacher):
    def denoise(self, x_t, t, y=None):
        out = self.teacher.denoise(x_t, t)
        out[3, 1] = float("nan")
        return out


def test_nan_from_teacher_is_caught_and_parameters_untouched():
    teacher, gen, student = small_problem()
    distiller = Distiller(NaNTeacher(teacher), gen, student, EMDConfig(K=2), batch=16, lr_g=1e-3, lr_s=1e-3)
    before = copy.deepcopy(distiller.state_tensors())
    with pytest.raises(FloatingPointError, match="teacher denoiser output contains nan"):
        distiller.step()
    after = distiller.state_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "rng")


def test_nonfinite_loss_leaves_parameters_unchanged():
    teacher, gen, student = small_problem()
    distiller = Distiller(teacher, gen, student, EMDConfig(K=1), batch=16, lr_g=1e-3, lr_s=1e-3)
    distiller.step()
    snapshot = {k: v.clone() for k, v in gen.state_dict().items()}
    loss = (gen(torch.randn(4, 2)) * float("nan")).mean()
    with pytest.raises(FloatingPointError, match="generator loss or gradient is nan/inf at step 2"):
        distiller._update(distiller.opt_g, loss, "generator")
    assert all(torch.equal(snapshot[k], v) for k, v in gen.state_dict().items())


def test_e_step_vjp_leaves_the_generator_weights_out():
    """The E-step's generator calls see weights that do not require grad (emd.frozen: a compiled backward would
    otherwise compute every weight gradient in each of the K VJPs); the M-step call sees them trainable again."""
    teacher, gen, student = small_problem()
    distiller = Distiller(teacher, gen, student, EMDConfig(K=3), batch=16, lr_g=1e-3, lr_s=1e-3)
    seen = []
    gen.register_forward_pre_hook(lambda module, args: seen.append(any(p.requires_grad for p in module.parameters())))
    distiller.step()
    assert seen == [False, False, False, True]  # K E-step calls (z moves: one VJP each), then the M-step
    assert all(p.requires_grad for p in gen.parameters())
