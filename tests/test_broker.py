"""The Redis transport that reuses one command client per channel: selected for redis URLs, behaves like kombu's."""

from __future__ import annotations

import pytest
import redis

from scheduler.settings import Settings
from workers.broker import TRANSPORT_PATH, Channel
from workers.celery_app import celery_config, make_app

URL = "redis://127.0.0.1:6379/12"


def test_selected_for_redis_urls_only() -> None:
    assert celery_config(Settings(broker_url=URL))["broker_transport"] == TRANSPORT_PATH
    assert celery_config(Settings(broker_url="rediss://127.0.0.1:6380/0"))["broker_transport"] == TRANSPORT_PATH
    assert celery_config(Settings(broker_url="amqp://guest@127.0.0.1//"))["broker_transport"] is None


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
