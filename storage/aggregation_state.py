"""Aggregation state (one row per run and category) and the metric rows the aggregator stores."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from storage.database import Database
from storage.jsonvalue import json_value
from storage.models import Category, CategoryStatus, MetricRow, utcnow


class AggregationRecords:
    """Categories' aggregation state and metric rows on one database."""

    db: Database

    def categories(self, run_id: int) -> list[Category]:
        with self.db.session() as session:
            return list(session.scalars(select(Category).where(Category.run_id == run_id).order_by(Category.category)))

    def reopen_aggregation(self, run_id: int, category: str) -> None:
        """A failed aggregator gives the category back: it is due again."""
        with self.db.session() as session, session.begin():
            session.execute(
                update(Category)
                .where(Category.run_id == run_id, Category.category == category, Category.status == CategoryStatus.AGGREGATING)
                .values(status=CategoryStatus.OPEN, dirty=True, aggregating_since=None)
            )

    def reset_stale_aggregations(self, run_id: int) -> int:
        """Embedded resume: an aggregation left 'aggregating' by a dead process becomes due again."""
        with self.db.session() as session, session.begin():
            return session.execute(
                update(Category)
                .where(Category.run_id == run_id, Category.status == CategoryStatus.AGGREGATING)
                .values(status=CategoryStatus.OPEN, dirty=True, aggregating_since=None)
            ).rowcount

    def finish_aggregation(
        self, run_id: int, category: str, *, rows: list[dict[str, Any]], state_key: str, num_used: int,
        num_skipped: int, num_failed: int,
    ) -> int:
        """Store a category's metric rows (replacing older versions) and mark it done; returns the version."""
        now = utcnow()
        with self.db.session() as session, session.begin():
            record = session.scalar(
                select(Category).where(Category.run_id == run_id, Category.category == category)
            )
            if record is None:
                raise LookupError(f"run {run_id} has no category {category!r}")
            record.version += 1
            record.status = CategoryStatus.OPEN if record.dirty else CategoryStatus.DONE
            record.aggregating_since = None
            record.state_key = state_key
            record.num_used, record.num_skipped, record.num_failed = num_used, num_skipped, num_failed
            self._replace_metric_rows(session, run_id, rows, version=record.version, now=now,
                                      where=MetricRow.category == category)
            return record.version

    def store_summary_rows(self, run_id: int, rows: list[dict[str, Any]]) -> None:
        """Replace the overall and mean rows."""
        with self.db.session() as session, session.begin():
            self._replace_metric_rows(session, run_id, rows, version=0, now=utcnow(),
                                      where=MetricRow.scope.in_(("overall", "mean")))

    @staticmethod
    def _replace_metric_rows(session: Any, run_id: int, rows: list[dict[str, Any]], *, version: int,
                             now: datetime, where: Any) -> None:
        for old in session.scalars(select(MetricRow).where(MetricRow.run_id == run_id, where)):
            session.delete(old)
        session.flush()
        known = {"scope", "category", "defect_type", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max",
                 "num_images", "num_anom_images"}
        for row in rows:
            session.add(
                MetricRow(
                    run_id=run_id, scope=row["scope"], category=row["category"],
                    defect_type=row.get("defect_type") or "",
                    iauroc=_nan_to_none(row.get("iAUROC")), pauroc=_nan_to_none(row.get("pAUROC")),
                    pro=_nan_to_none(row.get("PRO")), pro_hard=_nan_to_none(row.get("PRO_hard")),
                    f1_max=_nan_to_none(row.get("F1_max")), num_images=int(row.get("num_images", 0)),
                    num_anom_images=int(row.get("num_anom_images", 0)),
                    extra={k: json_value(v) for k, v in row.items() if k not in known},
                    version=version, updated_at=now,
                )
            )

    def metric_rows(self, run_id: int) -> list[MetricRow]:
        with self.db.session() as session:
            return list(session.scalars(select(MetricRow).where(MetricRow.run_id == run_id).order_by(MetricRow.id)))




def _nan_to_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if value != value else value
