"""Exact Gaussian-mixture teachers: the embedded presets, a user's mixture file, and random mixtures for sweeps.

``GaussianMixtureTeacher`` is exact: the noisy marginal of a Gaussian mixture is again a Gaussian mixture,
    p_t(x_t) = sum_k pi_k N(x_t; alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I),
so its score, denoiser and log-density are closed-form at every t.

A mixture file (``--mixture FILE``) is ``.json`` or ``.npz`` with
    means      (M, D)
    weights    (M,)     positive, summing to 1
    and one of covs (M, D, D) symmetric positive definite, variances (M, D) (diagonal) or variances (M,) (isotropic).
Everything is validated when the file is read, with one-line errors (``MixtureError``) that name the problem.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..checks import check_per_example
from ..errors import FileRefused
from ..files import read_json, read_npz
from ..schedules import Schedule, expand_like


class GaussianMixtureTeacher:
    """Exact teacher for p(x) = sum_k pi_k N(mu_k, Sigma_k) in D dimensions.

    means: (M, D); covs: (M, D, D) symmetric positive definite (or (M,) isotropic variances);
    weights: (M,) positive, normalised here. Everything is stored in float64 for the eigendecomposition and
    evaluated in the dtype of x_t.
    """

    def __init__(self, means, covs, weights, schedule: Schedule):
        means = torch.as_tensor(means, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (M, D), got {tuple(means.shape)}")
        m, d = means.shape
        if covs.dim() == 1:
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        if covs.shape != (m, d, d):
            raise ValueError(f"covs must have shape ({m}, {d}, {d}) or ({m},), got {tuple(covs.shape)}")
        if weights.shape != (m,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be {m} positive numbers, got {weights.tolist()}")
        if not torch.allclose(covs, covs.transpose(1, 2)):
            raise ValueError("covs must be symmetric")
        evals, evecs = torch.linalg.eigh(covs)
        if not bool((evals > 0).all()):
            raise ValueError("covs must be positive definite")
        self.schedule, self.data_shape = schedule, (d,)
        self.means, self.covs, self.weights = means, covs, weights / weights.sum()
        self._evals, self._evecs = evals, evecs  # (M, D), (M, D, D): Sigma_k = U diag(l) U^T
        self._on_device: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to_config(self) -> dict:
        return {"means": self.means.tolist(), "covs": self.covs.tolist(), "weights": self.weights.tolist()}

    def _terms(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Per-component log-densities (N, M) and precision-weighted residuals C_k^{-1}(x_t - alpha mu_k) (N, M, D),
        with C_k = alpha^2 Sigma_k + sigma^2 I and per-example alpha, sigma of shape (N,)."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x_t must have shape (N, {self.dim}), got {tuple(x_t.shape)}")
        mu, lam, u, logw = self._constants(x_t.device, x_t.dtype)
        dt = x_t.dtype
        alpha, sigma = alpha.to(dt)[:, None, None], sigma.to(dt)[:, None, None]
        var = alpha**2 * lam[None] + sigma**2  # (N, M, D) eigenvalues of C_k
        proj = torch.einsum("nmd,mde->nme", x_t[:, None, :] - alpha * mu[None], u)  # in each eigenbasis
        logp = logw - 0.5 * ((proj**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        prec_diff = torch.einsum("nme,mde->nmd", proj / var, u)
        return logp, prec_diff

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(means, eigenvalues, eigenvectors, log-weights) in ``dtype`` on ``device``, copied there once: a training
        step then makes no host-to-device copies (which a CUDA graph could not capture)."""
        key = (device, dtype)
        if key not in self._on_device:
            self._on_device[key] = tuple(v.to(device, dtype) for v in (self.means, self._evals, self._evecs,
                                                                       self.weights.log()))
        return self._on_device[key]

    def _noisy_terms(self, x_t, t):
        check_per_example("x_t", x_t, t=t)
        return self._terms(x_t, *self.schedule.alpha_sigma(t.to(x_t.dtype)))

    def log_prob_t(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t), (N,)."""
        return torch.logsumexp(self._noisy_terms(x_t, t)[0], dim=1)

    def score(self, x_t, t, y=None):
        """grad log p_t(x_t), (N, D)."""
        logp, prec_diff = self._noisy_terms(x_t, t)
        resp = torch.softmax(logp, dim=1)
        return -(resp[:, :, None] * prec_diff).sum(1)

    def denoise(self, x_t, t, y=None):
        """E[x | x_t] = (x_t + sigma^2 s(x_t)) / alpha (Tweedie), (N, D). Exact in x_t's dtype: an enclosing
        autocast (a bf16 training run) does not apply to the analytic teacher."""
        with torch.autocast(x_t.device.type, enabled=False):
            alpha, sigma = (expand_like(v.to(x_t.dtype), x_t) for v in self.schedule.alpha_sigma(t))
            return (x_t + sigma**2 * self.score(x_t, t)) / alpha

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the clean mixture (alpha=1, sigma=0), (N,)."""
        return torch.logsumexp(self._clean_logp(x), dim=1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean sample, (N,) int64."""
        return self._clean_logp(x).argmax(dim=1)

    def _clean_logp(self, x):
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return self._terms(x, ones, torch.zeros_like(ones))[0]

    def mahalanobis2(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of clean samples to every component, (N, M)."""
        ones = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        _, prec_diff = self._terms(x, ones, torch.zeros_like(ones))
        diff = x[:, None, :] - self._constants(x.device, x.dtype)[0][None]
        return (diff * prec_diff).sum(-1)

    def sample(self, n: int, generator: torch.Generator, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples (n, D) fp32 and their component labels (n,)."""
        labels = torch.multinomial(self.weights.float().to(device), n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs).float().to(device)
        noise = torch.randn(n, self.dim, generator=generator, device=device)
        x = self.means.float().to(device)[labels]
        if n * self.dim**2 <= SAMPLE_COV_ENTRIES:
            return x + torch.einsum("nde,ne->nd", chol[labels], noise), labels
        for k in labels.unique().tolist():  # a factor per mode drawn, not per example: (n, D, D) would not fit
            rows = (labels == k).nonzero().squeeze(1)
            x[rows] += noise[rows] @ chol[k].T
        return x, labels

    def sample_t(self, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exact samples of the noisy marginal at per-example t (N,): alpha_t x + sigma_t eps, (N, D) fp32."""
        x, _ = self.sample(t.shape[0], generator, t.device)
        alpha, sigma = (v[:, None] for v in self.schedule.alpha_sigma(t))
        return alpha * x + sigma * torch.randn(x.shape, generator=generator, device=t.device)


MAX_MODES = 10_000
MAX_COV_ENTRIES = 1 << 22  # M x D x D (32 MiB of float64; ~90 MB in the run's config.json)
MIN_RELATIVE_VARIANCE = 1e-10  # of the data's variance, per mode and direction
DATA_SCALES = (1e-10, 1e15)  # the data's std and the largest |mean| or mode std: squares and sums stay float32
SAMPLE_COV_ENTRIES = 1 << 24  # n x D x D of the per-example Cholesky factors one sampling call may gather
MIXTURE_JSON_BYTES = 256 << 20


class MixtureError(ValueError):
    """A mixture file or specification is unreadable or invalid."""


def ring2d(schedule: Schedule) -> GaussianMixtureTeacher:
    """8 isotropic modes (std 0.2) on a circle of radius 2, weights 1..8 (normalised): ratio 8 between modes."""
    m = 8
    angles = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = torch.arange(1, m + 1, dtype=torch.float64)
    return GaussianMixtureTeacher(means, torch.full((m,), 0.2**2), weights, schedule)


def gmm16d(schedule: Schedule, seed: int = 1234) -> GaussianMixtureTeacher:
    """10 modes in 16-D: means ~ N(0, I) scaled to norm 3, random covariances with std in [0.1, 0.3], weights 1..10."""
    g = torch.Generator().manual_seed(seed)
    m, d = 10, 16
    means = torch.randn(m, d, generator=g, dtype=torch.float64)
    means = 3.0 * means / means.norm(dim=1, keepdim=True)
    q, _ = torch.linalg.qr(torch.randn(m, d, d, generator=g, dtype=torch.float64))
    stds = 0.1 + 0.2 * torch.rand(m, d, generator=g, dtype=torch.float64)
    covs = q @ torch.diag_embed(stds**2) @ q.transpose(1, 2)
    covs = 0.5 * (covs + covs.transpose(1, 2))
    return GaussianMixtureTeacher(means, covs, torch.arange(1, m + 1, dtype=torch.float64), schedule)


PRESETS = {"ring2d": ring2d, "gmm16d": gmm16d}


def data_std(teacher: GaussianMixtureTeacher) -> float:
    """Root-mean-square per-coordinate std of the mixture: sigma_data for the networks' preconditioning."""
    mean = (teacher.weights[:, None] * teacher.means).sum(0)
    second = (teacher.weights[:, None] * (teacher.means**2 + torch.diagonal(teacher.covs, dim1=1, dim2=2))).sum(0)
    return float((second - mean**2).mean().sqrt())


def _read(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a mixture file, read as files.read_json / read_npz do (a regular file, capped)."""
    if not os.path.lexists(path):
        raise MixtureError(f"mixture file {path} does not exist")
    if path.suffix not in (".json", ".npz"):
        raise MixtureError(f"mixture file {path}: the suffix must be .json or .npz")
    try:
        if path.suffix == ".npz":
            return {k: np.asarray(v, dtype=np.float64) for k, v in read_npz(path, "mixture file").items()}
        raw = read_json(path, "mixture file", MIXTURE_JSON_BYTES)
        if not isinstance(raw, dict):
            raise MixtureError(f"{path}: expected a JSON object with means, weights and covs or variances, "
                               f"got {type(raw).__name__}")
        with np.errstate(all="ignore"):
            return {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()}
    except FileRefused as e:
        raise MixtureError(str(e)) from None
    except (ValueError, TypeError, OverflowError) as e:  # ragged lists, strings where numbers, too large integers
        raise MixtureError(f"cannot read mixture file {path}: {str(e).splitlines()[0]}") from None


@np.errstate(all="ignore")  # an overflow is reported as a MixtureError, not as a warning before it
def mixture_arrays(spec: dict, source: str = "mixture") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (means (M, D), covs (M, D, D), weights (M,)) float64 from a dict with means, weights and covs or
    variances; MixtureError (one line, prefixed with ``source``) for anything malformed."""
    unknown = set(spec) - {"means", "weights", "covs", "variances"}
    if unknown:
        raise MixtureError(f"{source}: unknown entries {sorted(unknown)} (expected means, weights, covs or variances)")
    for key in ("means", "weights"):
        if key not in spec:
            raise MixtureError(f"{source}: no '{key}'")
    if ("covs" in spec) == ("variances" in spec):
        raise MixtureError(f"{source}: give exactly one of 'covs' (M, D, D) and 'variances' (M,) or (M, D)")
    means, weights = spec["means"], spec["weights"]
    if means.ndim != 2 or 0 in means.shape:
        raise MixtureError(f"{source}: means must have shape (M, D) with M, D >= 1, got {means.shape}")
    m, d = means.shape
    if m > MAX_MODES or m * d * d > MAX_COV_ENTRIES:
        raise MixtureError(f"{source}: {m} modes in {d} dimensions: emd_fast's exact teacher takes at most "
                           f"{MAX_MODES} modes and M x D x D <= {MAX_COV_ENTRIES} covariance entries (each teacher "
                           f"call costs batch x M x D^2)")
    if weights.shape != (m,):
        raise MixtureError(f"{source}: weights must have shape ({m},) to match means {means.shape}, "
                           f"got {weights.shape}")
    if "covs" in spec:
        covs = spec["covs"]
        if covs.shape != (m, d, d):
            raise MixtureError(f"{source}: covs must have shape ({m}, {d}, {d}), got {covs.shape}")
    else:
        var = spec["variances"]
        if var.shape not in ((m,), (m, d)):
            raise MixtureError(f"{source}: variances must have shape ({m},) or ({m}, {d}), got {var.shape}")
        covs = np.eye(d) * (var[:, None, None] if var.ndim == 1 else var[:, :, None])
    for name, arr in (("means", means), ("weights", weights), ("covs" if "covs" in spec else "variances", covs)):
        if not np.isfinite(arr).all():
            raise MixtureError(f"{source}: {name} contains nan or inf")
    if (weights <= 0).any():
        raise MixtureError(f"{source}: weights must be positive, got min {weights.min():.4g}")
    if abs(weights.sum() - 1) > 1e-6:
        raise MixtureError(f"{source}: weights must sum to 1, they sum to {weights.sum():.6g}")
    asym = np.abs(covs - covs.transpose(0, 2, 1)).max(axis=(1, 2))
    if (asym > 1e-9 * np.abs(covs).max(axis=(1, 2))).any():
        raise MixtureError(f"{source}: covs[{int(asym.argmax())}] is not symmetric")
    eigenvalues = np.linalg.eigvalsh(covs)
    low = eigenvalues.min(axis=1)
    if (low <= 0).any():
        k = int(low.argmin())
        raise MixtureError(f"{source}: covs[{k}] is not positive definite (smallest eigenvalue {low[k]:.4g})")
    mean = weights @ means
    variance = float((weights @ (means**2 + np.diagonal(covs, axis1=1, axis2=2)) - mean**2).mean())
    if not math.isfinite(variance):
        raise MixtureError(f"{source}: means and covariances so large that the data's variance overflows")
    scale = max(float(np.abs(means).max()), math.sqrt(float(eigenvalues.max())))
    if not (DATA_SCALES[0] <= math.sqrt(variance) and scale <= DATA_SCALES[1]):
        raise MixtureError(f"{source}: a data standard deviation of {math.sqrt(variance):.4g} with means and standard "
                           f"deviations up to {scale:.4g} is outside what float32 computes here (both within "
                           f"[{DATA_SCALES[0]:g}, {DATA_SCALES[1]:g}]): rescale the mixture")
    if (low < MIN_RELATIVE_VARIANCE * variance).any():
        k = int(low.argmin())
        raise MixtureError(f"{source}: covs[{k}] has variance {low[k]:.4g} along one direction, below "
                           f"{MIN_RELATIVE_VARIANCE:g} x the data's variance {variance:.4g}: a mode that narrow is a "
                           f"point float32 cannot resolve")
    return means, covs, weights


def load_mixture(path: str | Path, schedule: Schedule) -> GaussianMixtureTeacher:
    """The exact teacher of a mixture file (.json or .npz; see the module docstring)."""
    path = Path(path)
    means, covs, weights = mixture_arrays(_read(path), str(path))
    return GaussianMixtureTeacher(means, covs, weights, schedule)


def random_mixture(schedule: Schedule, seed: int, dim: int, modes: int, condition: float = 1.0,
                   separation: float = 6.0, concentration: float = 1.0) -> GaussianMixtureTeacher:
    """A random mixture with controlled difficulty, normalised to unit data std (sigma_data = 1).

    dim, modes: D, M. condition: the ratio of largest to smallest eigenvalue of every covariance (random rotations,
    log-uniform spectrum in between). separation: the smallest distance between two means in units of the largest
    mode std along the line that joins them (about 2: touching modes, 10: far apart). concentration: of the
    Dirichlet the weights are drawn from (1: uniform on the simplex; smaller: more unequal).
    """
    if dim < 1 or modes < 1 or not condition >= 1 or not separation > 0 or not concentration > 0:
        raise MixtureError(f"random_mixture needs dim, modes >= 1, condition >= 1, separation > 0, concentration > 0; "
                           f"got {dim}, {modes}, {condition}, {separation}, {concentration}")
    g = np.random.default_rng(seed)
    means = g.standard_normal((modes, dim))
    spectrum = np.exp(g.uniform(0, np.log(condition), (modes, dim)))
    spectrum[:, 0], spectrum[:, -1] = 1.0, condition if dim > 1 else 1.0
    rot = np.linalg.qr(g.standard_normal((modes, dim, dim)))[0]
    covs = rot @ (spectrum[:, :, None] * rot.transpose(0, 2, 1))
    covs = 0.5 * (covs + covs.transpose(0, 2, 1))
    if modes > 1:  # scale the covariances so that the closest pair sits ``separation`` stds apart
        diff = means[:, None] - means[None]
        dist = np.linalg.norm(diff, axis=-1)
        unit = diff / np.where(dist > 0, dist, 1)[..., None]
        std_along = np.sqrt(np.maximum(np.einsum("ijd,ide,ije->ij", unit, covs, unit),
                                       np.einsum("ijd,jde,ije->ij", unit, covs, unit)))
        np.fill_diagonal(dist, np.inf)
        covs = covs * (np.min(dist / std_along) / separation) ** 2
    else:
        covs = covs * 0.1
    weights = g.dirichlet(np.full(modes, concentration))
    weights = np.maximum(weights, 1e-4)
    weights /= weights.sum()
    teacher = GaussianMixtureTeacher(means, covs, weights, schedule)
    scale = data_std(teacher)
    return GaussianMixtureTeacher(teacher.means / scale, teacher.covs / scale**2, teacher.weights, schedule)
