"""Helpers shared by the dataset, sample-data, image and baseline tests: tiny MVTec-format folders on disk, and
the views of a dataset index (per category, per status, file paths) that only the tests read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from scheduler.dataset import DatasetIndex
from storage.models import ImageStatus
from storage.paths import resolve_inside
from storage.repository import PlannedImage


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


# --- reading an index back: what the tests check, which the planner never needs ---------------------------------

INDEX_STATUSES = (ImageStatus.QUEUED, ImageStatus.SKIPPED, ImageStatus.FAILED)


def entries_for(index: DatasetIndex, category: str) -> tuple[PlannedImage, ...]:
    """The rows of one category, in index order."""
    return tuple(entry for entry in index.entries if entry.category == category)


def status_counts(index: DatasetIndex) -> dict[str, int]:
    """Number of rows per status (every status the index gives present as a key)."""
    counts = Counter(entry.status for entry in index.entries)
    return {status: counts.get(status, 0) for status in INDEX_STATUSES}


def category_counts(index: DatasetIndex) -> dict[str, dict[str, int]]:
    """Per category: rows per status plus ``total``, ``good`` and ``anomalous`` (all statuses)."""
    table: dict[str, dict[str, int]] = {}
    for category in index.categories:
        rows = entries_for(index, category)
        counts = Counter(entry.status for entry in rows)
        table[category] = {
            **{status: counts.get(status, 0) for status in INDEX_STATUSES},
            "total": len(rows),
            "good": sum(1 for entry in rows if entry.label == 0),
            "anomalous": sum(1 for entry in rows if entry.label == 1),
        }
    return table


def file_name(entry: PlannedImage) -> str:
    return PurePosixPath(entry.image_path).name


def image_file(index: DatasetIndex, entry: PlannedImage) -> Path:
    """Absolute path of an entry's image, checked to lie inside the root."""
    return resolve_inside(index.root, entry.image_path)


def mask_file(index: DatasetIndex, entry: PlannedImage) -> Path | None:
    """Absolute path of an entry's mask (None without one), checked to lie inside the root."""
    return None if entry.mask_path is None else resolve_inside(index.root, entry.mask_path)


def train_dir(index: DatasetIndex, category: str) -> Path | None:
    """``<root>/<category>/train/good`` resolved, None when the category has none; :class:`PathEscapeError` when
    it is a symlink loop or leads out of the root."""
    folder = resolve_inside(index.root, f"{category}/train/good")
    return folder if folder.is_dir() else None
