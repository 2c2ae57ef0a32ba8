"""Metric values from per-score counters: pure functions, no state, no I/O (DESIGN.md section 6).

Pixel inputs describe the distinct scores of one scope, in ascending score order, n >= 1 entries:
    normal: int64 (n,)  normal pixels with that score
    defect: int64 (n,)  defect pixels with that score
    inverse_sizes: float64 (n,)  Σ 1/(size of the pixel's region) over those defect pixels
    logits: float64 (n,)  representative logit of each entry (only the 200-threshold PRO reads values)
    num_regions: number of ground-truth regions in the scope (pooled over images).
A value that is undefined for the scope (no normal or no defect pixels / images) is NaN.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

FPR_LIMIT = 0.3
PRO_THRESHOLDS = 200
NAN = float("nan")


def image_auroc(image_scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of image scores (n,) against bool labels (n,); ties count one half (Mann–Whitney)."""
    scores = np.asarray(image_scores, dtype=np.float64)
    positive = np.asarray(labels, dtype=bool)
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return NAN
    ranks = rankdata(scores)
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def pixel_auroc(normal: np.ndarray, defect: np.ndarray) -> float:
    """ROC AUC over all pixels: P(defect score > normal score) + ½ P(equal)."""
    num_pos = int(defect.sum())
    num_neg = int(normal.sum())
    if num_pos == 0 or num_neg == 0:
        return NAN
    defect_at_or_below = np.cumsum(defect)
    defect_above = num_pos - defect_at_or_below
    wins = normal.astype(np.float64) * (defect_above.astype(np.float64) + 0.5 * defect.astype(np.float64))
    return float(wins.sum()) / (float(num_pos) * float(num_neg))


def f1_max(normal: np.ndarray, defect: np.ndarray) -> tuple[float, int]:
    """Largest pixel F1 over every distinct threshold "score >= t", and the entry index of that threshold.

    F1 = 2·TP / (TP + FP + P), the same value as the exact precision–recall curve gives. Index -1 with NaN
    when the scope has no defect pixels.
    """
    num_pos = int(defect.sum())
    if num_pos == 0:
        return NAN, -1
    true_pos = np.cumsum(defect[::-1]).astype(np.float64)
    false_pos = np.cumsum(normal[::-1]).astype(np.float64)
    scores = 2.0 * true_pos / (true_pos + false_pos + num_pos)
    best_from_top = int(np.argmax(scores))
    return float(scores[best_from_top]), len(defect) - 1 - best_from_top


def _area_to_limit(fprs: np.ndarray, pros: np.ndarray, limit: float) -> float:
    """Trapezoid area under (fprs, pros), sorted by fpr, from the first point up to fpr == limit.

    Follows the official MVTec AD ``trapezoid`` helper: when ``limit`` is not one of the x values, the curve
    is cut at ``limit`` by linear interpolation between its neighbours. The curve must reach ``limit``.
    """
    x = [float(v) for v in fprs]
    y = [float(v) for v in pros]
    correction = 0.0
    if limit not in x:
        insert = bisect_right(x, limit)
        left_x, left_y, right_x, right_y = x[insert - 1], y[insert - 1], x[insert], y[insert]
        cut_y = left_y + (right_y - left_y) * (limit - left_x) / (right_x - left_x)
        correction = 0.5 * (cut_y + left_y) * (limit - left_x)
    keep = np.asarray(x) <= limit
    kept_x = np.asarray(x)[keep]
    kept_y = np.asarray(y)[keep]
    return float(np.sum(0.5 * (kept_y[1:] + kept_y[:-1]) * np.diff(kept_x))) + correction


def pro_hard(normal: np.ndarray, inverse_sizes: np.ndarray, num_regions: int) -> float:
    """Official MVTec AD PRO (Bergmann et al. 2021, section 4.2; ``compute_pro`` of their evaluation code).

    One curve point per distinct score (ties form one step), (0, 0) and (1, 1) added, area up to FPR 0.3
    with linear interpolation at 0.3, divided by 0.3.
    """
    num_neg = int(normal.sum())
    if num_regions == 0 or num_neg == 0:
        return NAN
    fprs = np.cumsum(normal[::-1]) / num_neg
    pros = np.minimum(np.cumsum(inverse_sizes[::-1]) / num_regions, 1.0)  # rounding may overshoot 1
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    return _area_to_limit(fprs, pros, FPR_LIMIT) / FPR_LIMIT


def pro_200_points(normal: np.ndarray, inverse_sizes: np.ndarray, logits: np.ndarray,
                   num_regions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The (FPR, PRO) points of the original READAR evaluator's curve (DESIGN.md section 6); None when there
    is no region or no normal pixel.

    Thresholds: 200 probabilities evenly spaced from sigmoid(max logit) down to sigmoid(min logit) (float64
    ``np.linspace``). Per threshold t: PRO = mean over regions of the region's fraction with probability >= t,
    FPR = normal pixels with probability >= t / all normal pixels. Points with FPR <= 0.3 are kept in FPR order
    (= threshold order, both only grow as t falls). The curve starts at the origin (no pixel is at or above
    a threshold beyond the maximum), which is the point added at FPR 0 when none has FPR 0. When no point has
    FPR 0.3 exactly, the first point beyond it ends the curve, so that the point at 0.3 can be interpolated.
    """
    num_neg = int(normal.sum())
    if num_regions == 0 or num_neg == 0:
        return None
    probabilities = expit(np.asarray(logits, dtype=np.float64))
    thresholds = np.linspace(probabilities[-1], probabilities[0], PRO_THRESHOLDS)
    first_at_or_above = np.searchsorted(probabilities, thresholds, side="left")
    normal_from = np.concatenate((np.cumsum(normal[::-1])[::-1], [0]))
    inverse_from = np.concatenate((np.cumsum(inverse_sizes[::-1])[::-1], [0.0]))
    fprs = normal_from[first_at_or_above] / num_neg
    pros = np.minimum(inverse_from[first_at_or_above] / num_regions, 1.0)
    kept = fprs <= FPR_LIMIT
    curve_x = fprs[kept]
    curve_y = pros[kept]
    if curve_x.size == 0 or curve_x[0] > 0.0:
        curve_x = np.concatenate(([0.0], curve_x))
        curve_y = np.concatenate(([0.0], curve_y))
    if curve_x[-1] < FPR_LIMIT:
        beyond = int(np.argmax(fprs > FPR_LIMIT))  # the last threshold flags every pixel: FPR 1 exists
        curve_x = np.concatenate((curve_x, [fprs[beyond]]))
        curve_y = np.concatenate((curve_y, [pros[beyond]]))
    return curve_x, curve_y


def pro_200(normal: np.ndarray, inverse_sizes: np.ndarray, logits: np.ndarray, num_regions: int) -> float:
    """PRO as the original READAR evaluator defines it: the area under :func:`pro_200_points` up to FPR 0.3
    (the point at 0.3 interpolated linearly between its neighbours when missing), divided by 0.3."""
    points = pro_200_points(normal, inverse_sizes, logits, num_regions)
    if points is None:
        return NAN
    return _area_to_limit(*points, FPR_LIMIT) / FPR_LIMIT
