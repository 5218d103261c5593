"""Mixture teachers from files (validated, one-line errors) and the random family of the robustness sweep."""
import json

import numpy as np
import pytest
import torch

from emd_fast.schedules import VPCosine
from emd_fast.teachers.mixture import MixtureError, data_std, load_mixture, mixture_arrays, random_mixture

SPEC = {"means": [[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]], "weights": [0.5, 0.3, 0.2]}


def write(tmp_path, name, spec):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(spec))
    else:
        np.savez(path, **{k: np.asarray(v) for k, v in spec.items()})
    return path


@pytest.mark.parametrize("suffix", [".json", ".npz"])
@pytest.mark.parametrize("cov_key, cov", [
    ("variances", [0.1, 0.2, 0.05]),
    ("variances", [[0.1, 0.3], [0.2, 0.2], [0.05, 0.01]]),
    ("covs", [[[0.1, 0.02], [0.02, 0.3]], [[0.2, 0.0], [0.0, 0.2]], [[0.05, -0.01], [-0.01, 0.01]]]),
])
def test_mixture_files_load(tmp_path, suffix, cov_key, cov):
    teacher = load_mixture(write(tmp_path, "m" + suffix, {**SPEC, cov_key: cov}), VPCosine())
    want = np.asarray(cov)
    if want.ndim == 1:
        want = want[:, None, None] * np.eye(2)
    elif want.ndim == 2:
        want = want[:, :, None] * np.eye(2)
    assert torch.allclose(teacher.covs, torch.as_tensor(want))
    assert torch.allclose(teacher.means, torch.as_tensor(SPEC["means"], dtype=torch.float64))
    assert torch.allclose(teacher.weights, torch.as_tensor(SPEC["weights"], dtype=torch.float64))
    x, _ = teacher.sample(500, torch.Generator().manual_seed(0))
    assert x.shape == (500, 2) and bool(torch.isfinite(teacher.log_prob(x)).all())


@pytest.mark.parametrize("change, message", [
    ({"weights": [0.5, 0.3, 0.3]}, "weights must sum to 1, they sum to 1.1"),
    ({"weights": [0.5, 0.6, -0.1]}, "weights must be positive"),
    ({"weights": [0.5, 0.5]}, r"weights must have shape \(3,\)"),
    ({"means": [1.0, 2.0, 3.0]}, r"means must have shape \(M, D\)"),
    ({"variances": [0.1, -0.2, 0.05]}, r"covs\[1\] is not positive definite"),
    ({"variances": [0.1, float("nan"), 0.05]}, "variances contains nan or inf"),
    ({"variances": [[0.1, 0.2, 0.3]] * 3}, r"variances must have shape \(3,\) or \(3, 2\)"),
    ({"variances": None, "covs": [[[1.0, 0.5], [0.4, 1.0]]] * 3}, r"covs\[0\] is not symmetric"),
    ({"variances": None, "covs": [[[1.0, 2.0], [2.0, 1.0]]] * 3}, r"covs\[0\] is not positive definite"),
    ({"variances": None}, "give exactly one of 'covs'"),
    ({"covs": [[[1.0, 0.0], [0.0, 1.0]]] * 3}, "give exactly one of 'covs'"),
    ({"sigma": 1.0}, r"unknown entries \['sigma'\]"),
    ({"means": None}, "no 'means'"),
    ({"means": [[1e30, 0.0], [0.0, 1.0], [1.0, 1.0]]}, r"outside what float32 computes here"),
    ({"variances": [1e60, 1.0, 1.0]}, r"outside what float32 computes here"),
    ({"means": [[1e-30, 0.0], [0.0, 2e-30], [1e-30, 1e-30]], "variances": [1e-60] * 3},
     r"a data standard deviation of 1\.\d+e-30 .* outside what float32 computes here"),
    ({"means": [[10**400, 0], [0, 1], [1, 1]]}, "cannot read mixture file .*int too large"),
])
def test_bad_mixtures_are_one_line_errors(tmp_path, change, message):
    spec = {**SPEC, "variances": [0.1, 0.2, 0.05], **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(MixtureError, match=message) as info:
        load_mixture(write(tmp_path, "m.json", spec), VPCosine())
    assert "\n" not in str(info.value) and "m.json" in str(info.value)


def test_unreadable_mixture_files(tmp_path):
    for path, message in [(tmp_path / "none.json", "does not exist"),
                          (write(tmp_path, "l.json", [1, 2]), "JSON object"),
                          (tmp_path / "m.txt", "suffix must be .json or .npz")]:
        if path.suffix == ".txt":
            path.write_text("means")
        with pytest.raises(MixtureError, match=message):
            load_mixture(path, VPCosine())
    broken = tmp_path / "b.json"
    broken.write_text('{"means": [[0, 1]]')
    with pytest.raises(MixtureError, match="b.json: unreadable mixture file"):
        load_mixture(broken, VPCosine())
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(MixtureError, match="g.npz: not a readable .npz"):
        load_mixture(garbage, VPCosine())


@pytest.mark.parametrize("dim, modes, condition, separation", [(2, 25, 1.0, 2.0), (8, 12, 50.0, 8.0),
                                                               (32, 40, 10.0, 4.0), (3, 1, 5.0, 6.0)])
def test_random_mixture_has_the_asked_difficulty(dim, modes, condition, separation):
    teacher = random_mixture(VPCosine(), seed=3, dim=dim, modes=modes, condition=condition, separation=separation,
                             concentration=0.5)
    assert teacher.means.shape == (modes, dim) and data_std(teacher) == pytest.approx(1.0)
    evals = torch.linalg.eigvalsh(teacher.covs)
    if dim > 1:
        torch.testing.assert_close(evals[:, -1] / evals[:, 0], torch.full((modes,), condition, dtype=torch.float64))
    assert float(teacher.weights.sum()) == pytest.approx(1.0) and bool((teacher.weights > 0).all())
    if modes > 1:  # the closest pair of means is `separation` stds apart along the line joining them
        gap = []
        for i in range(modes):
            for j in range(i + 1, modes):
                d = teacher.means[i] - teacher.means[j]
                u = d / d.norm()
                std = max(float(u @ teacher.covs[i] @ u), float(u @ teacher.covs[j] @ u)) ** 0.5
                gap.append(float(d.norm()) / std)
        assert min(gap) == pytest.approx(separation, rel=1e-6)
    again = random_mixture(VPCosine(), seed=3, dim=dim, modes=modes, condition=condition, separation=separation,
                           concentration=0.5)
    assert torch.equal(again.means, teacher.means) and torch.equal(again.covs, teacher.covs)


def test_mixture_arrays_rejects_bad_random_spec():
    with pytest.raises(MixtureError, match="random_mixture needs"):
        random_mixture(VPCosine(), seed=0, dim=0, modes=3)
    means, covs, weights = mixture_arrays({k: np.asarray(v) for k, v in {**SPEC, "variances": [1.0, 1.0, 1.0]}.items()})
    assert covs.shape == (3, 2, 2) and weights.shape == (3,)


def test_sampling_without_a_factor_per_example_is_the_same_distribution(monkeypatch):
    """Past SAMPLE_COV_ENTRIES (n x D x D) the samples are drawn a mode at a time instead of gathering a Cholesky
    factor per example: the same labels and noise give the same samples (fp32 rounding), and a 2048-D mode samples
    without an (n, 2048, 2048) tensor."""
    import emd_fast.teachers.mixture as mixture

    g = torch.Generator().manual_seed(3)
    means = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a = torch.randn(7, 5, 5, generator=g, dtype=torch.float64)
    teacher = mixture.GaussianMixtureTeacher(means, a @ a.transpose(1, 2) + 0.1 * torch.eye(5),
                                             torch.arange(1.0, 8.0, dtype=torch.float64), VPCosine())
    gathered, labels = teacher.sample(301, torch.Generator().manual_seed(0))
    monkeypatch.setattr(mixture, "SAMPLE_COV_ENTRIES", 0)
    grouped, same = teacher.sample(301, torch.Generator().manual_seed(0))
    assert torch.equal(labels, same) and torch.allclose(grouped, gathered, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    wide = mixture.GaussianMixtureTeacher(torch.zeros(1, 2048, dtype=torch.float64), torch.full((1,), 4.0),
                                          torch.ones(1, dtype=torch.float64), VPCosine())
    x, _ = wide.sample(512, torch.Generator().manual_seed(0))
    assert x.shape == (512, 2048) and abs(float(x.std()) - 2.0) < 0.02
