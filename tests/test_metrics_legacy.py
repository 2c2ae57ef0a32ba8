"""The legacy evaluator (`readar eval`) on generated folders in the original READAR output layout."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from metrics.legacy import image_tail
from metrics.legacy_evaluation import evaluate_legacy
from scheduler.commands.eval import eval_command
from tests.conftest_metrics import reference_metrics

SIZE = (6, 8)


def _add(pred_root: Path, mvtec_root: Path, category: str, defect: str, index: int, logits: np.ndarray,
         mask: np.ndarray | None, *, image_prefix: str = "/data/elsewhere/mvtec") -> Path:
    """One prediction folder (+ its mask under the MVTec root); returns the folder."""
    folder = pred_root / f"{category}_{defect}_{index:03d}"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(
        json.dumps({"image_path": f"{image_prefix}/{category}/test/{defect}/{index:03d}.png"}))
    np.save(folder / "pred_logits_0.npy", logits)
    if mask is not None:
        mask_path = mvtec_root / category / "ground_truth" / defect / f"{index:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return folder


def _dataset(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Two categories, 3 good + 3 anomalous images each; float16-representable float32 logits."""
    rng = np.random.default_rng(seed)
    pred_root, mvtec_root = tmp_path / "pred", tmp_path / "mvtec"
    arrays: dict[str, tuple[list, list, list]] = {}
    for category, defects in (("bottle", ("crack", "hole", "crack")), ("zipper", ("rough", "rough", "split"))):
        maps, masks, labels = [], [], []
        for index in range(6):
            defect = "good" if index < 3 else defects[index - 3]
            mask = np.zeros(SIZE, dtype=bool)
            if defect != "good":
                mask[rng.integers(0, 4):, rng.integers(0, 5):rng.integers(5, 8)] = True
            logits = (rng.normal(size=SIZE) + 2 * mask).astype(np.float16).astype(np.float32)
            _add(pred_root, mvtec_root, category, defect, index, logits, mask if defect != "good" else None)
            maps.append(logits)
            masks.append(mask)
            labels.append(defect != "good")
        arrays[category] = (maps, masks, labels)
    return pred_root, mvtec_root, arrays


@pytest.mark.parametrize("workers", [1, 2])
def test_rows_match_reference(tmp_path: Path, workers: int) -> None:
    pred_root, mvtec_root, arrays = _dataset(tmp_path)
    result = evaluate_legacy(pred_root, mvtec_root, workers=workers)
    assert not result.skips and result.num_evaluated == 12
    rows = {(r["scope"], r["category"], r["defect_type"]): r for r in result.rows}
    assert set(rows) == {("category", "bottle", ""), ("defect", "bottle", "crack"), ("defect", "bottle", "hole"),
                         ("category", "zipper", ""), ("defect", "zipper", "rough"), ("defect", "zipper", "split"),
                         ("overall", "ALL", ""), ("mean", "ALL", "")}
    pooled = tuple(arrays["bottle"][i] + arrays["zipper"][i] for i in range(3))
    for key, images in ((("category", "bottle", ""), arrays["bottle"]), (("overall", "ALL", ""), pooled)):
        reference = reference_metrics(*images)
        for name in ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max"):
            assert rows[key][name] == pytest.approx(reference[name], abs=1e-9), (key, name)
    hole = reference_metrics(*(arrays["bottle"][i][:3] + arrays["bottle"][i][4:5] for i in range(3)))
    assert rows[("defect", "bottle", "hole")]["PRO_hard"] == pytest.approx(hole["PRO_hard"], abs=1e-9)


def test_several_logit_files_combine_by_maximum(tmp_path: Path) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    base = evaluate_legacy(pred_root, mvtec_root, classes=["bottle"]).rows[0]
    for folder in pred_root.glob("bottle_*"):
        first = np.load(folder / "pred_logits_0.npy")
        np.save(folder / "pred_logits_0.npy", np.full_like(first, -50.0))
        np.save(folder / "pred_logits_1.npy", first)  # the max of the two is the original map
    again = evaluate_legacy(pred_root, mvtec_root, classes=["bottle"]).rows[0]
    assert again["pAUROC"] == base["pAUROC"] and again["PRO"] == base["PRO"]


def _break(pred_root: Path, mvtec_root: Path) -> dict[str, str]:
    """Add one broken folder per kind of bad input; returns folder name → expected words in the reason."""
    good_logits = np.zeros(SIZE, dtype=np.float32)
    mask = np.zeros(SIZE, dtype=bool)
    mask[1:3, 1:3] = True
    expected = {}
    folder = _add(pred_root, mvtec_root, "bottle", "scratch", 50, good_logits, None)
    expected[folder.name] = "has no mask"
    folder = _add(pred_root, mvtec_root, "bottle", "dent", 51, np.zeros((5, 5), np.float32), mask)
    expected[folder.name] = "dent/051_mask.png is 6×8 but image bottle/test/dent/051.png is 5×5"
    nan_logits = good_logits.copy()
    nan_logits[0, 0] = np.nan
    folder = _add(pred_root, mvtec_root, "bottle", "good", 52, nan_logits, None)
    expected[folder.name] = "052/pred_logits_0.npy contains NaN or inf"
    folder = _add(pred_root, mvtec_root, "bottle", "good", 53, good_logits, None)
    np.save(folder / "pred_logits_0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    expected[folder.name] = "pickled objects are refused"
    folder = _add(pred_root, mvtec_root, "bottle", "good", 54, good_logits, None)
    np.savez(folder / "archive.npz", a=good_logits)
    (folder / "archive.npz").rename(folder / "pred_logits_0.npy")
    expected[folder.name] = "not a single array"
    folder = _add(pred_root, mvtec_root, "bottle", "good", 55, good_logits, None)
    (folder / "pred_logits_0.npy").write_bytes(b"garbage")
    expected[folder.name] = "not a readable .npy"
    folder = _add(pred_root, mvtec_root, "bottle", "good", 56, good_logits, None)
    (folder / "metadata.json").unlink()
    expected[folder.name] = "metadata.json is missing"
    folder = _add(pred_root, mvtec_root, "bottle", "good", 57, good_logits, None)
    (folder / "metadata.json").write_text(json.dumps({"image_path": "/x/bottle/train/good/057.png"}))
    expected[folder.name] = "does not end in <category>/test/<defect>/<file>"
    return expected


def test_every_bad_input_is_skipped_with_its_reason(tmp_path: Path) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    expected = _break(pred_root, mvtec_root)
    result = evaluate_legacy(pred_root, mvtec_root)
    reasons = {Path(skip.folder).name: skip.reason for skip in result.skips}
    assert set(reasons) == set(expected)
    for name, words in expected.items():
        assert words in reasons[name], (name, reasons[name])
    assert result.num_evaluated == 12
    bottle_row = next(r for r in result.rows if r["scope"] == "category" and r["category"] == "bottle")
    assert bottle_row["num_skipped"] == 6  # 056 (no metadata) and 057 (no test layout) have no category


def test_cli_writes_csv_and_table(tmp_path: Path) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    out_csv = tmp_path / "out" / "metrics.csv"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(eval_command, ["--pred-root", str(pred_root), "--mvtec-root", str(mvtec_root),
                                               "--out-csv", str(out_csv), "--workers", "1"])
    assert result.exit_code == 0, result.output
    with out_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["scope"] for r in rows] == ["mean", "overall", "category", "category", "defect", "defect", "defect",
                                          "defect"]  # the README's order, as `readar metrics`
    assert all(not math.isnan(float(r["PRO_hard"])) for r in rows)
    assert "overall" in result.output and "zipper" in result.output


def test_cli_skips_are_reported_and_strict_fails(tmp_path: Path) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    _break(pred_root, mvtec_root)
    out_csv = tmp_path / "metrics.csv"
    args = ["--pred-root", str(pred_root), "--mvtec-root", str(mvtec_root), "--out-csv", str(out_csv),
            "--workers", "1", "--no-pro-hard", "--classes", "bottle"]
    lenient = CliRunner().invoke(eval_command, args)
    assert lenient.exit_code == 0, lenient.output
    assert "skipped" in lenient.output and "contains NaN or inf" in lenient.output
    rows = list(csv.DictReader(out_csv.open()))
    assert {r["category"] for r in rows} == {"bottle", "ALL"} and math.isnan(float(rows[0]["PRO_hard"]))
    out_csv.unlink()
    strict = CliRunner().invoke(eval_command, [*args, "--strict"])
    assert strict.exit_code != 0 and not out_csv.exists()


def test_image_tail_reads_foreign_paths() -> None:
    assert image_tail(r"C:\data\mvtec\bottle\test\crack\003.png") == ("bottle", "crack", "003.png")
    assert image_tail("/mnt/x/mvtec/cable/test/good/000.png") == ("cable", "good", "000.png")
