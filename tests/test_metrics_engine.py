"""The streaming engine against an independent full-array reference (sklearn + plain loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics.binning import BINNINGS
from metrics.state import MetricState
from tests.conftest_metrics import random_case, reference_metrics

METRICS = ("iAUROC", "pAUROC", "F1_max", "PRO", "PRO_hard")


def _engine(maps, masks, labels, binning: str = "float16") -> dict[str, float]:
    state = MetricState(binning)
    for logits, mask, anomalous in zip(maps, masks, labels, strict=True):
        state.add_image(logits, mask, anomalous=anomalous)
    return state.finalize()


def _assert_close(got: dict, expected: dict, tolerance: float, names=METRICS) -> None:
    for name in names:
        if math.isnan(expected[name]):
            assert math.isnan(got[name]), f"{name}: expected NaN, got {got[name]}"
        else:
            assert abs(got[name] - expected[name]) <= tolerance, f"{name}: {got[name]} vs {expected[name]}"


@pytest.mark.parametrize("seed", range(12))
def test_float16_matches_reference_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    distinct = None if seed % 3 else int(rng.integers(2, 12))  # every third case is full of ties
    maps, masks, labels = random_case(rng, num_images=int(rng.integers(2, 7)), height=int(rng.integers(3, 13)),
                                      width=int(rng.integers(3, 13)), distinct_values=distinct)
    _assert_close(_engine(maps, masks, labels), reference_metrics(maps, masks, labels), 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_float16_maps_are_exact_in_float32_bins_too(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    maps, masks, labels = random_case(rng, num_images=4, height=9, width=7, distinct_values=6 if seed else None)
    _assert_close(_engine(maps, masks, labels, "float32"), reference_metrics(maps, masks, labels), 1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_float32_maps_deviate_at_most_1e4(seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    maps, masks, labels = random_case(rng, num_images=6, height=24, width=24, dtype=np.float32)
    _assert_close(_engine(maps, masks, labels, "float32"), reference_metrics(maps, masks, labels), 1e-4)


def test_float32_bins_tie_only_values_within_relative_6e5() -> None:
    binning = BINNINGS["float32"]
    rng = np.random.default_rng(3)
    values = np.sort(rng.normal(0, 20, size=50_000).astype(np.float32))
    bins = binning.index(values[None]).ravel()
    assert np.all(np.diff(bins) >= 0)  # order preserved
    same_bin = np.flatnonzero(np.diff(bins) == 0)
    relative_gap = np.abs(values[same_bin + 1] - values[same_bin]) / np.abs(values[same_bin])
    assert relative_gap.max() < 2.0**-14
    representative = binning.value(bins)
    assert np.all(np.abs(representative) <= np.abs(values.astype(np.float64)))  # truncation toward zero


def test_float16_bins_are_one_value_each_and_fold_negative_zero() -> None:
    binning = BINNINGS["float16"]
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(every[np.isfinite(every)].astype(np.float64))
    bins = binning.index(finite.astype(np.float16)[None]).ravel().astype(np.int64)
    assert np.all(np.diff(bins) >= 0)
    assert np.count_nonzero(np.diff(bins) == 0) == 1  # only -0.0 and +0.0 share a bin
    assert np.array_equal(binning.value(bins), finite)


maps_strategy = st.integers(min_value=0, max_value=2**32 - 1)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=maps_strategy, split=st.integers(min_value=1, max_value=4))
def test_merge_and_serialisation_equal_one_shot(seed: int, split: int) -> None:
    rng = np.random.default_rng(seed)
    maps, masks, labels = random_case(rng, num_images=5, height=6, width=5, distinct_values=5)
    one_shot = _engine(maps, masks, labels)
    first, second = MetricState(), MetricState()
    for position, (logits, mask, anomalous) in enumerate(zip(maps, masks, labels, strict=True)):
        (first if position < split else second).add_image(logits, mask, anomalous=anomalous)
    merged = MetricState.from_bytes(second.to_bytes())
    merged += MetricState.from_bytes(first.to_bytes())
    _assert_close(merged.finalize(), one_shot, 1e-12)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=maps_strategy, scale_power=st.integers(min_value=-3, max_value=3))
def test_order_only_metrics_ignore_monotone_transforms_and_image_order(seed: int, scale_power: int) -> None:
    rng = np.random.default_rng(seed)
    maps, masks, labels = random_case(rng, num_images=5, height=5, width=6, distinct_values=7)
    base = _engine(maps, masks, labels)
    order = rng.permutation(len(maps))
    # Scaling by a power of two is exact in float16: the order of the logits (only) is unchanged.
    scaled = [(maps[i].astype(np.float32) * 2.0**scale_power).astype(np.float16) for i in order]
    moved = _engine(scaled, [masks[i] for i in order], [labels[i] for i in order])
    _assert_close(moved, base, 1e-12, names=("iAUROC", "pAUROC", "F1_max", "PRO_hard"))


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(st.floats(min_value=-30, max_value=30, width=16), min_size=12, max_size=12),
    defect_bits=st.integers(min_value=1, max_value=2**12 - 2),
)
def test_arbitrary_float16_maps_match_reference(values: list[float], defect_bits: int) -> None:
    logits = np.array(values, dtype=np.float16).reshape(3, 4)
    mask = np.array([(defect_bits >> i) & 1 for i in range(12)], dtype=bool).reshape(3, 4)
    normal = np.zeros((3, 4), dtype=bool)
    maps, masks, labels = [logits, logits[::-1].copy()], [mask, normal], [True, False]
    _assert_close(_engine(maps, masks, labels), reference_metrics(maps, masks, labels), 1e-9)
