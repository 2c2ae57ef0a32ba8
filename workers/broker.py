"""kombu's Redis transport with one reusable command client per channel.

kombu's Redis channel builds a new ``redis.Redis`` client object for every synchronous operation (each
acknowledgement, each event publish, each unacked-message bookkeeping step). The clients share one connection
pool, so the new object buys nothing, but constructing it is among the largest costs of a short task in
``bench/queue_bench.py`` (figures: bench/RESULTS.md). This transport keeps one client per channel and
connection pool; it is selected through Celery's ``broker_transport`` setting and changes nothing else.
A ``redis.Redis`` client is safe to share between threads: every command takes its own pooled connection.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _command_client: Any = None
    _command_client_pool: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the event-loop connections (BRPOP, pub/sub) keep kombu's own handling
            return super()._create_client(asynchronous=True)
        pool = self.pool  # replaced by kombu after a connection error: a new pool gets a new client
        if self._command_client is None or self._command_client_pool is not pool:
            self._command_client = super()._create_client()
            self._command_client_pool = pool
        return self._command_client


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT_PATH = f"{__name__}:Transport"
