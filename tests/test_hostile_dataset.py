"""Hostile datasets (issue "Hostile input", items 4, 8 and 9): reference images from outside the root, names the
resolver would read as another file, and images that declare more pixels than the budget.

Each case fails its own rows (or its category's reference) with a reason that names the file and says what to
do; the rest of the run goes on. docs/RELIABILITY.md lists these tests.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import workers.detectors.baseline  # noqa: F401 - registers "baseline"
from scheduler.cli import cli
from scheduler.dataset import index_dataset
from storage.paths import PathEscapeError, RootResolver, reference_folder, resolve_inside
from tests.dataset_fixtures import (
    add_test_image,
    make_tiny_dataset,
    noise_image,
    status_counts,
    train_dir,
    write_image,
)
from workers import images as images_module
from workers.detectors.base import DETECTOR_REGISTRY, DetectorConfig, DetectorError
from workers.images import ImageLoadError, load_mask, load_rgb, set_max_image_pixels

BACKSLASH_NAME = "sub\\000.png"  # one file name on POSIX; `sub/000.png` once the backslash reads as a separator


def declared_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of ``width`` × ``height`` zero pixels: a few KB on disk for any declared size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def baseline():
    return DETECTOR_REGISTRY["baseline"](DetectorConfig())


def entry(index, image_path: str):
    (found,) = [row for row in index.entries if row.image_path == image_path]
    return found


@pytest.fixture
def budget():
    """Restores this process's pixel budget after a test changes it."""
    saved = images_module.max_image_pixels()
    yield set_max_image_pixels
    set_max_image_pixels(saved)


# --- item 4: train/good from outside the root ---------------------------------------------------------------------


def test_training_image_linked_from_outside_the_root_fails_the_reference(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    outside = write_image(tmp_path / "outside" / "secret.png", noise_image(16, 16, seed=7))
    os.symlink(outside, root / "bottle" / "train" / "good" / "001.png")
    with pytest.raises(DetectorError, match=r"bottle/train/good/001\.png.*outside the dataset root") as caught:
        baseline().statistics_for("bottle", root / "bottle" / "train" / "good")
    assert "replace the symlink with the file itself" in str(caught.value)


def test_training_image_symlink_loop_fails_the_reference(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    loop = root / "bottle" / "train" / "good" / "001.png"
    os.symlink(loop.name, loop)  # links to itself
    detector = baseline()
    for _ in range(2):  # learnt once, then the same error for every image of the category
        with pytest.raises(DetectorError, match=r"bottle/train/good/001\.png.*fix or remove the symlink"):
            detector.statistics_for("bottle", root / "bottle" / "train" / "good")
    statistics = detector.statistics_for("grid", root / "grid" / "train" / "good")  # other categories unaffected
    assert statistics is not None and statistics.num_train == 1


def test_train_good_symlink_loop_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    train = root / "bottle" / "train" / "good"
    for image in train.iterdir():
        image.unlink()
    train.rmdir()
    os.symlink("good", train)  # bottle/train/good → itself
    index = index_dataset(root)
    assert any("bottle/train/good cannot be used" in note for note in index.warnings), index.warnings
    with pytest.raises(PathEscapeError, match="fix or remove the symlink"):
        train_dir(index, "bottle")
    assert train_dir(index, "grid") == (root / "grid" / "train" / "good").resolve()
    # What a worker hands the detector: the folder itself, so that the loop is refused rather than taken as absent.
    assert reference_folder(root, "bottle") == train
    assert reference_folder(root, "nothing") is None
    with pytest.raises(DetectorError, match=r"training folder bottle/train/good cannot be used"):
        baseline().statistics_for("bottle", reference_folder(root, "bottle"))


def test_reference_from_outside_fails_the_category_in_a_run(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    outside = write_image(tmp_path / "outside" / "secret.png", noise_image(16, 16, seed=7))
    os.symlink(outside, root / "bottle" / "train" / "good" / "001.png")
    rows = _run(root, tmp_path / "work", env={"READAR_MAX_ATTEMPTS": "1"})  # retries would only repeat it
    bottle = {path: value for path, value in rows.items() if path.startswith("bottle/")}
    assert len(bottle) == 9 and all(status == "failed" for status, _ in bottle.values()), bottle
    assert all("bottle/train/good/001.png" in error and "outside the dataset root" in error
               for _, error in bottle.values())
    assert {status for path, (status, _) in rows.items() if path.startswith("grid/")} == {"done"}


# --- item 8: a backslash in a file name ---------------------------------------------------------------------------


def _backslash_dataset(root: Path) -> Path:
    """``crack/sub\\000.png`` with its mask, next to the different file ``crack/sub/000.png`` and its mask."""
    add_test_image(root, "cat", "good", "000.png")
    add_test_image(root, "cat", "crack", BACKSLASH_NAME, seed=1)
    write_image(root / "cat" / "test" / "crack" / "sub" / "000.png", noise_image(16, 16, seed=2))
    add_test_image(root, "cat", "crack", "001.png", seed=3)
    return root


def test_backslash_in_a_file_name_fails_its_row_at_indexing(tmp_path: Path) -> None:
    index = index_dataset(_backslash_dataset(tmp_path / "data"))
    row = entry(index, f"cat/test/crack/{BACKSLASH_NAME}")
    assert row.status == "failed"
    assert BACKSLASH_NAME in row.reason and "backslash" in row.reason and "rename" in row.reason
    assert entry(index, "cat/test/crack/001.png").status == "queued"  # the rest is indexed as before
    assert not any(r.image_path == "cat/test/crack/sub/000.png" for r in index.entries)


def test_resolver_refuses_a_backslash_instead_of_reading_another_file(tmp_path: Path) -> None:
    root = _backslash_dataset(tmp_path / "data")
    relative = f"cat/test/crack/{BACKSLASH_NAME}"
    for resolve in (RootResolver(root), lambda text: resolve_inside(root, text)):
        with pytest.raises(PathEscapeError, match="backslash"):
            resolve(relative)
    assert RootResolver(root)("cat/test/crack/sub/000.png").is_file()  # the file it used to read instead


def test_backslash_name_is_failed_in_a_run_and_nothing_else_is_read(tmp_path: Path) -> None:
    rows = _run(_backslash_dataset(tmp_path / "data"), tmp_path / "work")
    status, error = rows[f"cat/test/crack/{BACKSLASH_NAME}"]
    assert status == "failed" and BACKSLASH_NAME in error and "backslash" in error
    assert rows["cat/test/crack/001.png"][0] == "done" and rows["cat/test/good/000.png"][0] == "done"
    assert len(rows) == 3


# --- item 9: the pixel budget -------------------------------------------------------------------------------------


def test_image_over_the_pixel_budget_fails_at_indexing(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    bomb = declared_png(root / "bottle" / "test" / "good" / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 100_000
    index = index_dataset(root)
    row = entry(index, "bottle/test/good/bomb.png")
    assert row.status == "failed" and (row.height, row.width) == (10_000, 10_000)
    assert "bottle/test/good/bomb.png" in row.reason and "10000×10000" in row.reason
    assert "READAR_MAX_IMAGE_PIXELS" in row.reason and "4,194,304" in row.reason
    assert "start a new run" in row.reason and "retry" not in row.reason  # a retry keeps the run's limit
    assert status_counts(index) == {"queued": 18, "skipped": 0, "failed": 1}
    # The budget is settable: 16×16 = 256 pixels is the most this one lets through.
    small = index_dataset(root, classes=["grid"], max_image_pixels=255)
    assert {row.status for row in small.entries} == {"failed"}
    assert {row.status for row in index_dataset(root, classes=["grid"], max_image_pixels=256).entries} == {"queued"}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own note on opening it
def test_decode_refuses_an_image_over_the_budget_before_decoding(tmp_path: Path, budget) -> None:
    bomb = declared_png(tmp_path / "bomb.png", 10_000, 10_000)
    with pytest.raises(ImageLoadError, match=r"10000×10000 = 100,000,000 pixels.*READAR_MAX_IMAGE_PIXELS") as caught:
        load_rgb(bomb)
    assert str(bomb) in str(caught.value)
    with pytest.raises(ImageLoadError, match="more than the limit"):
        load_mask(bomb)
    small = write_image(tmp_path / "small.png", noise_image(16, 16))
    assert load_rgb(small, max_pixels=256).shape == (16, 16, 3)
    with pytest.raises(ImageLoadError, match="more than the limit of 255"):
        load_rgb(small, max_pixels=255)
    budget(255)  # what a worker sets from Settings.max_image_pixels
    with pytest.raises(ImageLoadError, match="more than the limit of 255"):
        load_rgb(small)
    with pytest.raises(ValueError, match="positive"):
        set_max_image_pixels(0)


def test_image_over_the_budget_is_failed_in_a_run_and_the_run_goes_on(tmp_path: Path) -> None:
    root = make_tiny_dataset(tmp_path / "data")
    declared_png(root / "bottle" / "test" / "good" / "bomb.png", 10_000, 10_000)
    rows = _run(root, tmp_path / "work")
    status, error = rows["bottle/test/good/bomb.png"]
    assert status == "failed" and "10000×10000" in error and "READAR_MAX_IMAGE_PIXELS" in error
    assert sum(status == "done" for status, _ in rows.values()) == 18


def _run(root: Path, work: Path, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """`readar run` with the baseline detector; {image path: (status, error)} of every row."""
    result = CliRunner().invoke(
        cli, ["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "hostile"], env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    with sqlite3.connect(work / "readar.sqlite") as database:
        return {path: (status, error or "") for path, status, error in
                database.execute("select image_path, status, error from images")}


def test_a_worker_never_takes_a_reference_folder_linked_out_of_the_root(tmp_path: Path) -> None:
    """The worker's own lookup (RunInfo.train_dir) used to build <root>/<category>/train/good without the
    containment check, and the baseline followed a train/good symlinked out of the dataset root."""
    from workers.task import RunInfo

    root = make_tiny_dataset(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_image(outside / "000.png", noise_image(16, 16, seed=9))
    train = root / "bottle" / "train" / "good"
    for image in train.iterdir():
        image.unlink()
    train.rmdir()
    os.symlink(outside, train)
    info = RunInfo(1, root, {})
    assert info.train_dir("bottle") == train  # handed over as it is, so that the detector can refuse it
    with pytest.raises(DetectorError, match="outside the dataset root"):
        baseline().statistics_for("bottle", info.train_dir("bottle"))
    assert info.train_dir("nothing") is None
    loop = root / "grid" / "train" / "good"
    for image in loop.iterdir():
        image.unlink()
    loop.rmdir()
    os.symlink("good", loop)  # a loop: the old lookup took it for "no reference" and scored images on themselves
    assert RunInfo(1, root, {}).train_dir("grid") == loop
