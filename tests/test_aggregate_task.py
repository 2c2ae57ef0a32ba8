"""A second delivery of a finished aggregation task does nothing (it used to recompute the category)."""

from __future__ import annotations

from pathlib import Path

from storage.repository import PlannedImage
from storage.settings import Settings
from workers.celery_app import _still_aggregating
from workers.runtime import WorkerRuntime


def test_only_a_category_in_aggregation_is_aggregated_by_a_task(tmp_path: Path) -> None:
    runtime = WorkerRuntime(Settings(work_dir=tmp_path))
    repo = runtime.repo
    run_id = repo.create_run(name="r", detector="noop", dataset_root="/d", config={}, code_version="t",
                             model_fingerprint=None, identity_keys=()).id
    repo.add_images(run_id, [PlannedImage("c", "good", 0, "c/test/good/0.png", None, 8, 8)])
    claim = repo.claim(repo.pending_image_ids(run_id)[0], "w", lease_seconds=60)
    repo.complete(claim, object_key="k", image_score=0.0, diagnostics={}, timings={}, device="cpu")
    assert not _still_aggregating(runtime, run_id, "c")  # open: no task was sent for it
    assert repo.try_start_aggregation(run_id, "c")
    assert _still_aggregating(runtime, run_id, "c")  # the task the compare-and-set winner sent
    repo.finish_aggregation(run_id, "c", rows=[], state_key="s", num_used=1, num_skipped=0, num_failed=0)
    assert not _still_aggregating(runtime, run_id, "c")  # done: a redelivered copy is skipped
    runtime.close()
