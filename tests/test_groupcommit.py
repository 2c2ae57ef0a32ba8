"""Group commit: concurrent callers share one call of the step; each gets its own result or error."""

from __future__ import annotations

import threading
import time

import pytest

from workers.groupcommit import GroupCommit, first_per_key


def _call_concurrently(group: GroupCommit, items: list, *, threads_start_together: bool = True) -> list:
    results: list = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def run(position: int) -> None:
        if threads_start_together:
            barrier.wait()
        try:
            results[position] = group(items[position])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[position] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_callers_share_calls_and_get_their_own_results() -> None:
    batches: list[list[int]] = []

    def step(items: list[int]) -> list[int]:
        batches.append(items)
        time.sleep(0.02)  # a statement in flight: later arrivals queue up behind it
        return [item * 10 for item in items]

    group = GroupCommit(step)
    results = _call_concurrently(group, list(range(16)))
    assert results == [i * 10 for i in range(16)]
    assert sorted(i for batch in batches for i in batch) == list(range(16))  # each request ran exactly once
    assert group.calls == len(batches) < 16 and group.items == 16


def test_a_lone_caller_is_served_at_once() -> None:
    group = GroupCommit(lambda items: [len(items)] * len(items))
    started = time.perf_counter()
    assert group("x") == 1
    assert time.perf_counter() - started < 0.5 and group.calls == 1


def test_an_error_reaches_every_caller_of_that_call_and_the_next_call_works() -> None:
    fail = threading.Event()
    fail.set()

    def step(items: list[int]) -> list[int]:
        time.sleep(0.02)
        if fail.is_set():
            fail.clear()
            raise RuntimeError("database went away")
        return items

    group = GroupCommit(step)
    results = _call_concurrently(group, list(range(6)))
    errors = [r for r in results if isinstance(r, RuntimeError)]
    assert errors and all(str(e) == "database went away" for e in errors)
    assert [r for r in results if not isinstance(r, Exception)] == [i for i, r in enumerate(results)
                                                                    if not isinstance(r, Exception)]
    assert group(41) == 41


def test_a_step_returning_the_wrong_count_is_an_error() -> None:
    group = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        group(1)


def test_max_items_splits_large_groups() -> None:
    sizes: list[int] = []

    def step(items: list[int]) -> list[int]:
        sizes.append(len(items))
        time.sleep(0.02)
        return items

    group = GroupCommit(step, max_items=3)
    assert _call_concurrently(group, list(range(10))) == list(range(10))
    assert max(sizes) <= 3 and sum(sizes) == 10
    with pytest.raises(ValueError, match="at least 1"):
        GroupCommit(step, max_items=0)


def test_first_per_key_gives_a_repeated_key_one_winner() -> None:
    seen: list[list[str]] = []

    def compare_and_set(keys: list[str]) -> list[bool]:
        seen.append(keys)
        return [True] * len(keys)

    step = first_per_key(compare_and_set)
    assert step(["a", "b", "a", "a", "c"]) == [True, True, None, None, True]
    assert seen == [["a", "b", "c"]]
