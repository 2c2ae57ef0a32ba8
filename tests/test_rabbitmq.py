"""RabbitMQ as the broker: quorum queues, bulk messages equal to Celery's, confirmed publishing, a backlog
count, and countdown retries that wait in RabbitMQ rather than in a worker's prefetch."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import amqp
import pytest
import redis
from conftest import AMQP_URL, REDIS_URL, RabbitVhost

from storage.database import Database
from storage.repository import PlannedImage, Repository
from storage.settings import Settings, broker_kind
from workers.celery_app import celery_config, make_app
from workers.dispatch import queue_backlog, send_images
from workers.queues import AGGREGATE_QUEUE, IMAGE_QUEUE, PROCESS_IMAGE

pytestmark = pytest.mark.services

REPO_ROOT = Path(__file__).resolve().parent.parent
PER_MESSAGE = {"id", "root_id", "correlation_id", "reply_to", "origin", "argsrepr"}  # ids; argsrepr has the time


def test_broker_kind_by_scheme() -> None:
    assert [broker_kind(u) for u in ("redis://h/0", "rediss://h/0", "amqp://h//", "pyamqp://h//", "amqps://h//",
                                     "sqs://", None)] == ["redis", "redis", "amqp", "amqp", "amqp", "other", "other"]


def test_rabbitmq_configuration_uses_quorum_queues_on_a_topic_exchange() -> None:
    config = celery_config(Settings(broker_url=f"{AMQP_URL}/"))
    queues = {queue.name: queue for queue in config["task_queues"]}
    assert set(queues) == {IMAGE_QUEUE, AGGREGATE_QUEUE}
    for queue in queues.values():
        assert queue.queue_arguments == {"x-queue-type": "quorum"} and queue.durable
        assert queue.exchange.type == "topic"  # native delayed delivery needs it; a direct exchange would not do
    assert "visibility_timeout" not in config.get("broker_transport_options", {})  # a Redis-only notion
    assert "task_queues" not in celery_config(Settings(broker_url=REDIS_URL))


def _get(vhost: RabbitVhost, queue: str) -> amqp.Message:
    host = AMQP_URL.split("@", 1)[1]
    with amqp.Connection(host, userid="guest", password="guest", virtual_host=vhost.name) as connection:
        message = connection.channel().basic_get(queue, no_ack=True)
    assert message is not None, f"no message in {queue}"
    return message


def _strip(mapping: dict) -> dict:
    return {k: (type(v).__name__ if k in PER_MESSAGE else _strip(v) if isinstance(v, dict) else v)
            for k, v in mapping.items()}


def _repo(tmp_path: Path, count: int) -> tuple[Repository, int, list[int]]:
    database = Database(f"sqlite:///{tmp_path / 'r.sqlite'}")
    database.migrate()
    repo = Repository(database)
    run_id = repo.create_run(name="r", detector="noop", dataset_root="/d", config={}, code_version="t",
                             model_fingerprint=None, identity_keys=()).id
    repo.add_images(run_id, [PlannedImage("c", "good", 0, f"c/test/good/{i}.png", None, 8, 8) for i in range(count)])
    return repo, run_id, [row.id for row in repo.images(run_id)]


def test_bulk_messages_equal_send_task_messages(rabbitmq: RabbitVhost, tmp_path: Path) -> None:
    celery = make_app(Settings(broker_url=rabbitmq.url))
    repo, run_id, ids = _repo(tmp_path, 1)
    args = [run_id, ids[0], 1764380000.25]
    with celery.producer_or_acquire() as producer:
        celery.send_task(PROCESS_IMAGE, args=args, queue=IMAGE_QUEUE, producer=producer)
    reference = _get(rabbitmq, IMAGE_QUEUE)
    send_images(celery, repo, run_id, ids)
    ours = _get(rabbitmq, IMAGE_QUEUE)
    assert json.loads(ours.body)[1:] == json.loads(reference.body)[1:]  # kwargs and embed
    assert json.loads(ours.body)[0][:2] == args[:2]
    assert _strip(ours.headers) == _strip(reference.headers)
    assert _strip(ours.properties) == _strip(reference.properties)
    assert ours.delivery_info["exchange"] == reference.delivery_info["exchange"] == "readar"
    assert repo.images(run_id)[0].enqueued_at is not None  # marked once RabbitMQ confirmed it


def test_bulk_send_confirms_every_message_and_counts_the_backlog(rabbitmq: RabbitVhost, tmp_path: Path) -> None:
    celery = make_app(Settings(broker_url=rabbitmq.url))
    assert queue_backlog(celery, IMAGE_QUEUE) == 0  # declared on first use, so an empty broker counts 0
    repo, run_id, ids = _repo(tmp_path, 2500)
    assert send_images(celery, repo, run_id, ids, chunk=1000) == 2500
    assert queue_backlog(celery, IMAGE_QUEUE) == rabbitmq.queue_length(IMAGE_QUEUE) == 2500
    assert all(row.enqueued_at is not None for row in repo.images(run_id))


_RETRY_WORKER = """
import sys, time
import redis
from storage.settings import Settings
from workers.celery_app import make_app

app = make_app(Settings(broker_url=sys.argv[1]))
log = redis.Redis.from_url(sys.argv[2])


@app.task(name="readar.process_image", bind=True, max_retries=None)
def retried(self, run_id, image_id, enqueued_at=None):
    log.rpush("readar-test-retries", f"{image_id} {self.request.retries} {time.time()}")
    if self.request.retries == 0:
        raise self.retry(countdown=4)
    return "ok"


app.worker_main(["worker", "--pool", "threads", "--concurrency", "1", "--queues", "readar.images",
                 "--without-gossip", "--without-mingle", "--loglevel", "WARNING"])
"""


@pytest.mark.slow
def test_countdown_retries_wait_in_rabbitmq_not_in_the_worker(rabbitmq: RabbitVhost, tmp_path: Path) -> None:
    """With one thread and prefetch 1, a retry held in the worker until its countdown would block the second
    task; native delayed delivery parks it in RabbitMQ, so the second task runs at once."""
    log = redis.Redis.from_url(REDIS_URL)
    log.delete("readar-test-retries")
    script = tmp_path / "retry_worker.py"
    script.write_text(_RETRY_WORKER)
    worker = subprocess.Popen([sys.executable, str(script), rabbitmq.url, REDIS_URL], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    try:
        celery = make_app(Settings(broker_url=rabbitmq.url))
        celery.send_task(PROCESS_IMAGE, args=[1, 1, time.time()], queue=IMAGE_QUEUE)
        deadline = time.monotonic() + 60
        while log.llen("readar-test-retries") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        celery.send_task(PROCESS_IMAGE, args=[1, 2, time.time()], queue=IMAGE_QUEUE)
        while log.llen("readar-test-retries") < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        entries = [line.decode().split() for line in log.lrange("readar-test-retries", 0, -1)]
    finally:
        worker.terminate()
        output = worker.communicate(timeout=30)[0].decode(errors="replace")
        log.delete("readar-test-retries")
    assert len(entries) == 4, f"expected first try, second task, second task's retry, retry: {entries}\n{output}"
    first = {(image, int(retries)): float(at) for image, retries, at in entries}
    assert first[("1", 1)] - first[("1", 0)] >= 3.5  # the countdown was honoured
    assert first[("2", 0)] < first[("1", 1)]  # ... without holding the only slot meanwhile
    assert "Direct exchanges are not supported" not in output
