"""Run reports: a static HTML page of a run's metrics, curves, galleries and failure breakdown, and
single-image diagnostic panels (``readar report`` / ``readar show``)."""

from metrics.reporting.builder import ReportError, ReportOptions, build_report, find_image, render_image
from metrics.reporting.failures import FAILURE_CLASSES, FailureEvidence, classify_failure

__all__ = [
    "FAILURE_CLASSES", "FailureEvidence", "ReportError", "ReportOptions", "build_report", "classify_failure",
    "find_image", "render_image",
]
