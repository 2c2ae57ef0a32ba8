"""Tests of the sample-data generator: MVTec layout, exact masks, determinism, argument checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scheduler.dataset import index_dataset
from scheduler.sample_data import (
    DEFAULT_CATEGORIES,
    DEFECT_TYPES,
    MIN_DEFECT_DELTA,
    SOURCES,
    SampleDataError,
    make_sample_data,
    render_category,
    synthesize_defect,
)
from tests.dataset_fixtures import status_counts


def tree_digest(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*.png"))
    }


def test_default_layout(sample_root: Path) -> None:
    assert sorted(p.name for p in sample_root.iterdir()) == sorted(DEFAULT_CATEGORIES)
    for category in DEFAULT_CATEGORIES:
        assert len(list((sample_root / category / "train" / "good").glob("*.png"))) == 8
        tests = sorted(
            p.relative_to(sample_root / category / "test").as_posix()
            for p in (sample_root / category / "test").rglob("*.png")
        )
        assert len(tests) == 12
        assert sum(t.startswith("good/") for t in tests) == 4
        assert sorted(p.name for p in (sample_root / category / "test").iterdir()) == sorted(
            ["good", *DEFECT_TYPES]
        )
        for defect in DEFECT_TYPES:
            images = sorted(p.stem for p in (sample_root / category / "test" / defect).glob("*.png"))
            masks = sorted(p.stem for p in (sample_root / category / "ground_truth" / defect).glob("*.png"))
            assert images and masks == [f"{stem}_mask" for stem in images]


def test_index_accepts_every_generated_image(sample_root: Path) -> None:
    index = index_dataset(sample_root)
    assert status_counts(index) == {"queued": 36, "skipped": 0, "failed": 0}
    assert index.category_defects == {name: DEFECT_TYPES for name in DEFAULT_CATEGORIES}
    assert {(e.height, e.width) for e in index.entries} == {(256, 256)}


def test_one_default_category_is_grayscale_and_masks_are_binary(sample_root: Path) -> None:
    modes = {
        category: Image.open(next((sample_root / category / "test" / "good").glob("*.png"))).mode
        for category in DEFAULT_CATEGORIES
    }
    assert "L" in modes.values() and "RGB" in modes.values()
    for mask_path in sample_root.rglob("*_mask.png"):
        mask = Image.open(mask_path)
        assert mask.mode == "L" and mask.size == (256, 256)
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values == {0, 255}, f"{mask_path} has values {values}"


def test_masks_on_disk_are_exact(tmp_path: Path) -> None:
    """Each written anomalous image differs from its normal image exactly on the written mask."""
    make_sample_data(tmp_path, categories=["brick", "chelsea"], size=64, per_class=7, seed=3)
    for category in ("brick", "chelsea"):
        anomalous = [s for s in render_category(category, size=64, per_class=7, seed=3) if s.mask is not None]
        assert {s.path.split("/")[2] for s in anomalous} == set(DEFECT_TYPES)
        for sample in anomalous:
            image = np.asarray(Image.open(tmp_path / sample.path)).astype(int)
            mask = np.asarray(Image.open(tmp_path / str(sample.mask_path))) > 0
            assert sample.reference is not None
            difference = np.abs(image - sample.reference.astype(int))
            changed = difference.max(axis=2) if difference.ndim == 3 else difference
            np.testing.assert_array_equal(changed > 0, mask, err_msg=sample.path)
            assert changed[mask].min() >= MIN_DEFECT_DELTA
            assert 0 < mask.mean() < 0.2


def test_normal_images_vary_mildly(sample_root: Path) -> None:
    train = [
        np.asarray(Image.open(p)).astype(float)
        for p in sorted((sample_root / "coffee" / "train" / "good").glob("*.png"))
    ]
    test_good = np.asarray(Image.open(sample_root / "coffee" / "test" / "good" / "000.png")).astype(float)
    assert not np.array_equal(train[0], train[1])  # not identical copies
    mean = np.mean(train, axis=0)
    assert np.median(np.abs(test_good - mean)) < 8  # but close to each other


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_synthesize_defect_changes_exactly_the_mask(defect: str) -> None:
    rng = np.random.default_rng(0)
    normal = np.full(
        (48, 48, 3), 128, dtype=np.uint8
    )  # flat: a pasted patch would equal the target without the push
    image, mask = synthesize_defect(normal, defect, rng)
    assert mask.any()
    changed = np.abs(image.astype(int) - normal).max(axis=2)
    np.testing.assert_array_equal(changed > 0, mask)
    assert changed[mask].min() >= MIN_DEFECT_DELTA


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    make_sample_data(tmp_path / "a", categories=["gravel"], size=48, per_class=5, seed=7)
    make_sample_data(tmp_path / "b", categories=["gravel"], size=48, per_class=5, seed=7)
    make_sample_data(tmp_path / "c", categories=["gravel"], size=48, per_class=5, seed=8)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    assert tree_digest(tmp_path / "a").keys() == tree_digest(tmp_path / "c").keys()


def test_summary_and_every_source_renders(tmp_path: Path) -> None:
    summary = make_sample_data(tmp_path, categories=sorted(SOURCES), size=32, per_class=4, train_per_class=1)
    assert summary.categories == tuple(sorted(SOURCES))
    assert summary.counts["coins"] == {"train": 1, "test_good": 1, "test_anomalous": 3}
    assert summary.num_test == 4 * len(SOURCES)
    assert status_counts(index_dataset(tmp_path))["queued"] == 4 * len(SOURCES)


def test_refuses_to_overwrite_without_permission(tmp_path: Path) -> None:
    make_sample_data(tmp_path, categories=["brick"], size=32, per_class=4)
    with pytest.raises(SampleDataError, match="already holds brick"):
        make_sample_data(tmp_path, categories=["brick"], size=32, per_class=4)
    make_sample_data(tmp_path, categories=["brick"], size=32, per_class=4, overwrite=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"categories": ["unicorn"]}, "unknown sample categories"),
        ({"categories": []}, "no categories"),
        ({"categories": "brick"}, "not the string"),
        ({"size": 8}, "size must be"),
        ({"per_class": 3}, "per_class must be at least 4"),
        ({"train_per_class": -1}, "train_per_class"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SampleDataError, match=message):
        make_sample_data(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
