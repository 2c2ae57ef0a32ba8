"""One finished image's stored result as everything downstream reads it: its logits, then its mask.

The aggregator, the report and ``readar export`` all read a done image back; they must see the same score map
(the full-resolution float16 logits of :func:`storage.logits.full_resolution_logits`) and the same ground truth
(:func:`metrics.groundtruth.load_mask`, at the logits' size), so the reading lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metrics.groundtruth import load_mask
from storage.logits import decode_logits, full_resolution_logits
from storage.objects import ObjectStore
from storage.paths import resolve_inside


@dataclass(frozen=True)
class ImageResult:
    """One image's arrays: logits float16 (H, W), mask bool (H, W) or None (``good`` images have none)."""

    logits: np.ndarray
    mask: np.ndarray | None


def load_logits(store: ObjectStore, row: Any) -> np.ndarray:
    """The full-resolution float16 logits (H, W) of a done image row (an :class:`storage.models.Image`).

    Raises :class:`storage.objects.ObjectMissingError` when the object is gone, :class:`LogitFormatError` when it
    is damaged (callers that can recompute the image tell the two from an unreachable store this way)."""
    stored = decode_logits(store.get(row.object_key), source=f"logits of {row.image_path}")
    return full_resolution_logits(stored)


def load_result(store: ObjectStore, dataset_root: str | Path, row: Any) -> ImageResult:
    """The image's logits, then its mask read at the logits' size from the dataset root.

    The logits come first so that the mask is checked against the map it is scored with. Raises what
    :func:`load_logits` raises, :class:`GroundTruthError` for a missing, unreadable or mis-sized mask, and
    :class:`PathEscapeError` for a mask path that leads out of the root."""
    logits = load_logits(store, row)
    if not row.mask_path:
        return ImageResult(logits, None)
    mask_file = resolve_inside(dataset_root, row.mask_path)
    return ImageResult(logits, load_mask(mask_file, logits.shape, image_path=row.image_path))
