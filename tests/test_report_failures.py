"""The report's pure parts: the failure classifier on constructed cases, the similarity-grid geometry, and the
curve points read off metric states (checked against the metric values the engine computes)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from metrics.reporting import curves
from metrics.reporting.failures import (
    MISS,
    NO_SEG,
    POINTS_WRONG,
    SAM_INCOMPLETE,
    SIMILARITY_UNSTABLE,
    SUCCESS,
    FailureEvidence,
    class_order,
    classify_failure,
    crop_window,
    mask_iou,
    mask_on_grid,
)
from metrics.state import MetricState

SIDE = 240  # 24×24 grid of 10-pixel cells on a square image


def _square_mask() -> np.ndarray:
    """Defect on rows/cols 100..139: grid cells 10..13."""
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    mask[100:140, 100:140] = True
    return mask


def _similarity(peak_row: int, peak_col: int) -> np.ndarray:
    similarity = np.zeros((24, 24))
    similarity[peak_row, peak_col] = 5.0
    return similarity


POINTS_IN = np.array([[120.0, 120.0], [5.0, 5.0]])  # (x, y): the first on the defect
POINTS_OUT = np.array([[5.0, 5.0], [120.0, 120.0]])


@pytest.mark.parametrize(
    ("evidence", "expected"),
    [
        (FailureEvidence(_square_mask(), 0.0, seg_found=False, similarity=_similarity(11, 11)), NO_SEG),
        (FailureEvidence(_square_mask(), 0.8, seg_found=True, similarity=_similarity(11, 11),
                         points=POINTS_IN, labels=np.array([1, 0])), SUCCESS),
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(2, 20),
                         points=POINTS_IN, labels=np.array([1, 0])), SIMILARITY_UNSTABLE),
        # Peak on the defect, but the point inside the mask is the negative one.
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(12, 12),
                         points=POINTS_OUT, labels=np.array([1, 0])), POINTS_WRONG),
        # Positive point inside the neutral-labelled defect → still wrong: only label 1 counts.
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(12, 12),
                         points=POINTS_IN, labels=np.array([-1, 1])), POINTS_WRONG),
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(12, 12),
                         points=POINTS_IN, labels=np.array([1, 0])), SAM_INCOMPLETE),
        # Baseline: no similarity, no points, no seg_found.
        (FailureEvidence(_square_mask(), 0.1), MISS),
        (FailureEvidence(_square_mask(), 0.5), SUCCESS),
        # LISA: a similarity map but no points (None): the peak decides, points_wrong cannot happen.
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(12, 12)), SAM_INCOMPLETE),
        (FailureEvidence(_square_mask(), 0.1, seg_found=True, similarity=_similarity(2, 20)), SIMILARITY_UNSTABLE),
    ],
    ids=["no_seg", "success", "similarity_unstable", "points_wrong", "points_wrong_label", "sam_incomplete",
         "baseline_miss", "baseline_success", "lisa_sam_incomplete", "lisa_similarity_unstable"],
)
def test_failure_classes(evidence: FailureEvidence, expected: str) -> None:
    assert classify_failure(evidence) == expected


def test_each_detector_kind_lists_only_the_classes_it_can_produce() -> None:
    assert POINTS_WRONG in class_order(True, True) and MISS not in class_order(True, True)
    assert class_order(True, False) == (NO_SEG, SIMILARITY_UNSTABLE, SAM_INCOMPLETE, SUCCESS)  # LISA
    assert class_order(False, False) == (NO_SEG, MISS, SUCCESS)  # baseline, PixelLM


def test_peak_next_to_the_defect_counts_only_when_its_cell_touches_it() -> None:
    mask = _square_mask()
    on_edge = FailureEvidence(mask, 0.0, seg_found=True, similarity=_similarity(13, 13), points=POINTS_IN,
                              labels=np.array([1, 0]))
    beside = FailureEvidence(mask, 0.0, seg_found=True, similarity=_similarity(14, 13), points=POINTS_IN,
                             labels=np.array([1, 0]))
    assert classify_failure(on_edge) == SAM_INCOMPLETE
    assert classify_failure(beside) == SIMILARITY_UNSTABLE


def test_classifier_rejects_a_non_boolean_mask() -> None:
    with pytest.raises(ValueError, match="bool"):
        classify_failure(FailureEvidence(_square_mask().astype(np.uint8), 0.0))


def test_crop_window_is_the_clip_centre_crop() -> None:
    # A tall image (400×200): CLIP sees its central 200×200 square, rows 100..300.
    assert crop_window(400, 200) == pytest.approx((100.0, 300.0, 0.0, 200.0))
    assert crop_window(240, 240) == pytest.approx((0.0, 240.0, 0.0, 240.0))
    # A defect in the top quarter of the tall image lies outside what the grid covers.
    tall = np.zeros((400, 200), dtype=bool)
    tall[10:60, 50:150] = True
    assert not mask_on_grid(tall, 24).any()
    tall[190:210, 95:105] = True  # the centre of the crop: cells 10..13 of 24
    cells = np.argwhere(mask_on_grid(tall, 24))
    assert cells.min() >= 10 and cells.max() <= 13


def test_mask_iou() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    assert mask_iou(a, b) == 0.0
    a[:2] = True
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


def _random_state(seed: int = 0) -> tuple[MetricState, list[np.ndarray], list[np.ndarray]]:
    generator = np.random.default_rng(seed)
    state = MetricState()
    all_logits, all_masks = [], []
    for index in range(6):
        mask = np.zeros((32, 32), dtype=bool)
        if index % 3:
            top, left = generator.integers(0, 24, size=2)
            mask[top:top + 8, left:left + 6] = True
        logits = (generator.normal(size=(32, 32)) + 2.0 * mask).astype(np.float16)
        state.add_image(logits, mask if mask.any() else None, anomalous=bool(mask.any()))
        all_logits.append(logits)
        all_masks.append(mask)
    return state, all_logits, all_masks


def test_curves_integrate_to_the_metric_values() -> None:
    state, all_logits, all_masks = _random_state()
    values = state.finalize()
    counts = curves.histograms(state)
    pro = curves.pro_curve(counts)
    assert pro.x[0] == 0.0 and pro.x[-1] == pytest.approx(0.3) and np.all(np.diff(pro.x) >= 0)
    assert curves.curve_area(pro) / 0.3 == pytest.approx(values["PRO"], abs=1e-12)
    roc = curves.pixel_roc(counts, max_points=None)
    assert roc.x.size > curves.MAX_PLOT_POINTS  # so that the thinned curve below is really thinned
    assert curves.curve_area(roc) == pytest.approx(values["pAUROC"], abs=1e-9)
    thinned = curves.pixel_roc(counts)
    assert thinned.x.size <= curves.MAX_PLOT_POINTS and (thinned.x[-1], thinned.y[-1]) == (1.0, 1.0)
    assert curves.curve_area(thinned) == pytest.approx(values["pAUROC"], abs=1e-3)
    reference = roc_auc_score(np.concatenate([m.ravel() for m in all_masks]),
                              np.concatenate([v.ravel().astype(float) for v in all_logits]))
    assert curves.curve_area(roc) == pytest.approx(reference, abs=1e-9)
    image = curves.image_roc(state.image_scores, state.image_labels)
    assert curves.curve_area(image) == pytest.approx(values["iAUROC"], abs=1e-12)
    edges, normal, defect = curves.score_histograms(counts)
    assert edges.size == normal.size + 1 and normal.sum() == pytest.approx(1.0) and defect.sum() == pytest.approx(1.0)
    assert np.average(0.5 * (edges[1:] + edges[:-1]), weights=defect) > np.average(
        0.5 * (edges[1:] + edges[:-1]), weights=normal)


def test_curves_of_a_one_class_scope_are_empty() -> None:
    state = MetricState()
    state.add_image(np.zeros((8, 8), dtype=np.float16), None, anomalous=False)
    counts = curves.histograms(state)
    assert curves.pixel_roc(counts).empty and curves.pro_curve(counts).empty
    assert curves.image_roc(state.image_scores, state.image_labels).empty


def test_panel_titles_wrap_to_the_figure_in_at_most_two_lines() -> None:
    from matplotlib.figure import Figure

    from metrics.reporting.panels import literal_title

    narrow, wide = Figure(figsize=(6.5, 3.7)), Figure(figsize=(13.0, 3.7))
    title = "run: brick/test/crack/000.png · image score 0.614 · threshold p=0.538 · prompt " + "“long words” " * 30
    assert literal_title(wide, "short $x$ title") == 1 and wide._suptitle.get_text() == "short $x$ title"
    assert literal_title(narrow, title) == 2
    first, second = narrow._suptitle.get_text().split("\n")
    assert len(first) <= 78 and len(second) <= 78 and second.endswith("…")
