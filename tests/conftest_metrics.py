"""Independent reference metrics for the metric tests: stack every pixel, then sklearn / plain loops.

Written the straightforward (memory-hungry) way the original evaluator worked, without histograms, so that
a test comparing the streaming engine with it can fail.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from skimage.measure import label as skimage_label
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _trapezoid(x: list[float], y: list[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2.0 for i in range(len(x) - 1)))


def _regions(masks: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(image index, bool region mask) for every 8-connected region of every mask."""
    regions = []
    for index, mask in enumerate(masks):
        labels = skimage_label(mask.astype(np.uint8), connectivity=2)
        for value in range(1, int(labels.max()) + 1):
            regions.append((index, labels == value))
    return regions


def reference_pro_200(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The original READAR PRO: 200 probability thresholds, per-region loop, FPR <= 0.3, area / 0.3."""
    probabilities = [expit(m.astype(np.float64)) for m in maps]
    regions = _regions(masks)
    normal_total = sum(int((~mask).sum()) for mask in masks)
    if not regions or normal_total == 0:
        return float("nan")
    top = max(float(p.max()) for p in probabilities)
    bottom = min(float(p.min()) for p in probabilities)
    points = []
    for threshold in np.linspace(top, bottom, 200):
        flagged = [p >= threshold for p in probabilities]
        overlaps = [flagged[i][region].sum() / region.sum() for i, region in regions]
        false_pos = sum(int((f & ~mask).sum()) for f, mask in zip(flagged, masks, strict=True))
        points.append((false_pos / normal_total, float(np.mean(overlaps))))
    points.sort()
    x = [fpr for fpr, _ in points if fpr <= 0.3]
    y = [pro for fpr, pro in points if fpr <= 0.3]
    if not x or x[0] > 0:
        x, y = [0.0, *x], [0.0, *y]
    if x[-1] < 0.3:
        next_fpr, next_pro = next((fpr, pro) for fpr, pro in points if fpr > 0.3)
        y.append(y[-1] + (next_pro - y[-1]) * (0.3 - x[-1]) / (next_fpr - x[-1]))
        x.append(0.3)
    return _trapezoid(x, y) / 0.3


def reference_pro_hard(maps: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """The official MVTec AD PRO: per-pixel FPR / PRO increments, sorted, ties merged, (0,0) and (1,1) added."""
    regions = _regions(masks)
    normal_total = sum(int((~mask).sum()) for mask in masks)
    if not regions or normal_total == 0:
        return float("nan")
    fpr_steps, pro_steps = [], []
    for index, mask in enumerate(masks):
        fpr_step = np.where(mask, 0.0, 1.0 / normal_total)
        pro_step = np.zeros(mask.shape)
        for image_index, region in regions:
            if image_index == index:
                pro_step[region] = 1.0 / (region.sum() * len(regions))
        fpr_steps.append(fpr_step.ravel())
        pro_steps.append(pro_step.ravel())
    scores = np.concatenate([m.astype(np.float64).ravel() for m in maps])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores = scores[order]
    fprs = np.cumsum(np.concatenate(fpr_steps)[order])
    pros = np.cumsum(np.concatenate(pro_steps)[order])
    last_of_tie = np.append(np.diff(scores) != 0, True)
    x = [0.0, *np.minimum(fprs[last_of_tie], 1.0).tolist(), 1.0]
    y = [0.0, *np.minimum(pros[last_of_tie], 1.0).tolist(), 1.0]
    inside = [i for i, value in enumerate(x) if value <= 0.3]
    area = _trapezoid([x[i] for i in inside], [y[i] for i in inside])
    if 0.3 not in x:
        right = inside[-1] + 1
        left = inside[-1]
        cut = y[left] + (y[right] - y[left]) * (0.3 - x[left]) / (x[right] - x[left])
        area += (cut + y[left]) / 2.0 * (0.3 - x[left])
    return area / 0.3


def reference_metrics(maps: list[np.ndarray], masks: list[np.ndarray], labels: list[bool]) -> dict[str, float]:
    """All five metrics of a scope from full arrays: sklearn for AUROC / F1, loops for the PROs."""
    pixels = np.concatenate([m.astype(np.float64).ravel() for m in maps])
    truth = np.concatenate([m.ravel() for m in masks])
    image_scores = [float(m.astype(np.float64).max()) for m in maps]
    result = {"iAUROC": float("nan"), "pAUROC": float("nan"), "F1_max": float("nan")}
    if 0 < sum(labels) < len(labels):
        result["iAUROC"] = float(roc_auc_score(labels, image_scores))
    if 0 < truth.sum() < truth.size:
        result["pAUROC"] = float(roc_auc_score(truth, pixels))
    if truth.sum() > 0:
        precision, recall, _ = precision_recall_curve(truth, pixels)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = 2 * precision * recall / (precision + recall)
        result["F1_max"] = float(np.nanmax(f1))
    result["PRO"] = reference_pro_200(maps, masks)
    result["PRO_hard"] = reference_pro_hard(maps, masks)
    return result


def random_case(
    rng: np.random.Generator, *, num_images: int, height: int, width: int, dtype: type = np.float16,
    distinct_values: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[bool]]:
    """Random maps (H, W) correlated with random blob masks; every other image is normal (empty mask).

    distinct_values: draw logits from that many values only (forces ties); None for continuous values.
    """
    maps, masks, labels = [], [], []
    palette = rng.normal(0.0, 3.0, size=distinct_values) if distinct_values else None
    for index in range(num_images):
        anomalous = index % 2 == 1
        mask = np.zeros((height, width), dtype=bool)
        if anomalous:
            for _ in range(int(rng.integers(1, 3))):
                top, left = rng.integers(0, height), rng.integers(0, width)
                mask[top:top + int(rng.integers(1, 4)), left:left + int(rng.integers(1, 4))] = True
        if palette is not None:
            logits = rng.choice(palette, size=(height, width)) + 2.0 * mask
        else:
            logits = rng.normal(0.0, 2.0, size=(height, width)) + 2.0 * mask
        maps.append(logits.astype(dtype))
        masks.append(mask)
        labels.append(anomalous)
    return maps, masks, labels
