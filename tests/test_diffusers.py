"""diffusers teachers (``--teacher DIR``): the discrete schedule, the prediction types, guidance, and runs end to end
on the CPU with tiny random-weight models built from configs and saved with ``save_pretrained`` (nothing is
downloaded; the CLIP tokenizer is written from a tiny vocabulary)."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from emd_fast import sample, train  # noqa: E402
from emd_fast.emd import EMD, EMDConfig  # noqa: E402
from emd_fast.ops import ReferenceOps  # noqa: E402
from emd_fast.teachers.diffusers_folder import (
    DiffusersDenoiser,
    DiscreteSchedule,
    GuidedTeacher,
    PromptTable,
    # noqa: E402
    inspect_folder,
    load_schedule,
)
from emd_fast.training.checkpoint import list_checkpoints  # noqa: E402

from helpers import NoHostRead  # noqa: E402

SMALL = ["--steps", "4", "--batch", "3", "--K", "1", "--eval-every", "2", "--eval-samples", "6", "--ckpt-every", "2",
         "--quiet", "--device", "cpu", "--phase-every", "0"]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def scheduler(**kw):
    return diffusers.DDPMScheduler(num_train_timesteps=kw.pop("num_train_timesteps", 1000), **kw)


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                           attention_head_dim=8), **kw})


def pixel_folder(path, prediction_type="epsilon", beta_schedule="linear", seed=0, **unet_kw):
    """A UNet2DModel folder: config.json, weights and scheduler_config.json side by side."""
    tiny_unet(seed, **unet_kw).save_pretrained(path)
    scheduler(prediction_type=prediction_type, beta_schedule=beta_schedule).save_pretrained(path)
    return path


def train_main(out, *args):
    return train.main(["--out", str(out), *SMALL, *args])


def final_tensors(out):
    return load_file(str(list_checkpoints(out / "checkpoints")[-1].with_suffix(".safetensors")))


def one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- the schedule ------------------------------------------------------------------------------------------------

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


# --- prediction types: the same analytic denoiser as an epsilon-, v- and sample-predicting module -----------------

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


# --- pixel teachers through the CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type,beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2"),
                                                           ("sample", "scaled_linear")])
def test_pixel_folder_trains_resumes_exactly_and_samples(prediction_type, beta_schedule, tmp_path):
    folder = pixel_folder(tmp_path / "ddpm", prediction_type, beta_schedule)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(straight, "--teacher", str(folder), "--plot-every", "2") == 0
    assert train_main(split, "--teacher", str(folder), "--steps", "2") == 0
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["generator.denoiser.unet.conv_in.weight"],
                           tiny_unet().state_dict()["conv_in.weight"])  # trained
    cfg = json.loads((split / "config.json").read_text())
    assert len(cfg["teacher_sha256"]) == 64 and cfg["teacher_info"]["arch"]["prediction_type"] == prediction_type
    assert cfg["teacher_info"]["schedule"] == {"name": "diffusers_discrete", "t_min": 0.0, "t_max": 999.0,
                                               "num_train_timesteps": 1000}
    summary = json.loads((split / "summary.json").read_text())
    assert summary["problem"] == "DiffusersProblem" and {"pixel_mean", "pixel_std"} <= set(summary["final"])
    for name in ("samples/final.png", "samples/step_0000002.png"):
        assert (straight / name).read_bytes()[:4] == b"\x89PNG"
    arrays = tmp_path / "s.npz"
    assert sample.main([str(split), "--n", "5", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (5, 3, 8, 8) and np.isfinite(f["images"]).all()


def test_generator_starts_as_the_teachers_denoiser_at_lambda_star(tmp_path):
    """Generator and student start from the teacher's UNet: at step 0 g(z) = D_T(sigma* z, t*)."""
    from emd_fast.training.build import Run

    folder = pixel_folder(tmp_path / "ddpm", "v_prediction")
    cfg = vars(train.build_parser().parse_args(["--teacher", str(folder), "--batch", "2", "--device", "cpu"]))
    cfg["out"] = str(tmp_path)
    run = Run(cfg, torch.device("cpu"), fit_teacher=False)
    z = torch.randn(2, 3, 8, 8)
    t_star = torch.full((2,), run.t_star)
    sigma_star = run.teacher.schedule.sigma(t_star)[0]
    want = run.teacher.denoise(sigma_star * z, t_star)
    assert torch.allclose(run.distiller.generator(z), want, atol=1e-5)
    assert torch.allclose(run.distiller.student(z, t_star), run.teacher.denoise(z, t_star), atol=1e-5)
    assert run.t_star == pytest.approx(float(run.teacher.schedule.t_from_lambda(torch.tensor(-4.0,
                                                                                             dtype=torch.float64))))


def test_class_conditional_pixel_unet_takes_labels(tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m", num_class_embeds=3)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--labels", "0", "2", "--steps", "2") == 0
    arrays = tmp_path / "s.npz"
    assert sample.main([str(out), "--labels", "2", "1", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (2, 3, 8, 8) and f["labels"].tolist() == [2, 1]
    err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder), "--labels", "3"))
    assert "--labels must lie in [0, 3)" in err


def test_pipeline_with_the_unet_and_scheduler_at_the_top(tmp_path):
    """The layout of google/ddpm-cifar10-32: model_index.json beside the UNet's config, weights and scheduler config."""
    import shutil

    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(folder)
    for part in ("unet", "scheduler"):
        for f in (folder / part).iterdir():
            f.rename(folder / f.name)
        shutil.rmtree(folder / part)
    assert inspect_folder(folder).unet == folder
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2", "--eval-every", "0") == 0


def test_grayscale_non_square_pixel_unet_trains_and_samples(tmp_path):
    """MNIST-style: 1 channel, 28 x 20 (not a power of two, not square), 6 and 10 channels (groups of 2)."""
    folder = pixel_folder(tmp_path / "m", in_channels=1, out_channels=1, sample_size=(28, 20), block_out_channels=(6, 10),
                          norm_num_groups=2, attention_head_dim=5)
    out, arrays = tmp_path / "r", tmp_path / "s.npz"
    assert train_main(out, "--teacher", str(folder), "--steps", "2") == 0
    assert sample.main([str(out), "--n", "3", "--out", str(arrays), str(tmp_path / "g.png")]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (3, 1, 28, 20) and np.isfinite(f["images"]).all()


def test_pipeline_folder_with_a_pixel_unet(tmp_path, capsys):
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=scheduler()).save_pretrained(folder)
    assert inspect_folder(folder).unet == folder / "unet"
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2") == 0
    err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder / "unet")))
    assert f"unet/ folder of a pipeline? give the pipeline folder, --teacher {folder}" in err
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        err = one_line_error(capsys, train_main(tmp_path / "r2", "--teacher", str(folder / name)))
        assert f"a file of the diffusers folder {folder}: give the folder" in err, name


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
    own = getattr(diffusers, cls)(**options)
    own.save_pretrained(folder)
    s = load_schedule(inspect_folder(folder))
    steps = own.config.num_train_timesteps
    assert s.t_max == steps - 1
    assert torch.allclose(s.alpha(torch.arange(float(steps), dtype=torch.float64)) ** 2, own.alphas_cumprod.double(),
                          rtol=1e-12, atol=0)


def test_zero_terminal_snr_teacher_trains_on_the_timesteps_before_the_last(tmp_path):
    """rescale_betas_zero_snr: alphas_cumprod[-1] = 0 (infinite noise) is not a noise level the EMD iteration can
    use (sigma/alpha = inf); the run's t range ends one timestep before, and every loss stays finite."""
    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder)
    diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                            timestep_spacing="trailing").save_pretrained(folder)
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--steps", "2") == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["teacher_info"]["schedule"]["t_max"] == 998.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss_g" in row]
    assert len(steps) == 2 and all(np.isfinite([row["loss_g"], row["loss_s"], row["grad_g"]]).all() for row in steps)


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


@pytest.mark.parametrize("save", [dict(variant="fp16"), dict(safe_serialization=False), dict(max_shard_size="50KB")])
def test_weights_as_a_variant_bin_or_shards_load_and_define_the_teacher(save, tmp_path):
    """fp16-variant-only, .bin-only and sharded weights: the run trains; the teacher's SHA-256 covers the files that
    are loaded (a changed shard or variant file is another teacher)."""
    from emd_fast.teachers.diffusers_folder import folder_sha256, weight_files

    folder = tmp_path / "m"
    tiny_unet().save_pretrained(folder, **save)
    scheduler().save_pretrained(folder)
    variant, files = weight_files(folder)
    assert variant == save.get("variant") and all(f.is_file() for f in files) and len(files) >= 1
    assert train_main(tmp_path / "r", "--teacher", str(folder), "--steps", "2", "--eval-every", "0") == 0
    before = folder_sha256(folder)
    data = files[-1].read_bytes()
    files[-1].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert folder_sha256(folder) != before


def test_load_schedule_reads_the_scheduler_config(tmp_path):
    folder = pixel_folder(tmp_path / "m", beta_schedule="scaled_linear")
    s = load_schedule(inspect_folder(folder))
    assert torch.allclose(s.alpha(torch.arange(1000.0, dtype=torch.float64)) ** 2,
                          scheduler(beta_schedule="scaled_linear").alphas_cumprod.double())


# --- bad input ---------------------------------------------------------------------------------------------------

def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def replace_scheduler(folder, cls, **options):
    (folder / "scheduler_config.json").unlink()
    getattr(diffusers, cls)(**options).save_pretrained(folder)


def two_variants(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "diffusion_pytorch_model.fp16.safetensors")
    (folder / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")


@pytest.mark.parametrize("breakage,message", [
    (lambda f: edit_json(f / "config.json", _class_name="UNet1DModel"), "model class 'UNet1DModel' is not supported"),
    (lambda f: edit_json(f / "scheduler_config.json", prediction_type="flow"), "prediction type 'flow' is not"),
    (lambda f: edit_json(f / "scheduler_config.json", beta_schedule="exp"), "beta schedule 'exp' is not"),
    (lambda f: (f / "diffusion_pytorch_model.safetensors").unlink(), "incomplete diffusers folder, no weights"),
    (lambda f: (f / "scheduler_config.json").unlink(), "no scheduler_config.json"),
    (lambda f: (f / "config.json").unlink(), "without model_index.json or config.json"),
    (lambda f: edit_json(f / "config.json", time_embedding_type="fourier"), "time_embedding_type 'fourier'"),
    (lambda f: (f / "config.json").write_text('{"_class_name": "UNet2DModel", '), "unreadable UNet config"),
    (lambda f: (f / "scheduler_config.json").write_text("{"), "unreadable scheduler config"),
    (lambda f: truncate(f / "diffusion_pytorch_model.safetensors"), "cannot load UNet2DModel: Unable to load weights"),
    (lambda f: truncate(f / "diffusion_pytorch_model.safetensors", 0), "cannot load UNet2DModel"),
    (lambda f: edit_json(f / "config.json", block_out_channels=[8, 32]), "cannot load UNet2DModel: Error(s) in "
                                                                          "loading state_dict for UNet2DModel: size"),
    (two_variants, "weights in several variants (ema, fp16) and none plain"),
    (lambda f: edit_json(f / "config.json", sample_size=None), "sample_size None in config.json"),
    (lambda f: edit_json(f / "config.json", out_channels=5), "out_channels 5 differs from in_channels 3"),
    (lambda f: edit_json(f / "config.json", in_channels=4, out_channels=4), "UNet2DModel with in_channels 4: a pixel"),
    (lambda f: edit_json(f / "config.json", class_embed_type="timestep"), "class_embed_type 'timestep' needs class"),
    (lambda f: replace_scheduler(f, "EDMEulerScheduler"), "scheduler 'EDMEulerScheduler' is not supported"),
    (lambda f: replace_scheduler(f, "FlowMatchEulerDiscreteScheduler"), "'FlowMatchEulerDiscreteScheduler' is not"),
    (lambda f: replace_scheduler(f, "EulerDiscreteScheduler", timestep_type="continuous"),
     "EulerDiscreteScheduler with timestep_type 'continuous' is not supported"),
    (lambda f: replace_scheduler(f, "DPMSolverMultistepScheduler", use_flow_sigmas=True), "use_flow_sigmas True"),
    (lambda f: replace_scheduler(f, "DDPMScheduler", num_train_timesteps=20000),  # fp32 alphas_cumprod underflow
     "scheduler_config.json: alphas_cumprod must be"),
    (lambda f: edit_json(f / "scheduler_config.json", num_train_timesteps="1000"), "'num_train_timesteps': '1000'"),
    (lambda f: edit_json(f / "scheduler_config.json", trained_betas="0.1"), "scheduler_config.json: no noise levels"),
    (lambda f: edit_json(f / "scheduler_config.json", num_train_timesteps=-3), "scheduler_config.json: no noise lev"),
])
def test_bad_folders_are_one_line_errors(breakage, message, tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m")
    breakage(folder)
    err = one_line_error(capsys, train_main(tmp_path / "r", "--teacher", str(folder)))
    assert message in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--guidance-scale", "-1"], "--guidance-scale must be finite and >= 0"),
    (["--guidance-scale", "inf"], "--guidance-scale must be finite and >= 0, got inf"),
    (["--guidance-scale", "nan"], "--guidance-scale must be finite and >= 0, got nan"),
    (["--schedule", "edm"], "leave --schedule out"),
    (["--prompts", "PROMPTS"], "is not text-conditioned"),
    (["--labels", "1"], "is unconditional"),
])
def test_bad_options_for_a_pixel_teacher_are_one_line_errors(args, message, tmp_path, capsys):
    folder = pixel_folder(tmp_path / "m")
    (tmp_path / "p.txt").write_text("a cat\n")
    args = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in args]
    err = one_line_error(capsys, train_main(tmp_path / "r", "--teacher", str(folder), *args))
    assert message in err


def test_diffusers_options_need_a_diffusers_teacher(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    err = one_line_error(capsys, train_main(tmp_path / "r", "--prompts", str(tmp_path / "p.txt")))
    assert "--prompts applies to diffusers teachers" in err
    err = one_line_error(capsys, train_main(tmp_path / "r", "--grad-checkpoint"))
    assert "--grad-checkpoint applies to diffusers teachers" in err


# --- latent text-to-image teachers -------------------------------------------------------------------------------

VOCAB = ["<|startoftext|>", "<|endoftext|>", "a</w>", "cat</w>", "dog</w>", "red</w>", "c", "a", "t", "d", "o", "g",
         "r", "e", "t</w>", "g</w>", "d</w>", "e</w>"]


def tiny_tokenizer(directory):
    """A CLIP tokenizer over a tiny vocabulary (words and letters, no merges), written here: never downloaded."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(VOCAB)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                                      model_max_length=8)


def tiny_cond_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)


def latent_pipeline(path, prediction_type="epsilon", seed=0):
    """A Stable-Diffusion-style pipeline folder: 4x8x8 latents, a VAE decoding them to 3x16x16, a CLIP text encoder
    (16 wide, 8 tokens)."""
    torch.manual_seed(seed + 1)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(path.parent / f"{path.name}-vocab"),
        unet=tiny_cond_unet(seed), scheduler=scheduler(prediction_type=prediction_type, **SD_BETAS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return latent_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


def prompts_file(tmp_path, text="a cat\n\na red dog\n"):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


def test_latent_text_pipeline_trains_in_latent_space_resumes_from_cached_embeddings_and_samples(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    prompts = prompts_file(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--teacher", str(folder), "--prompts", str(prompts), "--guidance-scale", "2.5"]
    assert train_main(straight, *args, "--plot-every", "2") == 0
    assert train_main(split, *args, "--steps", "2") == 0
    meta_tensors = load_file(str(split / "prompt_embeddings.safetensors"))
    assert meta_tensors["cond"].shape == (2, 8, 16) and meta_tensors["uncond"].shape == (1, 8, 16)
    (folder / "text_encoder").rename(tmp_path / "away")  # the training loop never needs the text encoder again
    assert train.main(["--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    assert sample.main([str(split), "--prompt", "a cat"]) == 2  # a new prompt does
    (tmp_path / "away").rename(folder / "text_encoder")
    a, b = final_tensors(straight), final_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("embeddings" in k or "vae" in k for k in a)  # neither the prompts nor the VAE are checkpointed
    cfg = json.loads((split / "config.json").read_text())
    assert cfg["teacher_info"]["guidance_scale"] == 2.5 and len(cfg["prompts_sha256"]) == 64
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["problem"] == "DiffusersProblem" and np.isfinite(summary["final"]["pixel_std"])
    assert (straight / "samples" / "step_0000002.png").read_bytes()[:4] == b"\x89PNG"
    # the cached prompts (one row each), decoded by the VAE to 3x16x16 images
    arrays = tmp_path / "s.npz"
    assert sample.main([str(straight), "--per-class", "3", "--out", str(arrays)]) == 0
    with np.load(arrays) as f:
        assert f["images"].shape == (6, 3, 16, 16) and f["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    grid = tmp_path / "cat.png"
    assert sample.main([str(straight), "--prompt", "a cat", "--n", "4", "--out", str(grid), str(arrays)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    with np.load(arrays) as f:
        assert f["images"].shape == (4, 3, 16, 16) and f["labels"].tolist() == [-1] * 4


def test_a_new_prompt_samples_as_the_same_cached_prompt_does(sd_folder, tmp_path):
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(sd_folder), "--prompts", str(prompts_file(tmp_path)), "--steps",
                      "2") == 0
    by_index, by_text = tmp_path / "i.npz", tmp_path / "t.npz"
    assert sample.main([str(out), "--labels", "1", "1", "--out", str(by_index)]) == 0
    assert sample.main([str(out), "--prompt", "a red dog", "--n", "2", "--out", str(by_text)]) == 0
    with np.load(by_index) as f, np.load(by_text) as g:
        assert np.allclose(f["images"], g["images"], atol=1e-5)


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


def test_bf16_teacher_and_gradient_checkpointing(sd_folder, tmp_path):
    """--precision bf16 keeps the frozen teacher in bf16 (generator and student fp32); --grad-checkpoint changes
    nothing that is computed."""
    from emd_fast.training.build import Run

    prompts = prompts_file(tmp_path)
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    args = ["--teacher", str(sd_folder), "--prompts", str(prompts), "--steps", "2", "--eval-every", "0"]
    assert train_main(plain, *args) == 0
    assert train_main(ckpt, *args, "--grad-checkpoint") == 0
    a, b = final_tensors(plain), final_tensors(ckpt)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    cfg = vars(train.build_parser().parse_args([*args, "--precision", "bf16", "--grad-checkpoint"]))
    cfg["out"] = str(plain)
    run = Run(cfg, torch.device("cpu"), fit_teacher=False)
    dtypes = {name: {p.dtype for p in net.parameters()} for name, net in
              (("teacher", run.teacher.net), ("generator", run.distiller.generator),
               ("student", run.distiller.student))}
    assert dtypes == {"teacher": {torch.bfloat16}, "generator": {torch.float32}, "student": {torch.float32}}
    assert not any(p.requires_grad for p in run.teacher.net.parameters())
    assert run.distiller.generator.denoiser.unet.is_gradient_checkpointing
    assert run.distiller.student.unet.is_gradient_checkpointing
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.full((2,), 400.0), torch.tensor([0, 1])
    assert run.teacher.denoise(x, t, y).dtype == torch.float32
    assert torch.isfinite(run.distiller.step()["loss_g"])


@pytest.mark.parametrize("case,message", [
    ("no_vae", "needs a VAE to decode samples"),
    ("unet_only", "needs a VAE to decode samples"),
    ("empty_prompts", "no prompts (one per line)"),
    ("no_prompts", "is text-conditioned: pass --prompts FILE"),
    ("negative_guidance", "--guidance-scale must be finite and >= 0"),
    ("no_text_encoder", "no text_encoder/ or tokenizer/"),
    ("sdxl", "with addition_embed_type 'text_time' needs extra conditioning inputs"),
    ("inpainting", "in_channels 9 differs from the VAE's latent_channels 4"),
    ("class_labels", "UNet2DConditionModel with num_class_embeds 10 needs class labels"),
    ("image_proj", "encoder_hid_dim_type 'image_proj' needs image embeddings"),
    ("truncated_text_encoder", "text_encoder: cannot load the text encoder: Error while deserializing header"),
    ("no_vae_weights", "vae: incomplete diffusers folder, no weights (diffusion_pytorch_model.safetensors / .bin)"),
    ("no_text_encoder_weights", "text_encoder: incomplete diffusers folder, no weights (model.safetensors / .bin or "
                                "pytorch_model.safetensors / .bin)"),
    ("text_width", "the text encoder's hidden_size 16 is not the width of the text embeddings the UNet takes (24)"),
    ("vq_vae", "VAE class 'VQModel' is not supported; emd_fast decodes with AutoencoderKL"),
    ("vae_4_channels", "vae: out_channels 4: the VAE must decode images of 1 or 3 channels"),
])
def test_bad_latent_input_is_a_one_line_error(case, message, sd_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    prompts = prompts_file(tmp_path, "\n  \n" if case == "empty_prompts" else "a cat\n")
    teacher = folder / "unet" if case == "unet_only" else folder
    if case == "no_vae":
        edit_json(folder / "model_index.json", vae=[None, None])
    if case == "no_text_encoder":
        shutil.rmtree(folder / "text_encoder")
        edit_json(folder / "model_index.json", text_encoder=[None, None])
    if case == "sdxl":
        edit_json(folder / "unet" / "config.json", addition_embed_type="text_time")
    if case == "inpainting":
        edit_json(folder / "unet" / "config.json", in_channels=9)
    if case == "class_labels":
        edit_json(folder / "unet" / "config.json", num_class_embeds=10)
    if case == "image_proj":
        edit_json(folder / "unet" / "config.json", encoder_hid_dim_type="image_proj", encoder_hid_dim=16)
    if case == "truncated_text_encoder":
        truncate(folder / "text_encoder" / "model.safetensors", 0.001)
    if case == "text_width":
        edit_json(folder / "unet" / "config.json", cross_attention_dim=24)
    if case == "vq_vae":
        edit_json(folder / "vae" / "config.json", _class_name="VQModel")
    if case == "vae_4_channels":
        edit_json(folder / "vae" / "config.json", out_channels=4)
    if case == "no_text_encoder_weights":
        (folder / "text_encoder" / "model.safetensors").unlink()
    if case == "no_vae_weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    args = ["--teacher", str(teacher)] + ([] if case == "no_prompts" else ["--prompts", str(prompts)])
    args += ["--guidance-scale", "-0.1"] if case == "negative_guidance" else []
    err = one_line_error(capsys, train_main(tmp_path / "r", *args))
    assert message in err and not (tmp_path / "r").exists()


def test_long_unicode_prompts_and_a_tokenizer_without_a_max_length(sd_folder, tmp_path):
    """Prompts longer than the text encoder's positions are truncated (as Stable Diffusion pipelines do), also where
    tokenizer_config.json gives no model_max_length (transformers then says 10**30); unicode and blank lines pass."""
    import shutil

    from emd_fast.teachers.diffusers_folder import encode_prompts

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model_max_length"}))
    assert transformers.AutoTokenizer.from_pretrained(folder / "tokenizer").model_max_length > 10**20
    prompts = prompts_file(tmp_path, "a cat " * 100 + "\n\n \u3000\n\u00fc\u00f1\u00ed \u732b \U0001f431 dog\r\n")
    out = tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--prompts", str(prompts), "--steps", "2") == 0
    cond = load_file(str(out / "prompt_embeddings.safetensors"))["cond"]
    assert cond.shape == (2, 8, 16) and torch.isfinite(cond).all()
    # 8 positions: start, 6 words, end; the rest of the long prompt is cut
    assert torch.allclose(cond[0], encode_prompts(inspect_folder(folder), ["a cat a cat a cat"])[0], atol=1e-6)


def test_pipeline_of_fp16_variant_weights_only(sd_folder, tmp_path):
    """A pipeline saved with variant="fp16" (UNet, VAE and text encoder: *.fp16.safetensors only) trains, with the
    same embeddings as the plain pipeline."""
    folder = tmp_path / "fp16"
    diffusers.StableDiffusionPipeline.from_pretrained(sd_folder).save_pretrained(folder, variant="fp16")
    assert not list(folder.glob("*/diffusion_pytorch_model.safetensors"))
    args = ["--prompts", str(prompts_file(tmp_path)), "--steps", "2", "--eval-every", "2"]
    assert train_main(tmp_path / "a", "--teacher", str(folder), *args) == 0
    assert train_main(tmp_path / "b", "--teacher", str(sd_folder), *args) == 0
    a, b = final_tensors(tmp_path / "a"), final_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_embeddings_are_those_of_the_runs_prompts_and_text_encoder(sd_folder, tmp_path):
    from emd_fast.problems.diffusers_folder import DiffusersProblem

    cfg = vars(train.build_parser().parse_args(["--teacher", str(sd_folder), "--prompts",
                                                str(prompts_file(tmp_path, "a cat\na dog\nred\n"))]))
    cfg["out"] = str(tmp_path)
    three = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert three.shape == (3, 8, 16) and (tmp_path / "prompt_embeddings.safetensors").is_file()
    again = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert torch.equal(again, three)
    prompts_file(tmp_path, "a dog\n")  # other prompts in the same run directory: encoded anew
    one = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert one.shape == (1, 8, 16) and torch.allclose(one[0], three[1])
    assert load_file(str(tmp_path / "prompt_embeddings.safetensors"))["cond"].shape == (1, 8, 16)


def test_cached_embeddings_of_another_text_encoder_are_encoded_anew(sd_folder, tmp_path):
    import shutil

    from emd_fast.problems.diffusers_folder import DiffusersProblem

    folder = tmp_path / "pipe"
    shutil.copytree(sd_folder, folder)
    cfg = vars(train.build_parser().parse_args(["--teacher", str(folder), "--prompts", str(prompts_file(tmp_path))]))
    cfg["out"] = str(tmp_path)
    before = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    final_norm = dict(text.named_parameters())["final_layer_norm.bias"]  # the last op of the text encoder
    with torch.no_grad():
        final_norm += 1.0
    text.save_pretrained(folder / "text_encoder")
    after = DiffusersProblem.from_config(cfg).teacher.net.prompts.embeddings
    assert torch.allclose(after, before + 1.0, atol=1e-5)


def test_memory_estimate_counts_what_a_real_forward_saves():
    """benchmarks/diffusers_memory.py counts saved-for-backward bytes on fake tensors: the count of a real forward
    of a tiny UNet; checkpointing saves less, a larger batch more."""
    import contextlib
    import importlib.util
    from pathlib import Path

    from torch._subclasses.fake_tensor import FakeTensorMode

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "diffusers_memory.py"
    spec = importlib.util.spec_from_file_location("diffusers_memory", path)
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    real = tiny_cond_unet()
    mode = FakeTensorMode()
    with mode:
        fake = tiny_cond_unet()
    for bf16 in (False, True):
        counts = {(b, c): memory.saved_bytes(fake, mode, b, c, bf16, tokens=8) for b in (1, 4) for c in (False, True)}
        for c in (False, True):  # fp32: the same tensors; bf16: within 2% (seen: 1.0%, real CPU kernels differ)
            real_count = memory.saved_bytes(real, contextlib.nullcontext(), 1, c, bf16, tokens=8)
            assert real_count == (pytest.approx(counts[1, c], rel=0.02) if bf16 else counts[1, c])
        assert counts[1, True] < counts[1, False] < counts[4, False] and counts[1, True] < counts[4, True]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deferred_step_of_a_text_to_image_teacher_makes_no_host_sync(sd_folder, tmp_path, precision):
    """The latent, prompt-conditioned, guided path of a --fast run (deferred checks, channels_last) reads no tensor
    value on the host in an iteration: it can be captured in a CUDA graph."""
    from emd_fast.training.build import Run

    args = ["--teacher", str(sd_folder), "--prompts", str(prompts_file(tmp_path)), "--finite-check", "deferred",
            "--channels-last", "--precision", precision, "--batch", "3", "--out", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()  # the run directory the command would make: the prompt embeddings are cached there
    run = Run(vars(train.build_parser().parse_args(args)), torch.device("cpu"), fit_teacher=False)
    assert run.distiller.deferred
    run.distiller.step()  # lazy state (optimizer moments) first
    with NoHostRead():
        run.distiller.step()
