"""Images in and out: [-1, 1] float tensors to uint8, tiled grids as PNG, folders of PNGs, .npz sample files.

Images are (N, C, H, W) float in [-1, 1] with C = 1 (grey) or 3 (RGB), the convention of EDM and of the digits
preset. uint8 conversion is EDM's: ``round((x + 1) * 127.5)`` clamped to [0, 255].
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write, make_dirs, open_regular, read_npz


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """True for a per-sample shape (C, H, W) with C = 1 or 3."""
    return len(shape) == 3 and shape[0] in (1, 3)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 (NaN becomes 0)."""
    x = ((images.detach().float().cpu().nan_to_num(-1.0) + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def tile(images: torch.Tensor, cols: int, gap: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows (H + gap) - gap, cols (W + gap) - gap, 3) uint8 RGB grid, row-major;
    white gaps, and white cells for NaN images (a missing sample)."""
    n, c, h, w = images.shape
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    pixels = to_uint8(images)
    missing = images.detach().reshape(n, -1).isnan().all(dim=1).cpu().numpy()
    for i in range(n):
        if missing[i]:
            continue
        r, col = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = pixels[i]  # grey: broadcast
    return grid


def figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib Figure drawn off-screen (no pyplot: the caller's matplotlib backend is never switched)."""
    from matplotlib.figure import Figure  # imported when a figure is drawn, not with emd_fast

    return Figure(figsize=figsize, dpi=dpi)


def save_figure(fig, path: str | Path, title: str = "", dpi: int = 100) -> None:
    """Title (if any), lay out, write ``fig`` to the PNG ``path`` (its folder made)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_png(fig, path, dpi)


def write_png(fig, path: str | Path, dpi: int = 100) -> None:
    """``fig`` as the PNG ``path``, written atomically and never through a link (``files.atomic_write``)."""
    make_dirs(Path(path).parent)
    with atomic_write(path) as f:
        fig.savefig(f, dpi=dpi, format="png")


def show(ax, images: torch.Tensor, cols: int, title: str) -> None:
    """Draw images (N, C, H, W) in [-1, 1] tiled ``cols`` per row (NaN images blank) on a matplotlib axis."""
    ax.imshow(tile(images, cols), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def save_grid(path: str | Path, images: torch.Tensor, cols: int, title: str = "") -> None:
    """A PNG grid of images (N, C, H, W) in [-1, 1], ``cols`` per row, with an optional title above it."""
    grid = tile(images, cols)
    h, w = grid.shape[:2]
    scale = max(1.0, 360 / max(w, 1))  # small images are enlarged so the grid is legible
    fig = figure((w * scale / 100, h * scale / 100 + (0.35 if title else 0)))
    ax = fig.add_axes((0, 0, 1, h * scale / 100 / fig.get_figheight()))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9, y=0.995, va="top")
    write_png(fig, path)


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_class: int, num_classes: int) -> torch.Tensor:
    """The first ``per_class`` images of each class, class by class: (num_classes * per_class, C, H, W); a class
    with fewer images is padded with NaN (drawn blank)."""
    out = torch.full((num_classes, per_class, *images.shape[1:]), float("nan"))
    for c in range(num_classes):
        picked = images[labels.cpu() == c][:per_class].float().cpu()
        out[c, :len(picked)] = picked
    return out.flatten(0, 1)


def save_png_folder(directory: str | Path, images: torch.Tensor, start: int = 0) -> None:
    """One 8-bit PNG (grey or RGB) per image, ``{index:06d}.png`` from ``start`` on: the layout clean-fid,
    torch-fidelity and EDM's fid.py read."""
    from PIL import Image  # matplotlib's own dependency

    directory = Path(directory)
    make_dirs(directory)
    for i, img in enumerate(to_uint8(images)):
        with atomic_write(directory / f"{start + i:06d}.png") as f:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(f, format="PNG")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGES_BYTES = 64 << 30  # an .npz of images (ImageNet 256 x 256, 50,000 images: 9.8 GB)


def read_images(source: str | Path, batch: int = 250):
    """Batches (B, C, H, W) float in [-1, 1] of the images in a folder (sorted by name; PNG/JPEG/...) or an .npz
    (``arr_0`` uint8 (N, H, W, C), or ``images`` float (N, C, H, W) as ``emd_fast.sample`` writes them). ValueError
    (one line) for an empty or unreadable source, or images of different sizes."""
    from PIL import Image, UnidentifiedImageError  # matplotlib's own dependency

    source = Path(source)
    if source.suffix == ".npz":
        arrays = read_npz(source, "images", IMAGES_BYTES)
        key = "arr_0" if "arr_0" in arrays else "images" if "images" in arrays else None
        if key is None:
            raise ValueError(f"{source}: no 'arr_0' (uint8 NHWC) or 'images' (float NCHW) array")
        data = arrays[key]
        if data.ndim != 4 or data.shape[0] == 0:
            raise ValueError(f"{source}: expected a non-empty batch of images, got shape {tuple(data.shape)}")
        for i in range(0, len(data), batch):  # converted batch by batch: uint8 -> float is 4x the memory
            x = torch.from_numpy(data[i:i + batch])
            yield x.permute(0, 3, 1, 2).float() / 127.5 - 1 if key == "arr_0" else x.float()
        return
    if not source.is_dir():
        raise ValueError(f"{source}: not a folder of images or an .npz")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    shape = None
    for i in range(0, len(files), batch):
        arrays = []
        for path in files[i:i + batch]:
            try:
                with open_regular(path, "image") as f, Image.open(f) as img:
                    arr = np.asarray(img.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {path}: {e}") from None
            if shape is not None and arr.shape != shape:
                raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, the first image {shape[1]}x{shape[0]}")
            shape = arr.shape
            arrays.append(arr)
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
