"""CPU time per image of the tiny PixelLM detector against the tiny READ detector (same LLaMA size, same image,
same answer length class), as a ratio. PixelLM has no SAM ViT image encoder: the ratio shows what that saves at
tiny scale (the tiny SAM encoder is far smaller than SAM-H, so real models differ by more).

    python bench/pixellm_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workers.detectors.base import DetectorConfig, ImageSample, build_detector
from workers.pixellm.tiny import make_tiny_pixellm
from workers.read.tiny import make_tiny_checkpoint


def _time(detector, sample: ImageSample, repeats: int) -> tuple[float, dict]:
    prepared = detector.prepare(sample)
    detector.detect([prepared])  # load + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detection = detector.detect([detector.prepare(sample)])[0]
        times.append(time.perf_counter() - start)
    return statistics.median(times), detection.diagnostics["timings_ms"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    sample = ImageSample(image=image, category="bottle", defect="crack")
    with tempfile.TemporaryDirectory() as folder:
        read_dir, read_clip = make_tiny_checkpoint(Path(folder) / "read", seed=0)
        pixel_dir, pixel_clip = make_tiny_pixellm(Path(folder) / "pixellm", seed=0)
        read = build_detector("read", DetectorConfig(checkpoint=read_dir, clip=read_clip))
        pixellm = build_detector("pixellm", DetectorConfig(checkpoint=pixel_dir, clip=pixel_clip))
        read_s, read_parts = _time(read, sample, args.repeats)
        pixel_s, pixel_parts = _time(pixellm, sample, args.repeats)
    print(f"threads {torch.get_num_threads()}, 512×512 image, median of {args.repeats}")
    print(f"read    (tiny, SAM ViT encoder 1024²): {read_s * 1000:8.1f} ms/image  {read_parts}")
    print(f"pixellm (tiny, CLIP 448², no SAM enc.): {pixel_s * 1000:8.1f} ms/image  {pixel_parts}")
    print(f"ratio read / pixellm: {read_s / pixel_s:.2f}")


if __name__ == "__main__":
    main()
