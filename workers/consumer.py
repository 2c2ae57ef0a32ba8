"""Celery's consumer with task events sent in batches at a bounded rate.

A worker with an event loop buffers task events (received, started, succeeded) and Celery flushes the buffer on
the loop's next turn: with short tasks that is one broker round trip, and one wake-up of the loop from a pool
thread, for nearly every event. Here a flush is due at most every ``EVENT_FLUSH_INTERVAL_S`` seconds instead;
Celery still flushes at once when the buffer holds 24 events. Monitors (Flower, ``celery events``) see the same
events, at most that interval later. Selected through Celery's ``worker_consumer`` setting.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

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
