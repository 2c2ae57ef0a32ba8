"""Test-only detectors, loaded by worker processes through READAR_PLUGINS=tests.plugins.

- ``slow_baseline``: the baseline detector plus a fixed delay per batch (so a test can act mid-run).
- ``poison``: the baseline detector, except that an image whose file name contains "poison" kills the whole
  worker process (os._exit), like a segfault in a native library would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from workers.detectors.base import Detection, Detector, DetectorConfig, ImageSample, register_detector
from workers.detectors.baseline import build_baseline


class _Wrapped(Detector):
    def __init__(self, inner: Detector, delay_s: float, poison: bool) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.poison = poison

    def prepare(self, sample: ImageSample) -> Any:
        if self.poison and "poison" in sample.key:
            os._exit(3)
        return self.inner.prepare(sample)

    def detect(self, batch: Sequence[Any]) -> list[Detection]:
        time.sleep(self.delay_s)
        return self.inner.detect(batch)


@register_detector("slow_baseline")
def build_slow(config: DetectorConfig) -> Detector:
    return _Wrapped(build_baseline(config), float(os.environ.get("READAR_TEST_DELAY_S", "0.3")), poison=False)


@register_detector("poison")
def build_poison(config: DetectorConfig) -> Detector:
    return _Wrapped(build_baseline(config), 0.0, poison=True)
