"""Samples of an exported generator for FID tools: ``samples.zip``, PNGs in the layout of EDM's dataset_tool
(``00000/img00000000.png``, labels in dataset.json), which EDM's ``fid.py calc --images=samples.zip`` reads, and
``samples.npz``, ``arr_0`` uint8 (N, H, W, C) and ``labels`` (N,) (-1: unconditional), the layout of the
guided-diffusion FID evaluator.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..evaluation.images import to_uint8


@torch.no_grad()
def write_samples(run, out: Path, n: int, seed: int, chunk: int) -> None:
    """n samples of the run's generator (z and labels from a generator seeded with ``seed``, ``chunk`` at a time;
    a latent run's decoded) as samples.zip and samples.npz in ``out``."""
    decode = getattr(run.problem, "decode", None) or (lambda x: x)  # None: samples are images as they are
    images, labels = [], []
    rng = torch.Generator(run.distiller.device).manual_seed(seed)
    with zipfile.ZipFile(out / "samples.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for start in tqdm(range(0, n, chunk), desc="samples", unit="batch", disable=n <= chunk):
            z, y = run.distiller.sample_inputs(min(chunk, n - start), rng)
            pixels = to_uint8(decode(run.distiller.generate(z, y)).cpu())
            for i, img in enumerate(pixels):
                archive.writestr(f"{(start + i) // 1000:05d}/img{start + i:08d}.png", _png(img))
            images.append(pixels)
            labels.append(np.full(len(z), -1) if y is None else y.cpu().numpy())
        labels = np.concatenate(labels).astype(np.int64)
        names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]
        archive.writestr("dataset.json", json.dumps(
            {"labels": None if labels[0] < 0 else [[name, int(c)] for name, c in zip(names, labels)]}))
    np.savez(out / "samples.npz", arr_0=np.concatenate(images), labels=labels)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, format="png")
    return buffer.getvalue()
