"""The worker's image score: the full-resolution resize (what it did) against the exact shortcut
(``storage.logits.max_full_resolution_logit``), per image on SAM-like low-resolution maps.

A map is a smooth background near −10 with one Gaussian bump of random centre and width (what SAM returns for
an image with one region), at the MVTec sizes. Each pair is checked equal before it is timed; the first use of
a geometry (its arithmetic check against torch) is shown on its own.

    python bench/image_score_bench.py            # 20 images per size and map count
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.logits import StoredLogits, full_resolution_logits, max_full_resolution_logit  # noqa: E402
from workers.read.preprocess import sam_input_size  # noqa: E402

SIZES = ((1024, 1024), (1000, 1000), (900, 900), (840, 840), (800, 800), (700, 700), (1024, 768))


def sam_like_map(rng: np.random.Generator) -> np.ndarray:
    background = gaussian_filter(rng.standard_normal((256, 256)), 8)
    background = background / background.std() * 3 - 10
    rows, cols = np.mgrid[:256, :256]
    centre_row, centre_col = rng.integers(0, 256, 2)
    radius = rng.uniform(3, 30)
    bump = 25 * np.exp(-((rows - centre_row) ** 2 + (cols - centre_col) ** 2) / (2 * radius * radius))
    return (background + bump).astype(np.float16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| size | maps | full resize ms | shortcut ms | ratio | first use of the size ms |")
    print("|---|---|---|---|---|---|")
    for size in SIZES:
        input_size = sam_input_size(size)
        started = time.perf_counter()
        max_full_resolution_logit(StoredLogits(sam_like_map(rng), size, input_size))
        first_use = (time.perf_counter() - started) * 1e3
        for count in (1, 3):
            full, short = [], []
            for _ in range(args.images):
                stored = StoredLogits(np.stack([sam_like_map(rng) for _ in range(count)]), size, input_size)
                t0 = time.perf_counter()
                expected = float(full_resolution_logits(stored).max())
                t1 = time.perf_counter()
                found = max_full_resolution_logit(stored)
                t2 = time.perf_counter()
                if found != expected:
                    raise SystemExit(f"{size} × {count}: shortcut {found!r} != full {expected!r}")
                full.append((t1 - t0) * 1e3)
                short.append((t2 - t1) * 1e3)
            old, new = statistics.median(full), statistics.median(short)
            print(f"| {size[0]}×{size[1]} | {count} | {old:.1f} | {new:.2f} | {old / new:.0f}× | {first_use:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
