"""Ground truth: mask PNGs as boolean arrays, and their 8-connected defect regions.

MVTec AD masks are 0 (normal) / 255 (defect) PNGs of the image's size; ``good`` images have no mask and count
as all-normal. A region is an 8-connected component of one image's mask (as in the official MVTec AD
evaluation, Bergmann et al. 2021, section 4.2): regions never span images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from metrics.errors import GroundTruthError, MaskSizeError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _size_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(int(v)) for v in shape)


def load_mask(path: str | Path, expected_shape: tuple[int, int], *, image_path: str | Path = "?") -> np.ndarray:
    """Read a mask PNG as bool (H, W), True where the pixel value is > 0.

    expected_shape: (H, W) of the image (or of its prediction map) the mask belongs to.
    image_path: named in error messages.
    Raises GroundTruthError when the file is missing or unreadable, MaskSizeError when its size differs.
    """
    from PIL import Image, UnidentifiedImageError

    mask_path = Path(path)
    try:
        with Image.open(mask_path) as image:
            image.load()
            pixels = defect_pixels(image)
    except FileNotFoundError:
        raise GroundTruthError(f"mask {mask_path} for image {image_path} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise GroundTruthError(f"mask {mask_path} for image {image_path} is not a readable image: {exc}") from exc
    expected = tuple(int(v) for v in expected_shape)
    if pixels.shape != expected:
        raise MaskSizeError(
            f"mask {mask_path} is {_size_text(pixels.shape)} but image {image_path} is {_size_text(expected)} "
            "(H×W); regenerate the mask or the prediction at the image's resolution"
        )
    return pixels


def defect_pixels(image: Any) -> np.ndarray:
    """The one rule for reading a mask (the aggregator, the report, `readar eval` and the workers all use it):
    bool (H, W), True where any colour channel of the stored value is > 0, whatever the bit depth (0/255, 0/65535,
    RGB). Alpha is ignored; palette masks are judged by their palette colours. ValueError for a mode that does not
    decode to one value per pixel."""
    mode = image.mode
    if mode in ("P", "PA"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("LA", "La"):
        values = np.asarray(image)[..., 0]
    elif mode in ("RGBA", "RGBa"):
        values = np.asarray(image)[..., :3]
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        values = np.asarray(image.convert("RGB"))
    else:
        values = np.asarray(image)
    if values.ndim == 3:
        return np.ascontiguousarray((values > 0).any(axis=2))
    if values.ndim == 2:
        return np.ascontiguousarray(values > 0)
    raise ValueError(f"mask mode {image.mode!r} decodes to shape {values.shape}, not (H, W)")


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool (H, W) mask → (int32 labels (H, W), 0 = background; region count)."""
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    return labels.astype(np.int32, copy=False), int(count)


def inverse_region_sizes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """1 / (size of the pixel's region) for every defect pixel of a bool (H, W) mask.

    Returns (float64 (n,), in the row-major order of ``mask[mask]``; number of regions). Summed over a region
    these weights give 1, so summing them over the defect pixels at or above a threshold gives the number of
    regions "covered", each weighted by its covered fraction.
    """
    labels, count = label_regions(mask)
    region_of_pixel = labels[mask]
    sizes = np.bincount(region_of_pixel, minlength=count + 1).astype(np.float64)
    return 1.0 / sizes[region_of_pixel], count
