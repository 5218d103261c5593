"""Flow matching as a schedule: FlowMatching's algebra, and the noise levels, network timesteps and denoiser of a
flow teacher against diffusers' own FlowMatchEulerDiscreteScheduler at its timesteps, for the shift options the
folders use (static shift, resolution-dependent dynamic shifting, exponential and linear), plus the spacing-only
options; a mixture distils with ``--schedule flow``."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from emd_fast import train
from emd_fast.schedules import FlowMatching

diffusers = pytest.importorskip("diffusers")

from emd_fast.teachers.diffusers_folder import Prompts, SD3Denoiser  # noqa: E402
from emd_fast.teachers.diffusers_folder.schedules import flow_shift  # noqa: E402


@pytest.mark.parametrize("shift", [1.0, 3.0, math.exp(1.15), 0.6])
def test_flow_schedule_algebra(shift):
    """alpha + sigma = 1; lambda = 2 log(alpha / sigma) decreasing, inverted by t_from_lambda; a log-SNR has the
    same noise level whatever the shift (lambda* = -4: s* = 1 / (1 + e^-2)); s(t) is the scheduler's shift map."""
    s = FlowMatching(shift)
    t = torch.linspace(s.t_min, s.t_max, 997, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    assert torch.allclose(alpha + sigma, torch.ones_like(t), rtol=0, atol=1e-15)
    assert torch.allclose(sigma, shift * t / (1 + (shift - 1) * t), rtol=1e-14)
    lam = s.lam(t)
    assert bool((lam[1:] < lam[:-1]).all()) and torch.allclose(lam, 2 * torch.log(alpha / sigma), rtol=1e-12)
    assert torch.allclose(s.t_from_lambda(lam), t, rtol=1e-12, atol=1e-14)
    assert torch.allclose(s.t_from_sigma(sigma), t, rtol=1e-12, atol=1e-14)
    t_star = s.t_at_lambda(-4.0)
    assert float(s.sigma(torch.tensor(t_star, dtype=torch.float64))) == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-12)
    f32 = s.sigma(t.float())
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), sigma, rtol=1e-6)
    with pytest.raises(ValueError, match="shift > 0"):
        FlowMatching(-1.0)


class VelocityStub(nn.Module):
    """SD3Transformer2DModel's calling convention: returns a fixed velocity and records the timestep it was given."""

    def __init__(self, v):
        super().__init__()
        self.v, self.dummy, self.timesteps = v, nn.Parameter(torch.zeros(())), []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        self.timesteps.append(timestep)
        return (self.v,)


# (name, scheduler options, image tokens the pipeline computes mu from, inference step counts)
CONFIGS = [
    ("SD3 shift 3", dict(shift=3.0), None, (1, 4, 28)),
    ("FLUX.1-schnell shift 1", dict(shift=1.0), None, (1, 4)),
    ("FLUX.1-dev dynamic, 1024 px", dict(shift=3.0, use_dynamic_shifting=True), 4096, (1, 4, 28)),
    ("FLUX.1-dev dynamic, 512 px", dict(shift=3.0, use_dynamic_shifting=True), 1024, (4,)),
    ("dynamic linear", dict(use_dynamic_shifting=True, time_shift_type="linear"), 2000, (4,)),
    ("shift_terminal", dict(shift=3.0, shift_terminal=0.1), None, (4,)),  # 1 step: the scheduler's own sigma is NaN
    ("karras sigmas", dict(shift=3.0, use_karras_sigmas=True), None, (4,)),
    ("exponential sigmas", dict(shift=2.0, use_exponential_sigmas=True), None, (4,)),
]


@pytest.mark.parametrize("name,options,tokens,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_noise_levels_timesteps_and_denoiser_are_the_schedulers(name, options, tokens, steps):
    """At every timestep of the scheduler's own sampling: sigma (alpha = 1 - sigma) is our s(t) at the time t that
    has it, the transformer is called at the scheduler's timestep, and the DDIM step built from our D(x_t, t),
    alpha' D + sigma' (x_t - alpha D) / sigma (D itself for the last step, to noise level 0), is
    ``scheduler.step`` (<= 1e-5, fp32)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(diffusers.FlowMatchEulerDiscreteScheduler(**options).config)
    k = flow_shift(config, tokens)
    schedule = FlowMatching(k)
    g = torch.Generator().manual_seed(0)
    worst = {"sigma": 0.0, "timestep": 0.0, "step": 0.0}
    for n in steps:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**options)
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15) if tokens else None  # what FluxPipeline passes
        scheduler.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n) if tokens else None, mu=mu)
        x = torch.randn(2, 4, 6, 6, generator=g)  # odd-ish sizes: 6 x 6 latents, 9 tokens of patch 2
        cond = Prompts(torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, generator=g))
        for i, timestep in enumerate(scheduler.timesteps):
            sigma, sigma_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
            t = schedule.t_from_sigma(sigma.reshape(1)).expand(2).float()
            v = torch.randn(2, 4, 6, 6, generator=g)
            stub = VelocityStub(v)
            d = SD3Denoiser(stub, schedule, None, scheduler.config.num_train_timesteps)(x, t, cond).double()
            alpha, s = (float(a[0]) for a in schedule.alpha_sigma(t.double()))
            if sigma_next > 0:
                a_next, s_next = 1 - float(sigma_next), float(sigma_next)
                ours = a_next * d + s_next * (x.double() - alpha * d) / s
            else:
                ours = d
            want = scheduler.step(v, timestep, x, return_dict=False)[0]
            worst["sigma"] = max(worst["sigma"], abs(s - float(sigma)) / float(sigma))
            called = float((stub.timesteps[0] - timestep).abs().max()) / float(timestep)
            worst["timestep"] = max(worst["timestep"], called)
            worst["step"] = max(worst["step"], float((ours.float() - want).abs().max()))
            x = want
    print(f"{name}: worst relative sigma {worst['sigma']:.1e}, relative timestep {worst['timestep']:.1e}, "
          f"step {worst['step']:.1e}")
    assert worst["sigma"] < 1e-6 and worst["timestep"] < 1e-6 and worst["step"] <= 1e-5, worst


def test_dynamic_shift_is_the_pipelines():
    """Dynamic shifting: k = e^mu with the pipelines' mu (linear in the image tokens), from the loaded scheduler's
    config: a key the file lacks takes the scheduler's default; linear time shifts: k = mu, refused where mu <= 0."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 128, "max_image_seq_len": 2048, "max_shift": 1.3}
    loaded = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config).config
    assert loaded.base_shift == 0.5
    for tokens in (16, 1024, 4096, 16384):
        mu = calculate_shift(tokens, 128, 2048, loaded.base_shift, 1.3)
        assert flow_shift(config, tokens) == pytest.approx(math.exp(mu), rel=1e-12)
        assert flow_shift({**config, "time_shift_type": "linear"}, tokens) == pytest.approx(mu, rel=1e-12)
    assert flow_shift({"shift": 3.0}, 4096) == 3.0
    with pytest.raises(ValueError, match=r"mu = -0\.60\d+ at 16 image tokens is not a time shift \(need mu > 0\)"):
        flow_shift({**config, "time_shift_type": "linear", "base_shift": -0.5, "base_image_seq_len": 256,
                    "max_image_seq_len": 4096, "max_shift": 1.16}, 16)


def test_flow_defaults_are_the_schedulers():
    """FLOW_DEFAULTS, the values a scheduler config without these keys loads with, are the installed
    FlowMatchEulerDiscreteScheduler's own defaults."""
    import inspect

    from emd_fast.teachers.diffusers_folder.folder import FLOW_DEFAULTS

    parameters = inspect.signature(diffusers.FlowMatchEulerDiscreteScheduler.__init__).parameters
    assert {key: parameters[key].default for key in FLOW_DEFAULTS if key in parameters} == {
        key: value for key, value in FLOW_DEFAULTS.items() if key in parameters}
    assert set(FLOW_DEFAULTS) - set(parameters) <= {"time_shift_type"}  # older diffusers: exponential only


def test_a_mixture_distils_in_flow_time(tmp_path):
    """--schedule flow: the exact mixture teacher and the MLPs in rectified-flow noise levels; the generator starts
    as the teacher denoiser at lambda* (s* = 0.881) and the losses stay finite."""
    out = tmp_path / "r"
    assert train.main(["--schedule", "flow", "--steps", "3", "--batch", "16", "--K", "2", "--teacher-fit-steps", "20",
                       "--eval-every", "3", "--eval-samples", "64", "--quiet", "--device", "cpu", "--out",
                       str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["schedule"] == "flow"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss_g" in row]
    assert len(steps) == 3 and all(np.isfinite([row["loss_g"], row["loss_s"]]).all() for row in steps)
