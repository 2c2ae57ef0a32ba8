"""Order-preserving bins of logit values: the keys of the metric histograms.

Every metric of DESIGN.md section 6 depends only on the order of scores (the sigmoid is strictly monotone) —
except the 200-threshold PRO, whose thresholds are evenly spaced probabilities; for that one each bin carries a
representative logit. So the histograms are keyed by logit, through a map ``bin_index`` that never reverses
the order of two values.

Guarantees:

* ``float16`` binning (the pipeline's stored format): 65,536 bins, one per float16 bit pattern (``-0`` shares
  the bin of ``+0``). Every bin holds exactly one value, so every metric is exact.
* ``float32`` binning (the original READAR output layout, ``readar eval``): a bin is the sign, the exponent and
  the top 14 of the 23 mantissa bits of the logit; magnitudes below 2**-24 share the zero bin and magnitudes of
  2**16 or more share one overflow bin per sign. Two logits tie only when they agree to a relative 2**-14
  (6.1e-5), so the results are the exact metrics of the logits truncated toward zero to 14 mantissa bits.
  Every float16 value has its own float32 bin and is its bin's representative, so float16 data stays exact.
  1,310,723 bins: 31 MB of counters per scope.

Bins are numbered so that a larger index means a larger logit; the representative of a bin (its logit
truncated toward zero, i.e. the value itself for float16) is what the 200-threshold PRO compares against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from metrics.errors import MetricInputError

FLOAT16_BINS = 1 << 16
_F16_SIGN = np.uint16(0x8000)
_F16_NEGATIVE_ZERO_KEY = 0x7FFF  # ~0x8000: where -0.0 lands before it is folded onto +0.0

# float32: keep 14 of the 23 mantissa bits (drop 9), magnitudes in [2**-24, 2**16) get their own bins.
_F32_DROPPED_BITS = 9
_F32_STEP = 1 << _F32_DROPPED_BITS
_F32_LOW = 103 << 23  # bit pattern of 2**-24, the smallest float16 subnormal
_F32_HIGH = 143 << 23  # bit pattern of 2**16, just above the largest float16 (65504)
_F32_ZERO_FLOOR = _F32_LOW - _F32_STEP
_F32_QMAX = ((_F32_HIGH - _F32_ZERO_FLOOR) >> _F32_DROPPED_BITS)  # magnitude index of the overflow bin
FLOAT32_BINS = 2 * _F32_QMAX + 1


def _float16_index(logits: np.ndarray) -> np.ndarray:
    """float16 (H, W) → uint16 (H, W) keys in value order (sign bit flipped for >= 0, all bits for < 0)."""
    bits = np.ascontiguousarray(logits).view(np.uint16)
    flip = (np.uint16(0) - (bits >> np.uint16(15))) | _F16_SIGN  # 0xFFFF for negatives, 0x8000 otherwise
    keys = bits ^ flip
    keys[keys == _F16_NEGATIVE_ZERO_KEY] = 0x8000
    return keys


def _float16_value(index: np.ndarray) -> np.ndarray:
    """uint keys → float64 logits (the exact float16 value of each bin)."""
    keys = np.asarray(index).astype(np.uint16)
    negative = keys < _F16_SIGN
    bits = np.where(negative, ~keys, keys ^ _F16_SIGN).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


def _float32_index(logits: np.ndarray) -> np.ndarray:
    """float32 or float16 (H, W) → int32 (H, W) bin indices in [0, FLOAT32_BINS)."""
    values = np.ascontiguousarray(logits, dtype=np.float32)
    bits = values.view(np.int32)
    magnitude = bits & np.int32(0x7FFFFFFF)
    np.clip(magnitude, _F32_ZERO_FLOOR, _F32_HIGH, out=magnitude)
    magnitude -= np.int32(_F32_ZERO_FLOOR)
    magnitude >>= np.int32(_F32_DROPPED_BITS)
    sign = bits >> np.int32(31)  # 0 for >= 0, -1 for < 0
    magnitude ^= sign
    magnitude -= sign  # now the signed magnitude index
    magnitude += np.int32(_F32_QMAX)
    return magnitude


def _float32_value(index: np.ndarray) -> np.ndarray:
    """Bin indices → float64 representative logits (truncated toward zero to the bin's 14 mantissa bits)."""
    signed = np.asarray(index, dtype=np.int64) - _F32_QMAX
    magnitude_index = np.abs(signed)
    bits = np.where(magnitude_index == 0, 0, _F32_ZERO_FLOOR + magnitude_index * _F32_STEP).astype(np.uint32)
    magnitudes = bits.view(np.float32).astype(np.float64)
    return np.where(signed < 0, -magnitudes, magnitudes)


@dataclass(frozen=True)
class Binning:
    """One way of turning logits into histogram bins.

    name: registry key, stored in serialised states.
    num_bins: length of every per-bin counter array.
    index: logits (H, W) → integer bin indices (H, W), order-preserving.
    value: bin indices (n,) → float64 representative logits (n,), non-decreasing in the index.
    dtypes: logit dtypes the binning accepts.
    """

    name: str
    num_bins: int
    index: Callable[[np.ndarray], np.ndarray]
    value: Callable[[np.ndarray], np.ndarray]
    dtypes: tuple[np.dtype, ...]


BINNINGS: dict[str, Binning] = {
    "float16": Binning("float16", FLOAT16_BINS, _float16_index, _float16_value, (np.dtype(np.float16),)),
    "float32": Binning(
        "float32", FLOAT32_BINS, _float32_index, _float32_value, (np.dtype(np.float32), np.dtype(np.float16))
    ),
}


def get_binning(name: str) -> Binning:
    """The binning registered under ``name`` ("float16" or "float32")."""
    try:
        return BINNINGS[name]
    except KeyError:
        raise MetricInputError(f"unknown binning {name!r}; choose one of {sorted(BINNINGS)}") from None
