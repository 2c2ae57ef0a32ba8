"""Bulk submit writes task messages itself: they must be the messages Celery's ``send_task`` would write."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from conftest import REDIS_URL

from storage.settings import Settings
from workers.celery_app import make_app
from workers.dispatch import TaskMessages
from workers.queues import IMAGE_QUEUE, PROCESS_IMAGE

pytestmark = pytest.mark.services

# Fields that differ between any two messages (fresh ids) or between two processes.
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag", "reply_to", "origin"}


def _strip(message: dict) -> dict:
    out = {}
    for key, value in message.items():
        if key in PER_MESSAGE:
            out[key] = type(value).__name__
        elif isinstance(value, dict):
            out[key] = _strip(value)
        else:
            out[key] = value
    return out


def test_bulk_messages_equal_send_task_messages() -> None:
    url = REDIS_URL
    client = redis.Redis.from_url(url)
    client.delete(IMAGE_QUEUE)
    celery = make_app(Settings(broker_url=url))
    args = [7, 123456, 1764380000.25]
    try:
        with celery.producer_or_acquire() as producer:
            celery.send_task(PROCESS_IMAGE, args=args, queue=IMAGE_QUEUE, producer=producer)
        reference = json.loads(client.rpop(IMAGE_QUEUE))
        ours = json.loads(TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE).encode(args))
    finally:
        client.delete(IMAGE_QUEUE)
    assert _strip(ours) == _strip(reference)
    assert base64.b64decode(ours["body"]) == base64.b64decode(reference["body"])
    headers, properties = ours["headers"], ours["properties"]
    assert headers["id"] == headers["root_id"] == properties["correlation_id"]
    uuid.UUID(headers["id"]), uuid.UUID(properties["delivery_tag"])  # noqa: B018 - they must parse as UUIDs


def test_each_message_gets_its_own_ids() -> None:
    messages = TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE)
    first, second = (json.loads(messages.encode([1, i, 0.0])) for i in range(2))
    assert first["headers"]["id"] != second["headers"]["id"]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]


def test_old_messages_are_resent_only_once_the_queue_is_empty(tmp_path) -> None:  # noqa: ANN001
    """A reconcile during a long backlog must not queue the backlog again (the full-size load run did)."""
    from storage.database import Database
    from storage.repository import PlannedImage, Repository
    from workers.dispatch import enqueue_images

    url = REDIS_URL
    client = redis.Redis.from_url(url)
    client.delete(IMAGE_QUEUE)
    database = Database(f"sqlite:///{tmp_path / 'r.sqlite'}")
    database.migrate()
    repo = Repository(database)
    run_id = repo.create_run(name="r", detector="noop", dataset_root="/d", config={}, code_version="t",
                             model_fingerprint=None, identity_keys=()).id
    repo.add_images(run_id, [PlannedImage("c", "good", 0, f"c/test/good/{i}.png", None, 8, 8) for i in range(3)])
    celery = make_app(Settings(broker_url=url))
    try:
        assert enqueue_images(celery, repo, run_id, visibility_timeout=1) == 3
        with database.engine.begin() as connection:  # the messages went out long ago
            connection.exec_driver_sql("UPDATE images SET enqueued_at = '2000-01-01 00:00:00'")
        assert enqueue_images(celery, repo, run_id, visibility_timeout=1) == 0  # still waiting in the queue
        assert client.llen(IMAGE_QUEUE) == 3
        client.delete(IMAGE_QUEUE)  # the broker lost them
        assert enqueue_images(celery, repo, run_id, visibility_timeout=1) == 3
        assert client.llen(IMAGE_QUEUE) == 3
    finally:
        client.delete(IMAGE_QUEUE)
        database.dispose()
