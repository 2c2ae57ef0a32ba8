"""Group commit: concurrent one-image tasks share one SQL statement per step.

A worker process runs up to batch-size tasks at once (Celery's thread pool, or the embedded executor's). Each
needs the same few statements — claim its row, commit its result, check whether its category is complete — and
on a busy process those statements cost more than the work between them. :class:`GroupCommit` runs a step for
everyone waiting on it at once: the first thread to arrive becomes the leader and executes the step for every
request queued by then; threads that arrive while a statement is in flight queue up and the next leader takes
them all. Nothing waits on a timer, so a lone task pays no latency, and a busy process gets batches as large as
its concurrency.

An error raised by the step is raised in every thread whose request was in that call: the statements run in one
transaction, so they all failed together and each caller's own retry logic applies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot:
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Runs ``execute(items) -> results`` (one result per item, same order) for concurrent callers."""

    def __init__(self, execute: Callable[[list[T]], Sequence[R]], *, max_items: int = 256) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1; got {max_items}")
        self._execute = execute
        self.max_items = max_items
        self._pending: list[_Slot] = []
        self._busy = False
        self._condition = threading.Condition()
        self.calls = 0  # statements executed (tests and benchmarks read these)
        self.items = 0

    def __call__(self, item: T) -> R:
        slot = _Slot(item)
        with self._condition:
            self._pending.append(slot)
            while self._busy and not slot.done:
                self._condition.wait()
            if slot.done:
                return self._result(slot)
            self._busy = True  # this thread leads until its own request is answered
        try:
            while not slot.done:
                with self._condition:
                    batch = self._pending[: self.max_items]
                    del self._pending[: self.max_items]
                self._run(batch)
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()
        return self._result(slot)

    def _run(self, batch: list[_Slot]) -> None:
        try:
            results = list(self._execute([slot.item for slot in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"group step returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of this call
            for slot in batch:
                slot.error, slot.done = exc, True
        else:
            for slot, result in zip(batch, results, strict=True):
                slot.result, slot.done = result, True
        finally:
            self.calls += 1
            self.items += len(batch)
        with self._condition:
            self._condition.notify_all()

    @staticmethod
    def _result(slot: _Slot) -> Any:
        if slot.error is not None:
            raise slot.error
        return slot.result


def first_per_key(execute: Callable[[list[Hashable]], Sequence[R]]) -> Callable[[list[Hashable]], list[Any]]:
    """Adapt a step over distinct keys for a :class:`GroupCommit` whose callers may repeat a key: the step sees
    each key once; the first caller of a key gets its result, later callers of the same key in that call get
    ``None`` (used for compare-and-set steps, where only one caller may win)."""

    def run(keys: list[Hashable]) -> list[Any]:
        distinct = list(dict.fromkeys(keys))
        by_key = dict(zip(distinct, execute(distinct), strict=True))
        seen: set[Hashable] = set()
        out: list[Any] = []
        for key in keys:
            out.append(None if key in seen else by_key[key])
            seen.add(key)
        return out

    return run
