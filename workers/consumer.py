"""Celery's consumer with task events sent in batches at a bounded rate.

A worker with an event loop buffers task events (received, started, succeeded) and Celery flushes the buffer on
the loop's next turn: with short tasks that is one broker round trip, and one wake-up of the loop from a pool
thread, for nearly every event. Here a flush is due at most every ``EVENT_FLUSH_INTERVAL_S`` seconds instead;
Celery still flushes at once when the buffer holds 24 events. Monitors (Flower, ``celery events``) see the same
events, at most that interval later. Selected through Celery's ``worker_consumer`` setting.

It also checks every task message before Celery builds a request from it: a body that is not
``[args, kwargs, options]`` makes Celery's request constructor raise inside the event loop, which stops the
worker ("Unrecoverable error"), and since the message was never acknowledged it is delivered again to the
restarted worker, forever. Such a message, or one whose arguments cannot name a row, is logged once and
acknowledged (dropped) here; every other message goes on to Celery unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from workers.queues import task_args_problem

log = logging.getLogger(__name__)

EVENT_FLUSH_INTERVAL_S = 0.1

CONSUMER_PATH = f"{__name__}:Consumer"


class Consumer(CeleryConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_flush_lock = threading.Lock()
        self._event_flush_due = False

    def on_send_event_buffered(self) -> None:
        """Called by any thread after it buffered an event: make sure one flush is due."""
        if not self.hub:
            return
        with self._event_flush_lock:
            if self._event_flush_due:
                return
            self._event_flush_due = True
        self.hub.call_soon(self._schedule_event_flush)  # thread-safe; the timer below is the loop's own

    def _schedule_event_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_INTERVAL_S, self._flush_due_events)

    def _flush_due_events(self) -> None:
        with self._event_flush_lock:
            # Cleared before flushing: an event buffered from now on asks for a flush of its own.
            self._event_flush_due = False
        self._flush_events()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            problem = malformed_message(message)
            if problem is None:
                return handle(message)
            headers = message.headers if isinstance(message.headers, dict) else {}
            log.error("dropped a malformed task message (task %.80r, id %.80r): %s", headers.get("task"),
                      headers.get("id"), problem)
            message.ack()
            return None

        return on_task_received


def malformed_message(message: Any) -> str | None:
    """Why a protocol-2 JSON task message cannot be run (None when it can, or when it is not ours to judge:
    other content types and unknown tasks keep Celery's own handling, which refuses them without stopping)."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    if message.content_type != "application/json":
        return None  # refused by Celery's accept_content (pickle, YAML ...)
    try:
        body = json.loads(message.body)
    except (TypeError, ValueError, RecursionError) as exc:
        return f"the body is not JSON ({type(exc).__name__})"
    if not isinstance(body, list) or len(body) != 3 or not isinstance(body[2], dict | None):
        return "the body is not [args, kwargs, options]"
    return task_args_problem(str(headers["task"]), body[0], body[1])
