"""In-process batcher: many concurrently running one-image tasks share one batched forward.

Each task thread hands its prepared item to :meth:`Batcher.submit` and waits on the returned future. One
background thread takes up to ``max_batch`` items (waiting at most ``max_wait_s`` after the first for more)
and runs ``detector.detect`` on them. If a whole batch fails, its items are retried one by one, so a single
bad input fails only its own task (DESIGN.md section 3).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class Batcher:
    """Collects items from many threads into batches for one ``run_batch`` callable."""

    def __init__(
        self, run_batch: Callable[[Sequence[Any]], list[Any]], *, max_batch: int, max_wait_s: float = 0.02,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1; got {max_batch}")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, item: Any) -> Future:
        """Queue one item; the future resolves to its result (or raises its error)."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        self._ensure_thread()
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, item: Any) -> Any:
        """Submit and wait: the one-image view a task uses."""
        return self.submit(item).result()

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="readar-batcher", daemon=True)
                self._thread.start()

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._execute(batch)
            if stop:
                return

    def _execute(self, batch: list[tuple[Any, Future]]) -> None:
        items = [item for item, _ in batch]
        started = time.perf_counter()
        try:
            results = self._run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"detector returned {len(results)} results for a batch of {len(items)}")
        except BaseException as exc:  # noqa: BLE001 - delivered to the waiting tasks
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("batch of %d failed (%s); retrying its items one by one", len(batch), exc)
            for entry in batch:
                self._execute([entry])
            return
        if self._on_batch is not None:
            self._on_batch(len(items), time.perf_counter() - started)
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
