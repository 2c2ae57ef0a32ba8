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

# Logit used for an image whose detector produced no mask at all (e.g. READ generated no [SEG] token):
# probability 0 everywhere, still finite so the metrics treat it as an ordinary (lowest) score.
NO_MASK_LOGIT = float(np.finfo(np.float16).min)

FORMAT_VERSION = 1

# Bounds on the geometry an object may declare: the full-resolution map and SAM's frame are allocated from it,
# so a damaged or hostile object must not name sizes no image has. The pixel bound is the largest pixel budget
# the settings accept (Settings.max_image_pixels); the frame bound is 8× SAM's 1024-pixel frame.
MAX_PIXELS = 2**31 - 1
MAX_FRAME_SIZE = 8192


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
        if height * width > MAX_PIXELS:
            raise LogitFormatError(f"original_size {height}×{width} exceeds {MAX_PIXELS:,} pixels")
        if not 0 < int(self.frame_size) <= MAX_FRAME_SIZE:
            raise LogitFormatError(f"frame_size must be from 1 to {MAX_FRAME_SIZE}; got {self.frame_size}")
        object.__setattr__(self, "frame_size", int(self.frame_size))
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


_ARRAYS = ("format_version", "maps", "original_size", "input_size", "frame_size")
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a member first, or an empty archive


def encode_logits(stored: StoredLogits) -> bytes:
    """Serialise to an ``.npz`` byte string with ``np.savez`` (plain numeric arrays, uncompressed, no pickle).

    numpy writes and reads these objects. A hand-written zip/npy reader and writer were faster, but by too little
    against READ's GPU time per image to keep a second parser of untrusted bytes (figures: bench/RESULTS.md).
    Objects that writer left behind are ordinary uncompressed ``.npz`` archives and decode here unchanged."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        format_version=np.array(FORMAT_VERSION, dtype=np.int64),
        maps=stored.maps,
        original_size=np.array(stored.original_size, dtype=np.int64),
        input_size=np.array(stored.input_size if stored.input_size else (-1, -1), dtype=np.int64),
        frame_size=np.array(stored.frame_size, dtype=np.int64),
    )
    return buffer.getvalue()


def _read_archive(data: bytes, source: str) -> dict[str, np.ndarray]:
    """The five arrays of a logit object, read by ``np.load`` without pickle.

    Refused with a reason: bytes that are not a zip archive (a bare ``.npy``, a pickle), a member that would
    expand beyond the size of the whole object (a compressed "zip bomb": READAR writes its members uncompressed,
    and numpy would inflate a member whole), an object array, a damaged member (zip checksum), a missing array.
    Members other than the five are never read."""
    if not data.startswith(_ZIP_SIGNATURES):
        raise LogitFormatError(f"{source} is not a READAR logit archive: not a zip archive (starts {data[:8]!r})")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for member in archive.zip.infolist():
                if member.file_size > len(data):
                    raise LogitFormatError(
                        f"{source}: member {member.filename!r} expands to {member.file_size:,} bytes, more than the "
                        f"whole object ({len(data):,} bytes); READAR never compresses logit objects"
                    )
            missing = set(_ARRAYS) - set(archive.files)
            if missing:
                raise LogitFormatError(f"{source} lacks arrays {sorted(missing)}")
            return {name: archive[name] for name in _ARRAYS}
    except LogitFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure (zip, npy header, pickle refused) is a format error
        raise LogitFormatError(f"{source} is not a READAR logit archive: {exc}") from exc


def _integers(arrays: dict[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> tuple[int, ...]:
    value = arrays[name]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.shape != shape:
        found = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise LogitFormatError(f"{source}: {name} must be integers of shape {shape}; got {found}")
    return tuple(int(v) for v in value.reshape(-1))


def decode_logits(data: bytes, *, source: str = "logit object") -> StoredLogits:
    """Inverse of :func:`encode_logits`; ``source`` names the object in error messages.

    Every malformed object (see :func:`_read_archive`; wrong dtypes or shapes; NaN or inf; a geometry that does
    not fit) raises :class:`LogitFormatError`, which the aggregator treats as a lost result."""
    arrays = _read_archive(data, source)
    (version,) = _integers(arrays, "format_version", (), source)
    if version != FORMAT_VERSION:
        raise LogitFormatError(f"{source} has format version {version}; expected {FORMAT_VERSION}")
    maps = arrays["maps"]
    if not isinstance(maps, np.ndarray) or maps.dtype != np.float16 or maps.ndim != 3:
        found = f"{maps.dtype} {maps.shape}" if isinstance(maps, np.ndarray) else type(maps).__name__
        raise LogitFormatError(f"{source}: maps must be float16 (K, h, w); got {found}")
    original_size = _integers(arrays, "original_size", (2,), source)
    input_size = _integers(arrays, "input_size", (2,), source)
    (frame_size,) = _integers(arrays, "frame_size", (), source)
    try:
        return StoredLogits(
            maps=maps,
            original_size=original_size,  # type: ignore[arg-type]
            input_size=None if input_size == (-1, -1) else input_size,  # type: ignore[arg-type]
            frame_size=frame_size,
        )
    except LogitFormatError as exc:
        raise LogitFormatError(f"{source}: {exc}") from exc
