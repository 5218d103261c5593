import pytest
import torch

from emd_fast.image_metrics import (DigitsClassifier, InceptionFeatures, class_coverage, frechet_distance,
                                    precision_recall)

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
    feats = InceptionFeatures(fake_inception_file(tmp_path))(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float64
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionFeatures(tmp_path / "missing.pt")
