"""SQL schema (SQLAlchemy 2.0 typed models). Alembic migrations in ``storage/migrations`` mirror these tables.

Tables (DESIGN.md section 4):
- ``runs``: one benchmark run: its name, configuration (credentials redacted), code version, model fingerprint.
- ``images``: one row per run and test image, with the delivery protocol's columns (status, attempts, lease,
  fence) and the result (object key, image score, diagnostics, timings).
- ``categories``: one row per run and category: aggregation state (dirty flag, compare-and-set status,
  version, counts).
- ``metric_rows``: the metrics table of a run, one row per scope (category, defect, overall, mean), versioned.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class ImageStatus(StrEnum):
    """Where an image row is in the delivery protocol (DESIGN.md section 2)."""

    QUEUED = "queued"  # waiting for a worker (a message is out, or will be sent)
    RUNNING = "running"  # claimed under a lease
    DONE = "done"  # result committed
    FAILED = "failed"  # quarantined: bad input, or the attempts are used up
    SKIPPED = "skipped"  # left out on purpose (e.g. a defect image without a mask)


class CategoryStatus(StrEnum):
    """A category's aggregation state: the compare-and-set moves it open → aggregating → done (or open again
    when results arrived meanwhile)."""

    OPEN = "open"
    AGGREGATING = "aggregating"
    DONE = "done"


class RunStatus(StrEnum):
    PLANNED = "planned"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # an embedded run's process stopped; `readar resume` goes on
    CANCELLED = "cancelled"
    DONE = "done"


IMAGE_STATUSES = tuple(status.value for status in ImageStatus)  # plain strings: click choices, table columns
ACTIVE_STATUSES = (ImageStatus.QUEUED, ImageStatus.RUNNING)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(20), default="planned")  # planned|running|done|cancelled
    detector: Mapped[str] = mapped_column(String(100))
    dataset_root: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]]
    code_version: Mapped[str] = mapped_column(String(100))
    model_fingerprint: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("run_id", "image_path", name="uq_images_run_path"),
        Index("ix_images_run_category_status", "run_id", "category", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No single-column indexes (migration 0004): queries filter by run first, served by the two above.
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(200))
    defect: Mapped[str] = mapped_column(String(200))
    label: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    mask_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(20), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    fence: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    object_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(50), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)  # last queue message sent (scale-out)


class Category(Base):
    __tablename__ = "categories"
    __table_args__ = (UniqueConstraint("run_id", "category", name="uq_categories_run_category"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    category: Mapped[str] = mapped_column(String(200))
    # open: results may still land; aggregating: one aggregator owns it (compare-and-set); done: rows current.
    status: Mapped[str] = mapped_column(String(20), default="open")
    dirty: Mapped[bool] = mapped_column(Boolean, default=True)  # results changed since the last aggregation
    version: Mapped[int] = mapped_column(Integer, default=0)  # bumped by every completed aggregation
    aggregating_since: Mapped[datetime | None] = mapped_column(nullable=True)
    num_used: Mapped[int] = mapped_column(Integer, default=0)
    num_skipped: Mapped[int] = mapped_column(Integer, default=0)
    num_failed: Mapped[int] = mapped_column(Integer, default=0)
    state_key: Mapped[str | None] = mapped_column(Text, nullable=True)


class MetricRow(Base):
    __tablename__ = "metric_rows"
    __table_args__ = (UniqueConstraint("run_id", "scope", "category", "defect_type", name="uq_metric_rows_scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(20))  # category | defect | overall | mean
    category: Mapped[str] = mapped_column(String(200))  # ALL for overall and mean
    defect_type: Mapped[str] = mapped_column(String(200), default="")  # "" except for defect rows
    iauroc: Mapped[float | None] = mapped_column(Float, nullable=True)
    pauroc: Mapped[float | None] = mapped_column(Float, nullable=True)
    pro: Mapped[float | None] = mapped_column(Float, nullable=True)
    pro_hard: Mapped[float | None] = mapped_column(Float, nullable=True)
    f1_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    num_images: Mapped[int] = mapped_column(Integer, default=0)
    num_anom_images: Mapped[int] = mapped_column(Integer, default=0)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime]
