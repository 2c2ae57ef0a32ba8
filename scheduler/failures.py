"""Connection and URL failures as one line that says what failed, where, and what to do.

The command line shows these instead of a traceback (``-v`` adds the traceback). Anything not recognised here
is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator

from storage.redact import redact_text, redact_url


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return redact_text(text.splitlines()[0].rstrip(". ") if text else type(exc).__name__)


def describe_failure(exc: BaseException, *, database_url: str | None, broker_url: str | None) -> str | None:
    """One line for a failure to reach the database, broker or object store, or to write an output file; None
    for anything else."""
    from amqp.exceptions import AccessRefused, NotAllowed
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    from metrics.output import OutputError
    from storage.database import DatabaseError
    from storage.objects import ObjectStoreError

    database = redact_url(database_url) or "the database"
    broker = redact_url(broker_url) or "the broker"
    for cause in _chain(exc):
        if isinstance(cause, NoSuchModuleError | ArgumentError):
            return (f"database URL {database} is not one READAR can use ({_first_line(cause)}); for PostgreSQL "
                    "write postgresql+psycopg://user@host:5432/dbname, for SQLite sqlite:////absolute/path.sqlite")
        if isinstance(cause, DBAPIError):
            return (f"cannot use the database {database}: {_first_line(cause)}; check READAR_DATABASE_URL or "
                    "--database-url, that the server runs, and that the role and database exist")
        if isinstance(cause, AccessRefused | NotAllowed):  # RabbitMQ: wrong user or password, unknown vhost
            return (f"the broker {broker} refused the connection: {_first_line(cause)}; check the user, password "
                    "and virtual host in READAR_BROKER_URL or --broker-url")
        if isinstance(cause, BrokerError | RedisConnectionError | RedisTimeoutError):
            return (f"cannot reach the broker {broker}: {_first_line(cause)}; start it, or fix READAR_BROKER_URL "
                    "or --broker-url")
        if isinstance(cause, ObjectStoreError):
            return f"object store: {_first_line(cause)}; check READAR_OBJECT_STORE_URL and the S3 settings"
    for cause in _chain(exc):
        if isinstance(cause, DatabaseError | OutputError):
            return _first_line(cause)
    return None
