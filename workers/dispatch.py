"""Scale-out control plane: enqueue one Celery task per unfinished image, reconcile, cancel.

Queue messages carry ids only. SQL decides what needs a message: queued images with no message sent within
the visibility timeout. So submitting twice enqueues nothing new, and a reconcile after a lost message or
an expired lease sends exactly the missing ones. Duplicate deliveries are harmless: the claim refuses them.

Lost messages (Redis): kombu's Redis transport takes a message off the queue list with BRPOP and only then,
in the worker process, records it in its ``unacked`` hash; a worker killed in between leaves no trace of the
message anywhere, and a worker killed after it leaves it in ``unacked`` until the visibility timeout
(25 minutes by default). :func:`find_lost_messages` compares SQL with the broker: a queued image whose
message is neither waiting in the queue list nor recently delivered is sent again.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery

from storage.repository import Repository
from storage.settings import broker_kind
from workers.queues import AGGREGATE_CATEGORY, AGGREGATE_QUEUE, IMAGE_QUEUE, PROCESS_IMAGE
from workers.task import dead_local_owners


@dataclass(frozen=True)
class ReconcileReport:
    leases_expired: int
    enqueued: int
    aggregations: int
    lost: int = 0  # queued images whose message had vanished from the broker, sent again


# How long a message may be out of sight before its image counts as lost: a message just pushed or just taken
# by a live worker is in flight for milliseconds; one delivered (unacked) to a live worker is claimed at once,
# but a retry waits up to 60 s (workers/celery_app.py _backoff) in the worker that holds it.
ABSENT_GRACE_S = 15.0
UNACKED_GRACE_S = 120.0
# Longest queue list scanned for waiting messages; with a longer backlog lost messages are looked for later.
SCAN_LIMIT = 20_000


@dataclass(frozen=True)
class MessageCensus:
    """Image ids that have a message in Redis right now: waiting in the image queue, or delivered and not yet
    acknowledged (image id → delivery time, seconds since the epoch)."""

    waiting: frozenset[int]
    delivered: dict[int, float]
    # The same for aggregate_category messages, by (run id, category).
    aggregations_waiting: frozenset[tuple[int, str]] = frozenset()
    aggregations_delivered: dict[tuple[int, str], float] = field(default_factory=dict)


def _task_key(payload: dict[str, Any]) -> int | tuple[int, str] | None:
    """What a message (kombu's stored form) is for: an image id for process_image, (run id, category) for
    aggregate_category, None for anything else."""
    try:
        task = payload["headers"]["task"]
        args = json.loads(base64.b64decode(payload["body"]))[0]
        if task == PROCESS_IMAGE:
            return int(args[1])
        if task == AGGREGATE_CATEGORY:
            return int(args[0]), str(args[1])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return None


def message_census(celery: Celery, *, scan_limit: int = SCAN_LIMIT) -> MessageCensus | None:
    """What the Redis broker holds for image tasks; None when it is not Redis or the backlog is too long."""
    if broker_kind(celery.conf.broker_url) != "redis":
        return None
    with celery.connection_for_write() as connection:
        client = connection.default_channel.client
        if int(client.llen(IMAGE_QUEUE)) > scan_limit:
            return None
        waiting: set[Any] = set()
        for queue in (IMAGE_QUEUE, AGGREGATE_QUEUE):
            for start in range(0, scan_limit, 1000):
                chunk = client.lrange(queue, start, start + 999)
                for raw in chunk:
                    key = _task_key(json.loads(raw))
                    if key is not None:
                        waiting.add(key)
                if len(chunk) < 1000:
                    break
        delivered_at = {tag.decode() if isinstance(tag, bytes) else tag: score
                        for tag, score in client.zrange("unacked_index", 0, -1, withscores=True)}
        delivered: dict[Any, float] = {}
        for tag, raw in client.hgetall("unacked").items():
            tag = tag.decode() if isinstance(tag, bytes) else tag
            try:
                key = _task_key(json.loads(raw)[0])
            except (ValueError, IndexError, TypeError):
                continue
            if key is not None:
                delivered[key] = max(delivered.get(key, 0.0), float(delivered_at.get(tag, 0.0)))
    return MessageCensus(
        frozenset(k for k in waiting if isinstance(k, int)),
        {k: v for k, v in delivered.items() if isinstance(k, int)},
        frozenset(k for k in waiting if isinstance(k, tuple)),
        {k: v for k, v in delivered.items() if isinstance(k, tuple)},
    )


def find_lost_messages(repo: Repository, run_id: int, census: MessageCensus, *,
                       absent_grace_s: float = ABSENT_GRACE_S, unacked_grace_s: float = UNACKED_GRACE_S) -> list[int]:
    """Queued images of the run sent more than ``absent_grace_s`` ago whose message is neither waiting nor
    delivered within ``unacked_grace_s`` (a delivered message older than that belongs to a dead worker)."""
    from storage.repository import utcnow

    now = time.time()
    lost = []
    for image_id in repo.queued_sent_before(run_id, utcnow() - timedelta(seconds=absent_grace_s)):
        if image_id in census.waiting:
            continue
        delivered = census.delivered.get(image_id)
        if delivered is not None and now - delivered < unacked_grace_s:
            continue
        lost.append(image_id)
    return lost


def enqueue_images(celery: Celery, repo: Repository, run_id: int, *, visibility_timeout: int,
                   chunk: int = 5000) -> int:
    """Send one task per queued image lacking a live message; returns how many were sent.

    Images never sent get a message. Images whose message went out more than the visibility timeout ago get a
    new one only when the image queue is empty: a message waiting in the queue never expires, so with a
    backlog an old timestamp means "still waiting"; with none, that message is gone (a broker that lost its
    data, a retry that could not be published) and the image would otherwise never run."""
    backlog = queue_backlog(celery, IMAGE_QUEUE)
    image_ids = repo.images_to_enqueue(run_id, stale_after_s=visibility_timeout, resend_stale=backlog == 0)
    return send_images(celery, repo, run_id, image_ids, chunk=chunk)


def queue_backlog(celery: Celery, queue: str) -> int:
    """Messages waiting (not yet delivered) in a queue: LLEN on Redis, a passive declare on RabbitMQ."""
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        if broker_kind(celery.conf.broker_url) == "redis":
            return int(channel.client.llen(queue))
        declaration = celery.amqp.queues[queue]
        connection.Producer(channel).maybe_declare(declaration)  # a queue that does not exist yet holds nothing
        return int(declaration.bind(channel).queue_declare(passive=True).message_count)


def send_images(celery: Celery, repo: Repository, run_id: int, image_ids: list[int], *, chunk: int = 5000) -> int:
    """Send one task message per image and record when; returns how many were sent. On Redis one LPUSH
    carries a chunk; on RabbitMQ a chunk is published on a channel in confirm mode and the rows are marked
    once RabbitMQ has confirmed all of it (one wait per chunk, not one per message)."""
    if not image_ids:
        return 0
    if broker_kind(celery.conf.broker_url) != "redis":
        return _publish_images(celery, repo, run_id, image_ids, chunk=chunk)
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        # Declared once (kombu records the queue's binding), as Celery's own publish would on its first send.
        connection.Producer(channel).maybe_declare(celery.amqp.queues[IMAGE_QUEUE])
        messages = TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE)
        for start in range(0, len(image_ids), chunk):
            batch = image_ids[start : start + chunk]
            now = time.time()
            channel.client.lpush(messages.queue, *(messages.encode([run_id, image_id, now]) for image_id in batch))
            repo.mark_enqueued(batch)  # only after Redis took the chunk
    return len(image_ids)


# Longest wait for RabbitMQ to confirm a chunk of messages.
CONFIRM_TIMEOUT_S = 60.0


def _publish_images(celery: Celery, repo: Repository, run_id: int, image_ids: list[int], *, chunk: int) -> int:
    declaration = celery.amqp.queues[IMAGE_QUEUE]
    messages = TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE)
    # A connection whose publishes do not each wait for their own confirm (the app's setting, right for single
    # sends, would make a bulk submit wait one round trip per image).
    with celery.connection_for_write(transport_options={"confirm_publish": False}) as connection:
        channel = connection.channel()
        try:
            producer = connection.Producer(channel)
            producer.maybe_declare(declaration)
            channel.confirm_select()
            confirmed = {"tag": 0, "nacked": False}

            def on_ack(tag: int, multiple: bool) -> None:
                confirmed["tag"] = max(confirmed["tag"], tag)

            def on_nack(tag: int, multiple: bool) -> None:
                confirmed["nacked"] = True
                on_ack(tag, multiple)

            channel.events["basic_ack"].add(on_ack)
            channel.events["basic_nack"].add(on_nack)
            published = 0
            for start in range(0, len(image_ids), chunk):
                batch = image_ids[start : start + chunk]
                now = time.time()
                for image_id in batch:
                    body, headers, properties = messages.parts([run_id, image_id, now])
                    producer.publish(body, exchange=declaration.exchange, routing_key=declaration.routing_key,
                                     headers=headers, content_type="application/json", content_encoding="utf-8",
                                     serializer=None, **properties)
                published += len(batch)
                deadline = time.monotonic() + CONFIRM_TIMEOUT_S
                while confirmed["tag"] < published:
                    connection.drain_events(timeout=max(0.1, deadline - time.monotonic()))
                if confirmed["nacked"]:
                    raise OSError(f"RabbitMQ refused messages of run {run_id} (a full or unavailable queue)")
                repo.mark_enqueued(batch)  # only after RabbitMQ confirmed the chunk
        finally:
            channel.close()
    return len(image_ids)


class TaskMessages:
    """Celery task messages (protocol 2, JSON) in the form kombu's Redis transport stores them in a queue list.

    ``send_task`` builds each message through several layers, too slow for submitting 100,000 images at once
    (figures: bench/RESULTS.md); this class writes the same message directly. The fields are exactly those
    ``send_task`` writes for a task with positional arguments, no ETA, no expiry and no result
    (tests/test_dispatch.py compares the two field by field), so workers cannot tell the difference.
    """

    def __init__(self, task_name: str, queue: str) -> None:
        self.task_name = task_name
        self.queue = queue
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())  # no replies are read (results are ignored); Celery sets one anyway
        self._embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

    def parts(self, args: list[Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Body (JSON), headers and properties of one message, as ``send_task`` fills them."""
        task_id = str(uuid.uuid4())
        body = json.dumps([args, {}, self._embed])
        headers = {
            "lang": "py", "task": self.task_name, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": json.dumps(args), "kwargsrepr": "{}",
            "origin": self.origin, "ignore_result": None, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {},
        }
        properties = {"correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2, "priority": 0}
        return body, headers, properties

    def encode(self, args: list[Any]) -> str:
        """One message in the form kombu's Redis transport keeps in a queue list."""
        body, headers, properties = self.parts(args)
        return json.dumps({
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                **properties,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        })


def reconcile_run(celery: Celery, repo: Repository, run_id: int, *, visibility_timeout: int,
                  stale_aggregation_s: int, census: MessageCensus | None = None,
                  absent_grace_s: float = ABSENT_GRACE_S, unacked_grace_s: float = UNACKED_GRACE_S) -> ReconcileReport:
    """Requeue expired leases, enqueue images without a live message, send again the ones whose message was
    lost, trigger missed aggregations. ``census`` (one per round over many runs) is taken here when not given."""
    # Leases of dead processes on this host need not wait for their expiry (a `readar reconcile` right after
    # a worker was killed on this machine).
    expired = repo.release_expired_or_orphaned(run_id, dead_local_owners(repo.running_owners(run_id)))
    if expired:
        repo.clear_enqueued(run_id, only_started=True)  # their old messages were consumed; they need new ones
    enqueued = enqueue_images(celery, repo, run_id, visibility_timeout=visibility_timeout)
    census = census if census is not None else message_census(celery)
    lost = []
    if census is not None:
        lost = find_lost_messages(repo, run_id, census, absent_grace_s=absent_grace_s,
                                  unacked_grace_s=unacked_grace_s)
        send_images(celery, repo, run_id, lost)
    aggregations = 0
    now = time.time()
    for record in repo.categories(run_id):
        key = (run_id, record.category)
        stale_after_s = stale_aggregation_s
        if census is not None and record.status == "aggregating" and key not in census.aggregations_waiting \
                and now - census.aggregations_delivered.get(key, 0.0) >= unacked_grace_s:
            # Its message is gone (the worker aggregating it was killed): take it over after the short grace.
            stale_after_s = int(absent_grace_s)
        if repo.try_start_aggregation(run_id, record.category, stale_after_s=stale_after_s):
            celery.send_task(AGGREGATE_CATEGORY, args=[run_id, record.category], queue=AGGREGATE_QUEUE)
            aggregations += 1
    return ReconcileReport(expired, enqueued, aggregations, len(lost))
