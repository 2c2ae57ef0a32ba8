"""Batch fill: how full the real ``Batcher``'s batches are under steady load, with task threads = batch size
(pipeline depth 1, the old worker) and with twice that (depth 2, double buffering, the default).

Each task thread loops like ``workers/task.py process_image`` does across deliveries: the time between two tasks
(store the result, commit, take the next message, claim its row) outside any reservation, then a reservation
around loading and preparing the image (a simulated time with jitter), submit, wait for the result. The batched
forward is a sleep of a per-batch plus a per-image cost (default 0.6 s for a batch of 32, like READ on one GPU).
Only the thread count differs between the two settings; it comes from ``task_threads``, the function the Celery
worker (``--concurrency``) and the embedded runner (its thread pool) size themselves with.

    python bench/batch_fill.py            # 30 s per configuration, batch sizes 8, 16, 32
    python bench/batch_fill.py --quick    # 5 s per configuration

Prints, per configuration, a histogram of batch sizes, the mean fill (mean batch / batch size) and images/s,
then the images/s ratio of depth 2 over depth 1 per batch size. Fill is what to compare: it does not depend on
this machine's speed; images/s follows from the simulated costs.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.batcher import Batcher, task_threads  # noqa: E402


@dataclass(frozen=True)
class Costs:
    """Simulated times in seconds; ranges are drawn uniformly per image."""

    batch_s: float = 0.1  # fixed cost of one forward
    image_s: float = 0.5 / 32  # per image in a forward: 0.6 s for a batch of 32
    prepare_s: tuple[float, float] = (0.020, 0.040)  # load + prepare, inside the reservation
    between_s: tuple[float, float] = (0.010, 0.090)  # store, commit, next delivery, claim: outside it


@dataclass
class FillResult:
    """The batches one configuration formed inside the measuring window (start-up and drain left out)."""

    batch_size: int
    depth: int
    threads: int
    seconds: float
    sizes: list[int] = field(default_factory=list)  # batches that started inside the window
    images_done: int = 0  # images of batches that finished inside the window
    largest: int = 0  # largest batch of the whole run, start-up and drain included

    @property
    def mean_fill(self) -> float:
        """Mean batch / batch size: 1.0 means every forward was full."""
        return sum(self.sizes) / len(self.sizes) / self.batch_size if self.sizes else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images_done / self.seconds

    def histogram(self) -> str:
        counts = Counter(self.sizes)
        return " ".join(f"{size}:{counts[size]}" for size in sorted(counts, reverse=True))


class _Forward:
    """The simulated batched forward: records every batch (start, end, size) for the window to pick from."""

    def __init__(self, costs: Costs) -> None:
        self.costs = costs
        self.batches: list[tuple[float, float, int]] = []

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        started = time.monotonic()
        time.sleep(self.costs.batch_s + self.costs.image_s * len(items))
        self.batches.append((started, time.monotonic(), len(items)))
        return list(items)

    def result(self, template: FillResult, window: tuple[float, float]) -> FillResult:
        begin, end = window
        template.sizes = [size for started, _, size in self.batches if begin <= started < end]
        template.images_done = sum(size for _, finished, size in self.batches if begin <= finished < end)
        template.largest = max((size for _, _, size in self.batches), default=0)
        return template


def _task_loop(batcher: Batcher, costs: Costs, stop: threading.Event, rng: random.Random) -> None:
    """One task thread: deliveries one after another, each shaped like process_image."""
    while not stop.is_set():
        time.sleep(rng.uniform(*costs.between_s))
        with batcher.reservation():
            time.sleep(rng.uniform(*costs.prepare_s))
            future = batcher.submit(None)
        future.result()


def warmup_s(batch_size: int, costs: Costs) -> float:
    """Start-up left out of the window: every thread starts at once, so the first batches are not steady load."""
    return 2 * (costs.batch_s + costs.image_s * batch_size) + costs.between_s[1] + costs.prepare_s[1]


def simulate(batch_size: int, depth: int, *, seconds: float, costs: Costs = Costs(), seed: int = 0) -> FillResult:
    """Drive a real Batcher with ``task_threads(batch_size, depth)`` threads; measure ``seconds`` of steady load."""
    threads = task_threads(batch_size, depth)
    forward = _Forward(costs)
    batcher = Batcher(forward, max_batch=batch_size)
    stop = threading.Event()
    workers = [threading.Thread(target=_task_loop, args=(batcher, costs, stop, random.Random(seed * 1000 + i)),
                                daemon=True) for i in range(threads)]
    begin = time.monotonic() + warmup_s(batch_size, costs)
    for worker in workers:
        worker.start()
    time.sleep(max(0.0, begin - time.monotonic()) + seconds)
    stop.set()
    for worker in workers:
        worker.join()
    batcher.close()
    return forward.result(FillResult(batch_size, depth, threads, seconds), (begin, begin + seconds))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s per configuration instead of 30 s")
    parser.add_argument("--seconds", type=float, help="measuring window per configuration")
    parser.add_argument("--batch-sizes", default="8,16,32")
    args = parser.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    costs = Costs()
    print(f"forward {costs.batch_s:.3f} s + {costs.image_s * 1e3:.1f} ms/image; prepare {costs.prepare_s[0] * 1e3:.0f}"
          f"–{costs.prepare_s[1] * 1e3:.0f} ms; between tasks {costs.between_s[0] * 1e3:.0f}–"
          f"{costs.between_s[1] * 1e3:.0f} ms; {seconds:.0f} s per configuration")
    print(f"{'batch':>5} {'depth':>5} {'threads':>7} {'batches':>7} {'mean':>6} {'fill':>5} {'img/s':>6}  sizes:count")
    ratios = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        results = {}
        for depth in (1, 2):
            result = simulate(batch_size, depth, seconds=seconds, costs=costs)
            results[depth] = result
            if result.largest > batch_size:
                raise SystemExit(f"a batch of {result.largest} exceeded the cap of {batch_size}")
            mean = result.mean_fill * batch_size
            print(f"{batch_size:>5} {depth:>5} {result.threads:>7} {len(result.sizes):>7} {mean:>6.1f} "
                  f"{result.mean_fill:>5.2f} {result.images_per_s:>6.1f}  {result.histogram()}", flush=True)
        old, new = results[1].images_per_s, results[2].images_per_s
        ratios.append(f"batch {batch_size}: {new / old:.2f}×" if old else f"batch {batch_size}: n/a")
    print("images/s, depth 2 / depth 1: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
