"""The image score's top logit without the full-resolution map (storage.logits.max_full_resolution_logit).

The shortcut must give ``float(full_resolution_logits(stored).max())`` bit for bit: the score is stored per
image and must not depend on which path computed it. Every case here compares with that literal value, on the
MVTec geometries READ meets (input_size from SAM's own resize), on SAM-like smooth maps and on the maps that
stress the shortcut's bound: a lone peak at an edge or corner, flat maps, maps at the float16 limit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import storage.logits as logits_module
from storage.logits import NO_MASK_LOGIT, StoredLogits, full_resolution_logits, max_full_resolution_logit
from workers import task
from workers.detectors.base import Detection
from workers.read.preprocess import sam_input_size

LOW_RES = 256
FLOAT16_MAX = float(np.finfo(np.float16).max)
SHORTCUT_MAPS = 15  # the first maps of sample_maps(); the flat ones after them take the full resize
GEOMETRIES = [(700, 700), (800, 800), (840, 840), (900, 900), (1000, 1000), (1024, 1024), (1024, 768), (600, 1000)]


def smooth(rng: np.random.Generator, scale: float, offset: float) -> np.ndarray:
    """Blurred noise with unit spread, scaled: the shape of SAM's low-res logits."""
    noise = gaussian_filter(rng.standard_normal((LOW_RES, LOW_RES)), rng.uniform(1.5, 12.0))
    return noise / noise.std() * scale + offset


def lone_peak(rng: np.random.Generator, row: int, col: int) -> np.ndarray:
    """One high cell on a gentle background: the bound must find a peak that the blur spreads over few pixels
    (or, in SAM's padding, ignore it)."""
    low_res = smooth(rng, 0.3, rng.uniform(-30.0, 0.0))
    low_res[row, col] = low_res.max() + rng.uniform(0.01, 40.0)
    return low_res


def live_edge(original_size: tuple[int, int]) -> tuple[int, int]:
    """The last low-res row and column whose values reach the image (beyond them lies SAM's padding)."""
    in_h, in_w = sam_input_size(original_size)
    return -(-in_h * LOW_RES // 1024) - 1, -(-in_w * LOW_RES // 1024) - 1


def sample_maps(rng: np.random.Generator, original_size: tuple[int, int]) -> list[np.ndarray]:
    """float16 low-res maps of every kind the shortcut must get right."""
    last_row, last_col = live_edge(original_size)
    maps = [smooth(rng, rng.uniform(1.0, 40.0), rng.uniform(-25.0, 10.0)) for _ in range(6)]
    corners = [(0, 0), (0, LOW_RES - 1), (LOW_RES - 1, 0), (LOW_RES - 1, LOW_RES - 1)]
    edges = [(last_row, int(rng.integers(LOW_RES))), (min(last_row + 1, LOW_RES - 1), 5),
             (int(rng.integers(LOW_RES)), last_col)]
    maps += [lone_peak(rng, row, col) for row, col in corners + edges]
    maps.append(np.clip(smooth(rng, 3000.0, -64000.0), -FLOAT16_MAX, FLOAT16_MAX))  # large and negative
    twin = smooth(rng, 0.5, -15.0)
    twin[40, 200] = twin[150, 30] = 12.0  # two equal peaks far apart
    maps.append(twin)
    assert len(maps) == SHORTCUT_MAPS
    maps.append(np.full((LOW_RES, LOW_RES), rng.uniform(-20.0, 20.0)))  # flat: no pixel can be ruled out
    maps.append(np.clip(smooth(rng, 3000.0, 64000.0), -FLOAT16_MAX, FLOAT16_MAX))  # saturates at the top
    return [m.astype(np.float16) for m in maps]


def literal_top(stored: StoredLogits) -> float:
    return float(full_resolution_logits(stored).max())


@pytest.mark.parametrize("original_size", GEOMETRIES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_the_top_logit_equals_the_full_maps_bit_for_bit(original_size: tuple[int, int], monkeypatch) -> None:
    rng = np.random.default_rng(sum(original_size))
    input_size = sam_input_size(original_size)
    maps = sample_maps(rng, original_size)
    resized = []  # maps the shortcut gave up on (it then resizes them whole)
    monkeypatch.setattr(logits_module, "full_resolution_logits",
                        lambda stored: resized.append(stored) or full_resolution_logits(stored))
    single = []
    for index, low_res in enumerate(maps):
        stored = StoredLogits(low_res, original_size, input_size)
        expected = literal_top(stored)
        resized.clear()
        assert max_full_resolution_logit(stored) == expected, f"map {index}"
        assert index >= SHORTCUT_MAPS or not resized, f"the shortcut gave up on map {index}"
        single.append(expected)
    # Several maps combine by per-pixel max, and the top of a per-pixel max is the max of the tops: each map's
    # literal top above is the reference for any three of them; one triple is also checked literally.
    resized.clear()
    for triple in itertools.islice(itertools.combinations(range(SHORTCUT_MAPS), 3), 0, None, 9):
        stored = StoredLogits(np.stack([maps[i] for i in triple]), original_size, input_size)
        assert max_full_resolution_logit(stored) == max(single[i] for i in triple), f"maps {triple}"
    stored = StoredLogits(np.stack([maps[0], maps[7], maps[14]]), original_size, input_size)
    assert max_full_resolution_logit(stored) == literal_top(stored)
    assert not resized, "the shortcut gave up on a triple of maps it takes one by one"


@pytest.mark.parametrize("original_size", [(1024, 1024), (1024, 768), (900, 900), (600, 1000)],
                         ids=lambda size: f"{size[0]}x{size[1]}")
def test_the_emulated_resize_is_pytorchs_bit_for_bit(original_size: tuple[int, int]) -> None:
    """The shortcut's exact values, on every pixel of maps other than its own probe, are PyTorch's float32 values.

    The top logit alone rarely shows a one-ulp float32 difference (float16 rounding hides it), so the emulated
    rounding (FMA or not, source indices, weights) is compared here before any rounding to float16."""
    input_size = sam_input_size(original_size)
    plan = logits_module._score_plan((LOW_RES, LOW_RES), 1024, input_size, original_size)
    assert plan is not None
    rng = np.random.default_rng(11)
    wide = rng.standard_normal((LOW_RES, LOW_RES)) * 2.0 ** rng.uniform(-8, 8, (LOW_RES, LOW_RES))
    for low_res in (smooth(rng, 20.0, -5.0).astype(np.float16), wide.astype(np.float16)):
        expected = logits_module._resized_maps(StoredLogits(low_res, original_size, input_size))[0].numpy()
        emulated = plan.values(low_res.astype(np.float32), np.arange(original_size[0]), np.arange(original_size[1]))
        assert np.array_equal(emulated, expected)

def test_full_resolution_maps_and_missing_masks() -> None:
    """Maps at the image's own resolution (the baseline's) need no resize; K == 0 is the no-mask logit."""
    rng = np.random.default_rng(7)
    for _ in range(100):
        height, width = (int(v) for v in rng.integers(1, 60, size=2))
        count = int(rng.integers(0, 4))
        maps = (rng.standard_normal((count, height, width)) * rng.uniform(0.1, 1e4)).clip(-6e4, 6e4)
        stored = StoredLogits(maps.astype(np.float16), (height, width))
        assert max_full_resolution_logit(stored) == literal_top(stored)
    empty = StoredLogits(np.zeros((0, LOW_RES, LOW_RES), np.float16), (900, 900), sam_input_size((900, 900)))
    assert max_full_resolution_logit(empty) == literal_top(empty) == NO_MASK_LOGIT


def test_a_geometry_whose_arithmetic_is_not_reproduced_takes_the_full_resize(monkeypatch) -> None:
    """If no emulated arithmetic matches PyTorch on a geometry, the shortcut resizes the whole map instead."""
    never = logits_module._Arithmetic(fused_index=True, blend="fma1")  # no known kernel rounds like this
    monkeypatch.setattr(logits_module, "_ARITHMETICS", (never,))
    monkeypatch.setattr(logits_module, "_SCORE_PLANS", {})
    resized = []
    monkeypatch.setattr(logits_module, "full_resolution_logits",
                        lambda stored: resized.append(stored) or full_resolution_logits(stored))
    original_size = (900, 900)
    stored = StoredLogits(sample_maps(np.random.default_rng(3), original_size)[0], original_size,
                          sam_input_size(original_size))
    assert max_full_resolution_logit(stored) == literal_top(stored)
    assert logits_module._SCORE_PLANS[((LOW_RES, LOW_RES), 1024, (1024, 1024), original_size)] is None
    assert resized == [stored]


def test_the_switch_chooses_the_path_and_both_give_one_score(monkeypatch) -> None:
    assert task.switch_on(None) and task.switch_on("") and task.switch_on("1") and task.switch_on("on")
    assert not any(task.switch_on(value) for value in ("0", "off", "OFF", " false ", "no"))
    calls = []
    monkeypatch.setattr(task, "full_resolution_logits", lambda stored: calls.append("full") or
                        full_resolution_logits(stored))
    monkeypatch.setattr(task, "max_full_resolution_logit", lambda stored: calls.append("fast") or
                        max_full_resolution_logit(stored))
    original_size = (840, 840)
    maps = sample_maps(np.random.default_rng(5), original_size)[:2]
    detection = Detection(StoredLogits(np.stack(maps), original_size, sam_input_size(original_size)))
    monkeypatch.setattr(task, "FAST_IMAGE_SCORE", True)
    fast = task.image_score(detection)
    monkeypatch.setattr(task, "FAST_IMAGE_SCORE", False)
    full = task.image_score(detection)
    assert calls == ["fast", "full"]
    assert fast == full == 1.0 / (1.0 + math.exp(-literal_top(detection.logits)))
