"""The sample-data generator: a small MVTec-AD-format dataset built offline from scikit-image's bundled pictures.

Each category starts from one bundled picture (centre-cropped, resized to ``size``). Normal images (train and
test ``good``) are that picture with mild, realistic variation: a shift of up to one pixel, a slight brightness
and contrast jitter and small Gaussian noise, so reference-based detectors have something to learn but not a
trivial job. Anomalous images paint one synthetic defect onto such a normal image:

- ``scratch``: a thin bright or dark line;
- ``blob``: a rotated ellipse of shifted colour;
- ``patch``: a rectangle cut from elsewhere in the same image and pasted (rotated by 180°).

Masks are exact: the anomalous image differs from the normal image it was painted on in every mask pixel (by at
least ``MIN_DEFECT_DELTA`` grey levels in some channel) and nowhere else. Everything is deterministic in ``seed``.
Grayscale categories are written as single-channel PNGs (like MVTec's grid, screw and zipper).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data
from skimage import draw

DEFECT_TYPES = ("blob", "patch", "scratch")
DEFAULT_CATEGORIES = ("brick", "chelsea", "coffee")
MIN_DEFECT_DELTA = 24
# Up to this many pixels of shift between normal images (the base is rendered with this margin on each side).
SHIFT_MARGIN = 1
NOISE_SIGMA = 2.0


@dataclass(frozen=True)
class _Source:
    """A bundled scikit-image picture (all of these ship inside the wheel: no download)."""

    loader: Callable[[], np.ndarray]
    grayscale: bool


SOURCES: dict[str, _Source] = {
    "brick": _Source(skimage_data.brick, True),
    "grass": _Source(skimage_data.grass, True),
    "gravel": _Source(skimage_data.gravel, True),
    "camera": _Source(skimage_data.camera, True),
    "coins": _Source(skimage_data.coins, True),
    "astronaut": _Source(skimage_data.astronaut, False),
    "chelsea": _Source(skimage_data.chelsea, False),
    "coffee": _Source(skimage_data.coffee, False),
}


class SampleDataError(ValueError):
    """Bad arguments for the sample-data generator, or an output folder that would be overwritten."""


@dataclass(frozen=True)
class SampleImage:
    """One generated file.

    path: POSIX path relative to the dataset root. image: uint8 (H, W) for grayscale categories, else (H, W, 3).
    mask: bool (H, W) for anomalous test images, else None. reference: the normal image the defect was painted
    on (anomalous images only) — ``image`` differs from it exactly where ``mask`` is True.
    """

    path: str
    image: np.ndarray
    mask: np.ndarray | None = None
    reference: np.ndarray | None = None

    @property
    def mask_path(self) -> str | None:
        """Where the mask goes: ``<category>/ground_truth/<defect>/<stem>_mask.png``."""
        if self.mask is None:
            return None
        category, _, defect, name = self.path.split("/")
        return f"{category}/ground_truth/{defect}/{Path(name).stem}_mask.png"


@dataclass(frozen=True)
class SampleDataSummary:
    """What :func:`make_sample_data` wrote.

    counts: per category, ``train``, ``test_good`` and ``test_anomalous`` image counts.
    """

    root: Path
    categories: tuple[str, ...]
    category_defects: dict[str, tuple[str, ...]]
    counts: dict[str, dict[str, int]]

    @property
    def num_test(self) -> int:
        return sum(c["test_good"] + c["test_anomalous"] for c in self.counts.values())

    def __str__(self) -> str:
        good = sum(c["test_good"] for c in self.counts.values())
        train = sum(c["train"] for c in self.counts.values())
        return (
            f"{len(self.categories)} categories ({', '.join(self.categories)}): {self.num_test} test images "
            f"({good} good, {self.num_test - good} anomalous), {train} train images"
        )


def _category_rng(seed: int, category: str) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])


def _base_picture(category: str, side: int) -> np.ndarray:
    """The category's picture, centre-cropped square and resized to ``side``; float32 (side, side, C)."""
    source = SOURCES[category]
    picture = np.asarray(source.loader())
    if picture.ndim == 3:
        picture = picture[..., :3]
        if source.grayscale:
            picture = picture.mean(axis=2)
    elif not source.grayscale:
        picture = np.repeat(picture[..., None], 3, axis=2)
    height, width = picture.shape[:2]
    crop = min(height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    square = np.ascontiguousarray(picture[top : top + crop, left : left + crop]).astype(np.uint8)
    resized = np.asarray(
        Image.fromarray(square).resize((side, side), Image.Resampling.LANCZOS), dtype=np.float32
    )
    return resized[..., None] if resized.ndim == 2 else resized


def _normal_variant(base: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A normal image: a shifted crop of the base with brightness/contrast jitter and noise; uint8 (size, size, C)."""
    dy, dx = rng.integers(0, 2 * SHIFT_MARGIN + 1, size=2)
    crop = base[dy : dy + size, dx : dx + size]
    gain = rng.uniform(0.97, 1.03)
    offset = rng.uniform(-3.0, 3.0)
    noisy = crop * gain + offset + rng.normal(0.0, NOISE_SIGMA, size=crop.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _scratch(normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin line of constant bright or dark value (whichever contrasts more with what it covers)."""
    size = normal.shape[0]
    thickness = max(2.0, size / 100)
    length = rng.uniform(0.3, 0.55) * size
    angle = rng.uniform(0, np.pi)
    center = rng.uniform(0.3, 0.7, size=2) * size
    half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    start, end = center - half, center + half
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    direction = end - start
    along = np.clip(
        ((rows - start[0]) * direction[0] + (cols - start[1]) * direction[1]) / (direction @ direction), 0, 1
    )
    distance = np.hypot(rows - (start[0] + along * direction[0]), cols - (start[1] + along * direction[1]))
    mask = distance <= thickness / 2
    covered = normal[mask].astype(np.float32).mean()
    value = 12.0 if covered > 127 else 243.0
    painted = normal.astype(np.float32)
    painted[mask] = value + rng.normal(0.0, NOISE_SIGMA, size=(int(mask.sum()), normal.shape[2]))
    return painted, mask


def _blob(normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rotated ellipse whose colour is shifted away from the nearer end of the range."""
    size, _, channels = normal.shape
    radii = rng.uniform(0.05, 0.12, size=2) * size
    center = rng.uniform(0.25, 0.75, size=2) * size
    rr, cc = draw.ellipse(
        center[0], center[1], radii[0], radii[1], shape=(size, size), rotation=rng.uniform(0, np.pi)
    )
    mask = np.zeros((size, size), dtype=bool)
    mask[rr, cc] = True
    covered = normal[mask].astype(np.float32).mean(axis=0)
    magnitude = rng.uniform(45, 75, size=channels) if channels > 1 else np.full(1, rng.uniform(45, 75))
    shift = np.where(covered > 127, -magnitude, magnitude)
    painted = normal.astype(np.float32)
    painted[mask] += shift
    return painted, mask


def _patch(normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle pasted from another place of the same image, rotated by 180° so it never matches."""
    size = normal.shape[0]
    height, width = (rng.uniform(0.1, 0.2, size=2) * size).astype(int) + 2
    top, left = rng.integers(0, size - height), rng.integers(0, size - width)
    # The source window starts at least one patch side away so that it does not overlap the target.
    while True:
        src_top, src_left = rng.integers(0, size - height), rng.integers(0, size - width)
        if abs(src_top - top) >= height or abs(src_left - left) >= width:
            break
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + height, left : left + width] = True
    painted = normal.astype(np.float32)
    painted[top : top + height, left : left + width] = normal[
        src_top : src_top + height, src_left : src_left + width
    ][::-1, ::-1]
    return painted, mask


_PAINTERS = {"blob": _blob, "patch": _patch, "scratch": _scratch}


def synthesize_defect(
    normal: np.ndarray, defect: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one ``defect`` (one of DEFECT_TYPES) onto a uint8 (H, W, C) normal image.

    Returns ``(image, mask)``: uint8 (H, W, C) and bool (H, W). ``image`` equals ``normal`` outside the mask and
    differs from it by at least MIN_DEFECT_DELTA grey levels (in some channel) at every mask pixel.
    """
    if defect not in _PAINTERS:
        raise SampleDataError(f"unknown defect type {defect!r}; choose one of {', '.join(DEFECT_TYPES)}")
    painted, mask = _PAINTERS[defect](normal, rng)
    image = np.clip(np.rint(painted), 0, 255).astype(np.uint8)
    # Make the mask exact: a mask pixel the defect left (nearly) unchanged is pushed away from the normal value.
    reference = normal.astype(np.int16)
    too_close = mask & (np.abs(image.astype(np.int16) - reference).max(axis=2) < MIN_DEFECT_DELTA)
    pushed = np.where(reference < 128, reference + MIN_DEFECT_DELTA, reference - MIN_DEFECT_DELTA)
    image[too_close] = pushed[too_close].astype(np.uint8)
    image[~mask] = normal[~mask]
    return image, mask


def _squeeze(image: np.ndarray) -> np.ndarray:
    return image[..., 0] if image.shape[2] == 1 else image


def render_category(
    category: str, *, size: int = 256, per_class: int = 12, train_per_class: int = 8, seed: int = 0
) -> list[SampleImage]:
    """All images of one category in memory (what :func:`make_sample_data` writes), deterministic in ``seed``.

    About a third of the ``per_class`` test images are good; the rest cycle through DEFECT_TYPES.
    """
    if category not in SOURCES:
        raise SampleDataError(
            f"unknown sample category {category!r}; available: {', '.join(sorted(SOURCES))}"
        )
    rng = _category_rng(seed, category)
    base = _base_picture(category, size + 2 * SHIFT_MARGIN)
    images = [
        SampleImage(f"{category}/train/good/{index:03d}.png", _squeeze(_normal_variant(base, size, rng)))
        for index in range(train_per_class)
    ]
    num_good = max(1, round(per_class / 3))
    images.extend(
        SampleImage(f"{category}/test/good/{index:03d}.png", _squeeze(_normal_variant(base, size, rng)))
        for index in range(num_good)
    )
    for number in range(per_class - num_good):
        defect = DEFECT_TYPES[number % len(DEFECT_TYPES)]
        normal = _normal_variant(base, size, rng)
        image, mask = synthesize_defect(normal, defect, rng)
        path = f"{category}/test/{defect}/{number // len(DEFECT_TYPES):03d}.png"
        images.append(SampleImage(path, _squeeze(image), mask, _squeeze(normal)))
    return images


def _check_arguments(categories: Sequence[str], size: int, per_class: int, train_per_class: int) -> None:
    if not categories:
        raise SampleDataError(f"no categories given; available: {', '.join(sorted(SOURCES))}")
    unknown = sorted(set(categories) - SOURCES.keys())
    if unknown:
        raise SampleDataError(f"unknown sample categories {unknown}; available: {', '.join(sorted(SOURCES))}")
    if not 32 <= size <= 2048:
        raise SampleDataError(f"size must be between 32 and 2048 pixels; got {size}")
    minimum = 1 + len(DEFECT_TYPES)
    if per_class < minimum:
        raise SampleDataError(
            f"per_class must be at least {minimum} (one good image and one per defect type); got {per_class}"
        )
    if train_per_class < 0:
        raise SampleDataError(f"train_per_class must be 0 or more; got {train_per_class}")


def make_sample_data(
    out_dir: Path | str,
    *,
    categories: Sequence[str] | None = None,
    size: int = 256,
    per_class: int = 12,
    train_per_class: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> SampleDataSummary:
    """Write an MVTec-AD-format sample dataset under ``out_dir`` and describe it.

    categories: names from SOURCES (default DEFAULT_CATEGORIES: a grayscale texture and two colour objects).
    size: image side in pixels. per_class: test images per category (about a third good).
    train_per_class: ``train/good`` images per category. overwrite: allow writing into existing category folders.
    """
    if isinstance(categories, str):
        raise SampleDataError(f"categories must be a list of names, not the string {categories!r}")
    chosen = tuple(DEFAULT_CATEGORIES if categories is None else categories)
    _check_arguments(chosen, size, per_class, train_per_class)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SampleDataError(f"{out_dir} exists and is not a directory; choose another output folder")
    existing = [name for name in chosen if (out_dir / name).exists()]
    if existing and not overwrite:
        raise SampleDataError(
            f"{out_dir} already holds {', '.join(existing)}; choose an empty folder or pass overwrite=True"
        )
    counts: dict[str, dict[str, int]] = {}
    for category in sorted(set(chosen)):
        rendered = render_category(
            category, size=size, per_class=per_class, train_per_class=train_per_class, seed=seed
        )
        for sample in rendered:
            target = out_dir / sample.path
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample.image).save(target, compress_level=1)
            if sample.mask is not None and sample.mask_path is not None:
                mask_target = out_dir / sample.mask_path
                mask_target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.where(sample.mask, 255, 0).astype(np.uint8)).save(
                    mask_target, compress_level=1
                )
        counts[category] = {
            "train": sum(1 for s in rendered if "/train/" in s.path),
            "test_good": sum(1 for s in rendered if "/test/good/" in s.path),
            "test_anomalous": sum(1 for s in rendered if s.mask is not None),
        }
    return SampleDataSummary(
        root=out_dir,
        categories=tuple(sorted(counts)),
        category_defects={name: DEFECT_TYPES for name in counts},
        counts=counts,
    )
