"""Image-quality metrics on features: Frechet distance, k-NN precision/recall, class coverage, Inception features.

Features come from a feature network: the small digits classifier the project trains itself (an honest "FID on
digits"), or Inception-v3 (``emd_fast.evaluation.inception``: the network defined here, its weights read as data from
the file the user supplies: NVlabs' ``inception-2015-12-05.pt`` or its safetensors conversion). Only with
``torchscript=True`` (``--inception-torchscript``) is the file loaded as TorchScript, i.e. run as code: called as
``net(uint8 NCHW RGB, return_features=True)`` -> (N, 2048). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import check_regular, read_npz


def frechet_distance_stats(mu_a: torch.Tensor, ca: torch.Tensor, mu_b: torch.Tensor, cb: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between N(mu_a, C_a) and N(mu_b, C_b):
    means (F,), covariances (F, F), computed in float64 with symmetric eigendecompositions."""
    mu_a, ca, mu_b, cb = (v.double() for v in (mu_a, ca, mu_b, cb))
    la, va = torch.linalg.eigh(ca)
    sqrt_a = va @ torch.diag(la.clamp(min=0).sqrt()) @ va.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a (N, F) and b (M, F)."""
    a, b = a.double(), b.double()
    return frechet_distance_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


class FeatureStats:
    """Running mean and covariance of features added in batches (float64): ``add`` (N, F), then ``mu``, ``sigma``
    (unbiased, as numpy's np.cov and EDM's fid.py compute them)."""

    def __init__(self):
        self.n, self.total, self.outer = 0, None, None

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu()
        if self.total is None:
            self.total, self.outer = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(
                f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError(f"feature statistics need at least 2 samples, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)


def load_fid_reference(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (F,), sigma (F, F)) float64 from a reference statistics file in EDM's format (.npz with ``mu`` and
    ``sigma``, e.g. EDM's fid-refs/imagenet-64x64.npz); ValueError (one line) for anything else."""
    path = Path(path)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in read_npz(path, "FID reference statistics").items()
              if k in ("mu", "sigma")}
    for key in ("mu", "sigma"):
        if key not in arrays:
            raise ValueError(f"{path}: no '{key}' array: FID reference statistics are an .npz with 'mu' and 'sigma'")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not (np.isfinite(mu).all() and
                                                                          np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu must be (F,) and sigma (F, F), finite; got {mu.shape} and {sigma.shape}")
    return torch.from_numpy(mu), torch.from_numpy(sigma)


class FID:
    """FID of generated images against reference statistics, on a user-supplied Inception network.

    inception: its weights file (InceptionFeatures; ``torchscript``: run it as TorchScript); reference: EDM-format
    .npz (``load_fid_reference``). Both are read and checked when constructed, before any sample is generated.
    """

    def __init__(self, inception: str | Path, reference: str | Path, device="cpu", torchscript: bool = False):
        self.mu, self.sigma = load_fid_reference(reference)
        self.features = InceptionFeatures(inception, device, torchscript)

    def __call__(self, batches) -> tuple[float, int]:
        """(FID, number of images) of the images yielded by ``batches`` ((B, C, H, W) in [-1, 1] each)."""
        acc = FeatureStats()
        for images in batches:
            acc.add(self.features(images))
        mu, sigma = acc.stats()
        if mu.shape != self.mu.shape:
            raise ValueError(f"the Inception network gives {mu.shape[0]} features, the reference statistics "
                             f"{self.mu.shape[0]}")
        return frechet_distance_stats(mu, sigma, self.mu, self.sigma), acc.n


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
    """Inception-v3 pool features, images (N, C, H, W) in [-1, 1] -> (N, 2048) float64: our network with the weights
    of ``path`` (``inception.load_inception``), or with ``torchscript`` the file loaded as TorchScript (code: it can
    read and write any file the process can; only for a file one trusts)."""

    def __init__(self, path: str | Path, device="cpu", torchscript: bool = False):
        path, self.device = Path(path), device
        if not torchscript:
            from .inception import load_inception

            self.net = load_inception(path, device)
            return
        check_regular(path, "Inception TorchScript file")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as e:
            raise ValueError(f"{path} is not a TorchScript Inception network: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if isinstance(self.net, torch.jit.ScriptModule):
            return self.net(x.to(self.device), return_features=True).double()
        return self.net(x.to(self.device)).double()
