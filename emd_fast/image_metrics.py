"""Image-quality metrics on features: Frechet distance, k-NN precision/recall, class coverage, Inception features.

Features come from a feature network: the small digits classifier the project trains itself (an honest "FID on
digits"), or Inception-v3 when the user supplies its TorchScript weights file (the ``inception-2015-12-05.pt``
convention of clean-fid / StyleGAN / NVlabs-edm: called as ``net(uint8 NCHW RGB, return_features=True)`` -> (N, 2048)).
Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between Gaussians fitted to a (N, F), b (M, F)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    la, va = torch.linalg.eigh(ca)
    sqrt_a = va @ torch.diag(la.clamp(min=0).sqrt()) @ va.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) with k-NN balls: real (N, F), fake (M, F).

    precision: fraction of fake samples inside some real sample's k-NN ball; recall: the converse.
    """
    def covered(ref, query):
        radii = torch.cdist(ref, ref).kthvalue(k + 1, dim=1).values  # k-th neighbour, self excluded
        return (torch.cdist(query, ref) <= radii[None]).any(dim=1).double().mean()

    real, fake = real.double(), fake.double()
    return float(covered(real, fake)), float(covered(fake, real))


def class_coverage(labels: torch.Tensor, num_classes: int, fraction: float = 0.2) -> tuple[int, float]:
    """(classes receiving >= fraction of a uniform share, TV distance of the class histogram to uniform)."""
    freq = torch.bincount(labels.cpu(), minlength=num_classes).double() / labels.numel()
    covered = int((freq >= fraction / num_classes).sum())
    return covered, float(0.5 * (freq - 1 / num_classes).abs().sum())


class DigitsClassifier(nn.Module):
    """A small CNN for (N, 1, 8, 8) images in [-1, 1]: ``features`` (N, 128) and class logits (N, 10)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class InceptionFeatures:
    """Inception-v3 pool features from a user-supplied TorchScript file; images (N, C, H, W) in [-1, 1] -> (N, 2048)."""

    def __init__(self, path: str | Path, device="cpu"):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found (supply inception-2015-12-05.pt; "
                                    f"emd_fast never downloads it)")
        self.net, self.device = torch.jit.load(str(path), map_location=device).eval(), device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x.to(self.device), return_features=True).double()
