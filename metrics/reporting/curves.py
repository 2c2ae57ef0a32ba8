"""Curve points for the report, read off a scope's :class:`~metrics.state.MetricState` histograms.

The histograms hold every distinct float16 logit of the scope with its normal-pixel, defect-pixel and
Σ 1/region-size counts, so the curves below are exact (the same numbers the metric values integrate), not
re-estimated from samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from metrics.binning import get_binning
from metrics.curves import FPR_LIMIT, pro_200_points
from metrics.state import MetricState

MAX_PLOT_POINTS = 2000


@dataclass(frozen=True)
class Histograms:
    """Occupied bins of a state, ascending logit: logits (n,) float64, normal/defect (n,) int64,
    inverse_sizes (n,) float64 (Σ 1/region-size of the defect pixels), num_regions."""

    logits: np.ndarray
    normal: np.ndarray
    defect: np.ndarray
    inverse_sizes: np.ndarray
    num_regions: int


@dataclass(frozen=True)
class Curve:
    """x and y points of one curve (float64 (n,)); empty when the scope does not define it."""

    x: np.ndarray
    y: np.ndarray

    @property
    def empty(self) -> bool:
        return self.x.size == 0


_EMPTY = Curve(np.zeros(0), np.zeros(0))


def histograms(state: MetricState) -> Histograms:
    """The state's per-score counters (the metric engine's own view of its bins)."""
    bins, total, defect, inverse_sizes = state.occupied_bins()
    logits = get_binning(state.binning).value(bins).astype(np.float64)
    if bins.size:
        # As MetricState.finalize: pin the ends to the exact extremes (float32 bins carry truncated values).
        logits[0], logits[-1] = state.min_logit, state.max_logit
    return Histograms(logits, total - defect, defect, inverse_sizes, state.num_regions)


def _thin(x: np.ndarray, y: np.ndarray, max_points: int | None) -> Curve:
    """At most ``max_points`` points (None: all), first and last kept: enough for a plot, fast to draw."""
    if max_points is not None and x.size > max_points:
        keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(int))
        x, y = x[keep], y[keep]
    return Curve(x, y)


def pixel_roc(counts: Histograms, max_points: int | None = MAX_PLOT_POINTS) -> Curve:
    """Pixel ROC (FPR, TPR), one point per distinct score from the highest down, starting at (0, 0);
    thinned to ``max_points`` evenly spaced points for plotting (None keeps every point: exact area)."""
    num_neg, num_pos = int(counts.normal.sum()), int(counts.defect.sum())
    if num_neg == 0 or num_pos == 0:
        return _EMPTY
    fpr = np.concatenate(([0.0], np.cumsum(counts.normal[::-1]) / num_neg))
    tpr = np.concatenate(([0.0], np.cumsum(counts.defect[::-1]) / num_pos))
    return _thin(fpr, tpr, max_points)


def image_roc(image_scores: np.ndarray, image_labels: np.ndarray) -> Curve:
    """Image ROC (FPR, TPR) of image scores (n,) against bool labels (n,); ties form one step."""
    scores = np.asarray(image_scores, dtype=np.float64)
    labels = np.asarray(image_labels, dtype=bool)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return _EMPTY
    distinct, inverse = np.unique(scores, return_inverse=True)
    positives = np.bincount(inverse, weights=labels, minlength=distinct.size)
    negatives = np.bincount(inverse, weights=~labels, minlength=distinct.size)
    fpr = np.concatenate(([0.0], np.cumsum(negatives[::-1]) / num_neg))
    tpr = np.concatenate(([0.0], np.cumsum(positives[::-1]) / num_pos))
    return Curve(fpr, tpr)


def pro_curve(counts: Histograms) -> Curve:
    """The PRO curve of the metrics table (``metrics.curves.pro_200_points``) cut at FPR 0.3: the trapezoid area
    of the returned points divided by 0.3 is the PRO value of the metrics table."""
    points = pro_200_points(counts.normal, counts.inverse_sizes, counts.logits, counts.num_regions)
    if points is None:
        return _EMPTY
    x, y = points
    if x[-1] > FPR_LIMIT:  # the neighbour beyond the limit: replace it by the point at the limit
        cut = y[-2] + (y[-1] - y[-2]) * (FPR_LIMIT - x[-2]) / (x[-1] - x[-2])
        x, y = np.concatenate((x[:-1], [FPR_LIMIT])), np.concatenate((y[:-1], [cut]))
    return Curve(x, y)


def curve_area(curve: Curve) -> float:
    """Trapezoid area under a curve's points (NaN for an empty curve)."""
    if curve.empty:
        return float("nan")
    return float(np.sum(0.5 * (curve.y[1:] + curve.y[:-1]) * np.diff(curve.x)))


def score_histograms(counts: Histograms, num_bins: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probability histograms of normal and defect pixels: (edges (num_bins+1,), normal (num_bins,),
    defect (num_bins,)) as fractions of each class's pixels (a class with no pixels gives zeros)."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    probabilities = expit(counts.logits)
    normal, _ = np.histogram(probabilities, bins=edges, weights=counts.normal)
    defect, _ = np.histogram(probabilities, bins=edges, weights=counts.defect)
    normal = normal / normal.sum() if normal.sum() else normal
    defect = defect / defect.sum() if defect.sum() else defect
    return edges, normal, defect
