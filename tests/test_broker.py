"""The Redis transport that reuses one command client per channel: selected for redis URLs, behaves like kombu's."""

from __future__ import annotations

import pytest
import redis
from conftest import REDIS_URL

from storage.settings import Settings
from workers.broker import TRANSPORT_PATH, Channel
from workers.celery_app import celery_config, make_app

URL = REDIS_URL


def test_selected_for_redis_urls_only() -> None:
    assert celery_config(Settings(broker_url=URL))["broker_transport"] == TRANSPORT_PATH
    assert celery_config(Settings(broker_url="rediss://127.0.0.1:6380/0"))["broker_transport"] == TRANSPORT_PATH
    assert celery_config(Settings(broker_url="amqp://guest@127.0.0.1//")).get("broker_transport") is None


@pytest.mark.services
def test_one_command_client_per_pool_and_messages_round_trip() -> None:
    celery = make_app(Settings(broker_url=URL))
    plain = redis.Redis.from_url(URL)
    plain.flushdb()
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)
        first = channel._create_client()
        assert channel._create_client() is first  # reused, not rebuilt per operation
        queue = connection.SimpleQueue("readar.test-broker")
        for number in range(3):
            queue.put({"n": number})
        received = []
        for _ in range(3):
            message = queue.get(timeout=5)
            received.append(message.payload["n"])
            message.ack()
        assert received == [0, 1, 2]
        assert plain.hlen("unacked") == 0  # every acknowledgement reached Redis
        channel._pool = None  # what kombu does after a connection error: a new pool ...
        assert channel._create_client() is not first  # ... gets a new client
        queue.close()
    plain.flushdb()


def test_task_events_follow_the_setting() -> None:
    assert celery_config(Settings(broker_url=URL))["worker_send_task_events"] is True
    assert celery_config(Settings(broker_url=URL, task_events=False))["worker_send_task_events"] is False


_EVENT_WORKER = """
import sys
from storage.settings import Settings
from workers.celery_app import make_app

app = make_app(Settings(broker_url=sys.argv[1]))


@app.task(name="readar.test.ping")
def ping(number):
    return number


app.worker_main(["worker", "--pool", "threads", "--concurrency", "4", "--queues", "readar.test-events",
                 "--hostname", "events@test", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "--loglevel", "WARNING"])
"""


@pytest.mark.services
def test_task_events_reach_a_monitor_in_batches(tmp_path) -> None:  # noqa: ANN001
    """What Flower sees: every task's received, started and succeeded events, sent a batch at a time
    (workers/consumer.py) rather than one broker message per event."""
    import base64
    import json
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    url = REDIS_URL
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    monitor = plain.pubsub()
    monitor.psubscribe(f"/{url.rsplit('/', 1)[1]}.celeryev/task.*")  # kombu's fanout channels for the celeryev exchange
    env = {**os.environ, "READAR_WORK_DIR": str(tmp_path / "work"), "READAR_BROKER_URL": url}
    worker = subprocess.Popen([sys.executable, "-c", _EVENT_WORKER, url], env=env,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        celery = make_app(Settings(broker_url=url))
        ids = [celery.send_task("readar.test.ping", args=[n], queue="readar.test-events").id for n in range(40)]
        seen: dict[str, set[str]] = {task_id: set() for task_id in ids}
        messages = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                {"task-received", "task-started", "task-succeeded"} <= kinds for kinds in seen.values()):
            message = monitor.get_message(timeout=1.0)
            if message is None or message["type"] != "pmessage":
                continue
            envelope = json.loads(message["data"])
            events = json.loads(base64.b64decode(envelope["body"]))
            messages += 1
            for event in events if isinstance(events, list) else [events]:
                if event.get("uuid") in seen:
                    seen[event["uuid"]].add(event["type"])
        missing = {task_id: kinds for task_id, kinds in seen.items() if len(kinds) < 3}
        assert not missing, f"events missing after 60 s: {missing}"
        assert worker.poll() is None, "the worker exited"
        # 120 events; one message per event (or per loop turn) would be dozens of messages.
        assert messages <= 20, f"{messages} messages for 120 task events"
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        monitor.close()
        plain.flushdb()
