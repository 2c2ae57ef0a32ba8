"""The ``noop`` detector: a constant all-zero logit map per image and no computation (queue benchmarks).

Zero logits mean probability 0.5 everywhere; metrics over such maps are meaningless (every pixel ties), which
is the point: the detector measures the cost of everything around the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.logits import StoredLogits
from workers.detectors.base import (
    Detection,
    Detector,
    DetectorConfig,
    DetectorError,
    ImageSample,
    register_detector,
)


class NoopDetector(Detector):
    """Returns one full-resolution float16 map of zeros (K=1) per image."""

    name = "noop"

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config

    def prepare(self, sample: ImageSample) -> tuple[int, int]:
        """Only the image size (H, W) is needed."""
        return sample.size

    def detect(self, batch: Sequence[Any]) -> list[Detection]:
        results = []
        for size in batch:
            if not (isinstance(size, tuple) and len(size) == 2):
                raise DetectorError(
                    f"noop.detect expects (height, width) tuples from noop.prepare; got {size!r}"
                )
            height, width = size
            maps = np.zeros((1, height, width), dtype=np.float16)
            results.append(
                Detection(StoredLogits(maps=maps, original_size=(height, width)), {"reference": "none"})
            )
        return results


@register_detector("noop")
def build_noop(config: DetectorConfig) -> Detector:
    """Registry factory for :class:`NoopDetector`."""
    return NoopDetector(config)
