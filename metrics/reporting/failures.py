"""Why an anomalous image was missed: the failure classes of the original READ-on-MVTec analysis.

Pure functions over one image's arrays; no files, SQL or plotting.

Overlap (used for galleries and for "success"): the IoU between the ground-truth mask and the score map
thresholded at the category's F1-max threshold (pixels whose logit is at or above the threshold at which the
category's pixel F1 is largest; probability 0.5, logit 0, when the category has no such threshold).

Classes, checked in this order for an anomalous image:

``no_seg``                the model produced no ``[SEG]`` token, so no mask at all;
``success``               overlap IoU >= :data:`SUCCESS_IOU`;
``similarity_unstable``   the peak cell of the ``[SEG]``-to-image-token similarity map (24×24 for READ, 16×16 for
                          LISA) does not touch the defect (the mask cropped like the CLIP input, DESIGN.md 5.5,
                          and max-pooled to the grid);
``points_wrong``          the peak is on the defect but no positive SasP point lies inside the mask (only for
                          detectors that prompt SAM with points);
``sam_incomplete``        the prompt was right — a positive point inside the defect, or for detectors without
                          points (LISA) the peak on it — yet the mask overlaps the defect too little;
``miss``                  detectors without a similarity map (baseline, PixelLM): any non-success.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metrics.geometry import CLIP_SIDE, aspect_padding

NO_SEG = "no_seg"
SIMILARITY_UNSTABLE = "similarity_unstable"
POINTS_WRONG = "points_wrong"
SAM_INCOMPLETE = "sam_incomplete"
SUCCESS = "success"
MISS = "miss"

# Display order and the one-line meaning of each class (the report's legend).
FAILURE_CLASSES: dict[str, str] = {
    NO_SEG: "no [SEG] token generated: no mask at all",
    SIMILARITY_UNSTABLE: "the similarity map's peak cell does not touch the defect",
    POINTS_WRONG: "similarity peak on the defect, but no positive SasP point inside the mask",
    SAM_INCOMPLETE: "the prompt was on the defect (a positive point, or without points the similarity peak), but "
                    "the mask's IoU is below the success level",
    MISS: "IoU below the success level (detector without a similarity map)",
    SUCCESS: "IoU at or above the success level",
}

SUCCESS_IOU = 0.3


@dataclass(frozen=True)
class FailureEvidence:
    """What the classifier looks at for one anomalous image.

    mask: bool (H, W) ground truth.
    iou: overlap of the thresholded score map with ``mask`` (see the module docstring).
    seg_found: whether a [SEG] token was produced; None when the detector does not say (baseline).
    similarity: float (g, g) raw dot products of the [SEG] state with the image tokens, or None.
    points: (n, 2) SasP points as (x, y) in original-image pixels, or None.
    labels: (n,) point labels, 1 positive / 0 negative / -1 neutral, or None.
    """

    mask: np.ndarray
    iou: float
    seg_found: bool | None = None
    similarity: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


def mask_iou(mask: np.ndarray, predicted: np.ndarray) -> float:
    """IoU of two bool (H, W) masks; 0 when both are empty."""
    union = int(np.count_nonzero(mask | predicted))
    return 0.0 if union == 0 else int(np.count_nonzero(mask & predicted)) / union


def crop_window(height: int, width: int, side: int = CLIP_SIDE) -> tuple[float, float, float, float]:
    """The part of the image (top, bottom, left, right in pixels, floats) that the similarity grid covers.

    Inverse of the aspect-ratio padding of DESIGN.md 5.5 step 1 (as the original SasP): a ``side``² map is
    padded with (⌊H·side/min(H, W)⌋ − side) // 2 rows top and bottom (likewise columns) and resized to (H, W),
    so the unpadded map lands on this window — the centre crop of CLIP's preprocessing.
    """
    pad_rows, pad_cols = aspect_padding(side, (height, width))
    padded_h = side + 2 * pad_rows
    padded_w = side + 2 * pad_cols
    top = pad_rows * height / padded_h
    left = pad_cols * width / padded_w
    return top, top + side * height / padded_h, left, left + side * width / padded_w


def mask_on_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """bool (grid, grid): cells of the similarity grid that contain at least one defect pixel of ``mask``."""
    height, width = mask.shape
    top, bottom, left, right = crop_window(height, width)
    row_edges = np.linspace(top, bottom, grid + 1)
    col_edges = np.linspace(left, right, grid + 1)
    # Cell k spans pixels [floor(edge_k), ceil(edge_k+1)): every pixel the cell touches counts.
    row_starts = np.clip(np.floor(row_edges[:-1]).astype(int), 0, height - 1)
    row_stops = np.clip(np.ceil(row_edges[1:]).astype(int), 1, height)
    col_starts = np.clip(np.floor(col_edges[:-1]).astype(int), 0, width - 1)
    col_stops = np.clip(np.ceil(col_edges[1:]).astype(int), 1, width)
    rows_hit = np.zeros((grid, width), dtype=bool)
    for index in range(grid):
        rows_hit[index] = mask[row_starts[index]:row_stops[index]].any(axis=0)
    cells = np.zeros((grid, grid), dtype=bool)
    for index in range(grid):
        cells[:, index] = rows_hit[:, col_starts[index]:col_stops[index]].any(axis=1)
    return cells


def similarity_peak(similarity: np.ndarray) -> tuple[int, int]:
    """(row, col) of the largest value of a (g, g) similarity map (the first one on ties)."""
    row, col = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
    return int(row), int(col)


def positive_point_inside(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> bool:
    """Whether any point labelled 1 falls on a defect pixel (points (n, 2) as (x, y) pixels, truncated)."""
    height, width = mask.shape
    for (x, y), label in zip(np.asarray(points, dtype=float).reshape(-1, 2), np.asarray(labels).ravel(),
                             strict=True):
        if int(label) != 1:
            continue
        col = min(max(int(x), 0), width - 1)
        row = min(max(int(y), 0), height - 1)
        if mask[row, col]:
            return True
    return False


def classify_failure(evidence: FailureEvidence, *, success_iou: float = SUCCESS_IOU) -> str:
    """The failure class (one of :data:`FAILURE_CLASSES`) of one anomalous image."""
    if evidence.mask.ndim != 2 or evidence.mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool (H, W) array; got {evidence.mask.dtype} {evidence.mask.shape}")
    if evidence.seg_found is False:
        return NO_SEG
    if evidence.iou >= success_iou:
        return SUCCESS
    if evidence.similarity is None:
        return MISS
    similarity = np.asarray(evidence.similarity, dtype=float)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (g, g) map; got shape {similarity.shape}")
    row, col = similarity_peak(similarity)
    if not mask_on_grid(evidence.mask, similarity.shape[0])[row, col]:
        return SIMILARITY_UNSTABLE
    if evidence.points is not None and not positive_point_inside(evidence.mask, evidence.points,
                                                                 evidence.labels if evidence.labels is not None
                                                                 else np.ones(len(evidence.points))):
        return POINTS_WRONG
    return SAM_INCOMPLETE


def class_order(has_similarity: bool, has_points: bool = True) -> Sequence[str]:
    """The classes a detector can produce, in display order."""
    if not has_similarity:
        return (NO_SEG, MISS, SUCCESS)
    if not has_points:
        return (NO_SEG, SIMILARITY_UNSTABLE, SAM_INCOMPLETE, SUCCESS)
    return (NO_SEG, SIMILARITY_UNSTABLE, POINTS_WRONG, SAM_INCOMPLETE, SUCCESS)
