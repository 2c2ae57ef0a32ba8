"""READAR settings: one object, read once from ``READAR_*`` environment variables and CLI flags, passed down.

Credentials never live in this object's printable form: URLs are shown through :func:`redact_url`, and S3
keys come only from the environment (``READAR_S3_KEY`` / ``READAR_S3_SECRET`` or the standard AWS variables
that s3fs reads itself).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.redact import redact_text, redact_url

# Upper bounds of the durations: far above any sensible value, far below what datetime arithmetic overflows on.
DAY_S = 86_400
WEEK_S = 7 * DAY_S
# Batches in flight per worker process (READAR_PIPELINE_DEPTH): 2 prepares the next batch while one runs.
DEFAULT_PIPELINE_DEPTH = 2
# Most images per batched forward: READAR_BATCH_SIZE and every --batch-size flag share this bound.
MAX_BATCH_SIZE = 1024
# The devices READAR runs on: READAR_DEVICE and every --device flag accept exactly these.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def broker_kind(url: str | None) -> str:
    """``redis`` or ``amqp`` (RabbitMQ) by the broker URL's scheme; ``other`` for anything else Celery accepts."""
    scheme = str(url or "").split("://", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme in ("amqp", "amqps", "pyamqp"):
        return "amqp"
    return "other"


class Settings(BaseSettings):
    """Every knob of READAR. Environment: ``READAR_<FIELD>`` (e.g. ``READAR_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="READAR_", extra="ignore")

    work_dir: Path = Field(Path("readar-work"), description="Folder for the default database, objects and CSVs.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default a SQLite file <work_dir>/readar.sqlite. PostgreSQL: "
        "postgresql+psycopg://user@host/db (password via the URL from the environment only)."
    )
    object_store_url: str | None = Field(
        None, description="fsspec URL for logits; default the local folder <work_dir>/objects; s3://bucket/prefix."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333.")
    s3_key: SecretStr | None = Field(None, description="S3 access key (environment only).")
    s3_secret: SecretStr | None = Field(None, description="S3 secret key (environment only).")
    broker_url: str | None = Field(None, description="Celery broker (redis://...); unset = embedded mode.")
    checkpoint: Path | None = Field(None, description="Local folder of a released READ checkpoint.")
    clip: Path | None = Field(None, description="Local folder of CLIP ViT-L/14-336 (HF format).")
    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE, description="Images per batched forward.")
    pipeline_depth: int = Field(
        DEFAULT_PIPELINE_DEPTH, ge=1, le=4, description="Batches in flight per worker process: task threads (and so "
        "Celery prefetch) = batch size × this. 2 (double buffering) prepares the next batch while one runs on the "
        "device, so batches stay full; 1 gives one batch's worth of threads (the device waits while they prepare "
        "the next). The soft time limit counts from when an image's own batch starts."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="Most torch intra-op threads per worker process, set once before its first "
        "model runs (uncapped, the processes' threads compete with each other and with the task threads for the "
        "CPUs); unset: the CPUs divided by the worker processes the supervisor starts on the machine. Never raises "
        "torch's own default (one per core), so `readar run` keeps it."
    )
    lease_seconds: int = Field(
        1200, ge=2, le=WEEK_S, description="How long a claimed image is owned before another worker may retry it; above the "
        "hard time limit, at most the visibility timeout."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts before an image is quarantined as failed.")
    soft_time_limit: int = Field(600, ge=1, le=WEEK_S, description="Seconds before a task is asked to stop (Celery).")
    hard_time_limit: int = Field(900, ge=1, le=WEEK_S, description="Seconds before a task is killed (Celery).")
    visibility_timeout: int = Field(
        1500, ge=1, le=WEEK_S, description="Redis redelivery timeout for unacknowledged tasks; above the lease. Use the same "
        "value on every client (workers, scheduler, monitoring)."
    )
    task_events: bool = Field(
        True, description="Workers send Celery task events (Flower, `celery events`), batched every 0.1 s; false "
        "turns them off (no measurable saving since batching), and Flower can still switch them on at run time."
    )
    path_map: str = Field(
        "", description="OLD=NEW[,OLD2=NEW2]: where this worker finds the dataset and checkpoint folders a run stored "
        "(absolute paths on the submitting machine) when it mounts them elsewhere."
    )
    setup_retry_seconds: int = Field(
        60, ge=1, le=DAY_S, description="How long a worker process that cannot run the detector on its machine (weights "
        "missing, no GPU) stays stopped before it tries again; meanwhile `readar healthcheck` reports unhealthy."
    )
    max_image_pixels: int = Field(
        4 * 1024 * 1024, ge=1, le=2**31 - 1, description="Largest image (width × height) READAR decodes: checked at "
        "indexing from the file header and again at decode; a larger image is failed with the reason. Default: "
        "four times the largest MVTec AD image (1024 × 1024)."
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus port of a worker (unset: off).")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the Prometheus endpoint binds (0.0.0.0 to let other hosts scrape it)."
    )
    heartbeat_file: Path | None = Field(None, description="File a worker touches on progress (liveness probes).")
    plugins: str = Field("", description="Comma-separated modules imported at start (they register detectors).")
    database_tls_ca_file: Path | None = Field(
        None, description="CA bundle: PostgreSQL over TLS with the server certificate verified (verify-full)."
    )
    broker_tls_ca_file: Path | None = Field(
        None, description="CA bundle: the broker over TLS (a rediss:// or amqps:// broker URL) with its certificate "
        "verified."
    )
    broker_tls_cert_file: Path | None = Field(None, description="Client certificate for broker TLS (optional).")
    broker_tls_key_file: Path | None = Field(None, description="Client key for broker TLS (optional).")

    @field_validator("path_map")
    @classmethod
    def _check_path_map(cls, value: str) -> str:
        from storage.paths import PathMap

        PathMap(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        # kombu cannot take a password as a query parameter (it fails with a TypeError on the first connection).
        if value and re.search(r"[?&;](password|passwd|pwd)=", value, re.IGNORECASE):
            raise ValueError("put the broker's password in the URL before the host (redis://:PASSWORD@host:6379/0 "
                             "or amqp://USER:PASSWORD@host:5672/vhost), not in a ?password= parameter")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"device must be cpu, cuda or cuda:N; got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_time_limits(self) -> Settings:
        # The messages name the environment variables (the only way to set these): READAR_<FIELD>.
        if not self.soft_time_limit < self.hard_time_limit:
            raise ValueError(
                f"READAR_SOFT_TIME_LIMIT ({self.soft_time_limit}) must be below READAR_HARD_TIME_LIMIT "
                f"({self.hard_time_limit}); lower the first or raise the second"
            )
        if not self.hard_time_limit < self.lease_seconds <= self.visibility_timeout:
            raise ValueError(
                f"need READAR_HARD_TIME_LIMIT ({self.hard_time_limit}) < READAR_LEASE_SECONDS "
                f"({self.lease_seconds}) <= READAR_VISIBILITY_TIMEOUT ({self.visibility_timeout}): a live task must "
                "never lose its lease, and a redelivered task must find the dead worker's lease expired"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.work_dir / 'readar.sqlite').resolve()}"

    @property
    def resolved_object_store_url(self) -> str:
        if self.object_store_url:
            return self.object_store_url
        return str((self.work_dir / "objects").resolve())

    def child_environment(self) -> dict[str, str]:
        """The resolved connection settings (and the pipeline depth and torch threads the supervisor plans its
        children with) as ``READAR_*`` variables, for processes this one starts: a child must use what the
        parent resolved (flags over environment over defaults), not re-read the environment."""
        env = {
            "READAR_WORK_DIR": str(self.work_dir.resolve()),
            "READAR_DATABASE_URL": self.resolved_database_url,
            "READAR_OBJECT_STORE_URL": self.resolved_object_store_url,
            "READAR_PIPELINE_DEPTH": str(self.pipeline_depth),
        }
        if self.torch_threads is not None:
            env["READAR_TORCH_THREADS"] = str(self.torch_threads)
        if self.broker_url:
            env["READAR_BROKER_URL"] = self.broker_url
        if self.path_map:
            env["READAR_PATH_MAP"] = self.path_map
        return env

    def broker_ssl(self) -> dict[str, Any] | None:
        """Celery ``broker_use_ssl`` for a TLS broker (the key names of redis-py or of py-amqp); None for plain
        connections."""
        import ssl

        url = self.broker_url or ""
        if not self.broker_tls_ca_file and not url.startswith(("rediss://", "amqps://")):
            return None
        prefix = "ssl_" if broker_kind(url) == "redis" else ""
        options: dict[str, Any] = {f"{prefix}cert_reqs": ssl.CERT_REQUIRED}
        for key, path in (("ca_certs", self.broker_tls_ca_file), ("certfile", self.broker_tls_cert_file),
                          ("keyfile", self.broker_tls_key_file)):
            if path:
                options[f"{prefix}{key}"] = str(path)
        return options

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for the object store (credentials included, never printed)."""
        options: dict[str, Any] = {}
        if self.resolved_object_store_url.startswith("s3://"):
            if self.s3_endpoint_url:
                options["client_kwargs"] = {"endpoint_url": self.s3_endpoint_url}
            if self.s3_key and self.s3_secret:
                options["key"] = self.s3_key.get_secret_value()
                options["secret"] = self.s3_secret.get_secret_value()
        return options

    def secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.s3_key, self.s3_secret) if s is not None]

    def public(self) -> dict[str, Any]:
        """A printable, storable view with every credential redacted."""
        return {
            "database_url": redact_url(self.resolved_database_url),
            "object_store_url": redact_url(self.resolved_object_store_url),
            "s3_endpoint_url": redact_url(self.s3_endpoint_url),
            "broker_url": redact_url(self.broker_url),
            "device": self.device,
            "batch_size": self.batch_size,
            "lease_seconds": self.lease_seconds,
            "max_attempts": self.max_attempts,
            "soft_time_limit": self.soft_time_limit,
            "hard_time_limit": self.hard_time_limit,
            "visibility_timeout": self.visibility_timeout,
            "max_image_pixels": self.max_image_pixels,
        }


def settings_error_line(exc: Any) -> str:
    """A pydantic ``ValidationError`` of :class:`Settings` as one line per problem, naming the environment
    variable and never echoing the value (it may be a URL with a password)."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error.get("loc", ())) or "settings"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"READAR_{field.upper()}: {redact_text(message)}" if field != "settings" else message)
    return "; ".join(problems)

