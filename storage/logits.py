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
    return _as_stored_logits(_resized_maps(stored).amax(dim=0).numpy())


def _resized_maps(stored: StoredLogits):  # -> torch.Tensor (K, H, W) float32
    """Each low-res map resized to the image as float32, before maps combine (DESIGN.md 5.6)."""
    import torch
    import torch.nn.functional as F

    in_h, in_w = stored.input_size  # type: ignore[misc]
    low_res = torch.from_numpy(stored.maps.astype(np.float32))[:, None]  # K,1,h,w
    framed = F.interpolate(low_res, (stored.frame_size, stored.frame_size), mode="bilinear", align_corners=False)
    cropped = framed[..., :in_h, :in_w]
    full = F.interpolate(cropped, stored.original_size, mode="bilinear", align_corners=False)
    return full[:, 0]


def _as_stored_logits(combined: np.ndarray) -> np.ndarray:
    """float32 logits → the float16 values a metric sees.

    Rounding to float16 keeps every score in a finite set (exact histogram metrics); clip so that very large
    logits saturate instead of overflowing to inf."""
    finfo = np.finfo(np.float16)
    return np.clip(combined, finfo.min, finfo.max).astype(np.float16)


# ---- The image's top logit without building its full-resolution map ----
#
# A worker needs only max(full_resolution_logits(...)) for the image score, and building the map costs two
# megapixel resizes per image. Every resized value is a blend of at most 2×2 values of its stage, so a pixel is
# bounded by the low-res values it depends on: the pixels next to the low-res maximum give a floor, and only
# pixels that depend on a low-res value near that floor are evaluated, each exactly as PyTorch rounds it.

_F32 = np.float32
# A resized value exceeds the largest low-res value it blends by its roundings only: four float32 blend levels
# (two per resize), under 2**-20 of the largest |value| of the map; the slack allows 16 times that.
_SCORE_SLACK = 2.0**-16
_SCORE_BUDGET = 8  # evaluate at most 1/8 of the pixels; above that, resizing the whole map is as cheap


@dataclass(frozen=True)
class _Arithmetic:
    """How this PyTorch build rounds a bilinear resize.

    Its CPU kernels are compiled once per instruction set and the compiler may fuse a multiply and an add into
    one FMA (one rounding instead of two). Observed on torch 2.13: the AVX2 kernels fuse the source index
    ``scale*(i+0.5)-0.5`` and the blend as ``fma(t0, w0, t1*w1)``; the DEFAULT kernels fuse neither. Which one
    a machine runs is found by trying each against PyTorch (:func:`_score_plan`)."""

    fused_index: bool
    blend: str  # "plain": t0*w0 + t1*w1; "fma0": fma(t0, w0, t1*w1); "fma1": fma(t1, w1, t0*w0)


_ARITHMETICS = tuple(_Arithmetic(fused, blend) for blend in ("fma0", "plain", "fma1") for fused in (True, False))


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a*b + c`` rounded once, as an FMA instruction rounds it (numpy has no FMA); broadcasts.

    Works through blocks that stay in cache: the float64 temporaries of a whole megapixel cost more in page
    faults than in arithmetic."""
    shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c))
    a, b, c = (np.broadcast_to(v, shape).reshape(-1) for v in (a, b, c))
    out = np.empty(a.size, _F32)
    for start in range(0, a.size, _FMA_BLOCK):
        block = slice(start, start + _FMA_BLOCK)
        out[block] = _fma32_block(a[block], b[block], c[block])
    return out.reshape(shape)


_FMA_BLOCK = 1 << 15


def _fma32_block(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:func:`_fma32` of 1-D arrays.

    a*b is exact in float64 (24+24 bits), and so is almost always the float64 sum with c; then one rounding to
    float32 is the FMA's. Where TwoSum shows the sum inexact, it is rounded to odd instead: float64 keeps enough
    spare bits that rounding a round-to-odd sum to float32 is still correct (no double rounding)."""
    product = a.astype(np.float64) * b
    addend = c.astype(np.float64)
    total = product + addend
    virtual = total - addend
    error = (product - virtual) + (addend - (total - virtual))
    inexact = np.flatnonzero(error)
    if inexact.size:
        bits = total[inexact].view(np.int64)
        toward_zero = (error[inexact] > 0) != (total[inexact] > 0)
        total[inexact] = (np.where(toward_zero, bits - 1, bits) | 1).view(np.float64)  # truncate, mark odd
    return total.astype(_F32)


def _blend(t0: np.ndarray, w0: np.ndarray, t1: np.ndarray, w1: np.ndarray, how: str) -> np.ndarray:
    """One bilinear tap pair, rounded as the kernel rounds it."""
    if how == "plain":
        return t0 * w0 + t1 * w1
    if how == "fma0":
        return _fma32(t0, w0, t1 * w1)
    return _fma32(t1, w1, t0 * w0)


@dataclass(frozen=True)
class _Axis:
    """Sources and weights of one axis of one resize, per output index: out[i] = x[i0]*w0 + x[i1]*w1."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    def take(self, index: np.ndarray) -> _Axis:
        return _Axis(self.i0[index], self.i1[index], self.w0[index], self.w1[index])


def _axis(size_in: int, size_out: int, fused_index: bool) -> _Axis:
    """PyTorch's CPU bilinear indices and weights (align_corners=False, no antialias) for one axis.

    As aten's compute_source_index_and_lambda: scale = in/out in float32, source = max(scale*(i+0.5)-0.5, 0),
    i0 = floor, lambda = source - i0; an axis whose size does not change copies (weights 1 and 0)."""
    out = np.arange(size_out)
    if size_in == size_out:
        return _Axis(out, out, np.ones(size_out, _F32), np.zeros(size_out, _F32))
    scale = np.full(size_out, _F32(size_in) / _F32(size_out), _F32)
    centre = out.astype(_F32) + _F32(0.5)
    if fused_index:
        source = _fma32(scale, centre, np.full(size_out, -0.5, _F32))
    else:
        source = scale * centre - _F32(0.5)
    source = np.maximum(source, _F32(0))
    i0 = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    w1 = np.minimum(np.maximum(source - i0.astype(_F32), _F32(0)), _F32(1))
    return _Axis(i0, np.where(i0 < size_in - 1, i0 + 1, i0), _F32(1) - w1, w1)


def _resize_grid(x: np.ndarray, rows: _Axis, cols: _Axis, how: str) -> np.ndarray:
    """The resize of x at the outputs ``rows`` × ``cols``.

    The kernel blends along columns inside each source row, then blends two such rows: the column blend of a
    source row is the same for every output row that reads it, so it is computed once per source row."""
    sources = np.unique(np.concatenate([rows.i0, rows.i1]))
    picked = x[sources]
    across = _blend(picked[:, cols.i0], cols.w0, picked[:, cols.i1], cols.w1, how)
    rows = _local(rows, sources)
    return _blend(across[rows.i0], rows.w0[:, None], across[rows.i1], rows.w1[:, None], how)


def _local(axis: _Axis, kept: np.ndarray) -> _Axis:
    """``axis`` with its sources renumbered into the sorted subset ``kept`` of its input."""
    return _Axis(np.searchsorted(kept, axis.i0), np.searchsorted(kept, axis.i1), axis.w0, axis.w1)


@dataclass(frozen=True)
class _Span:
    """One image axis through both resizes: ``frame`` (low-res → frame) and ``image`` (crop → image) axes, and
    for each low-res index the first and last image index whose value depends on it (first > last: none)."""

    frame: _Axis
    image: _Axis
    first: np.ndarray
    last: np.ndarray

    def image_indices(self, low_res: np.ndarray) -> np.ndarray:
        """Image indices that depend on any of the low-res indices marked in the boolean ``low_res``."""
        edges = np.zeros(len(self.image.i0) + 1, np.int64)
        first, last = self.first[low_res], self.last[low_res]
        np.add.at(edges, first, 1)
        np.add.at(edges, np.maximum(last + 1, first), -1)
        return np.flatnonzero(np.cumsum(edges[:-1]) > 0)


def _span(size_low: int, size_frame: int, size_in: int, size_out: int, fused_index: bool) -> _Span | None:
    """The :class:`_Span` of one axis; None if its dependencies are not monotone (then no fast path)."""
    frame = _axis(size_low, size_frame, fused_index)
    image = _axis(size_in, size_out, fused_index)
    sources = [frame.i0[image.i0], frame.i1[image.i0], frame.i0[image.i1], frame.i1[image.i1]]
    low, high = np.minimum.reduce(sources), np.maximum.reduce(sources)
    if (np.diff(low) < 0).any() or (np.diff(high) < 0).any():
        return None
    index = np.arange(size_low)
    first = np.searchsorted(high, index, side="left")
    last = np.searchsorted(low, index, side="right") - 1
    return _Span(frame, image, first, last)


@dataclass(frozen=True)
class _ScorePlan:
    """Everything about one geometry that the exact top logit needs, checked against PyTorch once."""

    rows: _Span
    cols: _Span
    blend: str

    def values(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Exact float32 resized values of the low-res map x at image pixels ``rows`` × ``cols``."""
        image_rows, image_cols = self.rows.image.take(rows), self.cols.image.take(cols)
        frame_rows = np.unique(np.concatenate([image_rows.i0, image_rows.i1]))
        frame_cols = np.unique(np.concatenate([image_cols.i0, image_cols.i1]))
        framed = _resize_grid(x, self.rows.frame.take(frame_rows), self.cols.frame.take(frame_cols), self.blend)
        return _resize_grid(framed, _local(image_rows, frame_rows), _local(image_cols, frame_cols), self.blend)

    def pixels_near(self, hot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image rows and columns that hold every pixel depending on a low-res cell marked in the boolean ``hot``."""
        return self.rows.image_indices(hot.any(axis=1)), self.cols.image_indices(hot.any(axis=0))

    def live(self) -> np.ndarray:
        """Low-res cells that some image pixel depends on (the others lie in SAM's padding)."""
        return (self.rows.first <= self.rows.last)[:, None] & (self.cols.first <= self.cols.last)[None]


def _score_plan(low_res: tuple[int, int], frame: int, input_size: tuple[int, int], original: tuple[int, int]
                ) -> _ScorePlan | None:
    """The plan for one geometry, or None when no emulated arithmetic reproduces PyTorch on it.

    Each candidate arithmetic must reproduce, bit for bit, every pixel of PyTorch's resize of a random probe map
    of this geometry: that checks this machine's kernels and this geometry's weights, not just the code's
    reading of them. Cached: a worker meets few geometries (one per dataset category)."""
    key = (low_res, frame, input_size, original)
    if key not in _SCORE_PLANS:
        _SCORE_PLANS[key] = _checked_plan(*key)
    return _SCORE_PLANS[key]


_SCORE_PLANS: dict[tuple, _ScorePlan | None] = {}


def _checked_plan(low_res: tuple[int, int], frame: int, input_size: tuple[int, int], original: tuple[int, int]
                  ) -> _ScorePlan | None:
    """:func:`_score_plan` uncached: the first arithmetic of :data:`_ARITHMETICS` that PyTorch confirms."""
    probe = (np.random.default_rng(0).standard_normal(low_res) * 8).astype(np.float16)
    expected = _resized_maps(StoredLogits(probe, original, input_size, frame))[0].numpy()
    for arithmetic in _ARITHMETICS:
        rows = _span(low_res[0], frame, input_size[0], original[0], arithmetic.fused_index)
        cols = _span(low_res[1], frame, input_size[1], original[1], arithmetic.fused_index)
        if rows is None or cols is None:
            return None
        plan = _ScorePlan(rows, cols, arithmetic.blend)
        emulated = plan.values(probe.astype(_F32), np.arange(original[0]), np.arange(original[1]))
        if np.array_equal(emulated, expected):
            return plan
    return None


def max_full_resolution_logit(stored: StoredLogits) -> float:
    """``float(full_resolution_logits(stored).max())``, bit for bit, mostly without building the map.

    The image score needs only this maximum. Rounding to float16 and clipping are monotone, so the maximum of
    the stored map is the stored form of the maximum float32 value over all maps and pixels; that value is found
    exactly (:func:`_top_value`). Maps that are flat near their top (no pixel can be ruled out), and
    geometries whose arithmetic is not reproduced, take the full resize."""
    if stored.num_maps == 0:
        return NO_MASK_LOGIT
    if stored.input_size is None:
        return float(stored.maps.max())
    plan = _score_plan(stored.maps.shape[1:], stored.frame_size, stored.input_size, stored.original_size)
    top = None if plan is None else _top_value(plan, stored.maps.astype(_F32), stored.original_size)
    if top is None:
        return float(full_resolution_logits(stored).max())
    return float(_as_stored_logits(np.array([top], _F32))[0])


def _top_value(plan: _ScorePlan, maps: np.ndarray, original: tuple[int, int]) -> np.float32 | None:
    """The largest resized float32 value over all maps and pixels; None if that needs too many pixels.

    Floor: exact values around each map's largest low-res cell (among cells some pixel depends on). A pixel
    above the floor depends on a low-res value above floor - slack, since a blend exceeds its largest input by
    less than the slack; only those pixels are evaluated."""
    live = plan.live()
    floor = None
    for x in maps:
        peak = np.zeros(x.shape, bool)
        peak[np.unravel_index(np.argmax(np.where(live, x, -np.inf)), x.shape)] = True
        value = plan.values(x, *plan.pixels_near(peak)).max()
        floor = value if floor is None else max(floor, value)
    top, budget = floor, original[0] * original[1] // _SCORE_BUDGET
    for x in maps:
        hot = x.astype(np.float64) > np.float64(floor) - _SCORE_SLACK * np.float64(np.abs(x).max())
        if not hot.any():
            continue
        rows, cols = plan.pixels_near(hot)
        budget -= len(rows) * len(cols)
        if budget < 0:
            return None
        if len(rows) and len(cols):
            top = max(top, plan.values(x, rows, cols).max())
    return top


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
