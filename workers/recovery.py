"""What a worker machine's supervisor does so that no image waits for a dead process.

- When a child dies, its claimed images are given back at once (owner ``host:pid`` on this host: the process
  is gone, so no straggler can commit; the fence would refuse one anyway) and sent again, and for the next
  :data:`URGENT_S` seconds the broker is checked every few seconds for messages the child took with it.
- On a timer, every unfinished run is reconciled (expired leases, lost messages, missed aggregations). One
  supervisor per deployment does this at a time: the holder of a Redis key with a time to live (Redis
  brokers) or of a PostgreSQL advisory lock (other brokers); with SQLite there is one machine, so no election.

Nothing here imports torch: the supervisor stays a light process.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from celery import Celery

from storage.models import RunStatus
from storage.repository import Repository
from workers.dispatch import (
    ABSENT_GRACE_S,
    UNACKED_GRACE_S,
    enqueue_images,
    message_census,
    reconcile_run,
)

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 10.0
URGENT_S = 30.0  # after a child's death: look for its lost messages this long
URGENT_EVERY_S = 2.0
URGENT_GRACE_S = 3.0  # a message out of sight this long just after a death belonged to the dead child
LEADER_KEY = "readar:reconciler"
ADVISORY_LOCK_ID = 0x52454144  # "READ": the reconciler's PostgreSQL advisory lock


class Leadership:
    """Which supervisor reconciles on the timer: the holder of a Redis key (renewed while alive) or of a
    PostgreSQL advisory lock (held by a session of its own); with SQLite, always this one."""

    def __init__(self, celery: Celery, repo: Repository, *, ttl_s: float) -> None:
        self.celery, self.repo = celery, repo
        self.ttl_ms = int(ttl_s * 1000)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self._session: Any = None
        self._held = False
        broker = str(celery.conf.broker_url or "")
        database = repo.db.engine.url.get_backend_name()
        self.kind = "redis" if broker.startswith(("redis://", "rediss://")) else (
            "postgresql" if database == "postgresql" else "single")

    def acquire(self) -> bool:
        if self.kind == "redis":
            with self.celery.connection_for_write() as connection:
                client = connection.default_channel.client
                if client.set(LEADER_KEY, self.identity, nx=True, px=self.ttl_ms):
                    return True
                holder = client.get(LEADER_KEY)
                if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == self.identity:
                    client.pexpire(LEADER_KEY, self.ttl_ms)
                    return True
                return False
        if self.kind == "postgresql":
            return self._advisory_lock()
        return True

    def _advisory_lock(self) -> bool:
        """Session-level lock on a connection kept for it (re-entrant per session: taken once, then checked)."""
        from sqlalchemy import text

        try:
            if self._session is None:
                self._session = self.repo.db.engine.connect()
            if self._held:
                self._session.execute(text("SELECT 1"))  # the session, and with it the lock, is still there
            else:
                acquired = self._session.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
                self._held = bool(acquired.scalar())
            self._session.commit()
        except Exception:
            self._forget_session()
            raise
        return self._held

    def _forget_session(self) -> None:
        if self._session is not None:
            self._session.invalidate()  # a broken session must not go back to the pool
            self._session = None
        self._held = False

    def release(self) -> None:
        if self.kind == "redis":
            with self.celery.connection_for_write() as connection:
                client = connection.default_channel.client
                holder = client.get(LEADER_KEY)
                if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == self.identity:
                    client.delete(LEADER_KEY)
        elif self._session is not None:
            from sqlalchemy import text

            if self._held:
                self._session.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                self._session.commit()
            self._session.close()
            self._session, self._held = None, False


def is_distributed(run: Any) -> bool:
    """Whether a run was submitted to workers (its stored settings name a broker). An embedded run belongs to
    the `readar run` process executing it, even in a database that workers share: workers leave it alone."""
    return bool(((run.config or {}).get("settings") or {}).get("broker_url"))


class Recovery:
    """Called by the supervisor: :meth:`child_died` when a child exits, :meth:`tick` on every loop turn."""

    def __init__(self, celery: Celery, repo: Repository, *, visibility_timeout: int,
                 every_s: float = RECONCILE_EVERY_S) -> None:
        self.celery, self.repo = celery, repo
        self.visibility_timeout = visibility_timeout
        self.every_s = every_s
        self.host = socket.gethostname()
        self.leadership = Leadership(celery, repo, ttl_s=max(3 * every_s, 30.0))
        self._urgent_until = 0.0
        self._next = 0.0

    def child_died(self, pid: int) -> int:
        """Give back and send again what the dead child held; returns how many images. Never raises."""
        try:
            released = self.repo.release_owners([f"{self.host}:{pid}"])
            for run_id in released:
                enqueue_images(self.celery, self.repo, run_id, visibility_timeout=self.visibility_timeout)
        except Exception as exc:  # the database or broker may be down too; the timer tries again
            log.warning("could not give back the images of dead worker process %d now (%s: %s); retrying on "
                        "the reconcile timer", pid, type(exc).__name__, exc)
            released = {}
        count = sum(len(ids) for ids in released.values())
        if count:
            log.warning("worker process %d died holding %d image(s): given back and sent again", pid, count)
        self._urgent_until = time.monotonic() + URGENT_S
        self._next = 0.0
        return count

    def tick(self) -> None:
        """Reconcile when due: every few seconds just after a death (this machine), else on the timer (leader)."""
        now = time.monotonic()
        if now < self._next:
            return
        urgent = now < self._urgent_until
        self._next = now + (URGENT_EVERY_S if urgent else self.every_s)
        try:
            if not urgent and not self.leadership.acquire():
                return
            grace = URGENT_GRACE_S if urgent else None
            self.reconcile_all(absent_grace_s=grace or ABSENT_GRACE_S, unacked_grace_s=grace or UNACKED_GRACE_S)
        except Exception as exc:  # never let the supervisor die of an outage; try again next time
            log.warning("reconcile failed (%s: %s); trying again in %.0f s", type(exc).__name__, exc,
                        self.every_s)

    def reconcile_all(self, *, absent_grace_s: float, unacked_grace_s: float) -> None:
        runs = [run for run in self.repo.list_runs()
                if run.status not in (RunStatus.DONE, RunStatus.CANCELLED) and is_distributed(run)]
        if not runs:
            return
        census = message_census(self.celery)
        for run in runs:
            report = reconcile_run(self.celery, self.repo, run.id, visibility_timeout=self.visibility_timeout,
                                   stale_aggregation_s=self.visibility_timeout, census=census,
                                   absent_grace_s=absent_grace_s, unacked_grace_s=unacked_grace_s)
            if report.leases_expired or report.lost or report.aggregations:
                log.warning("run %s: %d expired lease(s) requeued, %d lost message(s) sent again, %d "
                            "aggregation(s) triggered", run.name, report.leases_expired, report.lost,
                            report.aggregations)

    def close(self) -> None:
        try:
            self.leadership.release()
        except Exception as exc:  # the key expires by itself
            log.warning("could not release the reconciler lock (%s)", type(exc).__name__)
