"""The per-category aggregator: stored logits + ground truth of one category → metric rows in SQL.

It streams the category's finished images through the metrics engine (constant memory), stores the
category's mergeable metric state in the object store, and — once every category of the run is done —
merges those states into the ``overall`` row and averages the category rows into the ``mean`` row.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from storage.logits import LogitFormatError
from storage.models import CategoryStatus, ImageStatus, RunStatus
from storage.objects import ObjectMissingError, ObjectStore, category_state_key
from storage.repository import Repository

log = logging.getLogger(__name__)


class AggregationError(RuntimeError):
    """A category could not be aggregated; the message names the category and the cause."""


class LostResultsError(AggregationError):
    """Some done images of the category have no readable logit object (missing, truncated or failing its
    checksum: e.g. a power failure before the local store reached the disk). Those images are queued again and
    the category aggregates once they are done; ``image_ids`` says which."""

    def __init__(self, category: str, image_ids: list[int], paths: list[str]) -> None:
        self.category = category
        self.image_ids = image_ids
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        super().__init__(
            f"category {category!r}: the stored results of {len(image_ids)} image(s) are missing or damaged "
            f"({shown}); they are queued to be computed again and the category aggregates once they finish"
        )


def aggregate_category(
    repo: Repository, store: ObjectStore, run_id: int, category: str,
    *, progress: Callable[[int, int], None] | None = None,
    path_map: Callable[[str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Compute and store the metric rows of one category (category scope + its defect scopes), then finish the
    run when this was its last category (:func:`finish_run_if_complete`).

    path_map: where this machine finds the run's dataset root (a worker's READAR_PATH_MAP); None reads it as
    stored."""
    from metrics.errors import GroundTruthError, MetricInputError
    from metrics.results import load_result
    from metrics.scopes import ScopedAccumulator, set_image_counts

    run = repo.get_run_by_id(run_id)
    dataset_root = str(path_map(run.dataset_root)) if path_map else run.dataset_root
    rows = repo.images(run_id, category=category)
    done = [r for r in rows if r.status == ImageStatus.DONE]
    # Per (category, defect type): each metric row reports the skips and failures of its own scope.
    skipped = Counter((r.category, r.defect) for r in rows if r.status == ImageStatus.SKIPPED)
    failed = Counter((r.category, r.defect) for r in rows if r.status == ImageStatus.FAILED)
    accumulator = ScopedAccumulator()
    used = 0
    lost = []
    for position, row in enumerate(done, start=1):
        try:
            result = load_result(store, dataset_root, row)
            accumulator.add(category, row.defect, result.logits, result.mask)
        except (ObjectMissingError, LogitFormatError) as exc:  # an unreachable store still raises: retried
            log.warning("result of %s is lost: %s", row.image_path, exc)
            lost.append(row)
            continue
        except (GroundTruthError, MetricInputError) as exc:
            log.warning("skipping %s in the metrics: %s", row.image_path, exc)
            skipped[(row.category, row.defect)] += 1
            continue
        used += 1
        if progress is not None:
            progress(position, len(done))
    if lost:
        lost_ids = [r.id for r in lost]
        repo.requeue_lost_results(run_id, lost_ids, "result lost (logit object missing or damaged); computing again")
        repo.reopen_aggregation(run_id, category)
        raise LostResultsError(category, lost_ids, [r.image_path for r in lost])
    metric_rows = accumulator.rows(include_summary=False)
    set_image_counts(metric_rows, "num_skipped", skipped)
    set_image_counts(metric_rows, "num_failed", failed)
    category_record = next(c for c in repo.categories(run_id) if c.category == category)
    key = category_state_key(run_id, category_record.id)
    store.put(key, accumulator.to_bytes())
    repo.finish_aggregation(
        run_id, category, rows=metric_rows, state_key=key, num_used=used, num_skipped=skipped.total(),
        num_failed=failed.total(),
    )
    finish_run_if_complete(repo, store, run_id)
    return metric_rows


def finish_run_if_complete(repo: Repository, store: ObjectStore, run_id: int) -> bool:
    """The one place that decides "every category is done → summary → run done"; True when the run is done.

    Once every category is aggregated, the ``overall`` and ``mean`` rows are merged again (a category that was
    aggregated anew changes them), and the run becomes done unless images are still queued or running (they
    will aggregate their category again, and call this again) or the run was cancelled (it stays cancelled until
    resumed). Every path that can complete a run calls this: the aggregator after each category, the embedded
    runner at its end, and the ``aggregate``, ``submit`` and ``resume`` commands."""
    if not all(c.status == CategoryStatus.DONE for c in repo.categories(run_id)):
        return False
    refresh_summary(repo, store, run_id)
    if repo.active_count(run_id) or repo.get_run_by_id(run_id).status == RunStatus.CANCELLED:
        return False
    repo.set_run_status(run_id, RunStatus.DONE)
    return True


def refresh_summary(repo: Repository, store: ObjectStore, run_id: int) -> list[dict[str, Any]]:
    """Merge every category's stored state into the ``overall`` row and average them into ``mean``.

    Both rows count the skipped and failed images of every category (as their categories' last aggregation
    recorded them: skips found while aggregating, e.g. an unreadable mask, are only known there)."""
    from metrics.scopes import ScopedAccumulator

    merged = ScopedAccumulator()
    records = repo.categories(run_id)
    for record in records:
        if record.state_key:
            merged.merge(ScopedAccumulator.from_bytes(store.get(record.state_key)))
    summary = [row for row in merged.rows(include_summary=True) if row["scope"] in ("overall", "mean")]
    skipped, failed = sum(r.num_skipped for r in records), sum(r.num_failed for r in records)
    for row in summary:
        row["num_skipped"], row["num_failed"] = skipped, failed
    repo.store_summary_rows(run_id, summary)
    return summary
