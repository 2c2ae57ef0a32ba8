"""The mergeable metric state of one scope: histograms over logit bins plus the image scores.

Per bin (see :mod:`metrics.binning`) the state counts all pixels, defect pixels, and Σ 1/region-size over
defect pixels; it also keeps every image's score (its max logit) and label, the region count and the extreme
logits. That is everything DESIGN.md section 6 needs; memory is fixed by the binning (plus 9 bytes per
image), and two states of disjoint image sets add up to the state of their union.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from metrics import curves
from metrics.binning import Binning, get_binning
from metrics.errors import MetricInputError, StateFormatError
from metrics.groundtruth import inverse_region_sizes

STATE_FORMAT_VERSION = 1
_STATE_ARRAYS = (
    "format_version", "binning", "bins", "total", "defect", "inverse_sizes", "num_regions",
    "image_scores", "image_labels", "logit_range",
)


class MetricState:
    """Streaming accumulator of one scope; ``finalize`` turns it into metric values.

    binning: "float16" (exact for float16 logits, 65,536 bins) or "float32" (see :mod:`metrics.binning`).
    """

    def __init__(self, binning: str = "float16") -> None:
        self._binning: Binning = get_binning(binning)
        self._total: np.ndarray | None = None  # int64 (num_bins,), allocated on the first image
        self._defect: np.ndarray | None = None  # int64 (num_bins,)
        self._inverse_sizes: np.ndarray | None = None  # float64 (num_bins,)
        self.num_regions = 0
        self._image_scores: list[float] = []
        self._image_labels: list[bool] = []
        self.min_logit = math.inf
        self.max_logit = -math.inf

    @property
    def binning(self) -> str:
        return self._binning.name

    @property
    def num_images(self) -> int:
        return len(self._image_scores)

    @property
    def num_anomalous_images(self) -> int:
        return int(sum(self._image_labels))

    @property
    def image_scores(self) -> np.ndarray:
        """float64 (num_images,): max logit of each image, in the order added / merged."""
        return np.asarray(self._image_scores, dtype=np.float64)

    @property
    def image_labels(self) -> np.ndarray:
        """bool (num_images,): True for anomalous images."""
        return np.asarray(self._image_labels, dtype=bool)

    def _allocate(self) -> None:
        if self._total is None:
            size = self._binning.num_bins
            self._total = np.zeros(size, dtype=np.int64)
            self._defect = np.zeros(size, dtype=np.int64)
            self._inverse_sizes = np.zeros(size, dtype=np.float64)

    def add_image(self, logits: np.ndarray, mask: np.ndarray | None = None, *, anomalous: bool) -> None:
        """Add one image.

        logits: raw logits (H, W), float16 (or float32 with ``binning="float32"``); combined over several maps
            already (per-pixel max). Must be finite.
        mask: bool (H, W), True on defect pixels; None means all-normal and is only valid for normal images.
        anomalous: the image label (defect type != good).
        """
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.size == 0:
            shape = getattr(logits, "shape", type(logits).__name__)
            raise MetricInputError(f"logits must be a non-empty 2-D array (H, W); got {shape}")
        if logits.dtype not in self._binning.dtypes:
            raise MetricInputError(
                f"logits are {logits.dtype} but this state uses {self.binning} bins, which take "
                f"{[str(d) for d in self._binning.dtypes]}; create the state with binning='float32' for float32 maps"
            )
        if mask is None:
            if anomalous:
                raise MetricInputError("an anomalous image needs a ground-truth mask; skip the image instead")
        elif not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise MetricInputError(f"mask must be a bool array (use mask > 0); got {getattr(mask, 'dtype', mask)}")
        elif mask.shape != logits.shape:
            raise MetricInputError(f"mask is {mask.shape} but the logit map is {logits.shape} (H, W)")
        top = float(logits.max())
        bottom = float(logits.min())
        if not (math.isfinite(top) and math.isfinite(bottom)):
            raise MetricInputError("logits contain NaN or inf; the detector output is broken for this image")
        self._allocate()
        bins = self._binning.index(logits)
        self._total += np.bincount(bins.ravel(), minlength=self._binning.num_bins)
        if mask is not None and mask.any():
            rows = np.flatnonzero(mask.any(axis=1))
            cols = np.flatnonzero(mask.any(axis=0))
            window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            mask_window = mask[window]
            weights, count = inverse_region_sizes(mask_window)
            defect_bins = bins[window][mask_window]
            self._defect += np.bincount(defect_bins, minlength=self._binning.num_bins)
            self._inverse_sizes += np.bincount(defect_bins, weights=weights, minlength=self._binning.num_bins)
            self.num_regions += count
        self._image_scores.append(top)
        self._image_labels.append(bool(anomalous))
        self.min_logit = min(self.min_logit, bottom)
        self.max_logit = max(self.max_logit, top)

    def merge(self, other: MetricState) -> MetricState:
        """Add ``other`` (a state of other images, same binning) into this one; returns self."""
        if not isinstance(other, MetricState):
            raise MetricInputError(f"can only merge a MetricState; got {type(other).__name__}")
        if other.binning != self.binning:
            raise MetricInputError(f"cannot merge a {other.binning}-binned state into a {self.binning}-binned one")
        if other._total is not None:
            self._allocate()
            self._total += other._total
            self._defect += other._defect
            self._inverse_sizes += other._inverse_sizes
        self.num_regions += other.num_regions
        self._image_scores.extend(other._image_scores)
        self._image_labels.extend(other._image_labels)
        self.min_logit = min(self.min_logit, other.min_logit)
        self.max_logit = max(self.max_logit, other.max_logit)
        return self

    def __iadd__(self, other: MetricState) -> MetricState:
        return self.merge(other)

    def copy(self) -> MetricState:
        return MetricState(self.binning).merge(self)

    def occupied_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bin indices, all, defect, Σ 1/size) of the non-empty bins, ascending score."""
        if self._total is None:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, np.zeros(0)
        bins = np.flatnonzero(self._total)
        return bins, self._total[bins], self._defect[bins], self._inverse_sizes[bins]

    def finalize(self, *, pro_hard: bool = True) -> dict[str, Any]:
        """Metric values of the scope.

        Returns iAUROC, pAUROC, PRO, PRO_hard (NaN when ``pro_hard`` is False), F1_max, f1_threshold_logit
        (threshold of F1_max: pixels with logit >= it are flagged), num_images, num_anom_images, num_regions.
        """
        values: dict[str, Any] = {
            "iAUROC": curves.image_auroc(self.image_scores, self.image_labels),
            "pAUROC": curves.NAN, "PRO": curves.NAN, "PRO_hard": curves.NAN, "F1_max": curves.NAN,
            "f1_threshold_logit": curves.NAN,
            "num_images": self.num_images, "num_anom_images": self.num_anomalous_images,
            "num_regions": self.num_regions,
        }
        bins, total, defect, inverse_sizes = self.occupied_bins()
        if bins.size == 0:
            return values
        normal = total - defect
        logits = self._binning.value(bins)
        # Bin representatives may lie outside the true range for float32 bins; pin the ends to the exact
        # extremes so that the first PRO threshold flags the maximum and the last one flags every pixel.
        logits[-1] = self.max_logit
        logits[0] = self.min_logit
        f1_value, f1_index = curves.f1_max(normal, defect)
        values["pAUROC"] = curves.pixel_auroc(normal, defect)
        values["F1_max"] = f1_value
        values["f1_threshold_logit"] = float(logits[f1_index]) if f1_index >= 0 else curves.NAN
        values["PRO"] = curves.pro_200(normal, inverse_sizes, logits, self.num_regions)
        if pro_hard:
            values["PRO_hard"] = curves.pro_hard(normal, inverse_sizes, self.num_regions)
        return values

    def to_bytes(self) -> bytes:
        """Serialise as an ``.npz`` of plain numeric arrays (non-empty bins only); no pickle."""
        bins, total, defect, inverse_sizes = self.occupied_bins()
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format_version=np.array(STATE_FORMAT_VERSION, dtype=np.int64),
            binning=np.array(self.binning),
            bins=bins.astype(np.int64), total=total, defect=defect, inverse_sizes=inverse_sizes,
            num_regions=np.array(self.num_regions, dtype=np.int64),
            image_scores=self.image_scores, image_labels=self.image_labels,
            logit_range=np.array([self.min_logit, self.max_logit], dtype=np.float64),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "metric state") -> MetricState:
        """Inverse of :meth:`to_bytes`; ``source`` names the bytes in error messages."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as exc:  # noqa: BLE001 - any parse failure means malformed bytes
            raise StateFormatError(f"{source} is not a serialised metric state: {exc}") from exc
        missing = set(_STATE_ARRAYS) - arrays.keys()
        if missing:
            raise StateFormatError(f"{source} lacks arrays {sorted(missing)}; was it written by MetricState?")
        if int(arrays["format_version"]) != STATE_FORMAT_VERSION:
            raise StateFormatError(
                f"{source} has state format {int(arrays['format_version'])}; this code reads {STATE_FORMAT_VERSION}"
            )
        try:
            state = cls(str(arrays["binning"]))
        except MetricInputError as exc:
            raise StateFormatError(f"{source}: {exc}") from exc
        bins = arrays["bins"]
        counters = (arrays["total"], arrays["defect"], arrays["inverse_sizes"])
        if bins.ndim != 1 or any(c.shape != bins.shape for c in counters):
            raise StateFormatError(f"{source}: bin and counter arrays differ in shape")
        if bins.size and (bins.min() < 0 or bins.max() >= state._binning.num_bins or np.any(np.diff(bins) <= 0)):
            raise StateFormatError(f"{source}: bin indices are out of range or not strictly increasing")
        if np.any(arrays["defect"] < 0) or np.any(arrays["defect"] > arrays["total"]):
            raise StateFormatError(f"{source}: defect counts must lie between 0 and the pixel counts")
        scores, labels = arrays["image_scores"], arrays["image_labels"]
        if scores.shape != labels.shape or scores.ndim != 1 or labels.dtype != np.bool_:
            raise StateFormatError(f"{source}: image scores and labels differ in shape or type")
        if bins.size:
            state._allocate()
            state._total[bins] = arrays["total"]
            state._defect[bins] = arrays["defect"]
            state._inverse_sizes[bins] = arrays["inverse_sizes"]
        state.num_regions = int(arrays["num_regions"])
        state._image_scores = [float(v) for v in scores]
        state._image_labels = [bool(v) for v in labels]
        state.min_logit, state.max_logit = (float(v) for v in arrays["logit_range"])
        return state
