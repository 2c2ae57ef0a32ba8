"""Image and mask loading for workers: any common PNG/JPEG flavour in, 8-bit RGB (or a boolean mask) out.

The dataset index only reads image headers (fast); the full decode happens here, in the worker, so that a
corrupt or truncated file fails its own image row with a message that names the file instead of failing a run.

Conversion rules (MVTec AD mixes RGB and single-channel PNGs; other MVTec-format datasets add more):
- grayscale (``L``, ``1``, ``LA``) → the one channel repeated three times;
- palette (``P``, ``PA``) → the palette colours;
- ``RGBA`` → its colour channels; the alpha channel is dropped, not composited (anomaly masks are aligned with the
  stored pixels, so pixels must keep their stored colour);
- 16-bit or 32-bit integer grayscale (``I;16*``, ``I``) → scaled from 0…65535 to 0…255 (rounded);
- float grayscale (``F``) → values in 0…1 are scaled by 255, anything else is clipped to 0…255;
- other modes (``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) → Pillow's conversion to RGB.
EXIF orientation is deliberately not applied: MVTec masks are aligned with the stored pixel grid.
Multi-frame files (GIF, TIFF) use their first frame.

Pixel budget: an image with more than the process's limit of pixels (:func:`set_max_image_pixels`, from
``Settings.max_image_pixels`` / READAR_MAX_IMAGE_PIXELS) is refused from its header, before its pixels are
decoded: a 97 KB PNG may declare 10000×10000 pixels and cost gigabytes of memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from metrics.groundtruth import defect_pixels
from storage.settings import Settings  # a leaf module: pydantic + storage.redact only

# Modes whose integer samples span 16 bits (Pillow opens 16-bit grayscale PNGs as ``I;16`` or ``I``).
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_GRAYSCALE_MODES = ("L", "1", "LA", "La")
_PALETTE_MODES = ("P", "PA")

DEFAULT_MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS


class ImageLoadError(RuntimeError):
    """A file could not be decoded as an image; ``path`` names it and ``reason`` says what went wrong."""

    def __init__(self, path: Path | str, reason: str, advice: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        advice = advice or "Replace the file with a valid PNG or JPEG, then run `readar retry RUN`"
        super().__init__(f"cannot load image {self.path}: {reason}. {advice}")


# A run keeps the pixel limit it was planned with, and a shrunk image is a changed dataset: neither a retry nor a
# resume can take such an image, only a new run.
TOO_LARGE_ADVICE = ("A run keeps the pixel limit it was planned with: start a new run (another --run-name) with a "
                    "higher READAR_MAX_IMAGE_PIXELS, or with the image shrunk")


def set_max_image_pixels(limit: int) -> None:
    """Set this process's pixel budget (``Settings.max_image_pixels``); workers call it once at start.

    Pillow's own decompression-bomb limit is raised to the budget when it is lower, so that Pillow does not
    refuse images the budget allows; it is never lowered (other code in the process may open larger images)."""
    global _max_image_pixels
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the pixel budget must be a positive number of pixels; got {limit!r}")
    _max_image_pixels = limit
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit


def max_image_pixels() -> int:
    """This process's pixel budget (see :func:`set_max_image_pixels`)."""
    return _max_image_pixels


def _open_fully(path: Path, max_pixels: int | None) -> Image.Image:
    """Open and fully decode ``path`` (first frame), turning every failure into :class:`ImageLoadError`.

    ``max_pixels`` (None: the process's budget) is checked from the header, before the pixels are decoded."""
    limit = _max_image_pixels if max_pixels is None else max_pixels
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageLoadError(path, "the file does not exist") from None
    except OSError as exc:
        raise ImageLoadError(path, f"the file cannot be accessed ({exc.strerror or exc})") from exc
    if not path.is_file():
        raise ImageLoadError(path, "the path is not a regular file")
    if size == 0:
        raise ImageLoadError(path, "the file is empty (0 bytes)")
    try:
        # Pillow's LOAD_TRUNCATED_IMAGES stays False (its default): a short file must fail, not come back grey.
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > limit:
                raise ImageLoadError(
                    path, f"the image is {height}×{width} = {width * height:,} pixels, more than the limit of "
                    f"{limit:,} (READAR_MAX_IMAGE_PIXELS)", TOO_LARGE_ADVICE,
                )
            opened.load()
            # ``load`` decodes the pixels; copying detaches them from the file handle.
            return opened.copy()
    except UnidentifiedImageError:
        raise ImageLoadError(path, "the file is not in an image format Pillow recognises") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            path, f"the image is implausibly large ({exc})", TOO_LARGE_ADVICE
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated data raises OSError ("image file is truncated"), broken chunks raise SyntaxError/ValueError.
        raise ImageLoadError(path, f"the image data is corrupt or truncated ({exc})") from None


def _wide_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit sample values (0…65535) to 8 bits, rounding to nearest."""
    wide = np.clip(array.astype(np.float64), 0, 65535)
    return np.rint(wide / 257.0).astype(np.uint8)


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Float samples: 0…1 images are scaled by 255, anything else is taken as 0…255 and clipped."""
    values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.rint(np.clip(values, 0, 255)).astype(np.uint8)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a decoded Pillow image of any mode to a contiguous uint8 (H, W, 3) array."""
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8)
    elif mode in _GRAYSCALE_MODES:
        gray = np.asarray(image.convert("L"), dtype=np.uint8)
        array = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode in _WIDE_INTEGER_MODES:
        gray = _wide_to_uint8(np.asarray(image))
        array = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "F":
        gray = _float_to_uint8(np.asarray(image))
        array = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode in _PALETTE_MODES:
        # Via RGBA so palettes with a transparency entry convert without Pillow's transparency warning.
        array = np.asarray(image.convert("RGBA").convert("RGB"))
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(array, dtype=np.uint8)


def load_rgb(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Fully decode the image at ``path`` into a uint8 RGB array (H, W, 3).

    Raises :class:`ImageLoadError` for missing, empty, truncated, corrupt and non-image files, and for images
    with more than ``max_pixels`` pixels (None: the process's budget, :func:`set_max_image_pixels`).
    """
    path = Path(path)
    image = _open_fully(path, max_pixels)
    try:
        array = _to_rgb_array(image)
    except (OSError, ValueError) as exc:
        raise ImageLoadError(path, f"mode {image.mode!r} cannot be converted to RGB ({exc})") from None
    if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ImageLoadError(path, f"decoding gave an array of shape {array.shape}, not (H, W, 3)")
    return array


def load_mask(path: Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Fully decode a ground-truth mask into a boolean array (H, W); True marks defect pixels.

    The rule is :func:`metrics.groundtruth.defect_pixels` (the aggregator reads masks by it too, and the dataset
    index accepts masks by it). ``max_pixels`` as for :func:`load_rgb`.
    """
    path = Path(path)
    image = _open_fully(path, max_pixels)
    try:
        return defect_pixels(image)
    except ValueError as exc:
        raise ImageLoadError(path, str(exc)) from None
