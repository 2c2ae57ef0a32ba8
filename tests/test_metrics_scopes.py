"""Scopes, serialisation, input errors, ground-truth loading and the writers."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from metrics.errors import GroundTruthError, MaskSizeError, MetricInputError, StateFormatError
from metrics.groundtruth import inverse_region_sizes, label_regions, load_mask
from metrics.output import metrics_table, write_metrics_csv
from metrics.scopes import CSV_COLUMNS, ScopedAccumulator
from metrics.state import MetricState
from tests.conftest_metrics import random_case, reference_metrics


def _fill(accumulator: ScopedAccumulator, category: str, seed: int, defects=("crack", "hole")) -> dict:
    """Adds 2 good + 2 images per defect type; returns the raw images per defect type for references."""
    rng = np.random.default_rng(seed)
    images: dict[str, tuple[list, list, list]] = {}
    for defect in ("good", *defects):
        maps, masks, _ = random_case(rng, num_images=4, height=6, width=7, distinct_values=9)
        chosen = (maps[0::2], masks[0::2]) if defect == "good" else (maps[1::2], masks[1::2])
        for logits, mask in zip(*chosen, strict=True):
            accumulator.add(category, defect, logits, None if defect == "good" else mask)
        images[defect] = (chosen[0], chosen[1], [defect != "good"] * 2)
    return images


def _pool(*parts):
    return tuple(sum((list(p[i]) for p in parts), []) for i in range(3))


def test_rows_cover_every_scope_and_match_references() -> None:
    accumulator = ScopedAccumulator()
    bottle = _fill(accumulator, "bottle", 1)
    cable = _fill(accumulator, "cable", 2, defects=("bent",))
    rows = accumulator.rows()
    assert [(r["scope"], r["category"], r["defect_type"]) for r in rows] == [
        ("category", "bottle", ""), ("defect", "bottle", "crack"), ("defect", "bottle", "hole"),
        ("category", "cable", ""), ("defect", "cable", "bent"), ("overall", "ALL", ""), ("mean", "ALL", ""),
    ]
    expected = {
        ("category", "bottle"): _pool(*bottle.values()),
        ("defect", "crack"): _pool(bottle["good"], bottle["crack"]),
        ("category", "cable"): _pool(*cable.values()),
        ("overall", ""): _pool(*bottle.values(), *cable.values()),
    }
    by_key = {("category", "bottle"): rows[0], ("defect", "crack"): rows[1], ("category", "cable"): rows[3],
              ("overall", ""): rows[5]}
    for key, images in expected.items():
        reference = reference_metrics(*images)
        for name in ("iAUROC", "pAUROC", "F1_max", "PRO", "PRO_hard"):
            assert by_key[key][name] == pytest.approx(reference[name], abs=1e-9), (key, name)
    assert rows[1]["num_images"] == 4 and rows[1]["num_anom_images"] == 2
    mean = rows[-1]
    assert mean["PRO"] == pytest.approx((rows[0]["PRO"] + rows[3]["PRO"]) / 2, abs=1e-15)
    assert mean["num_images"] == 6 + 4


def test_accumulator_merge_and_bytes_equal_one_shot() -> None:
    whole, first, second = ScopedAccumulator(), ScopedAccumulator(), ScopedAccumulator()
    _fill(whole, "bottle", 5)
    _fill(whole, "cable", 6)
    _fill(first, "bottle", 5)
    _fill(second, "cable", 6)
    merged = ScopedAccumulator.from_bytes(first.to_bytes())
    merged.merge(ScopedAccumulator.from_bytes(second.to_bytes()))
    for got, expected in zip(merged.rows(), whole.rows(), strict=True):
        for column in CSV_COLUMNS:
            a, b = got[column], expected[column]
            assert (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


def test_include_summary_false_leaves_out_overall_and_mean() -> None:
    accumulator = ScopedAccumulator()
    _fill(accumulator, "bottle", 3)
    assert {r["scope"] for r in accumulator.rows(include_summary=False)} == {"category", "defect"}


def test_only_anomalous_category_has_nan_image_auroc_and_nan_mean() -> None:
    accumulator = ScopedAccumulator()
    rng = np.random.default_rng(4)
    maps, masks, _ = random_case(rng, num_images=4, height=5, width=5)
    accumulator.add("pill", "crack", maps[1], masks[1])
    accumulator.add("pill", "crack", maps[3], masks[3])
    _fill(accumulator, "tile", 9)
    rows = {(r["scope"], r["category"]): r for r in accumulator.rows()}
    assert math.isnan(rows[("category", "pill")]["iAUROC"])
    assert not math.isnan(rows[("category", "pill")]["pAUROC"])
    assert math.isnan(rows[("mean", "ALL")]["iAUROC"])


@pytest.mark.parametrize(
    ("logits", "mask", "anomalous", "message"),
    [
        (np.zeros((2, 2), np.float32), None, False, "binning='float32'"),
        (np.zeros(4, np.float16), None, False, "2-D"),
        (np.array([[np.nan, 0]], np.float16), None, False, "NaN or inf"),
        (np.array([[np.inf, 0]], np.float16), None, False, "NaN or inf"),
        (np.zeros((2, 2), np.float16), None, True, "needs a ground-truth mask"),
        (np.zeros((2, 2), np.float16), np.zeros((2, 3), bool), True, "mask is (2, 3)"),
        (np.zeros((2, 2), np.float16), np.zeros((2, 2), np.uint8), True, "mask > 0"),
    ],
)
def test_bad_images_raise_typed_errors(logits, mask, anomalous, message) -> None:
    state = MetricState()
    with pytest.raises(MetricInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        state.add_image(logits, mask, anomalous=anomalous)
    assert state.num_images == 0  # nothing half-added


def test_bad_names_and_mixed_binnings_are_rejected() -> None:
    with pytest.raises(MetricInputError, match="ALL"):
        ScopedAccumulator().add("ALL", "good", np.zeros((1, 1), np.float16))
    with pytest.raises(MetricInputError, match="unknown binning"):
        MetricState("float8")
    with pytest.raises(MetricInputError, match="cannot merge"):
        MetricState("float16").merge(MetricState("float32"))


def test_corrupt_state_bytes_raise_state_format_error() -> None:
    with pytest.raises(StateFormatError, match="not a serialised"):
        MetricState.from_bytes(b"not an npz")
    buffer = io.BytesIO()
    np.savez(buffer, format_version=np.array(1))
    with pytest.raises(StateFormatError, match="lacks arrays"):
        MetricState.from_bytes(buffer.getvalue())
    with pytest.raises(StateFormatError):
        ScopedAccumulator.from_bytes(MetricState().to_bytes())


def test_label_regions_is_eight_connected() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
    labels, count = label_regions(mask)
    assert count == 2 and labels[0, 0] == labels[1, 1]
    weights, count = inverse_region_sizes(mask)
    assert count == 2 and np.allclose(weights, [0.5, 0.5, 0.5, 0.5])


def test_load_mask_checks_size_and_reads_any_nonzero_as_defect(tmp_path: Path) -> None:
    path = tmp_path / "003_mask.png"
    Image.fromarray(np.array([[0, 255, 7], [0, 0, 0]], dtype=np.uint8)).save(path)
    mask = load_mask(path, (2, 3), image_path="bottle/test/crack/003.png")
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, True, True], [False, False, False]]
    with pytest.raises(MaskSizeError, match=r"003_mask.png is 2×3 but image bottle/test/crack/003.png is 4×4"):
        load_mask(path, (4, 4), image_path="bottle/test/crack/003.png")
    with pytest.raises(GroundTruthError, match="does not exist"):
        load_mask(tmp_path / "missing.png", (2, 3))
    (tmp_path / "broken.png").write_bytes(b"junk")
    with pytest.raises(GroundTruthError, match="not a readable image"):
        load_mask(tmp_path / "broken.png", (2, 3))


def test_csv_and_table(tmp_path: Path) -> None:
    accumulator = ScopedAccumulator()
    _fill(accumulator, "bottle", 8)
    rows = accumulator.rows()
    path = write_metrics_csv(rows, tmp_path / "out" / "metrics.csv")
    with path.open() as handle:
        read = list(csv.reader(handle))
    assert read[0][:9] == ["scope", "category", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "num_images",
                           "num_anom_images"]
    assert len(read) == len(rows) + 1
    assert float(read[1][3]) == rows[0]["pAUROC"]  # full precision survives
    console = Console(record=True, width=200)
    console.print(metrics_table(rows))
    text = console.export_text()
    assert "bottle" in text and "overall" in text and f"{100 * rows[0]['pAUROC']:.1f}" in text
