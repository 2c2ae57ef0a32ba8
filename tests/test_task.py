"""The per-image task function under duplicate delivery, time limits and batching (real PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scheduler.planner import RunRequest, plan_run
from storage.database import Database
from storage.logits import StoredLogits
from storage.objects import ObjectStore
from storage.repository import Repository
from workers.batcher import Batcher
from workers.detectors.base import Detection, Detector, DetectorConfig, ImageSample
from workers.task import WorkerContext, await_detection, process_image


class SlowConstant(Detector):
    """A detector whose forward takes ``delay_s`` and returns ``value`` everywhere."""

    name = "slow-constant"

    def __init__(self, delay_s: float, value: float) -> None:
        self.delay_s = delay_s
        self.value = value
        self.batch_sizes: list[int] = []

    def prepare(self, sample: ImageSample) -> Any:
        return sample.size

    def detect(self, batch: Sequence[Any]) -> list[Detection]:
        self.batch_sizes.append(len(batch))
        time.sleep(self.delay_s)
        return [Detection(StoredLogits(np.full((1, h, w), self.value, np.float16), (h, w)), {"v": self.value})
                for h, w in batch]


def _setup(url: str, root: Path, tmp_path: Path) -> tuple[Repository, ObjectStore, int]:
    database = Database(url)
    database.migrate()
    repo = Repository(database)
    request = RunRequest(mvtec_root=root, detector="baseline", detector_config=DetectorConfig().public(),
                         classes=("brick",), run_name="task-test")
    run, _ = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False, settings_public={})
    return repo, ObjectStore(str(tmp_path / "objects")), run.id


def _context(repo: Repository, store: ObjectStore, detector: Detector, owner: str, **kwargs: Any) -> WorkerContext:
    return WorkerContext(repo=repo, store=store, detector=detector, batcher=Batcher(detector.detect, max_batch=4),
                         owner=owner, **kwargs)


@pytest.mark.services
def test_duplicate_delivery_one_result_and_the_stale_writer_is_fenced(
    postgres_url: str, sample_root: Path, tmp_path: Path,
) -> None:
    repo, store, run_id = _setup(postgres_url, sample_root, tmp_path)
    image_id = repo.pending_image_ids(run_id)[0]
    slow = _context(repo, store, SlowConstant(2.5, 1.0), "worker-a", lease_seconds=1)
    fast = _context(repo, store, SlowConstant(0.0, 2.0), "worker-b", lease_seconds=60)
    outcomes: dict[str, str] = {}
    first = threading.Thread(target=lambda: outcomes.__setitem__("a", process_image(slow, run_id, image_id)))
    first.start()
    time.sleep(0.3)
    assert process_image(fast, run_id, image_id) == "held"  # a live lease: the duplicate waits
    time.sleep(1.2)  # worker A's lease expires while its forward is still running
    outcomes["b"] = process_image(fast, run_id, image_id)
    first.join()
    assert outcomes == {"a": "stale", "b": "done"}
    row = repo.image(image_id)
    assert (row.status, row.worker, row.attempts, row.fence) == ("done", "worker-b", 2, 2)
    assert row.diagnostics == {"v": 2.0}  # worker B's result, not the stale one
    assert process_image(fast, run_id, image_id) == "not-claimed"  # a third delivery changes nothing
    for ctx in (slow, fast):
        ctx.batcher.close()


def test_soft_time_limit_frees_the_task_and_retries(sqlite_url: str, sample_root: Path, tmp_path: Path) -> None:
    repo, store, run_id = _setup(sqlite_url, sample_root, tmp_path)
    image_id = repo.pending_image_ids(run_id)[0]
    ctx = _context(repo, store, SlowConstant(1.5, 0.0), "w", detect_timeout_s=0.3, max_attempts=3)
    assert process_image(ctx, run_id, image_id) == "retry"
    row = repo.image(image_id)
    assert row.status == "queued" and "soft time limit" in row.error
    ctx.batcher.close()


def test_concurrent_tasks_share_batched_forwards(sqlite_url: str, sample_root: Path, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    repo, store, run_id = _setup(sqlite_url, sample_root, tmp_path)
    detector = SlowConstant(0.2, 0.0)
    ctx = _context(repo, store, detector, "w")
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda i: process_image(ctx, run_id, i), repo.pending_image_ids(run_id)))
    ctx.batcher.close()
    assert outcomes == ["done"] * 12
    assert sum(detector.batch_sizes) == 12 and max(detector.batch_sizes) > 1


@pytest.mark.services
def test_a_claim_that_raced_a_give_back_keeps_the_message(postgres_url: str, sample_root: Path,
                                                          tmp_path: Path) -> None:
    """The claim saw the row running (another attempt's), that attempt then failed and gave the row back:
    the row is queued and this message may be its only one, so it must be retried, not dropped."""
    repo, store, run_id = _setup(postgres_url, sample_root, tmp_path)
    image_id = repo.pending_image_ids(run_id)[0]
    ctx = _context(repo, store, SlowConstant(0.0, 1.0), "worker-c")
    ctx.claim = lambda _image_id: None  # what the claim statement returned while the row was still running
    assert repo.image(image_id).status == "queued"  # given back since
    assert process_image(ctx, run_id, image_id) == "held"  # the Celery task retries it after a pause
    ctx.batcher.close()


def _sleeping_batcher(delay_s: float) -> Batcher:
    def run(items: Sequence[Any]) -> list[Any]:
        time.sleep(delay_s)
        return list(items)

    return Batcher(run, max_batch=1, max_wait_s=0.0)


def test_the_soft_limit_counts_from_when_the_batch_starts() -> None:
    """Queued behind a batch that takes most of the limit, an item still gets the whole limit for its own."""
    batcher = _sleeping_batcher(0.4)
    try:
        ahead, mine = batcher.submit("ahead"), batcher.submit("mine")
        assert await_detection(mine, 0.6, depth=2) == "mine"  # 0.8 s after submitting: over 0.6 from submit
        assert ahead.result() == "ahead"
    finally:
        batcher.close()


def test_a_queued_item_gives_up_after_the_batches_ahead_had_their_limit() -> None:
    batcher = _sleeping_batcher(1.0)
    try:
        batcher.submit("ahead")
        mine = batcher.submit("mine")
        with pytest.raises(FutureTimeoutError):
            await_detection(mine, 0.2, depth=2)  # the batch ahead outlasts its 0.2 s
        assert not mine.running()
    finally:
        batcher.close()
