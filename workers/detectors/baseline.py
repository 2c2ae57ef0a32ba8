"""The weight-free ``baseline`` detector: per-pixel colour statistics of the category's normal images.

For each category it learns, once and lazily, the per-pixel mean and standard deviation of the ``train/good``
images on a common grid (the first training image's size, capped at ``max_side`` pixels on the longer side).
A test image is resized to that grid; its score is the per-pixel Mahalanobis-like distance
``sqrt(mean_c ((x_c - mean_c) / std_c)^2)`` (diagonal covariance), Gaussian-smoothed, resized back to the test
image's resolution and mapped to a raw logit ``(distance - offset) / scale``. The standard deviation gets a floor
(a fraction of the image-wide median plus a few grey levels) so that pixels that never changed in training do not
turn sensor noise into certainty.

Without training images it falls back to the image itself: the distance from a median-filtered copy, scaled by
the image's median absolute deviation ("reference": "self_median" in the diagnostics). Useful only for small,
high-contrast defects; it says so rather than failing. Only a ``train/good`` that is absent counts as "without":
one that is a symlink loop, or a training file that leads out of the dataset root (checked per file, like test
images), fails the category's images with the reason instead of falling back silently.

Config (``DetectorConfig.extra``, all optional): ``baseline_max_train`` (default 64 training images),
``baseline_max_side`` (512), ``baseline_sigma`` (smoothing, in grid pixels; default grid side / 256, at least 1),
``baseline_offset`` (3.0) and ``baseline_scale`` (1.0).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from storage.logits import StoredLogits
from storage.paths import PathEscapeError, resolve_inside
from workers.detectors.base import (
    Detection,
    Detector,
    DetectorConfig,
    DetectorError,
    ImageSample,
    register_detector,
)
from workers.images import ImageLoadError, load_rgb

TRAIN_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Logits are clipped here: far inside float16's range, and sigmoid is already 0 or 1 to float precision.
LOGIT_LIMIT = 60.0
# Standard-deviation floor: this many grey levels plus this fraction of the image-wide median std.
STD_FLOOR_LEVELS = 2.0
STD_FLOOR_FRACTION = 0.25
# Side of the shrunken copy that the self-reference fallback median-filters.
SELF_MEDIAN_SIDE = 128


@dataclass(frozen=True)
class ReferenceStatistics:
    """Per-pixel statistics of a category's normal images on one grid.

    mean / std: float32 (h, w, 3) in grey levels (std already floored). num_train: images used.
    """

    mean: np.ndarray
    std: np.ndarray
    num_train: int

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.mean.shape[0]), int(self.mean.shape[1])


@dataclass(frozen=True)
class _Prepared:
    """What ``prepare`` hands to ``detect`` for one image."""

    image: np.ndarray  # float32 (h, w, 3) on the statistics grid (without statistics: longer side ≤ max_side)
    original_size: tuple[int, int]
    statistics: ReferenceStatistics | None
    key: str
    prepare_ms: float


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float (h, w, C) or (h, w) to ``size`` (h, w); align_corners=False, antialiased when shrinking."""
    if array.shape[:2] == tuple(size):
        return array.astype(np.float32, copy=False)
    squeeze = array.ndim == 2
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    tensor = tensor[None, None] if squeeze else tensor.permute(2, 0, 1)[None]
    shrinking = size[0] < array.shape[0] or size[1] < array.shape[1]
    resized = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    result = resized[0, 0] if squeeze else resized[0].permute(1, 2, 0)
    return result.contiguous().numpy()


def _grid_for(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The statistics grid for a (height, width) image: same aspect, longer side at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _train_files(train_dir: Path, limit: int) -> list[Path]:
    """The first ``limit`` training images of ``train_dir`` (by name), each resolved inside the dataset root.

    ``train_dir`` is ``<root>/<category>/train/good`` (:class:`ImageSample`), so the root is its third parent
    (the highest one of a shorter path). An empty list when the folder is absent; :class:`DetectorError` when
    the folder or one of the files is a symlink loop or leads out of the root: reading it would mean a reference
    from outside the dataset, and ignoring it would silently change what the category is scored against."""
    folder = train_dir.absolute()
    depth = min(3, len(folder.parents))
    root, relative = folder.parents[depth - 1], "/".join(folder.parts[-depth:])
    try:
        resolved = resolve_inside(root, relative)
    except PathEscapeError as exc:
        raise DetectorError(f"the training folder {relative} cannot be used: {exc}") from None
    if not resolved.is_dir():
        return []
    with os.scandir(resolved) as listing:
        names = sorted(
            entry.name for entry in listing
            if entry.name.lower().endswith(TRAIN_EXTENSIONS) and not entry.name.startswith(".")
        )
    files = []
    for name in names[:limit]:
        try:
            files.append(resolve_inside(root, f"{relative}/{name}"))
        except PathEscapeError as exc:
            raise DetectorError(f"training image {relative}/{name} cannot be used: {exc}") from None
    return files


def learn_statistics(train_files: Sequence[Path], max_side: int) -> ReferenceStatistics:
    """Per-pixel mean and floored std of ``train_files`` on the first file's grid (float64 accumulation).

    Raises :class:`DetectorError` when no file can be used; single unreadable files are skipped.
    """
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None
    grid: tuple[int, int] | None = None
    used = 0
    for path in train_files:
        try:
            image = load_rgb(path).astype(np.float32)
        except ImageLoadError:
            continue  # one broken training image should not disable the category's detector
        if grid is None:
            grid = _grid_for(image.shape[0], image.shape[1], max_side)
        resized = _resize(image, grid).astype(np.float64)
        total = resized if total is None else total + resized
        total_sq = resized**2 if total_sq is None else total_sq + resized**2
        used += 1
    if total is None or total_sq is None:
        raise DetectorError(
            f"none of the {len(train_files)} training images could be read; check the train/good folder"
        )
    mean = total / used
    variance = np.maximum(total_sq / used - mean**2, 0.0)
    std = np.sqrt(variance)
    floor = STD_FLOOR_LEVELS + STD_FLOOR_FRACTION * float(np.median(std))
    return ReferenceStatistics(
        mean=mean.astype(np.float32), std=np.sqrt(std**2 + floor**2).astype(np.float32), num_train=used
    )


def distance_map(image: np.ndarray, statistics: ReferenceStatistics) -> np.ndarray:
    """Per-pixel RMS standardised distance of a float (h, w, 3) image from the statistics; float32 (h, w)."""
    standardised = (image - statistics.mean) / statistics.std
    return np.sqrt(np.mean(standardised**2, axis=2)).astype(np.float32)


def self_reference_distance(image: np.ndarray) -> np.ndarray:
    """Fallback without training images: deviation from a median-filtered copy, in robust standard units.

    The median runs on a copy shrunk to at most SELF_MEDIAN_SIDE pixels (a large median window at full size
    would cost seconds per image); the smooth result is resized back before the subtraction.
    """
    height, width = image.shape[:2]
    small = _resize(image, _grid_for(height, width, SELF_MEDIAN_SIDE))
    smooth = _resize(ndimage.median_filter(small, size=(5, 5, 1), mode="reflect"), (height, width))
    deviation = np.sqrt(np.mean((image - smooth) ** 2, axis=2))
    # 1.4826 × MAD estimates a standard deviation for Gaussian noise; the small constant avoids division by 0.
    spread = 1.4826 * float(np.median(np.abs(deviation - np.median(deviation)))) + 1.0
    return ((deviation - float(np.median(deviation))) / spread).astype(np.float32)


class BaselineDetector(Detector):
    """Reference statistics from ``train/good``, learnt once per category; thread-safe."""

    name = "baseline"

    def __init__(self, config: DetectorConfig) -> None:
        extra = config.extra
        self.max_train = int(extra.get("baseline_max_train", 64))
        self.max_side = int(extra.get("baseline_max_side", 512))
        self.sigma = extra.get("baseline_sigma")
        self.offset = float(extra.get("baseline_offset", 3.0))
        self.scale = float(extra.get("baseline_scale", 1.0))
        if self.max_train < 1 or self.max_side < 8:
            raise DetectorError("baseline_max_train must be ≥ 1 and baseline_max_side ≥ 8")
        if self.scale <= 0:
            raise DetectorError(f"baseline_scale must be positive; got {self.scale}")
        if self.sigma is not None and float(self.sigma) < 0:
            raise DetectorError(f"baseline_sigma must be 0 or more; got {self.sigma}")
        self._lock = threading.Lock()
        self._category_locks: dict[tuple[str, str], threading.Lock] = {}
        self._statistics: dict[tuple[str, str], ReferenceStatistics | None] = {}
        # A category whose reference cannot be used fails every image with the same error, learnt once.
        self._errors: dict[tuple[str, str], str] = {}

    def fingerprint(self) -> str:
        return (
            f"baseline(max_train={self.max_train},max_side={self.max_side},sigma={self.sigma},"
            f"offset={self.offset},scale={self.scale})"
        )

    def _cached(self, cache_key: tuple[str, str]) -> tuple[bool, ReferenceStatistics | None]:
        """(found, statistics) from the cache; raises the category's cached reference error. Call with the lock."""
        if cache_key in self._errors:
            raise DetectorError(self._errors[cache_key])
        if cache_key in self._statistics:
            return True, self._statistics[cache_key]
        return False, None

    def statistics_for(self, category: str, train_dir: Path | None) -> ReferenceStatistics | None:
        """The category's statistics, learnt on first use (one thread learns, the others wait); None without data.

        Raises :class:`DetectorError` when ``train_dir`` is a symlink loop or it or a training image leads out
        of the dataset root (see :func:`_train_files`)."""
        if train_dir is None:
            return None
        cache_key = (category, str(train_dir))
        with self._lock:
            found, statistics = self._cached(cache_key)
            if found:
                return statistics
            category_lock = self._category_locks.setdefault(cache_key, threading.Lock())
        with category_lock:
            with self._lock:
                found, statistics = self._cached(cache_key)
                if found:
                    return statistics
            try:
                files = _train_files(train_dir, self.max_train)
            except DetectorError as exc:
                with self._lock:
                    self._errors[cache_key] = str(exc)
                raise
            statistics = learn_statistics(files, self.max_side) if files else None
            with self._lock:
                self._statistics[cache_key] = statistics
            return statistics

    def prepare(self, sample: ImageSample) -> _Prepared:
        start = time.perf_counter()
        statistics = self.statistics_for(sample.category, sample.train_dir)
        image = sample.image.astype(np.float32)
        grid = statistics.grid if statistics is not None else _grid_for(*sample.size, self.max_side)
        image = _resize(image, grid)
        return _Prepared(image, sample.size, statistics, sample.key, (time.perf_counter() - start) * 1000)

    def _score(self, item: _Prepared) -> tuple[np.ndarray, dict[str, Any]]:
        if item.statistics is not None:
            distance = distance_map(item.image, item.statistics)
            diagnostics: dict[str, Any] = {"reference": "train_good", "num_train": item.statistics.num_train}
        else:
            distance = self_reference_distance(item.image)
            diagnostics = {
                "reference": "self_median",
                "num_train": 0,
                "note": "no train/good images: scored against a median-filtered copy of the image itself",
            }
        sigma = float(self.sigma) if self.sigma is not None else max(1.0, min(distance.shape) / 256)
        if sigma > 0:
            distance = ndimage.gaussian_filter(distance, sigma=sigma, mode="reflect")
        full = _resize(distance, item.original_size)
        logits = np.clip((full - self.offset) / self.scale, -LOGIT_LIMIT, LOGIT_LIMIT)
        diagnostics["grid"] = list(distance.shape)
        diagnostics["max_distance"] = round(float(distance.max()), 4)
        return logits.astype(np.float16), diagnostics

    def detect(self, batch: Sequence[Any]) -> list[Detection]:
        results = []
        for item in batch:
            if not isinstance(item, _Prepared):
                raise DetectorError(
                    f"baseline.detect got {type(item).__name__}; pass items from baseline.prepare"
                )
            start = time.perf_counter()
            logits, diagnostics = self._score(item)
            diagnostics["timings_ms"] = {
                "prepare": round(item.prepare_ms, 3),
                "detect": round((time.perf_counter() - start) * 1000, 3),
            }
            results.append(
                Detection(StoredLogits(maps=logits[None], original_size=item.original_size), diagnostics)
            )
        return results


@register_detector("baseline")
def build_baseline(config: DetectorConfig) -> Detector:
    """Registry factory for :class:`BaselineDetector`."""
    return BaselineDetector(config)
