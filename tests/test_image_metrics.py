import numpy as np
import pytest
import torch

from emd_fast.errors import CheckpointError, FileRefused
from emd_fast.evaluation.image_metrics import (
    FID,
    DigitsClassifier,
    FeatureStats,
    InceptionFeatures,
    class_coverage,
    frechet_distance,
    frechet_distance_stats,
    load_fid_reference,
    precision_recall,
)

from helpers import fake_inception_file


def test_frechet_distance_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(20000, 3, generator=g, dtype=torch.float64) + 1
    # N(0, I) vs N(1, 4I): 3 * 1^2 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_precision_recall_detect_collapse():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=g)
    p, r = precision_recall(real, torch.randn(1000, 2, generator=g))
    assert p > 0.9 and r > 0.9
    collapsed = 0.1 * torch.randn(1000, 2, generator=g)
    p, r = precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.3


def test_class_coverage():
    assert class_coverage(torch.arange(10).repeat(10), 10) == (10, 0.0)
    covered, tv = class_coverage(torch.zeros(50, dtype=torch.long), 10)
    assert covered == 1 and tv == pytest.approx(0.9)


def test_digits_classifier_shapes():
    net = DigitsClassifier()
    x = torch.randn(5, 1, 8, 8)
    assert net(x).shape == (5, 10) and net.features(x).shape == (5, 128)


def test_inception_features_convention(tmp_path):
    feats = InceptionFeatures(fake_inception_file(tmp_path), torchscript=True)(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float64
    for torchscript in (False, True):
        with pytest.raises(FileRefused, match="missing.pt: no such file"):
            InceptionFeatures(tmp_path / "missing.pt", torchscript=torchscript)


def test_feature_stats_match_numpy_in_batches():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    acc = FeatureStats()
    for chunk in feats.split(137):
        acc.add(chunk)
    mu, sigma = acc.stats()
    np.testing.assert_allclose(mu.numpy(), feats.numpy().mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        FeatureStats().stats()


def test_frechet_distance_stats_closed_form():
    """N(m1, diag(a)) vs N(m2, diag(b)): |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2, exactly."""
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    m1, m2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    want = 1 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert frechet_distance_stats(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(want, rel=1e-12)
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    rotated = frechet_distance_stats(q @ m1.double(), q @ torch.diag(a).double() @ q.T, q @ m2.double(),
                                     q @ torch.diag(b).double() @ q.T)
    assert rotated == pytest.approx(want, rel=1e-9)


def test_fid_pipeline_with_a_stand_in_inception(tmp_path):
    """The FID of images against statistics of the same distribution is small, of another one large; the features
    come from a TorchScript file with the Inception file's calling convention."""
    inception = fake_inception_file(tmp_path)
    g = torch.Generator().manual_seed(0)

    def images(n, shift):
        return (0.3 * torch.randn(n, 3, 8, 8, generator=g) + shift).clamp(-1, 1)

    feats = InceptionFeatures(inception, torchscript=True)(images(2000, 0.0))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=feats.mean(0).numpy(), sigma=np.cov(feats.numpy(), rowvar=False))
    fid = FID(inception, ref, torchscript=True)
    same, n = fid(images(500, 0.0) for _ in range(4))
    other, _ = fid(images(500, 0.4) for _ in range(4))
    assert n == 2000 and same < 0.05 * other and other > 1000


def test_fid_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="none.npz: no such file"):
        load_fid_reference(tmp_path / "none.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match="no 'sigma' array"):
        load_fid_reference(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match=r"mu must be \(F,\) and sigma \(F, F\)"):
        load_fid_reference(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="FID reference statistics .*junk.npz: not a readable .npz"):
        load_fid_reference(tmp_path / "junk.npz")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable torch file"):
        InceptionFeatures(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="is not a TorchScript Inception network"):
        InceptionFeatures(tmp_path / "junk.pt", torchscript=True)
