"""Database connection: engine creation, Alembic migrations applied on start, sessions."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from storage.redact import redact_text, redact_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SUPPORTED_URLS = "sqlite:////absolute/path.sqlite and postgresql+psycopg://user@host:5432/dbname"


class DatabaseError(RuntimeError):
    """The database cannot be reached or migrated; the message says which URL (redacted) and why."""


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API objects are untyped
    cursor = dbapi_connection.cursor()
    # WAL lets readers (readar results/status) work while a run writes; busy_timeout waits out short locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _generic_plans(dbapi_connection, _record) -> None:  # noqa: ANN001 - DB-API objects are untyped
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # no transaction left open by the SET
    cursor = dbapi_connection.cursor()
    cursor.execute("SET plan_cache_mode = force_generic_plan")
    cursor.close()
    dbapi_connection.autocommit = autocommit


class Database:
    """An engine plus a session factory for one database URL. Call :meth:`migrate` once at start."""

    def __init__(self, url: str, *, echo: bool = False, tls_ca_file: str | None = None) -> None:
        """``tls_ca_file``: PostgreSQL over TLS with the server certificate verified against this CA bundle
        (``sslmode=verify-full``); ``sslmode`` and friends in the URL work as well."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                folder = Path(path).parent
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # a file in the way, a read-only or missing mount
                    raise DatabaseError(
                        f"cannot create the folder {folder} for the SQLite database ({exc.strerror or exc}): pass a "
                        "--work-dir (or READAR_WORK_DIR) that is a folder you can write, or a --database-url"
                    ) from exc
            self.engine: Engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # No pre-ping (a round trip per checkout on the hot path): a dropped connection fails its statement,
            # SQLAlchemy invalidates the pool, and the task retries (transient error) on a fresh connection.
            connect_args = {"sslmode": "verify-full", "sslrootcert": tls_ca_file} if tls_ca_file else {}
            try:
                self.engine = create_engine(url, echo=echo, pool_recycle=1800, connect_args=connect_args)
            except ImportError as exc:  # mysql://, postgresql:// (psycopg2), ...: a driver READAR does not ship
                raise DatabaseError(
                    f"database URL {redact_url(url)} needs a driver READAR does not ship ({exc.name or exc}): "
                    f"READAR supports {SUPPORTED_URLS}"
                ) from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Same pool, no BEGIN/COMMIT round trips: for single statements that need no transaction around them.
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # The delivery protocol's statements (Repository claim, complete, aggregation check) run several times
        # per image. On PostgreSQL they get their own small autocommit pool whose sessions keep generic plans:
        # otherwise PostgreSQL re-plans these prepared statements on every execution (their custom plans look
        # cheaper than the generic one), which cost about as much server CPU as running them.
        self.protocol: Engine = self.autocommit
        if not self.is_sqlite:
            self.protocol = create_engine(url, echo=echo, pool_recycle=1800, pool_size=3, max_overflow=10,
                                          isolation_level="AUTOCOMMIT", connect_args=connect_args)
            # A SET on each new connection rather than a startup option: poolers such as PgBouncer refuse
            # unknown startup parameters.
            event.listen(self.protocol, "connect", _generic_plans)

    def session(self) -> Session:
        return self.sessions()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; safe to call from every process)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        try:
            with self.engine.begin() as connection:
                if not self.is_sqlite:
                    # Serialise concurrent migrators (several workers starting at once) on PostgreSQL.
                    connection.exec_driver_sql("SELECT pg_advisory_xact_lock(427100)")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except Exception as exc:
            raise DatabaseError(
                f"cannot migrate the database at {redact_url(self.url)}: {redact_text(str(exc))}"
            ) from exc

    def dispose(self) -> None:
        self.engine.dispose()
        if self.protocol is not self.autocommit:
            self.protocol.dispose()
