"""The stored logit format: what a detector produces for one image and what the metrics read back.

SAM decodes 256×256 low-resolution mask logits on a padded 1024×1024 frame; the full-resolution map is a fixed,
deterministic resize of them (DESIGN.md 5.6). Storing the low-resolution logits as float16 plus the resize
geometry costs ~1/30 of a full-resolution float32 map. Detectors that work at the image's own resolution (the
weight-free baseline) store full-resolution maps instead (``input_size`` is then ``None``).

The *score map* of an image is ``sigmoid(full_resolution_logits(...))``. Full-resolution logits are rounded to
float16 after the resize, so every score a metric sees lies in the finite set of float16 values: that is what
makes the histogram metrics exact (DESIGN.md section 6).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from storage.npz import read_npz, write_npz

# Logit used for an image whose detector produced no mask at all (e.g. READ generated no [SEG] token):
# probability 0 everywhere, still finite so the metrics treat it as an ordinary (lowest) score.
NO_MASK_LOGIT = float(np.finfo(np.float16).min)

FORMAT_VERSION = 1


class LogitFormatError(ValueError):
    """A stored logit object is malformed (wrong arrays, shapes, or non-finite values)."""


@dataclass(frozen=True)
class StoredLogits:
    """Raw-logit maps of one image.

    maps: float16 array (K, h, w). K >= 0 maps (several [SEG] tokens or several prompts) that combine by
        per-pixel max of probabilities, i.e. per-pixel max of logits after each is resized. K == 0 means the
        detector produced no mask (the score map is then ``NO_MASK_LOGIT`` everywhere).
    original_size: (H, W) of the image in pixels.
    input_size: None for full-resolution maps (then h, w == H, W); otherwise (h_in, w_in), the size of the image
        after SAM's longest-side resize inside the ``frame_size`` square that the low-res maps cover.
    frame_size: side of SAM's padded input frame (1024 for SAM).
    """

    maps: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int] | None = None
    frame_size: int = 1024

    def __post_init__(self) -> None:
        maps = np.asarray(self.maps)
        if maps.ndim == 2:
            maps = maps[None]
        if maps.ndim != 3:
            raise LogitFormatError(f"logit maps must be (K, h, w); got shape {maps.shape}")
        maps = maps.astype(np.float16, copy=False)
        if not np.isfinite(maps).all():
            raise LogitFormatError("logit maps contain NaN or inf values")
        height, width = (int(v) for v in self.original_size)
        if height <= 0 or width <= 0:
            raise LogitFormatError(f"original_size must be positive; got {self.original_size}")
        object.__setattr__(self, "maps", maps)
        object.__setattr__(self, "original_size", (height, width))
        if self.input_size is None:
            if maps.shape[0] and maps.shape[1:] != (height, width):
                raise LogitFormatError(
                    f"full-resolution maps are {maps.shape[1]}×{maps.shape[2]} but the image is {height}×{width}"
                )
        else:
            in_h, in_w = (int(v) for v in self.input_size)
            if not (0 < in_h <= self.frame_size and 0 < in_w <= self.frame_size):
                raise LogitFormatError(f"input_size {self.input_size} does not fit a {self.frame_size} frame")
            object.__setattr__(self, "input_size", (in_h, in_w))

    @property
    def num_maps(self) -> int:
        return int(self.maps.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.maps.nbytes)


def full_resolution_logits(stored: StoredLogits) -> np.ndarray:
    """The image's combined raw-logit map at original resolution, float16 (H, W).

    Low-res SAM logits follow DESIGN.md 5.6 (the original READ post-processing): bilinear resize to the frame,
    crop to ``input_size``, bilinear resize to (H, W), align_corners=False throughout. Several maps combine by
    per-pixel max after each is resized.
    """
    height, width = stored.original_size
    if stored.num_maps == 0:
        return np.full((height, width), NO_MASK_LOGIT, dtype=np.float16)
    if stored.input_size is None:
        return stored.maps.max(axis=0)
    import torch
    import torch.nn.functional as F

    in_h, in_w = stored.input_size
    low_res = torch.from_numpy(stored.maps.astype(np.float32))[:, None]  # K,1,h,w
    framed = F.interpolate(low_res, (stored.frame_size, stored.frame_size), mode="bilinear", align_corners=False)
    cropped = framed[..., :in_h, :in_w]
    full = F.interpolate(cropped, (height, width), mode="bilinear", align_corners=False)
    combined = full[:, 0].amax(dim=0).numpy()
    # Rounding to float16 keeps every score in a finite set (exact histogram metrics); clip so that very large
    # logits saturate instead of overflowing to inf.
    finfo = np.finfo(np.float16)
    return np.clip(combined, finfo.min, finfo.max).astype(np.float16)


def encode_logits(stored: StoredLogits) -> bytes:
    """Serialise to an ``.npz`` byte string (plain numeric arrays only: readable by ``np.load``, no pickle)."""
    return write_npz({
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "maps": stored.maps,
        "original_size": np.array(stored.original_size, dtype=np.int64),
        "input_size": np.array(stored.input_size if stored.input_size else (-1, -1), dtype=np.int64),
        "frame_size": np.array(stored.frame_size, dtype=np.int64),
    })


def decode_logits(data: bytes, *, source: str = "logit object") -> StoredLogits:
    """Inverse of :func:`encode_logits`; ``source`` names the object in error messages."""
    arrays = read_npz(data)  # the fast path for what encode_logits writes
    if arrays is None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as exc:  # noqa: BLE001 - any parse failure is a format error for the caller
            raise LogitFormatError(f"{source} is not a READAR logit archive: {exc}") from exc
    missing = {"format_version", "maps", "original_size", "input_size", "frame_size"} - arrays.keys()
    if missing:
        raise LogitFormatError(f"{source} lacks arrays {sorted(missing)}")
    if int(arrays["format_version"]) != FORMAT_VERSION:
        raise LogitFormatError(f"{source} has format version {int(arrays['format_version'])}; expected {FORMAT_VERSION}")
    input_size = tuple(int(v) for v in arrays["input_size"])
    try:
        return StoredLogits(
            maps=arrays["maps"],
            original_size=tuple(int(v) for v in arrays["original_size"]),  # type: ignore[arg-type]
            input_size=None if input_size == (-1, -1) else input_size,  # type: ignore[arg-type]
            frame_size=int(arrays["frame_size"]),
        )
    except LogitFormatError as exc:
        raise LogitFormatError(f"{source}: {exc}") from exc
