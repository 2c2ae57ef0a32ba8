"""The Celery application: JSON-only messages carrying ids, one task per image, an aggregator task.

Settings follow DESIGN.md section 2: late acknowledgement, reject on worker loss, prefetch 1, soft and hard
time limits, a Redis visibility timeout above the lease (the same value on every client), retries with
backoff for transient errors only, cancelling long-running tasks when the broker connection is lost.
Workers use a thread pool of batch size × pipeline depth threads (``READAR_PIPELINE_DEPTH``, default 2), so
concurrently delivered tasks share batched forwards through the in-process batcher, and the next batch is
prepared while one runs (DESIGN.md section 3).

Apps come from :func:`make_app` and the caller's Settings; importing this module reads no environment (``app``,
for ``celery -A``, is built from it on first access).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from typing import Any, NoReturn

from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange, Queue
from sqlalchemy.exc import DBAPIError, OperationalError

from storage.database import DatabaseError
from storage.models import CategoryStatus, RunStatus
from storage.objects import ObjectStoreError
from storage.redact import redact_url
from storage.settings import Settings, broker_kind
from workers.broker import TRANSPORT_PATH
from workers.consumer import CONSUMER_PATH
from workers.detectors.base import SetupError, check_device
from workers.monitoring import IMAGES, QUEUE_WAIT, Heartbeat, start_metrics_server
from workers.queues import (
    AGGREGATE_CATEGORY,
    AGGREGATE_QUEUE,
    IMAGE_QUEUE,
    PROCESS_IMAGE,
    task_args_problem,
)
from workers.runtime import WorkerRuntime
from workers.task import Outcome, process_image, worker_identity

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration every client (worker, scheduler, Flower) must share."""
    broker_url = settings.broker_url or "redis://127.0.0.1:6379/0"
    kind = broker_kind(broker_url)
    config: dict[str, Any] = {"broker_url": broker_url, **(_redis_options(settings) if kind == "redis" else {}),
                              **(_rabbitmq_options() if kind == "amqp" else {})}
    config.update({
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "accept_content": ["json"],  # never pickle: a pickled message is refused, not executed
        "result_serializer": "json",
        "event_serializer": "json",
        "task_ignore_result": True,  # SQL is the record of truth; no result backend
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Prefetch = concurrency × 1 = batch size × pipeline depth (workers/supervisor.py): about two batches.
        # The extra messages come from more threads, not from a larger multiplier, and that keeps late ack safe:
        # every message the worker holds is running on a thread of its own at once, so none waits unacknowledged
        # in a local buffer. How long a message stays unacknowledged is still bounded by its task (at most the
        # hard time limit, below the lease and the visibility timeout), so Redis never redelivers a message a
        # live worker holds; and a worker that dies leaves all of them unacknowledged, to be sent again (the
        # supervisor gives their rows back at once, workers/recovery.py): double buffering only doubles how many.
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.hard_time_limit,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": settings.task_events,
        "worker_consumer": CONSUMER_PATH,  # task events sent in batches (workers/consumer.py)
        "task_send_sent_event": False,  # workers send received/started/succeeded events; one less message per task
        "task_default_queue": IMAGE_QUEUE,
        "task_routes": {PROCESS_IMAGE: {"queue": IMAGE_QUEUE}, AGGREGATE_CATEGORY: {"queue": AGGREGATE_QUEUE}},
        "worker_hijack_root_logger": False,
        "broker_use_ssl": settings.broker_ssl(),
    })
    return config


def _redis_options(settings: Settings) -> dict[str, Any]:
    return {
        # kombu's Redis transport, reusing one command client per channel (workers/broker.py).
        "broker_transport": TRANSPORT_PATH,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for messages of dead workers often enough that redelivery follows the visibility timeout
            # closely (kombu's default sweep is every ~100 s).
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
            # The restore sweep holds a mutex in Redis; a worker killed while holding it must not block every
            # other worker's sweep for kombu's default 300 s.
            "unacked_mutex_expire": max(5, min(300, settings.visibility_timeout // 4)),
            # A broker that vanishes without closing the connection must not hang publishes forever.
            "socket_timeout": 30,
            "socket_connect_timeout": 10,
        },
    }


def _rabbitmq_options() -> dict[str, Any]:
    """RabbitMQ: durable quorum queues (replicated, and a dead consumer's unacknowledged messages return to
    the queue as soon as its connection closes), bound to a topic exchange so that retries with a countdown
    wait in RabbitMQ's delay queues (Celery's native delayed delivery) instead of in a worker's prefetch."""
    exchange = Exchange("readar", type="topic", durable=True)
    return {
        "task_queues": [Queue(name, exchange, routing_key=name, durable=True,
                              queue_arguments={"x-queue-type": "quorum"})
                        for name in (IMAGE_QUEUE, AGGREGATE_QUEUE)],
        "task_default_exchange": exchange.name,
        "task_default_exchange_type": exchange.type,
        "task_default_queue_type": "quorum",
        "broker_native_delayed_delivery_queue_type": "quorum",
        "worker_detect_quorum_queues": True,  # per-consumer prefetch: quorum queues have no global QoS
        # No confirm_publish here: Celery publishes task events from the worker's event loop, and a confirm wait
        # there (RabbitMQ applies flow control under load) stalls the loop past the AMQP heartbeat, so RabbitMQ
        # closes the consumer's connection. Bulk submits confirm on a channel of their own (workers/dispatch.py).
    }


class WorkerState:
    """What a worker process of one app keeps between tasks: the settings the app was made with, and the runtime
    and heartbeat built on first use (after Celery has started: no CUDA before any fork). The app owns it, so two
    apps in one process (a test's, a bench's) never share a runtime and nothing of it lives in this module."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.heartbeat: Heartbeat | None = None
        self._runtime: WorkerRuntime | None = None
        self._lock = threading.Lock()

    def runtime(self) -> WorkerRuntime:
        with self._lock:
            if self._runtime is None:
                self.heartbeat = Heartbeat(self.settings.heartbeat_file)
                start_metrics_server(self.settings.metrics_port, self.settings.metrics_host)
                self._runtime = WorkerRuntime(self.settings, on_category_complete=self.enqueue_aggregation)
                # Once per process, at the default log level: which broker, database and bucket this worker really uses.
                log.warning("worker %s uses broker %s, database %s, objects %s", worker_identity(),
                            redact_url(self.settings.broker_url), redact_url(self.settings.resolved_database_url),
                            redact_url(self._runtime.store.describe()))
            return self._runtime

    def enqueue_aggregation(self, run_id: int, category: str) -> None:
        self.app.send_task(AGGREGATE_CATEGORY, args=[run_id, category], queue=AGGREGATE_QUEUE)

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """Storage checks, heartbeat, metrics endpoint and the detectors of the runs in progress up before the
        first task arrives. Celery's signal is process-wide: a worker of another app is not this one's to set up."""
        if getattr(sender, "app", None) is not self.app:
            return
        runtime = self.runtime()
        try:
            check_device(self.settings.device)
            for run in runtime.repo.list_runs():
                if run.status == RunStatus.RUNNING:
                    runtime.context_for_run(run.id).detector.preflight()
        except SetupError as exc:
            stop_for_setup(exc)


def make_app(settings: Settings) -> Celery:
    """A Celery app for ``settings`` with both tasks registered on it alone (not shared with every app of the
    process) and its :class:`WorkerState` as ``app.worker_state``. The worker-ready hook holds the state weakly,
    so an app dropped by a test or a command leaves no receiver behind."""
    celery = Celery("readar", set_as_current=False)
    celery.conf.update(celery_config(settings))
    celery.worker_state = WorkerState(celery, settings)
    celery.task(name=PROCESS_IMAGE, bind=True, max_retries=10, shared=False)(process_image_task)
    celery.task(name=AGGREGATE_CATEGORY, bind=True, max_retries=5, shared=False)(aggregate_category_task)
    worker_ready.connect(celery.worker_state.on_worker_ready)
    return celery


@functools.cache
def default_app() -> Celery:
    """The app of this process's environment (READAR_* variables), built once, on first use."""
    return make_app(Settings())


def __getattr__(name: str) -> Any:
    """``app`` for ``celery -A workers.celery_app`` (Flower) and workers/worker_main.py: importing this module
    reads no environment; looking ``app`` up does (PEP 562)."""
    if name == "app":
        return default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Storage and network failures that a later attempt can succeed after (never counted against the image).
TRANSIENT_ERRORS = (OperationalError, DBAPIError, DatabaseError, ObjectStoreError, ConnectionError, TimeoutError)


def _backoff(retries: int) -> int:
    return min(2 ** retries, 60)


def process_image_task(self: Any, run_id: int, image_id: int, enqueued_at: float | None = None) -> Outcome:
    """Ids in, one call, status out. Transient storage errors retry with backoff; everything else is recorded
    in SQL by :func:`workers.task.process_image`. Arguments that cannot name a row are dropped, never retried
    (the consumer drops such messages before they get here; this covers a call that did not come through it)."""
    problem = task_args_problem(PROCESS_IMAGE, [run_id, image_id] + ([enqueued_at] if enqueued_at is not None
                                                                         else []), {})
    if problem is not None:
        log.error("dropped a %s call with arguments %.80r: %s", PROCESS_IMAGE, (run_id, image_id), problem)
        IMAGES.labels(Outcome.REJECTED).inc()
        return Outcome.REJECTED
    if enqueued_at is not None and self.request.retries == 0:
        QUEUE_WAIT.observe(max(time.time() - float(enqueued_at), 0.0))
    worker: WorkerState = self.app.worker_state
    heartbeat = worker.heartbeat  # the one told of the start is the one told of the end
    if heartbeat is not None:
        heartbeat.task_started()
    try:
        # Everything that touches the database or the object store is inside the retry: a message is never
        # acknowledged away by an outage (the row would stay queued with nothing to send it again).
        state = worker.runtime()
        if state.run_status(run_id) == RunStatus.CANCELLED:
            return Outcome.CANCELLED
        outcome = process_image(state.context_for_run(run_id), run_id, image_id)
    except TRANSIENT_ERRORS as exc:
        log.warning("transient error on image %d (%s); retrying", image_id, type(exc).__name__)
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    except SetupError as exc:
        stop_for_setup(exc)
    finally:
        if heartbeat is not None:
            heartbeat.task_finished()
    IMAGES.labels(outcome).inc()
    if outcome.queued_again:  # send it again after a pause
        raise self.retry(countdown=_backoff(self.request.retries))
    if outcome is Outcome.HELD:  # a live lease elsewhere, or a row given back meanwhile: look again later
        raise self.retry(countdown=_lease_wait(state, image_id), max_retries=None)
    return outcome


def _lease_wait(state: WorkerRuntime, image_id: int) -> float:
    from storage.repository import utcnow

    expires = state.repo.image(image_id).lease_expires_at
    if expires is None:
        return 1.0
    if expires.tzinfo is None:  # SQLite returns naive UTC datetimes
        from datetime import UTC

        expires = expires.replace(tzinfo=UTC)
    return max(1.0, min((expires - utcnow()).total_seconds() + 1.0, float(state.settings.lease_seconds)))


def aggregate_category_task(self: Any, run_id: int, category: str) -> int:
    """Compute a category's metric rows; on failure the category becomes due again and the task retries."""
    problem = task_args_problem(AGGREGATE_CATEGORY, [run_id, category], {})
    if problem is not None:
        log.error("dropped a %s call with arguments %.80r: %s", AGGREGATE_CATEGORY, (run_id, category), problem)
        return 0
    from metrics.aggregator import LostResultsError, aggregate_category
    from workers.dispatch import enqueue_images

    try:
        state = self.app.worker_state.runtime()
        if not _still_aggregating(state, run_id, category):
            # A second delivery of a finished aggregation (redelivered after the visibility timeout, or sent
            # twice): the rows are stored already; running again would only repeat the work.
            return 0
        rows = aggregate_category(state.repo, state.store, run_id, category,
                                  path_map=state.path_map or None)  # the masks where this machine mounts them
    except LostResultsError as exc:
        # Those images are queued again: send them; the last of them to finish triggers this aggregation anew.
        log.warning("%s", exc)
        enqueue_images(self.app, state.repo, run_id, visibility_timeout=state.settings.visibility_timeout)
        return 0
    except TRANSIENT_ERRORS as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    except Exception as exc:
        state.repo.reopen_aggregation(run_id, category)
        if state.repo.try_start_aggregation(run_id, category):
            raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
        raise
    return len(rows)


def _still_aggregating(state: WorkerRuntime, run_id: int, category: str) -> bool:
    return any(c.category == category and c.status == CategoryStatus.AGGREGATING
               for c in state.repo.categories(run_id))


# Exit status of a worker process that cannot run here (sysexits' EX_CONFIG): the supervisor keeps it
# stopped for a while and reports the machine unhealthy instead of restarting it at once.
SETUP_EXIT_CODE = 78


def stop_for_setup(exc: Exception) -> NoReturn:
    """Leave at once without acknowledging anything: the image was given back untouched, the supervisor sends
    this process's messages again, and no further task is taken while the setup is broken."""
    log.error("this worker cannot run the detector: %s; it takes no more tasks until that is fixed", exc)
    logging.shutdown()
    os._exit(SETUP_EXIT_CODE)
