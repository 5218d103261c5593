"""Image problems, and the problem of a teacher network file (``--teacher``: an NVlabs/EDM or EDM2 network pickle or
an emd_fast U-Net file).

Generator and student start from the teacher's network, as in the paper. The metrics need no feature network: pixel
statistics of the one-step samples (mean, std, the fraction outside [-1, 1]) beside those of the teacher's own Heun
samples (the floor; 18 steps, or the number the network's authors sample with: ``heun_steps``, EDM2's 32); FID, when
asked for (``--fid-ref`` with ``--inception``), is computed by the run.

A teacher whose samples are a VAE's latents (EDM2's ImageNet-512 models: the network's ``latents``) distils in the
latent space; ``--vae DIR`` (a local diffusers AutoencoderKL folder) decodes them into images for the metrics, plots,
FID and ``emd_fast.sample``. Without it the run trains all the same and says that images are not decoded: the metrics
are then statistics of the latents, the plots show their first three channels. ``--guide FILE --guide-weight W``
guides the teacher by a second network (EDM2's guidance: ``GuidedNetworkTeacher``).
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch
from torch import nn

from ..evaluation.images import class_rows, figure, is_image_shape, save_figure, show
from ..evaluation.reference import reference_samples
from ..files import sha256_file
from ..schedules import NOISE_PREDICTION_WEIGHTINGS, make_schedule
from ..seeds import Stream, seed_for
from ..teachers import GuidedNetworkTeacher, NetworkTeacher
from ..teachers.network_file import load_guide_network, load_teacher_network, network_precond

HEUN_STEPS = 18  # the teacher's reference sampler (unless its network says otherwise): 35 network evaluations
REFERENCE_SAMPLES = 256  # at most this many teacher samples for the floor and the plots
GRID_CLASSES = 10  # plots show a row per class for at most this many classes, else a plain grid


def check_labels(cfg: dict, num_classes: int) -> None:
    """--labels (cfg["labels"]) fit a teacher with ``num_classes`` classes (0: unconditional); ValueError if not."""
    labels = cfg.get("labels")
    if labels is not None and not num_classes:
        raise ValueError(f"--labels: the teacher {cfg['teacher']} is unconditional (label_dim 0)")
    if labels is not None and not all(0 <= c < num_classes for c in labels):
        raise ValueError(f"--labels must lie in [0, {num_classes}) for this teacher, got {labels}")


class ImageProblem:
    """Image teachers: a NetworkTeacher on (C, H, W) data; pixel-statistics metrics against the teacher's own Heun
    samples, sample grids. ``from_config`` reads a teacher file (--teacher FILE): a ``Problem`` (``emd_fast.problems``).

    The network computes the same function in any Schedule (its preconditioning is written in s = sigma/alpha), so
    ``--schedule`` may replace the file's own (by default EDM's sigma range within what the network supports).
    """

    reads = ("teacher network files (--teacher FILE: an NVlabs/EDM or EDM2 network pickle, an emd_fast U-Net "
             ".safetensors)")
    options = frozenset({"vae", "guide", "guide_weight"})
    option_notes = {"vae": "latent EDM2 teachers (--teacher edm2-img512-*.pkl)", "guide_weight": "--guide"}

    def __init__(self, teacher: NetworkTeacher, cfg: dict, sigma_data: float, num_classes: int, vae=None):
        self.teacher, self.cfg, self.sigma_data, self.num_classes = teacher, cfg, sigma_data, num_classes
        self.latents, self.latent_vae = getattr(teacher.net, "latents", None), vae  # a latent teacher: decoding, VAE
        self.heun_steps = getattr(teacher.net, "heun_steps", HEUN_STEPS)
        check_labels(cfg, self.num_classes)

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_file()

    @classmethod
    def check_options(cls, cfg: dict) -> None:
        from ..teachers.diffusers_folder import check_not_a_folders_file

        check_not_a_folders_file(cfg["teacher"])
        if cfg.get("vae"):
            from ..teachers.vae_folder import check_vae_folder

            check_vae_folder(cfg["vae"])
        if bool(cfg.get("guide")) != (cfg.get("guide_weight") is not None):
            raise ValueError("--guide PKL and --guide-weight W go together: the guide network and its weight")
        if cfg.get("guide") and not math.isfinite(cfg["guide_weight"]):
            raise ValueError(f"--guide-weight must be a finite number, got {cfg['guide_weight']}")
        if cfg.get("lora") and cfg.get("lora_dropout") and network_precond(cfg["teacher"]) == "edm2":
            raise ValueError("--lora-dropout: EDM2's adapters change the weight of a layer, no input goes through them "
                             "to drop; leave it out")

    @classmethod
    def option_defaults(cls, cfg: dict) -> dict:
        """NOISE_PREDICTION_WEIGHTINGS for a network of EDM's VP or VE preconditioning (c_out = sigma: it predicts the
        noise, and both are trained with weight 1/sigma^2, which is snr); nothing for EDM's and EDM2's (c_out at most
        sigma_data)."""
        return dict(NOISE_PREDICTION_WEIGHTINGS) if network_precond(cfg["teacher"]) in ("vp", "ve") else {}

    @classmethod
    def input_files(cls, cfg: dict) -> dict[str, str]:
        files = {"teacher_sha256": sha256_file(Path(cfg["teacher"]), reuse=True)}
        if cfg.get("guide"):
            files["guide_sha256"] = sha256_file(Path(cfg["guide"]), reuse=True)
        if cfg.get("vae"):
            from ..teachers.vae_folder import vae_folder_sha256

            files["vae_sha256"] = vae_folder_sha256(cfg["vae"])
        return files

    @classmethod
    def from_config(cls, cfg: dict) -> "ImageProblem":
        net = load_teacher_network(cfg["teacher"])
        if cfg.get("schedule"):
            net.schedule = make_schedule(cfg["schedule"])
        guide = load_guide_network(cfg["guide"], net) if cfg.get("guide") else None
        vae = latent_vae(cfg, net)
        shape, source = (net.img_channels, net.img_resolution, net.img_resolution), Path(cfg["teacher"])
        if guide is not None:
            teacher = GuidedNetworkTeacher(net, guide, cfg["guide_weight"], net.schedule, shape, source,
                                           guide_source=cfg["guide"])
        else:
            teacher = NetworkTeacher(net, net.schedule, shape, source)
        return cls(teacher, cfg, net.sigma_data, net.label_dim, vae)

    def teacher_network(self, device, fit: bool) -> tuple[nn.Module, dict]:
        """Moves the teacher (and a VAE) to ``device`` and returns its network (init_networks copies it; ``fit`` is
        moot)."""
        self.teacher.to(device)
        if self.latent_vae is not None:
            self.latent_vae.to(device)
        return self.teacher.net, {}

    @property
    def decode(self):
        """latents (N, C, R, R) -> images (N, 3, H, W) in about [-1, 1] on the CPU where this run decodes its samples
        (a latent teacher with --vae), else None."""
        return None if self.latent_vae is None else functools.partial(self.latents.decode, self.latent_vae)

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """What the metrics and plots look at: the samples decoded where the run decodes them, else as they are."""
        decode = self.decode
        return samples if decode is None else decode(samples)

    @functools.cached_property
    def reference(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's Heun samples (n, C, H, W) on the CPU and their labels (n,) or None, n <= REFERENCE_SAMPLES:
        labels cycle through the run's classes. Drawn with a progress bar, cached (``evaluation.reference``)."""
        n = min(self.cfg["eval_samples"], REFERENCE_SAMPLES)
        y = None
        if self.num_classes:
            classes = torch.as_tensor(self.cfg.get("labels") or range(self.num_classes))
            y = classes[torch.arange(n) % len(classes)]
        seed = seed_for(self.cfg["seed"], Stream.REFERENCE)
        return reference_samples(self.teacher, n, seed, y, self.heun_steps, 64, self.cfg.get("quiet", False)), y

    @functools.cached_property
    def reference_images(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference samples as the metrics and plots look at them (``images``)."""
        x, y = self.reference
        return self.images(x), y

    def metrics(self, samples: torch.Tensor, y=None) -> dict:
        """``pixel_statistics`` of the samples as images (``images``)."""
        return pixel_statistics(self.images(samples))

    def floor(self) -> dict:
        """The same statistics of the teacher's Heun samples: what the one-step generator should match."""
        return pixel_statistics(self.reference_images[0])

    def _grid(self, ax, images, y, title):
        per = 8
        if not is_image_shape(tuple(images.shape[1:])):  # latents not decoded: their first channels, +-2 std in view
            images, title = images[:, :3] / (2 * self.sigma_data), f"{title}, latent channels 0-2"
        if y is not None and self.num_classes <= GRID_CLASSES:
            show(ax, class_rows(images, y, per, self.num_classes), per, title)
        else:
            show(ax, images[:per * per], per, title)

    def plot(self, path, samples, y, metrics, history, title) -> None:
        """One-step samples beside the teacher's Heun samples (a row per class for few classes), as a PNG."""
        fig = figure((12, 6.4))
        axes = fig.subplots(1, 2)
        self._grid(axes[0], self.images(samples).cpu(), None if y is None else y.cpu(),
                   f"one-step generator (pixel std {metrics['pixel_std']:.3f})")
        self._grid(axes[1], *self.reference_images, f"teacher, Heun {self.heun_steps} steps")
        save_figure(fig, path, title)

    @staticmethod
    def progress(m: dict) -> dict:
        return {"std": f"{m['pixel_std']:.3f}", **({"fid": f"{m['fid']:.2f}"} if "fid" in m else {})}

    def summary_lines(self, f: dict, floor: dict) -> list[str]:
        rows = [(f"{name:<16}{f[key]:.4f}   (teacher, Heun {self.heun_steps} steps: {floor[key]:.4f})")
                for name, key in (("pixel mean", "pixel_mean"), ("pixel std", "pixel_std"),
                                  ("saturated", "saturated"))]
        if self.latents is not None and self.latent_vae is None:
            rows.append("(statistics of the latents: images are not decoded without --vae)")
        return rows + ([f"FID             {f['fid']:.3f}   ({f['fid_samples']} samples)"] if "fid" in f else [])


def latent_vae(cfg: dict, net: nn.Module) -> nn.Module | None:
    """The VAE (--vae) that decodes the samples of a latent teacher network ``net``; None for a pixel teacher, or for a
    latent one without --vae (said on stderr). ValueError for --vae with a pixel teacher, --fid-ref without a VAE."""
    latents = getattr(net, "latents", None)
    if latents is None:
        if cfg.get("vae"):
            raise ValueError(f"--vae: the teacher {cfg['teacher']} is a pixel model: its samples are images already")
        return None
    if cfg.get("vae"):
        from ..teachers.vae_folder import load_vae_folder

        return load_vae_folder(cfg["vae"], net.img_channels)
    if cfg.get("fid_ref"):
        raise ValueError(f"--fid-ref: the teacher's samples are latents of {latents.vae}: pass --vae DIR (a local "
                         f"folder of that VAE) to decode them into images")
    print(f"note: the teacher's samples are latents of the VAE {latents.vae} and no --vae folder was given: images "
          f"are not decoded (metrics and plots show the latents)", file=sys.stderr)
    return None


def pixel_statistics(images: torch.Tensor) -> dict:
    """Pixel statistics of images (N, C, H, W): mean, std, and the fraction of pixels outside [-1, 1]."""
    x = images.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("generator samples contain nan/inf")
    return {"pixel_mean": float(x.mean()), "pixel_std": float(x.std()),
            "saturated": float((x.abs() > 1).double().mean())}
