"""In-process batcher: many concurrently running one-image tasks share one batched forward.

Each task thread announces itself with :meth:`Batcher.reservation` while it loads and prepares its image,
then hands the prepared item to :meth:`Batcher.submit` and waits on the returned future. One background
thread forms batches: it takes what is queued, and waits (at most ``max_wait_s``) for more only while other
tasks are still preparing items, so a batch is as full as the work in flight allows without idling the
device for nothing. If a whole batch fails, its items are retried one by one, so a single bad input fails
only its own task (DESIGN.md section 3); a SetupError (broken weights, no device) fails the whole batch at once,
since every item would fail alike.

Double buffering: a process runs :func:`task_threads` = batch size × pipeline depth task threads. With depth 2,
while one batch runs on the device its tasks wait on their futures and the other half of the threads prepare and
queue the next batch, so when the device is free a full batch is waiting. With depth 1 the same threads that wait
for a batch must also prepare the next one, and the batcher takes whatever has arrived once no reservation is open
(bench/batch_fill.py: batches of 32 split into about 17 and 15).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from workers.detectors.base import SetupError

log = logging.getLogger(__name__)


def task_threads(batch_size: int, pipeline_depth: int) -> int:
    """Task threads of one process (the Celery worker's concurrency, the embedded runner's pool): enough for
    ``pipeline_depth`` batches in flight; the batcher still caps every batch at ``batch_size``."""
    if batch_size < 1 or pipeline_depth < 1:
        raise ValueError(f"batch size and pipeline depth must be at least 1; got {batch_size}, {pipeline_depth}")
    return batch_size * pipeline_depth


class Batcher:
    """Collects items from many threads into batches for one ``run_batch`` callable."""

    def __init__(
        self, run_batch: Callable[[Sequence[Any]], list[Any]], *, max_batch: int, max_wait_s: float = 0.05,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._items: deque[tuple[Any, Future]] = deque()
        self._preparing = 0  # tasks inside a reservation that have not submitted yet
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def reservation(self) -> Iterator[None]:
        """Mark a task that will submit an item soon (while it loads and prepares its image)."""
        with self._condition:
            self._preparing += 1
        try:
            yield
        finally:
            with self._condition:
                self._preparing -= 1
                self._condition.notify_all()

    def submit(self, item: Any) -> Future:
        """Queue one item; the future resolves to its result (or raises its error)."""
        future: Future = Future()
        with self._condition:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="readar-batcher", daemon=True)
                self._thread.start()
            self._items.append((item, future))
            self._condition.notify_all()
        return future

    def __call__(self, item: Any) -> Any:
        """Submit and wait: the one-image view a task uses."""
        return self.submit(item).result()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None

    def _next_batch(self) -> list[tuple[Any, Future]] | None:
        with self._condition:
            while not self._items:
                if self._closed:
                    return None
                self._condition.wait()
            deadline = time.monotonic() + self.max_wait_s
            # More is worth waiting for only while some task is still preparing an item.
            while len(self._items) < self.max_batch and self._preparing > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            count = min(self.max_batch, len(self._items))
            return [self._items.popleft() for _ in range(count)]

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch: list[tuple[Any, Future]]) -> None:
        items = [item for item, _ in batch]
        for _, future in batch:  # the soft limit of a waiting task counts from here (workers/task.py)
            if not future.running():  # already running when retried alone after its batch failed
                future.set_running_or_notify_cancel()
        started = time.perf_counter()
        try:
            results = self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"detector returned {len(results)} results for a batch of {len(items)}")
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting tasks
            if len(batch) == 1 or isinstance(exc, SetupError):
                # A broken setup (weights, device) fails every image alike: retrying them one by one would
                # only repeat the failure, and its long message, once per image.
                for _, future in batch:
                    future.set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying its items one by one", len(batch), exc)
            for entry in batch:
                self._execute([entry])
            return
        if self._on_batch is not None:
            self._on_batch(len(items), time.perf_counter() - started)
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
