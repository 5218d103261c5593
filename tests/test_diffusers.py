"""diffusers teachers as this project's denoiser and schedule: the discrete schedule (from the scheduler's own
noise levels), the prediction types, a learned-variance UNet, classifier-free guidance, and the memory estimate of
benchmarks/memory.py against real forwards (tests/test_memory_report.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from emd_fast.emd import EMD, EMDConfig
from emd_fast.ops import ReferenceOps
from emd_fast.teachers.diffusers_folder import (
    DiffusersDenoiser,
    DiscreteSchedule,
    GuidedTeacher,
    PromptTable,
    inspect_folder,
    load_schedule,
)

from diffusers_models import SD_BETAS, diffusers, pixel_folder, scheduler, tiny_cond_unet, tiny_unet


@pytest.mark.parametrize("kw", [dict(beta_schedule="linear"), SD_BETAS, dict(beta_schedule="squaredcos_cap_v2")])
def test_schedule_is_the_schedulers_at_timesteps_and_interpolates_log_sigma_between(kw):
    sched = scheduler(**kw)
    s = DiscreteSchedule(sched.alphas_cumprod)
    abar = sched.alphas_cumprod.double()
    steps = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.alpha(steps) ** 2, abar, rtol=1e-12, atol=0)
    assert torch.allclose(s.sigma(steps) ** 2, 1 - abar, rtol=1e-9, atol=1e-15)
    # between timesteps: diffusers' samplers interpolate log sigma (sigma = sqrt((1 - abar) / abar)) linearly in t
    t = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 999
    log_sigma = np.interp(t.numpy(), steps.numpy(), (0.5 * ((1 - abar) / abar).log()).numpy())
    alpha_want = 1 / np.sqrt(1 + np.exp(2 * log_sigma))
    assert np.allclose(s.alpha(t).numpy(), alpha_want, rtol=1e-10)
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(s.t_from_lambda(s.lam(t)), t, atol=1e-8)  # the inverse
    lam = s.lam(torch.linspace(0, 999, 3001, dtype=torch.float64))
    assert bool((lam[1:] < lam[:-1]).all())  # strictly decreasing
    f32 = s.alpha(t.float())
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), s.alpha(t.float().double()), rtol=1e-6)


def test_schedule_refuses_bad_tables_and_drops_a_zero_terminal_snr():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.7]))
    zero_snr = scheduler(beta_schedule="linear", rescale_betas_zero_snr=True).alphas_cumprod
    assert zero_snr[-1] == 0  # infinite noise at the last timestep: dropped, t is clamped to the one before
    s = DiscreteSchedule(zero_snr)
    assert s.t_max == 998 and np.isfinite(s.lambda_range).all()
    t = torch.tensor([997.5, 998.0, 998.7, 999.0, 1e9], dtype=torch.float64)
    assert torch.equal(s.alpha(t)[1:], s.alpha(torch.full((4,), 998.0, dtype=torch.float64)))
    assert torch.isfinite(s.lam(t)).all() and all(((v > 0) & (v < 1)).all() for v in s.alpha_sigma(t))
    assert s.t_from_lambda(torch.tensor([-float("inf"), -1e9], dtype=torch.float64)).tolist() == [998.0, 998.0]


@pytest.mark.parametrize("cls,options", [
    ("DDIMScheduler", dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing", clip_sample=True,
                           thresholding=True, sample_max_value=2.0, **SD_BETAS)),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, **SD_BETAS)),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, timestep_spacing="leading", beta_schedule="linear")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", thresholding=True,
                                         beta_schedule="squaredcos_cap_v2")),
    ("DDIMScheduler", dict(num_train_timesteps=500, trained_betas=torch.linspace(1e-4, 0.04, 500).tolist())),
    ("DDPMScheduler", dict(beta_schedule="sigmoid")),
    ("DDPMScheduler", dict(beta_schedule="laplace")),
])
def test_sampling_schedulers_give_their_training_noise_levels(cls, options, tmp_path):
    """The scheduler_config.json of a sampler (DDIM, PNDM, Euler, DPM-Solver) with sampling-only options: the noise
    levels are that scheduler's own alphas_cumprod."""
    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder)
    try:
        own = getattr(diffusers, cls)(**options)
    except NotImplementedError as e:  # e.g. 'laplace' betas arrived in a diffusers newer than our lower bound
        pytest.skip(f"this diffusers ({diffusers.__version__}) lacks it: {e}")
    own.save_pretrained(folder)
    s = load_schedule(inspect_folder(folder))
    steps = own.config.num_train_timesteps
    assert s.t_max == steps - 1
    assert torch.allclose(s.alpha(torch.arange(float(steps), dtype=torch.float64)) ** 2, own.alphas_cumprod.double(),
                          rtol=1e-12, atol=0)


def test_load_schedule_reads_the_scheduler_config(tmp_path):
    folder = pixel_folder(tmp_path / "m", beta_schedule="scaled_linear")
    s = load_schedule(inspect_folder(folder))
    assert torch.allclose(s.alpha(torch.arange(1000.0, dtype=torch.float64)) ** 2,
                          scheduler(beta_schedule="scaled_linear").alphas_cumprod.double())


class GaussianData:
    """x ~ N(mu, v) per element: E[x | x_t] = mu + alpha v (x_t - alpha mu) / (alpha^2 v + sigma^2)."""

    def __init__(self, shape, seed):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=g) * 0.5
        self.v = torch.rand(shape, generator=g) * 0.3 + 0.05

    def denoise(self, x_t, alpha, sigma):
        return self.mu + alpha * self.v * (x_t - alpha * self.mu) / (alpha**2 * self.v + sigma**2)


class AnalyticUNet(nn.Module):
    """diffusers' calling convention (sample, timestep, return_dict=False) -> (out,), predicting ``kind`` of
    GaussianData exactly."""

    def __init__(self, data, schedule, kind):
        super().__init__()
        self.data, self.schedule, self.kind = data, schedule, kind
        self.dummy = nn.Parameter(torch.zeros(()))  # a dtype for DiffusersDenoiser

    def forward(self, sample, timestep, return_dict=True):
        a, s = (v.reshape(-1, 1, 1, 1) for v in self.schedule.alpha_sigma(timestep))
        d = self.data.denoise(sample, a, s)
        eps = (sample - a * d) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * d, "sample": d}[self.kind]
        return (out,)


class ScaledGenerator(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.full(shape, 0.8))
        self.b = nn.Parameter(torch.full(shape, 0.1))

    def forward(self, z, y=None):
        return self.a * z + self.b


def test_prediction_types_give_the_same_denoiser_and_the_same_emd_gradient():
    shape = (3, 5, 7)  # odd sizes
    schedule = DiscreteSchedule(scheduler(**SD_BETAS).alphas_cumprod)
    data, student_data = GaussianData(shape, 0), GaussianData(shape, 1)
    g = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(6, *shape, generator=g), torch.rand(6, generator=g) * 900 + 20
    a, s = (v.reshape(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
    exact = data.denoise(x_t, a, s)
    grads = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        net = DiffusersDenoiser(AnalyticUNet(data, schedule, kind), schedule, kind)
        assert torch.allclose(net(x_t, t), exact, rtol=1e-4, atol=1e-4), kind
        teacher = GuidedTeacher(net, shape)
        student = DiffusersDenoiser(AnalyticUNet(student_data, schedule, "epsilon"), schedule, "epsilon")
        gen = ScaledGenerator(shape)
        emd = EMD(teacher, gen, student, EMDConfig(K=2, t_min=20.0, t_max=900.0),
                  ReferenceOps(torch.Generator().manual_seed(3)))
        rng = torch.Generator().manual_seed(4)
        z, eps = torch.randn(4, *shape, generator=rng), torch.randn(4, *shape, generator=rng)
        tt = schedule.sample_t(4, rng, "cpu", 20.0, 900.0)
        emd.generator_loss(emd.e_step(z, eps, tt)).backward()
        grads[kind] = torch.cat([gen.a.grad.flatten(), gen.b.grad.flatten()])
    assert grads["epsilon"].abs().max() > 1e-3  # a gradient that can differ
    for kind in ("v_prediction", "sample"):
        assert torch.allclose(grads[kind], grads["epsilon"], rtol=1e-3, atol=1e-5), kind


def test_learned_variance_unet_is_read_by_its_prediction_half():
    """A UNet whose out_channels are twice its in_channels outputs (prediction, variance), as diffusers' pipelines
    split it: D is read from the first half."""
    unet = tiny_unet(out_channels=6)
    schedule = DiscreteSchedule(scheduler().alphas_cumprod)
    net = DiffusersDenoiser(unet, schedule, "epsilon")
    g = torch.Generator().manual_seed(3)
    x_t, t = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g) * 999
    a, s = (v.reshape(-1, 1, 1, 1).float() for v in schedule.alpha_sigma(t))
    with torch.no_grad():
        eps = unet(x_t, t).sample[:, :3]
        assert torch.allclose(net(x_t, t), (x_t - s * eps) / a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_denoiser(prediction_type):
    unet = tiny_cond_unet(3)
    schedule = DiscreteSchedule(scheduler(**SD_BETAS).alphas_cumprod)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(3, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)
    net = DiffusersDenoiser(unet, schedule, prediction_type, PromptTable(cond))
    x_t, t, y = torch.randn(5, 4, 8, 8, generator=g), torch.rand(5, generator=g) * 999, torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        d_c, d_u = net(x_t, t, y), net(x_t, t, uncond.expand(5, -1, -1))
        assert torch.allclose(net(x_t, t, cond[y]), d_c)  # indices and embeddings are the same condition
    assert (d_c - d_u).abs().max() > 1e-3  # the condition matters
    teacher = {w: GuidedTeacher(net, (4, 8, 8), w, uncond) for w in (0.0, 1.0, 3.5)}
    assert torch.equal(teacher[1.0].denoise(x_t, t, y), d_c)
    assert torch.allclose(teacher[0.0].denoise(x_t, t, y), d_u, atol=1e-5)
    assert torch.allclose(teacher[3.5].denoise(x_t, t, y), d_u + 3.5 * (d_c - d_u), atol=1e-4)
    with pytest.raises(ValueError, match="guidance-scale must be finite and >= 0"):
        GuidedTeacher(net, (4, 8, 8), -0.5, uncond)
