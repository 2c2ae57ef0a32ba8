"""Detectors, built by name from a registry (see :mod:`workers.detectors.base`)."""

from workers.detectors.base import (
    DETECTOR_REGISTRY,
    Detection,
    Detector,
    DetectorConfig,
    DetectorError,
    ImageSample,
    build_detector,
    register_detector,
)

__all__ = [
    "DETECTOR_REGISTRY",
    "Detection",
    "Detector",
    "DetectorConfig",
    "DetectorError",
    "ImageSample",
    "build_detector",
    "register_detector",
]
