"""Typed errors of the metrics package; every message says what was wrong and what to do about it."""

from __future__ import annotations


class MetricsError(ValueError):
    """Base class of every error raised by :mod:`metrics`."""


class MetricInputError(MetricsError):
    """An image handed to a metric accumulator is unusable (wrong dtype, shape, non-finite logits, ...)."""


class StateFormatError(MetricsError):
    """Serialised metric state bytes are malformed or were written with another binning or version."""


class GroundTruthError(MetricsError):
    """A ground-truth mask is missing, unreadable, or does not match its image."""


class MaskSizeError(GroundTruthError):
    """A mask's (H, W) differs from the size of its image / prediction map."""


class LegacyInputError(MetricsError):
    """One prediction folder of the original READAR output layout cannot be evaluated (it is skipped)."""
