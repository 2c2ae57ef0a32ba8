"""Scale-out control plane: enqueue one Celery task per unfinished image, reconcile, cancel.

Queue messages carry ids only. SQL decides what needs a message: queued images with no message sent within
the visibility timeout. So submitting twice enqueues nothing new, and a reconcile after a lost message or
an expired lease sends exactly the missing ones. Duplicate deliveries are harmless: the claim refuses them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery

from storage.repository import Repository
from workers.queues import AGGREGATE_CATEGORY, AGGREGATE_QUEUE, IMAGE_QUEUE, PROCESS_IMAGE


@dataclass(frozen=True)
class ReconcileReport:
    leases_expired: int
    enqueued: int
    aggregations: int


def enqueue_images(celery: Celery, repo: Repository, run_id: int, *, visibility_timeout: int,
                   chunk: int = 5000) -> int:
    """Send one task per queued image lacking a live message; returns how many were sent.

    Images never sent get a message. Images whose message went out more than the visibility timeout ago get a
    new one only when the image queue is empty: a message waiting in the queue never expires, so with a
    backlog an old timestamp means "still waiting"; with none, that message is gone (a broker that lost its
    data, a retry that could not be published) and the image would otherwise never run."""
    sent = 0
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        backlog = int(channel.client.llen(IMAGE_QUEUE))
        image_ids = repo.images_to_enqueue(run_id, stale_after_s=visibility_timeout, resend_stale=backlog == 0)
        # Declared once (kombu records the queue's binding), as Celery's own publish would on its first send.
        connection.Producer(channel).maybe_declare(celery.amqp.queues[IMAGE_QUEUE])
        messages = TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE)
        for start in range(0, len(image_ids), chunk):
            batch = image_ids[start : start + chunk]
            now = time.time()
            # One LPUSH carries the whole chunk; the rows are marked as enqueued only after Redis took it.
            channel.client.lpush(messages.queue, *(messages.encode([run_id, image_id, now]) for image_id in batch))
            repo.mark_enqueued(batch)
            sent += len(batch)
    return sent


class TaskMessages:
    """Celery task messages (protocol 2, JSON) in the form kombu's Redis transport stores them in a queue list.

    ``send_task`` builds each message through several layers (about 200 µs a message); submitting 100,000
    images needs them in a few µs. The fields are exactly those ``send_task`` writes for a task with
    positional arguments, no ETA, no expiry and no result (tests/test_dispatch.py compares the two field by
    field), so workers cannot tell the difference.
    """

    def __init__(self, task_name: str, queue: str) -> None:
        self.task_name = task_name
        self.queue = queue
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())  # no replies are read (results are ignored); Celery sets one anyway
        self._embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def encode(self, args: list[Any]) -> str:
        task_id = str(uuid.uuid4())
        body = json.dumps([args, {}, self._embed])
        return json.dumps({
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": self.task_name, "id": task_id, "shadow": None, "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
                "root_id": task_id, "parent_id": None, "argsrepr": json.dumps(args), "kwargsrepr": "{}",
                "origin": self.origin, "ignore_result": None, "replaced_task_nesting": 0,
                "stamped_headers": None, "stamps": {},
            },
            "properties": {
                "correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue}, "priority": 0,
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        })


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
