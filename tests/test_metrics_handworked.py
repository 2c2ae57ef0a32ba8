"""Tiny cases whose metric values were worked out by hand (the arithmetic is in each docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metrics.state import MetricState


def _finalize(*images: tuple[list[float], list[bool]], normal_images: int = 0) -> dict:
    """Each image is one row of logits with its mask row; plus ``normal_images`` all-zero-logit good images."""
    state = MetricState()
    for logits, mask in images:
        state.add_image(np.array([logits], dtype=np.float16), np.array([mask], dtype=bool), anomalous=True)
    for _ in range(normal_images):
        state.add_image(np.zeros((1, 2), dtype=np.float16), None, anomalous=False)
    return state.finalize()


def test_constant_map_gives_chance_values() -> None:
    """Logits all 0, one defect pixel of four: every threshold flags everything.

    pAUROC ½; F1 = 2·1/(1+3+1) = 0.4; PRO curve (0,0)→(1,1) cut at 0.3: area 0.045 / 0.3 = 0.15 for both PROs.
    One (anomalous) image only: iAUROC NaN.
    """
    values = _finalize(([0, 0, 0, 0], [True, False, False, False]))
    assert values["pAUROC"] == pytest.approx(0.5, abs=1e-12)
    assert values["F1_max"] == pytest.approx(0.4, abs=1e-12)
    assert values["PRO"] == pytest.approx(0.15, abs=1e-12)
    assert values["PRO_hard"] == pytest.approx(0.15, abs=1e-12)
    assert math.isnan(values["iAUROC"])


def test_tie_at_the_top_is_one_diagonal_step() -> None:
    """Defect pixel and one normal both at 10, three normals at -10 (N = 4, one region).

    Both curves: (0,0) → (0.25,1) diagonal (area 0.125) then flat at 1 to 0.3 (0.05): 0.175/0.3 = 7/12.
    """
    values = _finalize(([10, 10, -10, -10, -10], [True, False, False, False, False]))
    assert values["PRO_hard"] == pytest.approx(7 / 12, abs=1e-12)
    assert values["PRO"] == pytest.approx(7 / 12, abs=1e-12)
    assert values["pAUROC"] == pytest.approx((0.5 + 3) / 4, abs=1e-12)
    assert values["F1_max"] == pytest.approx(2 / (1 + 1 + 1), abs=1e-12)


def test_single_region_interpolated_at_0_3() -> None:
    """One region {5, 2}, normals {4, 3, 1, 0} (N = 4).

    Hard curve (0,0),(0,.5),(.25,.5),(.5,.5),(.5,1),… : area .25·.5 + .05·.5 = .15 → 0.5. The 200 thresholds
    see the same steps (each gap holds several thresholds) → 0.5. pAUROC: defect 5 beats 4 normals, defect 2
    beats 2 → 6/8. F1: at t=5: 2/(1+0+2)=2/3; at t=2: 4/(2+2+2)=2/3.
    """
    values = _finalize(([5, 2, 4, 3, 1, 0], [True, True, False, False, False, False]))
    assert values["pAUROC"] == pytest.approx(0.75, abs=1e-12)
    assert values["PRO_hard"] == pytest.approx(0.5, abs=1e-12)
    assert values["PRO"] == pytest.approx(0.5, abs=1e-12)
    assert values["F1_max"] == pytest.approx(2 / 3, abs=1e-12)
    assert values["num_regions"] == 1


def test_regions_split_across_images_are_averaged_as_one_pool() -> None:
    """Image A: region a = pixels {4, 1} (mask T T), normals {2, 0}; image B: region b = {3}, normals {0, 0, 0}.

    N = 5, R = 2. Descending: 4 → PRO .25; 3 → .75; 2 → FPR .2; 1 → PRO 1; 0 → FPR 1.
    Area: .2·.75 + .1·1 = .25 → .25/.3 = 5/6 (both definitions; each step holds several thresholds).
    """
    values = _finalize(([4, 1, 2, 0], [True, True, False, False]), ([0, 0, 0, 3], [False, False, False, True]))
    assert values["num_regions"] == 2
    assert values["PRO_hard"] == pytest.approx(5 / 6, abs=1e-12)
    assert values["PRO"] == pytest.approx(5 / 6, abs=1e-12)


def test_200_thresholds_miss_a_step_that_the_official_curve_keeps() -> None:
    """Normals {10, 4.898, -10, -10}, one 1-pixel region at 5 (N = 4).

    Hard: (0,0),(.25,0),(.25,1),(.5,1),… → area .05·1 = .05 → 1/6.
    200 thresholds (step (σ(10)−σ(−10))/199 ≈ .005025): t0 = σ(10) = .99995 and t1 ≈ .99493 flag only 10 →
    (.25, 0); t2 ≈ .98991 already flags 5 and 4.898 together → (.5, 1). Kept: (.25, 0) with the origin added;
    interpolated at .3: 0 + 1·(.05/.25) = .2; area ½·(0 + .2)·.05 = .005 → .005/.3 = 1/60.
    """
    values = _finalize(([10, 5, 4.9, -10, -10], [False, True, False, False, False]))
    assert values["PRO_hard"] == pytest.approx(1 / 6, abs=1e-12)
    assert values["PRO"] == pytest.approx(1 / 60, abs=1e-12)


def test_every_fpr_above_0_3_gives_zero_when_the_top_is_normal() -> None:
    """Normals {10, -10} (N = 2), region {0.001, 0}: the first point is already FPR .5 with PRO 0 → PRO 0."""
    values = _finalize(([10, 0.001, 0, -10], [False, True, True, False]))
    assert values["PRO_hard"] == pytest.approx(0.0, abs=1e-12)
    assert values["PRO"] == pytest.approx(0.0, abs=1e-12)


def test_image_auroc_and_counts_with_good_images() -> None:
    """Anomalous image max 5 vs two good images with max 0: iAUROC 1; 3 images, 1 anomalous."""
    values = _finalize(([5, 0], [True, False]), normal_images=2)
    assert values["iAUROC"] == 1.0
    assert (values["num_images"], values["num_anom_images"]) == (3, 1)


def test_all_normal_scope_is_nan_not_an_error() -> None:
    state = MetricState()
    state.add_image(np.ones((2, 2), dtype=np.float16), None, anomalous=False)
    values = state.finalize()
    for name in ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max"):
        assert math.isnan(values[name]), name


def test_all_defect_pixels_scope_has_no_pixel_metrics() -> None:
    """Every pixel is a defect: no normal pixels, so FPR (and pAUROC) are undefined; F1 is 1."""
    state = MetricState()
    state.add_image(np.ones((2, 2), dtype=np.float16), np.ones((2, 2), dtype=bool), anomalous=True)
    values = state.finalize()
    assert math.isnan(values["pAUROC"]) and math.isnan(values["PRO"]) and math.isnan(values["PRO_hard"])
    assert values["F1_max"] == 1.0


def test_empty_state_finalizes() -> None:
    values = MetricState().finalize()
    assert values["num_images"] == 0 and math.isnan(values["pAUROC"])
