"""Tests of the weight-free ``baseline`` and the ``noop`` detectors.

The accuracy checks use scikit-learn's ROC AUC over raw pixels, independently of the project's metrics engine:
a wrong resize, a transposed axis or a misaligned mask anywhere on the way would pull pixel AUROC down.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

import workers.detectors.baseline as baseline_module
import workers.detectors.noop  # noqa: F401 - registers "noop"
from scheduler.dataset import index_dataset
from scheduler.sample_data import DEFAULT_CATEGORIES
from storage.logits import full_resolution_logits
from tests.dataset_fixtures import image_file, mask_file, train_dir
from workers.detectors.base import DETECTOR_REGISTRY, Detector, DetectorConfig, DetectorError, ImageSample
from workers.images import load_mask, load_rgb


def build(name: str, **extra: object) -> Detector:
    return DETECTOR_REGISTRY[name](DetectorConfig(extra=dict(extra)))


def score_category(
    detector: Detector, root: Path, category: str, *, resize_to: tuple[int, int] | None = None
):
    """(pixel AUROC, image AUROC, last diagnostics) of ``detector`` over one category's test images.

    resize_to: (H, W) to resize test images (bilinear) and masks (nearest) to before detection.
    """
    index = index_dataset(root, classes=[category])
    pixel_scores, pixel_labels, image_scores, image_labels = [], [], [], []
    diagnostics: dict = {}
    for entry in index.entries:
        image = load_rgb(image_file(index, entry))
        mask_path = mask_file(index, entry)
        mask = load_mask(mask_path) if mask_path is not None else np.zeros(image.shape[:2], dtype=bool)
        if resize_to is not None:
            size_wh = (resize_to[1], resize_to[0])
            image = np.asarray(Image.fromarray(image).resize(size_wh, Image.Resampling.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize(size_wh, Image.Resampling.NEAREST))
        sample = ImageSample(
            image=image,
            category=category,
            defect=entry.defect,
            category_defects=index.category_defects[category],
            train_dir=train_dir(index, category),
            key=entry.image_path,
        )
        (detection,) = detector.detect([detector.prepare(sample)])
        logits = full_resolution_logits(detection.logits).astype(np.float32)
        assert logits.shape == mask.shape
        pixel_scores.append(logits.ravel())
        pixel_labels.append(mask.ravel())
        image_scores.append(float(logits.max()))
        image_labels.append(entry.label)
        diagnostics = detection.diagnostics
    pixel_auroc = roc_auc_score(np.concatenate(pixel_labels), np.concatenate(pixel_scores))
    image_auroc = roc_auc_score(image_labels, image_scores)
    return pixel_auroc, image_auroc, diagnostics


# The requirement is pixel AUROC >= 0.9. Measured values are 0.992-0.999; shifting the output map by 4 pixels
# drops them to 0.95-0.97, so the tighter bound below is what catches a small misalignment.
REQUIRED_PIXEL_AUROC = 0.9
ALIGNMENT_PIXEL_AUROC = 0.98


@pytest.mark.parametrize("category", DEFAULT_CATEGORIES)
def test_baseline_pixel_auroc_on_sample_data(sample_root: Path, category: str) -> None:
    pixel_auroc, image_auroc, diagnostics = score_category(build("baseline"), sample_root, category)
    assert pixel_auroc >= REQUIRED_PIXEL_AUROC, f"{category}: pixel AUROC {pixel_auroc:.4f}"
    assert pixel_auroc >= ALIGNMENT_PIXEL_AUROC, (
        f"{category}: pixel AUROC {pixel_auroc:.4f}: maps misaligned?"
    )
    assert image_auroc >= 0.9, f"{category}: image AUROC {image_auroc:.4f}"
    assert diagnostics["reference"] == "train_good" and diagnostics["num_train"] == 8


def test_baseline_output_aligns_when_test_size_differs_from_train(sample_root: Path) -> None:
    """Non-square, larger test images: the map must come back at the test size, aligned with the mask."""
    pixel_auroc, _, diagnostics = score_category(
        build("baseline"), sample_root, "chelsea", resize_to=(300, 360)
    )
    assert diagnostics["grid"] == [256, 256]
    assert pixel_auroc >= ALIGNMENT_PIXEL_AUROC, (
        f"pixel AUROC {pixel_auroc:.4f} after resizing the test images"
    )


def test_baseline_scores_are_not_a_constant(sample_root: Path) -> None:
    """Guards the AUROC test: a detector that ignored its input would score 0.5, not >= 0.9."""
    pixel_auroc, _, _ = score_category(build("noop"), sample_root, "coffee")
    assert pixel_auroc == pytest.approx(0.5)


def test_baseline_output_format(sample_root: Path) -> None:
    detector = build("baseline")
    image = load_rgb(sample_root / "coffee" / "test" / "blob" / "000.png")
    sample = ImageSample(image, "coffee", "blob", train_dir=sample_root / "coffee" / "train" / "good")
    (detection,) = detector.detect([detector.prepare(sample)])
    stored = detection.logits
    assert stored.maps.dtype == np.float16 and stored.maps.shape == (1, 256, 256)
    assert stored.input_size is None and stored.original_size == (256, 256)
    assert np.isfinite(stored.maps).all()
    assert np.abs(stored.maps).max() <= baseline_module.LOGIT_LIMIT
    assert json.loads(json.dumps(detection.diagnostics)) == detection.diagnostics
    # Defect pixels are more likely anomalous than 0.5, background pixels less.
    mask = load_mask(sample_root / "coffee" / "ground_truth" / "blob" / "000_mask.png")
    probabilities = 1 / (1 + np.exp(-stored.maps[0].astype(np.float32)))
    assert probabilities[mask].mean() > 0.5 > np.median(probabilities[~mask])


def test_baseline_without_training_images_falls_back_and_says_so(sample_root: Path) -> None:
    detector = build("baseline")
    image = load_rgb(sample_root / "brick" / "test" / "scratch" / "000.png")[:100, :120]
    (detection,) = detector.detect([detector.prepare(ImageSample(image, "brick", "scratch", train_dir=None))])
    assert detection.diagnostics["reference"] == "self_median"
    assert detection.diagnostics["num_train"] == 0
    assert detection.logits.maps.shape == (1, 100, 120)


def test_baseline_learns_each_category_once_across_threads(sample_root: Path, monkeypatch) -> None:
    calls: list[str] = []
    original = baseline_module.learn_statistics

    def slow_learn(files, max_side):
        calls.append(str(files[0].parent))
        time.sleep(0.05)  # widen the race window
        return original(files, max_side)

    monkeypatch.setattr(baseline_module, "learn_statistics", slow_learn)
    detector = build("baseline")
    image = load_rgb(sample_root / "chelsea" / "test" / "good" / "000.png")
    errors: list[BaseException] = []

    def work(category: str) -> None:
        try:
            detector.prepare(
                ImageSample(image, category, "good", train_dir=sample_root / category / "train" / "good")
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(cat,)) for cat in ("chelsea", "coffee") * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(calls) == sorted(str(sample_root / c / "train" / "good") for c in ("chelsea", "coffee"))


def test_baseline_skips_unreadable_training_images(tmp_path: Path, sample_root: Path) -> None:
    train = tmp_path / "train" / "good"
    train.mkdir(parents=True)
    (train / "000.png").write_bytes(b"broken")
    for index in range(2):
        (train / f"{index + 1:03d}.png").write_bytes(
            (sample_root / "coffee" / "train" / "good" / f"{index:03d}.png").read_bytes()
        )
    detector = build("baseline")
    statistics = detector.statistics_for("coffee", train)
    assert statistics is not None and statistics.num_train == 2
    (train / "001.png").write_bytes(b"broken")
    (train / "002.png").write_bytes(b"broken")
    with pytest.raises(DetectorError, match="none of the 3 training images"):
        build("baseline").statistics_for("coffee", train)


def test_baseline_rejects_bad_config() -> None:
    with pytest.raises(DetectorError, match="baseline_scale"):
        build("baseline", baseline_scale=0)
    with pytest.raises(DetectorError, match="baseline_max_train"):
        build("baseline", baseline_max_train=0)


def test_baseline_rejects_foreign_items() -> None:
    with pytest.raises(DetectorError, match="baseline.prepare"):
        build("baseline").detect([(4, 4)])


def test_noop_returns_zero_maps_at_full_resolution() -> None:
    detector = build("noop")
    samples = [ImageSample(np.zeros((h, w, 3), np.uint8), "c", "good") for h, w in ((5, 7), (3, 2))]
    detections = detector.detect([detector.prepare(s) for s in samples])
    assert [d.logits.maps.shape for d in detections] == [(1, 5, 7), (1, 3, 2)]
    assert [d.logits.original_size for d in detections] == [(5, 7), (3, 2)]
    assert all(d.logits.maps.dtype == np.float16 and not d.logits.maps.any() for d in detections)
    with pytest.raises(DetectorError, match="noop.prepare"):
        detector.detect(["not a size"])
