"""The library internals READAR builds on, checked on the installed versions: when a Celery or kombu release
renames one, these fail loudly instead of the workers misbehaving quietly. pyproject.toml bounds both libraries
to the minor release these were checked against; bench/RESULTS.md ("Private APIs") records what each buys."""

from __future__ import annotations

import inspect

import celery
import kombu
from celery.events.dispatcher import EventDispatcher
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis

from workers.broker import Channel
from workers.consumer import Consumer


def test_kombu_redis_channel_still_builds_its_clients_where_we_override_it() -> None:
    """workers/broker.py replaces ``Channel._create_client(asynchronous=...)`` and watches ``Channel.pool``."""
    original = inspect.signature(kombu_redis.Channel._create_client)
    assert "asynchronous" in original.parameters, f"kombu {kombu.__version__}: _create_client changed: {original}"
    assert isinstance(inspect.getattr_static(kombu_redis.Channel, "pool"), property)
    assert "self._create_client(" in inspect.getsource(kombu_redis.Channel)  # kombu's own callers still use it
    assert Channel._create_client is not kombu_redis.Channel._create_client


def test_celery_consumer_still_flushes_events_through_the_hooks_we_override() -> None:
    """workers/consumer.py overrides ``on_send_event_buffered`` (given to the event dispatcher as
    ``on_send_buffered``), calls ``_flush_events`` and wraps ``create_task_handler``."""
    for name in ("on_send_event_buffered", "_flush_events", "create_task_handler"):
        assert callable(getattr(CeleryConsumer, name, None)), f"celery {celery.__version__}: Consumer.{name} is gone"
    assert "on_send_buffered" in inspect.signature(EventDispatcher.__init__).parameters
    assert "on_send_event_buffered" in inspect.getsource(CeleryConsumer)  # still wired to the dispatcher
    assert "on_task_received" in inspect.getsource(CeleryConsumer.create_task_handler)
    for name in ("on_send_event_buffered", "create_task_handler"):
        assert name in Consumer.__dict__
