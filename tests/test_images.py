"""Tests of worker-side image loading: every mode to 8-bit RGB, every broken file to a typed error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scheduler.dataset import index_dataset
from tests.dataset_fixtures import noise_image, write_image
from workers.images import ImageLoadError, load_mask, load_rgb


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --- conversions ------------------------------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    array = noise_image(7, 5)
    loaded = load_rgb(write_image(tmp_path / "a.png", array))
    assert loaded.dtype == np.uint8 and loaded.shape == (7, 5, 3)
    np.testing.assert_array_equal(loaded, array)


def test_grayscale_is_repeated_into_three_channels(tmp_path: Path) -> None:
    gray = noise_image(6, 9, channels=1)
    loaded = load_rgb(write_image(tmp_path / "g.png", gray))
    assert loaded.shape == (6, 9, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], gray)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path: Path) -> None:
    wide = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    path = write_image(tmp_path / "w.png", wide)
    assert Image.open(path).mode.startswith("I")
    loaded = load_rgb(path)
    np.testing.assert_array_equal(loaded[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
    np.testing.assert_array_equal(loaded[..., 0], loaded[..., 2])


def test_rgba_drops_alpha_and_keeps_colours(tmp_path: Path) -> None:
    rgba = noise_image(5, 5, channels=4)
    rgba[..., 3] = 0  # fully transparent: the stored colours must survive
    loaded = load_rgb(write_image(tmp_path / "a.png", rgba))
    np.testing.assert_array_equal(loaded, rgba[..., :3])


def test_palette_image_gives_its_colours(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[:2] = (200, 10, 30)
    rgb[2:] = (5, 250, 90)
    path = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(load_rgb(path), rgb)


def test_one_bit_and_float_images(tmp_path: Path) -> None:
    bits = np.zeros((4, 4), dtype=bool)
    bits[0] = True
    loaded = load_rgb(write_image(tmp_path / "b.png", bits))
    assert loaded[0, 0].tolist() == [255, 255, 255] and loaded[1, 0].tolist() == [0, 0, 0]
    floats = np.full((3, 3), 0.5, dtype=np.float32)
    loaded = load_rgb(write_image(tmp_path / "f.tiff", floats))
    assert loaded.shape == (3, 3, 3) and int(loaded[0, 0, 0]) == 128


def test_jpeg_loads(tmp_path: Path) -> None:
    array = np.full((8, 8, 3), 120, dtype=np.uint8)
    loaded = load_rgb(write_image(tmp_path / "j.jpg", array))
    assert loaded.shape == (8, 8, 3)
    assert np.abs(loaded.astype(int) - 120).max() <= 3


# --- broken files -----------------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty") as info:
        load_rgb(path)
    assert info.value.path == path
    assert str(path) in str(info.value) and "Replace the file" in str(info.value)


def test_non_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello, I am text")
    with pytest.raises(ImageLoadError, match="not in an image format"):
        load_rgb(path)


def test_truncated_png_passes_the_index_but_fails_the_full_decode(tmp_path: Path) -> None:
    data = png_bytes(noise_image(64, 64))
    path = tmp_path / "cat" / "test" / "good" / "000.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(data[: len(data) // 2])
    # The index reads headers only (fast): the row is queued there ...
    assert index_dataset(tmp_path).entries[0].status == "queued"
    # ... and the worker's full decode catches the damage.
    with pytest.raises(ImageLoadError, match="corrupt or truncated") as info:
        load_rgb(path)
    assert info.value.reason.startswith("the image data is corrupt or truncated")


def test_corrupt_pixel_data(tmp_path: Path) -> None:
    data = bytearray(png_bytes(noise_image(32, 32)))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zero out part of the compressed stream
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageLoadError):
        load_rgb(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_rgb(tmp_path)


# --- masks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode",
    [
        lambda m: m.astype(np.uint8) * 255,  # 0/255 grayscale
        lambda m: np.dstack(
            [m.astype(np.uint8) * 255, np.zeros_like(m, np.uint8), np.zeros_like(m, np.uint8)]
        ),
        lambda m: m.astype(np.uint16) * 65535,  # 16-bit
        lambda m: m.astype(np.uint8),  # 0/1 grayscale
        lambda m: m,  # 1-bit
    ],
    ids=["gray255", "rgb-red", "16bit", "gray01", "bool"],
)
def test_load_mask_reduces_any_mode_to_nonzero(tmp_path: Path, encode) -> None:
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:3, 2:6] = True
    loaded = load_mask(write_image(tmp_path / "m.png", encode(mask)))
    assert loaded.dtype == bool
    np.testing.assert_array_equal(loaded, mask)


def test_load_mask_ignores_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, :3] = 255
    loaded = load_mask(write_image(tmp_path / "m.png", rgba))
    assert loaded.sum() == 1 and loaded[0, 0]


def test_load_mask_of_a_broken_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageLoadError):
        load_mask(path)


def test_the_aggregator_and_the_workers_read_masks_by_one_rule(tmp_path: Path) -> None:
    """metrics.groundtruth.load_mask (aggregator, report, eval) and workers.images.load_mask each had their own
    mode rules; both use metrics.groundtruth.defect_pixels now, and agree on every mode a PNG mask can hold."""
    from PIL import Image

    from metrics.groundtruth import load_mask as ground_truth_mask
    from scheduler.dataset import MASK_MODES
    from workers.images import load_mask as worker_mask

    rng = np.random.default_rng(3)
    base = (rng.random((6, 7)) > 0.6).astype(np.uint8) * 255
    rgba = np.dstack([base, base // 2, np.zeros_like(base), np.full_like(base, 255)])  # opaque alpha everywhere
    for mode in sorted(MASK_MODES):
        try:
            image = Image.fromarray(rgba, "RGBA").convert(mode)
        except ValueError:
            continue  # Pillow cannot convert into this mode; nothing can write such a mask here
        path = tmp_path / f"{mode.replace(';', '_')}.png"
        try:
            image.save(path)
        except (OSError, KeyError):
            continue  # PNG cannot hold this mode
        expected = worker_mask(path)
        assert np.array_equal(ground_truth_mask(path, expected.shape), expected), mode
        assert expected.any() and not expected.all(), mode  # alpha (255 everywhere) did not count
