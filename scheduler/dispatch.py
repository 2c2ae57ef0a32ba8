"""Scale-out control plane: enqueue one Celery task per unfinished image, reconcile, cancel.

Queue messages carry ids only. SQL decides what needs a message: queued images with no message sent within
the visibility timeout. So submitting twice enqueues nothing new, and a reconcile after a lost message or
an expired lease sends exactly the missing ones. Duplicate deliveries are harmless: the claim refuses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from celery import Celery

from storage.repository import Repository
from workers.queues import AGGREGATE_CATEGORY, AGGREGATE_QUEUE, IMAGE_QUEUE, PROCESS_IMAGE


@dataclass(frozen=True)
class ReconcileReport:
    leases_expired: int
    enqueued: int
    aggregations: int


def enqueue_images(celery: Celery, repo: Repository, run_id: int, *, visibility_timeout: int,
                   chunk: int = 2000) -> int:
    """Send one task per queued image lacking a fresh message; returns how many were sent."""
    image_ids = repo.images_to_enqueue(run_id, stale_after_s=visibility_timeout)
    sent = 0
    with celery.producer_or_acquire() as producer:
        for start in range(0, len(image_ids), chunk):
            batch = image_ids[start : start + chunk]
            now = time.time()
            # kombu's publish batch pipelines the Redis LPUSHes (one round trip per `chunk` messages); the batch
            # is flushed when the block ends, before the rows are marked as enqueued.
            with producer.batch(chunk):
                for image_id in batch:
                    celery.send_task(PROCESS_IMAGE, args=[run_id, image_id, now], queue=IMAGE_QUEUE,
                                     producer=producer)
            repo.mark_enqueued(batch)
            sent += len(batch)
    return sent


def reconcile_run(celery: Celery, repo: Repository, run_id: int, *, visibility_timeout: int,
                  stale_aggregation_s: int) -> ReconcileReport:
    """Requeue expired leases, enqueue images without a live message, trigger missed aggregations."""
    expired = repo.release_expired_or_orphaned(run_id)
    if expired:
        repo.clear_enqueued(run_id, only_started=True)  # their old messages were consumed; they need new ones
    enqueued = enqueue_images(celery, repo, run_id, visibility_timeout=visibility_timeout)
    aggregations = 0
    for record in repo.categories(run_id):
        if repo.try_start_aggregation(run_id, record.category, stale_after_s=stale_aggregation_s):
            celery.send_task(AGGREGATE_CATEGORY, args=[run_id, record.category], queue=AGGREGATE_QUEUE)
            aggregations += 1
    return ReconcileReport(expired, enqueued, aggregations)
