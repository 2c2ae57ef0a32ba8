"""Tests of the dataset index: layout errors, per-image statuses, selection options, path safety."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from scheduler.dataset import DatasetError, index_dataset
from storage.paths import PathEscapeError, resolve_inside
from tests.dataset_fixtures import (
    add_test_image,
    category_counts,
    entries_for,
    file_name,
    image_file,
    make_tiny_dataset,
    mask_file,
    noise_image,
    square_mask,
    status_counts,
    train_dir,
    write_image,
)


def entry_by_path(index, image_path: str):
    matches = [entry for entry in index.entries if entry.image_path == image_path]
    assert len(matches) == 1, f"expected one row for {image_path}, found {len(matches)}"
    return matches[0]


# --- whole-dataset errors ---------------------------------------------------------------------------------------


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        index_dataset(tmp_path / "nowhere")


def test_root_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        index_dataset(file)


def test_root_without_categories_explains_the_layout(tmp_path: Path) -> None:
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)  # no test/ folder: not a category
    with pytest.raises(DatasetError, match=r"no categories.*<category>/test/<defect>"):
        index_dataset(tmp_path)


def test_unknown_class_lists_the_available_ones(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown category 'botle'.*available: bottle, grid"):
        index_dataset(tmp_path, classes=["botle"])


@pytest.mark.parametrize("bad", [0, -2, -100])
def test_bad_max_per_class_is_an_error(tmp_path: Path, bad: int) -> None:
    make_tiny_dataset(tmp_path)
    with pytest.raises(DatasetError, match="max_per_class"):
        index_dataset(tmp_path, max_per_class=bad)


def test_excluding_good_is_an_error(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    with pytest.raises(DatasetError, match="'good' cannot be excluded"):
        index_dataset(tmp_path, exclude_defects=["good"])


def test_a_string_instead_of_a_list_is_an_error(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not the string"):
        index_dataset(tmp_path, classes="bottle")
    with pytest.raises(DatasetError, match="not the string"):
        index_dataset(tmp_path, exclude_defects="color")


# --- a valid dataset --------------------------------------------------------------------------------------------


def test_valid_dataset_rows_and_order(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    index = index_dataset(tmp_path)
    assert index.categories == ("bottle", "grid")
    assert index.category_defects == {"bottle": ("color", "crack"), "grid": ("color", "crack")}
    assert len(index.entries) == 18
    assert status_counts(index) == {"queued": 18, "skipped": 0, "failed": 0}
    keys = [(e.category, e.defect, file_name(e)) for e in index.entries]
    assert keys == sorted(keys)
    first = index.entries[0]
    assert first.image_path == "bottle/test/color/000.png"
    assert first.mask_path == "bottle/ground_truth/color/000_mask.png"
    assert (first.label, first.height, first.width, first.reason) == (1, 16, 16, None)
    good = entry_by_path(index, "bottle/test/good/001.png")
    assert (good.label, good.mask_path) == (0, None)
    assert category_counts(index)["grid"] == {
        "queued": 9,
        "skipped": 0,
        "failed": 0,
        "total": 9,
        "good": 3,
        "anomalous": 6,
    }
    assert train_dir(index, "bottle") == (tmp_path / "bottle" / "train" / "good").resolve()
    assert image_file(index, first).read_bytes()[:4] == b"\x89PNG"


def test_order_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "c.PNG", "10.png", "2.png"):
        add_test_image(tmp_path, "cat", "good", name)
    index = index_dataset(tmp_path)
    assert [file_name(e) for e in index.entries] == ["10.png", "2.png", "a.png", "b.png", "c.PNG"]


def test_extensions_are_case_insensitive_and_others_ignored(tmp_path: Path) -> None:
    add_test_image(tmp_path, "cat", "good", "a.PNG")
    add_test_image(tmp_path, "cat", "good", "b.JPG")
    add_test_image(tmp_path, "cat", "good", "c.jpeg")
    (tmp_path / "cat" / "test" / "good" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "test" / "good" / ".hidden.png").write_bytes(b"")
    index = index_dataset(tmp_path)
    assert [file_name(e) for e in index.entries] == ["a.PNG", "b.JPG", "c.jpeg"]
    assert all(e.status == "queued" for e in index.entries)


def test_mask_name_is_matched_case_insensitively(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "test" / "crack" / "000.png", noise_image(8, 8))
    write_image(tmp_path / "cat" / "ground_truth" / "crack" / "000_MASK.PNG", square_mask(8, 8))
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "queued"
    assert entry.mask_path == "cat/ground_truth/crack/000_MASK.PNG"


# --- selection options ------------------------------------------------------------------------------------------


def test_classes_selects_categories(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    index = index_dataset(tmp_path, classes=["grid"])
    assert index.categories == ("grid",)
    assert {e.category for e in index.entries} == {"grid"}
    assert list(index_dataset(tmp_path, classes=[]).categories) == ["bottle", "grid"]


def test_max_per_class_keeps_the_first_images_in_order(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    index = index_dataset(tmp_path, max_per_class=4)
    assert len(index.entries) == 8
    assert [e.image_path for e in entries_for(index, "bottle")] == [
        "bottle/test/color/000.png",
        "bottle/test/color/001.png",
        "bottle/test/color/002.png",
        "bottle/test/crack/000.png",
    ]
    # Defect types do not depend on how many images were kept.
    assert index.category_defects["bottle"] == ("color", "crack")
    assert len(index_dataset(tmp_path, max_per_class=-1).entries) == 18


def test_exclude_defects_applies_before_max_per_class(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    index = index_dataset(tmp_path, exclude_defects=["color", "not_there"], max_per_class=4)
    assert all(e.defect != "color" for e in index.entries)
    assert index.category_defects == {"bottle": ("crack",), "grid": ("crack",)}
    assert [e.image_path for e in entries_for(index, "grid")] == [
        "grid/test/crack/000.png",
        "grid/test/crack/001.png",
        "grid/test/crack/002.png",
        "grid/test/good/000.png",
    ]


def test_empty_category_is_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tiny_dataset(tmp_path)
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    index = index_dataset(tmp_path)
    assert index.categories == ("bottle", "grid")
    assert index.empty_categories == ("empty",)
    assert any("category empty has no test images" in note for note in index.warnings)
    assert "category empty has no test images" in caplog.text


def test_only_empty_categories_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images found"):
        index_dataset(tmp_path)


def test_stray_images_directly_in_test_are_reported(tmp_path: Path) -> None:
    add_test_image(tmp_path, "cat", "good")
    write_image(tmp_path / "cat" / "test" / "loose.png", noise_image(8, 8))
    index = index_dataset(tmp_path)
    assert len(index.entries) == 1
    assert any("outside a defect folder" in note and "loose.png" in note for note in index.warnings)


# --- per-image statuses -----------------------------------------------------------------------------------------


def test_anomalous_image_without_mask_is_skipped(tmp_path: Path) -> None:
    add_test_image(tmp_path, "bottle", "crack", "003.png", with_mask=False)
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "skipped"
    assert entry.mask_path is None
    assert entry.reason is not None
    assert "bottle/test/crack/003.png has no mask" in entry.reason
    assert "bottle/ground_truth/crack/003_mask.png" in entry.reason


def test_mask_size_mismatch_fails_with_both_paths_and_sizes(tmp_path: Path) -> None:
    add_test_image(tmp_path, "bottle", "crack", "003.png", size=(30, 30), mask_size=(20, 24))
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "failed"
    assert entry.reason is not None
    assert "mask bottle/ground_truth/crack/003_mask.png is 20×24" in entry.reason
    assert "the image bottle/test/crack/003.png is 30×30" in entry.reason
    assert (entry.height, entry.width) == (30, 30)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"this is not an image", "not in an image format"),
        (b"\x89PNG\r\n\x1a\n\x00", "not in an image format"),
    ],
)
def test_unreadable_image_header_fails(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "cat" / "test" / "good" / "bad.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    add_test_image(tmp_path, "cat", "good", "ok.png")
    index = index_dataset(tmp_path)
    bad = entry_by_path(index, "cat/test/good/bad.png")
    assert bad.status == "failed"
    assert bad.reason is not None and expected in bad.reason and "cat/test/good/bad.png" in bad.reason
    assert (bad.height, bad.width) == (None, None)
    assert entry_by_path(index, "cat/test/good/ok.png").status == "queued"


def test_unreadable_mask_fails(tmp_path: Path) -> None:
    write_image(tmp_path / "cat" / "test" / "crack" / "000.png", noise_image(8, 8))
    mask = tmp_path / "cat" / "ground_truth" / "crack" / "000_mask.png"
    mask.parent.mkdir(parents=True)
    mask.write_bytes(b"garbage")
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "failed"
    assert entry.reason is not None and "mask cat/ground_truth/crack/000_mask.png" in entry.reason


@pytest.mark.parametrize(
    ("mask", "mode"),
    [
        (np.dstack([square_mask(8, 8)] * 3), None),  # RGB mask
        ((square_mask(8, 8).astype(np.uint16) * 257), None),  # 16-bit mask (Pillow mode I;16)
        (square_mask(8, 8) > 0, None),  # 1-bit mask
    ],
)
def test_masks_in_other_modes_are_accepted(tmp_path: Path, mask: np.ndarray, mode: str | None) -> None:
    write_image(tmp_path / "cat" / "test" / "crack" / "000.png", noise_image(8, 8))
    write_image(tmp_path / "cat" / "ground_truth" / "crack" / "000_mask.png", mask, mode=mode)
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "queued", entry.reason


def test_mask_in_cmyk_mode_fails(tmp_path: Path) -> None:
    from PIL import Image

    write_image(tmp_path / "cat" / "test" / "crack" / "000.png", noise_image(8, 8))
    mask_path = tmp_path / "cat" / "ground_truth" / "crack" / "000_mask.jpg"
    mask_path.parent.mkdir(parents=True)
    Image.new("CMYK", (8, 8)).save(mask_path, format="JPEG")
    mask_path.rename(mask_path.with_suffix(".png"))  # a CMYK JPEG named like a mask
    (entry,) = index_dataset(tmp_path).entries
    assert entry.status == "failed"
    assert entry.reason is not None and "'CMYK'" in entry.reason


def test_grayscale_images_are_accepted(tmp_path: Path) -> None:
    write_image(tmp_path / "grid" / "test" / "good" / "000.png", noise_image(12, 10, channels=1))
    write_image(tmp_path / "grid" / "test" / "bent" / "000.png", noise_image(12, 10, channels=1))
    write_image(tmp_path / "grid" / "ground_truth" / "bent" / "000_mask.png", square_mask(12, 10))
    index = index_dataset(tmp_path)
    assert [(e.status, e.height, e.width) for e in index.entries] == [("queued", 12, 10), ("queued", 12, 10)]


def test_names_with_spaces_unicode_and_shell_characters(tmp_path: Path) -> None:
    root = tmp_path / "my data $HOME; rm -rf"
    category, defect, name = "métal nut", "scratch & dent", "wé'ird $(x) `y` [1].png"
    add_test_image(root, category, defect, name)
    add_test_image(root, category, "good", "ça va.png")
    index = index_dataset(root)
    assert status_counts(index)["queued"] == 2
    anomalous = entry_by_path(index, f"{category}/test/{defect}/{name}")
    assert anomalous.mask_path == f"{category}/ground_truth/{defect}/wé'ird $(x) `y` [1]_mask.png"
    assert mask_file(index, anomalous) is not None and mask_file(index, anomalous).is_file()
    assert index.category_defects == {category: (defect,)}


# --- path safety ------------------------------------------------------------------------------------------------


def test_image_symlink_escaping_the_root_fails(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = write_image(tmp_path / "outside" / "secret.png", noise_image(8, 8))
    add_test_image(root, "cat", "good", "000.png")
    os.symlink(outside, root / "cat" / "test" / "good" / "001.png")
    index = index_dataset(root)
    linked = entry_by_path(index, "cat/test/good/001.png")
    assert linked.status == "failed"
    assert linked.reason is not None and "outside the dataset root" in linked.reason
    assert entry_by_path(index, "cat/test/good/000.png").status == "queued"


def test_symlink_inside_the_root_is_fine(tmp_path: Path) -> None:
    add_test_image(tmp_path, "cat", "good", "000.png")
    os.symlink(tmp_path / "cat" / "test" / "good" / "000.png", tmp_path / "cat" / "test" / "good" / "001.png")
    assert status_counts(index_dataset(tmp_path))["queued"] == 2


def test_category_folder_linked_from_outside_fails_every_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    add_test_image(root, "inside", "good")
    add_test_image(tmp_path / "elsewhere", "linked", "good")
    os.symlink(tmp_path / "elsewhere" / "linked", root / "linked")
    index = index_dataset(root)
    assert [e.status for e in entries_for(index, "linked")] == ["failed"]
    assert [e.status for e in entries_for(index, "inside")] == ["queued"]


def test_mask_symlink_escaping_the_root_fails(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_image(root / "cat" / "test" / "crack" / "000.png", noise_image(8, 8))
    outside = write_image(tmp_path / "outside" / "m.png", square_mask(8, 8))
    (root / "cat" / "ground_truth" / "crack").mkdir(parents=True)
    os.symlink(outside, root / "cat" / "ground_truth" / "crack" / "000_mask.png")
    (entry,) = index_dataset(root).entries
    assert entry.status == "failed"
    assert entry.reason is not None and "mask cat/ground_truth/crack/000_mask.png resolves to" in entry.reason


def test_defect_and_mask_folders_linked_from_outside_fail(tmp_path: Path) -> None:
    # The index resolves each folder once and trusts plain files inside it: a linked folder must still fail.
    root = tmp_path / "root"
    add_test_image(root, "cat", "good", "000.png")
    write_image(tmp_path / "elsewhere" / "crack" / "000.png", noise_image(8, 8))
    os.symlink(tmp_path / "elsewhere" / "crack", root / "cat" / "test" / "crack")
    write_image(root / "cat" / "test" / "hole" / "000.png", noise_image(8, 8))
    write_image(tmp_path / "masks" / "hole" / "000_mask.png", square_mask(8, 8))
    (root / "cat" / "ground_truth").mkdir(parents=True)
    os.symlink(tmp_path / "masks" / "hole", root / "cat" / "ground_truth" / "hole")
    index = index_dataset(root)
    crack = entry_by_path(index, "cat/test/crack/000.png")
    assert crack.status == "failed" and "image cat/test/crack/000.png resolves to" in crack.reason
    hole = entry_by_path(index, "cat/test/hole/000.png")
    assert hole.status == "failed" and "mask cat/ground_truth/hole/000_mask.png resolves to" in hole.reason
    assert entry_by_path(index, "cat/test/good/000.png").status == "queued"


@pytest.mark.parametrize("mode", ["1", "L", "I;16", "RGB", "RGBA", "LA", "P"])
def test_png_header_fast_path_agrees_with_pillow(tmp_path: Path, mode: str) -> None:
    from PIL import Image

    from scheduler.dataset import _png_header, _read_header

    path = tmp_path / f"{mode.replace(';', '_')}.png"
    Image.new(mode, (7, 5)).save(path)
    with Image.open(path) as image:
        expected = ((image.height, image.width), image.mode)
    assert _png_header(path) == expected
    assert _read_header(path) == (*expected, None)


def test_png_with_a_damaged_header_goes_through_pillow(tmp_path: Path) -> None:
    from PIL import Image

    from scheduler.dataset import _png_header, _read_header

    path = tmp_path / "damaged.png"
    Image.new("L", (7, 5)).save(path)
    data = bytearray(path.read_bytes())
    data[29] ^= 0xFF  # the IHDR checksum no longer matches
    path.write_bytes(bytes(data))
    assert _png_header(path) is None  # not trusted: Pillow gets to say what is wrong
    size, mode, error = _read_header(path)
    assert size is None and mode is None and "Pillow recognises" in error  # the row fails, as before


def test_broken_symlink_fails(tmp_path: Path) -> None:
    (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
    os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "test" / "good" / "000.png")
    add_test_image(tmp_path, "cat", "good", "001.png")
    index = index_dataset(tmp_path)
    assert entry_by_path(index, "cat/test/good/000.png").status == "failed"


def test_resolve_inside_accepts_plain_relative_paths(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path)
    resolved = resolve_inside(tmp_path, "bottle/test/good/000.png")
    assert resolved == (tmp_path / "bottle" / "test" / "good" / "000.png").resolve()
    assert resolve_inside(str(tmp_path), "a name with spaces.png").name == "a name with spaces.png"


@pytest.mark.parametrize(
    "relative",
    ["../etc/passwd", "bottle/../../x.png", "/etc/passwd", "", "a\x00b", "bottle\\..\\..\\x.png"],
)
def test_resolve_inside_refuses_escapes(tmp_path: Path, relative: str) -> None:
    with pytest.raises(PathEscapeError):
        resolve_inside(tmp_path, relative)


@pytest.mark.parametrize(
    "relative",
    ["../etc/passwd", "bottle/../../x.png", "/etc/passwd", "", "a\x00b", "bottle\\..\\..\\x.png", "bottle/..",
     "bottle/test/.."],
)
def test_the_cached_resolver_refuses_what_resolve_inside_refuses(tmp_path: Path, relative: str) -> None:
    from storage.paths import RootResolver

    make_tiny_dataset(tmp_path)
    resolver = RootResolver(tmp_path)
    resolver("bottle/test/good/000.png")  # the directory is cached now
    with pytest.raises(PathEscapeError) as caught:
        resolver(relative)
    assert repr(relative)[1:-1] in str(caught.value) or relative == ""  # names the whole path


def test_the_cached_resolver_agrees_with_resolve_inside_and_checks_file_links(tmp_path: Path) -> None:
    from storage.paths import RootResolver

    root = tmp_path / "root"
    make_tiny_dataset(root)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(b"x")
    good = root / "bottle" / "test" / "good"
    os.symlink(tmp_path / "outside" / "secret.png", good / "out.png")
    os.symlink(good / "000.png", good / "in.png")
    os.symlink(tmp_path / "outside", root / "bottle" / "linked")
    resolver = RootResolver(root)
    for relative in ("bottle/test/good/000.png", "bottle/test/good/001.png", "bottle/test/good/in.png",
                     "bottle/test/good/missing.png", "top.png"):
        assert resolver(relative) == resolve_inside(root, relative), relative
    for relative in ("bottle/test/good/out.png", "bottle/linked/secret.png"):
        with pytest.raises(PathEscapeError, match="outside the dataset root"):
            resolver(relative)


def test_resolve_inside_refuses_symlinks_leading_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    with pytest.raises(PathEscapeError, match="outside the dataset root"):
        resolve_inside(root, "link/file.png")


def test_dotdot_category_name_is_refused(tmp_path: Path) -> None:
    make_tiny_dataset(tmp_path / "root")
    with pytest.raises(DatasetError, match="unknown category"):
        index_dataset(tmp_path / "root", classes=["../root/bottle"])
