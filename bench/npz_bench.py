"""Logit objects: encode and decode time per object, hand-written ``.npz`` code against numpy's, on READ sizes.

A READ image stores ``StoredLogits`` (storage/logits.py): float16 maps (1, 256, 256) of SAM's low-resolution
mask logits plus four small int64 arrays (format_version, original_size, input_size, frame_size). The worker
encodes one object per image; the aggregator decodes it once per image, then resizes it to full resolution and
bins it. Each saving is set against READ's per-image GPU cost (25–70 ms), the cost a worker pays per image
anyway.

    python bench/npz_bench.py                 # READ-sized objects, plus the context rows
    python bench/npz_bench.py --repeat 9      # more repeats on a noisy machine

The hand-written rows need ``storage/npz.py`` (``write_npz`` / ``read_npz``); without it they are left out and
only numpy's figures are printed. Figures only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage.logits import StoredLogits, decode_logits, encode_logits, full_resolution_logits  # noqa: E402

try:
    from storage.npz import read_npz, write_npz  # type: ignore[import-not-found]
except ImportError:  # removed after the measurement of 2026-12-02 (bench/RESULTS.md)
    read_npz = write_npz = None

GPU_MS_PER_IMAGE = (25.0, 70.0)  # READ on a GPU, per image (the range the project plans with; not measured here)


def per_call_us(function: Callable[[], Any], repeat: int, budget_s: float = 0.2) -> float:
    """CPU time of one call in µs: the fastest of ``repeat`` runs (each the mean over about ``budget_s``).

    This process's CPU time (``time.process_time``), not wall time, and the fastest run, not the median: on a
    small machine shared with other work, wall-clock medians moved by 50 % from one run to the next, while other
    processes only ever add to a run's time. For torch, CPU time sums its threads."""
    timer = timeit.Timer(function, timer=time.process_time)
    number, elapsed = timer.autorange()
    number = max(1, int(number * budget_s / max(elapsed, 1e-9)))
    runs = timer.repeat(repeat=repeat, number=number)
    return min(runs) / number * 1e6


def read_logits(seed: int, maps: int = 1) -> StoredLogits:
    """A READ-like object: a smooth low-frequency field plus noise (so compression sees realistic data) on a
    1024×1024 MVTec image (input_size equal to the frame)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:256] / 256.0
    field = 6 * np.sin(3 * x + rng.uniform(0, 6)) * np.cos(2 * y + rng.uniform(0, 6)) - 4
    stack = np.stack([field + rng.normal(0, 0.5, field.shape) for _ in range(maps)]) if maps else np.zeros((0, 256, 256))
    return StoredLogits(stack.astype(np.float16), original_size=(1024, 1024), input_size=(1024, 1024))


def arrays_of(stored: StoredLogits) -> dict[str, np.ndarray]:
    """The arrays a logit object holds, named as storage/logits.py names them."""
    return {
        "format_version": np.array(1, dtype=np.int64),
        "maps": stored.maps,
        "original_size": np.array(stored.original_size, dtype=np.int64),
        "input_size": np.array(stored.input_size if stored.input_size else (-1, -1), dtype=np.int64),
        "frame_size": np.array(stored.frame_size, dtype=np.int64),
    }


def numpy_encode(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def numpy_decode(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def measure_payload(label: str, stored: StoredLogits, repeat: int) -> dict[str, float]:
    arrays = arrays_of(stored)
    plain, packed = numpy_encode(arrays), numpy_encode(arrays, compressed=True)
    rows: dict[str, float] = {
        "numpy encode (np.savez)": per_call_us(lambda: numpy_encode(arrays), repeat),
        "numpy encode (np.savez_compressed)": per_call_us(lambda: numpy_encode(arrays, True), repeat),
        "numpy decode (np.load) of np.savez bytes": per_call_us(lambda: numpy_decode(plain), repeat),
        "numpy decode (np.load) of np.savez_compressed bytes": per_call_us(lambda: numpy_decode(packed), repeat),
    }
    sizes = {"np.savez": len(plain), "np.savez_compressed": len(packed)}
    if write_npz is not None and read_npz is not None:
        lean = write_npz(arrays)
        assert read_npz(lean) is not None, "the hand-written reader must take its own writer's bytes"
        rows["hand-written encode (write_npz)"] = per_call_us(lambda: write_npz(arrays), repeat)
        rows["hand-written decode (read_npz)"] = per_call_us(lambda: read_npz(lean), repeat)
        rows["numpy decode (np.load) of write_npz bytes"] = per_call_us(lambda: numpy_decode(lean), repeat)
        sizes["write_npz"] = len(lean)
    print(f"\n{label}: maps {stored.maps.shape} {stored.maps.dtype}; object bytes "
          + ", ".join(f"{name} {size:,}" for name, size in sizes.items()))
    for name, value in rows.items():
        print(f"  {name:<54} {value:9.1f} µs CPU")
    if "hand-written encode (write_npz)" in rows:
        encode_gain = rows["numpy encode (np.savez)"] - rows["hand-written encode (write_npz)"]
        decode_gain = rows["numpy decode (np.load) of np.savez bytes"] - rows["hand-written decode (read_npz)"]
        total = encode_gain + decode_gain
        print(f"  encode: numpy / hand-written = {rows['numpy encode (np.savez)'] / rows['hand-written encode (write_npz)']:.2f}×"
              f", saving {encode_gain:.1f} µs")
        print(f"  decode: numpy / hand-written = "
              f"{rows['numpy decode (np.load) of np.savez bytes'] / rows['hand-written decode (read_npz)']:.2f}×"
              f", saving {decode_gain:.1f} µs")
        shares = ", ".join(f"{100 * total / (ms * 1000):.2f} % of {ms:.0f} ms" for ms in GPU_MS_PER_IMAGE)
        print(f"  encode + decode saving per image: {total:.1f} µs = {shares} of READ's GPU time per image")
        rows["saving per image (encode + decode)"] = total
    return rows


def measure_context(stored: StoredLogits, repeat: int) -> None:
    """What else a READ image costs around the object: the project's own encode/decode (as storage/logits.py is
    now, with its checks) and the aggregator's resize to full resolution."""
    from metrics.scopes import ScopedAccumulator

    data = encode_logits(stored)
    full = full_resolution_logits(stored)
    y, x = np.ogrid[0:1024, 0:1024]
    mask = (y - 400) ** 2 / 90**2 + (x - 600) ** 2 / 60**2 <= 1  # one elliptical defect
    accumulator = ScopedAccumulator()
    rows = {
        "encode_logits (storage/logits.py as it is now)": per_call_us(lambda: encode_logits(stored), repeat),
        "decode_logits (storage/logits.py as it is now)": per_call_us(lambda: decode_logits(data), repeat),
        "full_resolution_logits (aggregator, 256² → 1024²)": per_call_us(lambda: full_resolution_logits(stored), repeat),
        "ScopedAccumulator.add (aggregator, defect image)": per_call_us(
            lambda: accumulator.add("bottle", "broken", full, mask), repeat),
    }
    print("\ncontext, the same READ object (1024×1024 image):")
    for name, value in rows.items():
        print(f"  {name:<54} {value:9.1f} µs CPU")
    aggregation = sum(value for name, value in rows.items() if not name.startswith("encode"))
    print(f"  aggregation per image (decode + resize + add)          {aggregation:9.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per figure (the fastest is printed)")
    args = parser.parse_args()
    import os

    import torch

    print(f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.machine()}")
    if write_npz is None:
        print("storage/npz.py is not there: hand-written rows left out (see bench/RESULTS.md for the last figures)")
    measure_payload("READ, one [SEG] mask", read_logits(0), args.repeat)
    measure_payload("READ, three [SEG] masks", read_logits(1, maps=3), args.repeat)
    measure_payload("READ, no mask", read_logits(2, maps=0), args.repeat)
    measure_context(read_logits(0), args.repeat)


if __name__ == "__main__":
    main()
