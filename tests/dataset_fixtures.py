"""Helpers shared by the dataset, sample-data, image and baseline tests: tiny MVTec-format folders on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, array: np.ndarray, *, mode: str | None = None) -> Path:
    """Write ``array`` as an image file (format from the suffix), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(path)
    return path


def noise_image(height: int, width: int, *, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A random uint8 image (H, W, C), or (H, W) when ``channels`` is 1."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def square_mask(height: int, width: int) -> np.ndarray:
    """A 0/255 uint8 mask with a defect square in the middle."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 255
    return mask


def add_test_image(
    root: Path,
    category: str,
    defect: str,
    name: str = "000.png",
    *,
    size: tuple[int, int] = (16, 16),
    mask_size: tuple[int, int] | None = None,
    with_mask: bool = True,
    seed: int = 0,
) -> Path:
    """Add ``<root>/<category>/test/<defect>/<name>`` and, for defects with ``with_mask``, its ground-truth mask."""
    image_path = write_image(root / category / "test" / defect / name, noise_image(*size, seed=seed))
    if defect != "good" and with_mask:
        mask_h, mask_w = mask_size or size
        stem = Path(name).stem
        write_image(
            root / category / "ground_truth" / defect / f"{stem}_mask.png", square_mask(mask_h, mask_w)
        )
    return image_path


def make_tiny_dataset(root: Path) -> Path:
    """Two categories, two defect types each, three images per defect folder, all valid."""
    for category in ("bottle", "grid"):
        for defect in ("good", "crack", "color"):
            for index in range(3):
                add_test_image(root, category, defect, f"{index:03d}.png", seed=index)
        write_image(root / category / "train" / "good" / "000.png", noise_image(16, 16))
    return root
