"""Loss weightings for noise-predicting teachers (epsilon-prediction diffusers UNets, Stable Diffusion; EDM's VP and
VE networks): such a network's denoiser D = (x_t - sigma eps_hat) / alpha multiplies its errors by sigma / alpha (157
at DDPM's last linear-beta timestep). The defaults for such a teacher weigh both losses in noise-prediction units: the
student loss is the noise MSE (the teacher's own training loss) and the generator gradient the noise-prediction
difference, bounded at every t."""
import copy
import json

import pytest
import torch
from test_edm_import import edm_globals, write_edm_pickle  # noqa: F401 (a fixture)
from test_unet import random_song

from emd_fast import train
from emd_fast.emd import EMD, EMDConfig
from emd_fast.ops import ReferenceOps
from emd_fast.problems.diffusers_folder import DiffusersProblem
from emd_fast.schedules import NOISE_PREDICTION_WEIGHTINGS, expand_like
from emd_fast.teachers.network_file import save_network
from emd_fast.training.config import resolve

from diffusers_models import pixel_folder, train_main

T = torch.tensor([0.0, 1.0, 37.5, 250.0, 500.0, 750.0, 900.0, 998.5, 999.0])  # fractional timesteps, t_max included


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = pixel_folder(tmp_path_factory.mktemp("eps") / "ddpm", "epsilon", in_channels=1, out_channels=1,
                          num_class_embeds=3)
    return DiffusersProblem.from_config({"teacher": str(folder), "seed": 0, "eval_samples": 4,
                                         "precision": "fp32"}).teacher


def noise_prediction(net, x_t, t, y):
    return net.unet(x_t, t, class_labels=y).sample


class Fixed(torch.nn.Module):
    """A 'generator' whose output is its parameter (N, ...): the gradient of a loss in it is dL/dg."""

    def __init__(self, x):
        super().__init__()
        self.x = torch.nn.Parameter(x.clone())

    def forward(self, z, y=None):
        return self.x


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randn(n, 1, 8, 8, generator=g),
            torch.randint(3, (n,), generator=g))


def test_snr_student_loss_is_the_noise_mse_and_bounded_over_t(teacher):
    """Student = teacher (as at step 0): snr-weighted DSM == the teacher's own noise-prediction MSE at every t (the
    ratio of its largest to smallest per-t value is the network's, < 10 here), while EDM's weighting grows as
    (sigma / alpha)^2: x 10^4 at t_max."""
    student = copy.deepcopy(teacher.net)
    n = len(T)
    x, eps, y = data(n, 1)
    per_t = {}
    for kind in ("snr", "edm"):
        emd = EMD(teacher, Fixed(x), student, EMDConfig(student_weighting=kind), ReferenceOps(torch.Generator()),
                  sigma_data=0.5)
        per_t[kind] = torch.stack([emd.student_loss(x[i:i + 1], T[i:i + 1], eps[i:i + 1], y[i:i + 1]).detach()
                                   for i in range(n)])
    alpha, sigma = (expand_like(v, x) for v in teacher.schedule.alpha_sigma(T))
    with torch.no_grad():
        noise_mse = (noise_prediction(teacher.net, alpha * x + sigma * eps, T, y) - eps).square().flatten(1).mean(1)
    torch.testing.assert_close(per_t["snr"], noise_mse, rtol=2e-3, atol=1e-6)
    assert float(per_t["snr"].max() / per_t["snr"].min()) < 10
    assert float(per_t["edm"][-1] / per_t["edm"][0]) > 1e4


@pytest.mark.parametrize("kind,factor", [("sqrt_inv_snr", lambda a, s: 1.0), ("inv_snr", lambda a, s: s / a)])
def test_generator_gradient_in_noise_prediction_units(teacher, kind, factor):
    """EMD-1 on eps (z fixed), noise cancelled: dL/dg = gamma (eps_T - eps_psi) x factor / numel, eps_T and eps_psi
    the noise predictions at x_t = alpha g + sigma eps_0. sqrt_inv_snr: factor 1 at every t (bounded by the networks'
    own difference); inv_snr: factor sigma / alpha (157 at t_max)."""
    student = copy.deepcopy(teacher.net)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    n, gamma = len(T), 0.3
    g, eps, y = data(n, 2)
    gen = Fixed(g)
    emd = EMD(teacher, gen, student, EMDConfig(K=1, gamma_eps=gamma, variant="eps", gen_weighting=kind),
              ReferenceOps(torch.Generator().manual_seed(0)), sigma_data=0.5)
    loss = emd.generator_loss(emd.e_step(torch.zeros_like(g), eps, T, y), y)
    (got,) = torch.autograd.grad(loss, [gen.x])
    alpha, sigma = (expand_like(v, g) for v in teacher.schedule.alpha_sigma(T))
    x_t = alpha * g + sigma * eps
    with torch.no_grad():
        diff = noise_prediction(teacher.net, x_t, T, y) - noise_prediction(student, x_t, T, y)
    want = gamma * diff * factor(alpha, sigma) / g.numel()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert float(diff.abs().min(0).values.max()) > 0  # the student differs from the teacher


def resolved(argv):
    parser = train.build_parser()
    return resolve(vars(parser.parse_args(argv)), train._explicit(parser, argv))[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_epsilon_teachers_default_to_noise_unit_weightings(prediction_type, tmp_path):
    folder = str(pixel_folder(tmp_path / "m", prediction_type))
    cfg = resolved(["--teacher", folder, "--out", str(tmp_path / "r")])
    want = NOISE_PREDICTION_WEIGHTINGS if prediction_type == "epsilon" else {"student_weighting": "edm",
                                                                     "gen_weighting": "inv_snr"}
    assert {k: cfg[k] for k in want} == want
    cfg = resolved(["--teacher", folder, "--out", str(tmp_path / "r"), "--student-weighting", "uniform"])
    assert cfg["student_weighting"] == "uniform"  # what the command line says wins
    assert cfg["gen_weighting"] == want["gen_weighting"]


@pytest.mark.parametrize("variant, precond", [("ddpmpp", "edm"), ("ncsnpp", "ve"), ("skip", "vp")])
def test_vp_and_ve_networks_default_to_noise_unit_weightings(variant, precond, edm_globals, tmp_path):  # noqa: F811
    """EDM's VP and VE networks predict the noise (c_out = sigma), in our files and in EDM pickles alike; EDM's own
    preconditioning does not (c_out <= sigma_data) and keeps the EDM weightings."""
    net = random_song(variant)
    assert net.arch["precond"]["type"] == precond
    files = [tmp_path / "net.safetensors", write_edm_pickle(net, tmp_path / "net.pkl")]
    save_network(net, files[0])
    want = NOISE_PREDICTION_WEIGHTINGS if precond in ("vp", "ve") else {"student_weighting": "edm",
                                                                        "gen_weighting": "inv_snr"}
    for path in files:
        cfg = resolved(["--teacher", str(path), "--out", str(tmp_path / "r")])
        assert {k: cfg[k] for k in want} == want, path.name
        cfg = resolved(["--teacher", str(path), "--out", str(tmp_path / "r"), "--gen-weighting", "edm"])
        assert (cfg["student_weighting"], cfg["gen_weighting"]) == (want["student_weighting"], "edm")


def test_embedded_teachers_keep_their_weightings(tmp_path):
    for argv in (["--preset", "digits"], ["--preset", "ring2d"]):
        cfg = resolved([*argv, "--out", str(tmp_path / "r")])
        assert (cfg["student_weighting"], cfg["gen_weighting"]) == ("edm", "inv_snr")


def test_a_resumed_run_keeps_its_saved_weightings(tmp_path):
    """A run saved with other weightings (e.g. made before these defaults) resumes with them."""
    folder, out = pixel_folder(tmp_path / "m"), tmp_path / "r"
    assert train_main(out, "--teacher", str(folder), "--steps", "2", "--student-weighting", "edm",
                      "--gen-weighting", "inv_snr") == 0
    cfg = resolved(["--out", str(out), "--resume", "--steps", "4"])
    assert (cfg["student_weighting"], cfg["gen_weighting"]) == ("edm", "inv_snr")
    assert train.main(["--out", str(out), "--resume", "--steps", "3", "--quiet", "--device", "cpu"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["student_weighting"], saved["gen_weighting"]) == ("edm", "inv_snr")


def test_a_pickle_precond_is_read_once_per_file_version(edm_globals, tmp_path, monkeypatch):  # noqa: F811
    """The option checks ask for an EDM pickle's preconditioning more than once; the pickle (weights inline, read
    whole) is parsed once while the file stays the same, and again once it is replaced."""
    from emd_fast.teachers import network_file

    reads = []
    read = network_file.read_edm_pickle
    monkeypatch.setattr(network_file, "read_edm_pickle", lambda path: reads.append(path) or read(path))
    path = write_edm_pickle(random_song("skip"), tmp_path / "net.pkl")
    assert [network_file.network_precond(path) for _ in range(3)] == ["vp"] * 3
    assert len(reads) == 1
    replacement = write_edm_pickle(random_song("ncsnpp"), tmp_path / "other.pkl")
    replacement.replace(path)
    assert network_file.network_precond(path) == "ve"
    assert len(reads) == 2
