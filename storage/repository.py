"""Repository: every read and write of run state, with the delivery protocol of DESIGN.md section 2.

SQL is the record of truth. A worker *claims* an image (status running, a lease, the fence incremented,
attempts counted), writes its logits to the image's fixed object key, then *completes* the row only if its
fence is still current, so a stale duplicate can never overwrite a newer result. A category is complete when
none of its rows is queued or running; the first finisher that sees that wins a compare-and-set on the
category row and runs (or enqueues) the aggregator exactly once per change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from storage.database import Database
from storage.jsonvalue import json_value
from storage.models import ACTIVE_STATUSES, Category, Image, MetricRow, Run


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunConflictError(RuntimeError):
    """A run of that name exists with a different configuration."""


class RunNotFoundError(LookupError):
    """No run of that name."""


@dataclass(frozen=True)
class PlannedImage:
    """One image row to create: what the dataset index knows about it."""

    category: str
    defect: str
    label: int
    image_path: str
    mask_path: str | None
    height: int | None
    width: int | None
    status: str = "queued"  # queued, or skipped/failed when the index already found a problem
    reason: str | None = None


@dataclass(frozen=True)
class Claim:
    """A held claim on an image row, with the row's facts a task needs (read in the same statement)."""

    image_id: int
    fence: int
    attempts: int
    run_id: int = 0
    category: str = ""
    defect: str = ""
    image_path: str = ""
    mask_path: str | None = None
    height: int | None = None
    width: int | None = None


class Repository:
    """Run state on one database."""

    def __init__(self, database: Database) -> None:
        self.db = database

    # ---------------------------------------------------------------- runs
    def get_run(self, name: str) -> Run:
        with self.db.session() as session:
            run = session.scalar(select(Run).where(Run.name == name))
        if run is None:
            raise RunNotFoundError(f"no run named {name!r}; `readar runs` lists the runs in this database")
        return run

    def find_run(self, name: str) -> Run | None:
        with self.db.session() as session:
            return session.scalar(select(Run).where(Run.name == name))

    def get_run_by_id(self, run_id: int) -> Run:
        with self.db.session() as session:
            run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        return run

    def list_runs(self) -> list[Run]:
        with self.db.session() as session:
            return list(session.scalars(select(Run).order_by(Run.id)))

    def create_run(
        self, *, name: str, detector: str, dataset_root: str, config: dict[str, Any], code_version: str,
        model_fingerprint: str | None, identity_keys: Sequence[str],
    ) -> Run:
        """Create the run, or return the existing one when its identity (``identity_keys`` of ``config`` plus
        detector and dataset root) matches; a mismatch raises :class:`RunConflictError`.

        Two schedulers submitting the same run at once: the unique name lets one insert win; the other sees
        the constraint violation, reads the winner's row and carries on with it."""
        for _ in range(3):
            try:
                with self.db.session() as session, session.begin():
                    existing = session.scalar(select(Run).where(Run.name == name))
                    if existing is None:
                        run = Run(
                            name=name, created_at=utcnow(), status="planned", detector=detector,
                            dataset_root=dataset_root, config=config, code_version=code_version,
                            model_fingerprint=model_fingerprint,
                        )
                        session.add(run)
                        session.flush()
                        return run
                break
            except IntegrityError:
                continue
        differences = [
            key for key in identity_keys if existing.config.get(key) != config.get(key)
        ]
        if existing.detector != detector:
            differences.append("detector")
        if existing.dataset_root != dataset_root:
            differences.append("dataset_root")
        if differences:
            raise RunConflictError(
                f"run {name!r} already exists with different settings ({', '.join(differences)}); "
                f"resume it with `readar resume {name}` or choose another --run-name"
            )
        return existing

    def set_run_status(self, run_id: int, status: str) -> None:
        with self.db.session() as session, session.begin():
            session.execute(update(Run).where(Run.id == run_id).values(status=status))

    # ---------------------------------------------------------------- planning
    def add_images(self, run_id: int, planned: Iterable[PlannedImage]) -> int:
        """Insert rows for images not yet in the run (idempotent); returns how many were new.

        A concurrent planner of the same run makes one transaction fail on the unique constraints; it then
        retries against the rows that now exist, so each image gets exactly one row."""
        planned = list(planned)
        for attempt in range(3):
            try:
                return self._add_images(run_id, planned)
            except IntegrityError:
                if attempt == 2:
                    raise
        return 0

    def _add_images(self, run_id: int, planned: list[PlannedImage]) -> int:
        with self.db.session() as session, session.begin():
            known = set(session.scalars(select(Image.image_path).where(Image.run_id == run_id)))
            new_rows = [
                {"run_id": run_id, "category": p.category, "defect": p.defect, "label": p.label,
                 "image_path": p.image_path, "mask_path": p.mask_path, "height": p.height, "width": p.width,
                 "status": p.status, "attempts": 0, "fence": 0, "error": p.reason}
                for p in planned
                if p.image_path not in known
            ]
            # Core executemany in chunks: planning 100,000 images must take seconds, not minutes.
            for start in range(0, len(new_rows), 5000):
                session.execute(insert(Image), new_rows[start : start + 5000])
            categories = {p.category for p in planned}
            known_categories = set(
                session.scalars(select(Category.category).where(Category.run_id == run_id))
            )
            session.add_all(
                Category(run_id=run_id, category=c, status="open", dirty=True, version=0, num_used=0,
                         num_skipped=0, num_failed=0)
                for c in sorted(categories - known_categories)
            )
        return len(new_rows)

    # ---------------------------------------------------------------- delivery protocol
    # The hot path runs on Core connections: one short transaction per step, no ORM unit of work.
    def claim(self, image_id: int, owner: str, lease_seconds: int, *, max_attempts: int = 3) -> Claim | None:
        """Claim an image if it is queued or its lease expired; None when someone else holds it or it is done.

        An image whose attempts are used up without a recorded failure (its worker died every time, e.g. a
        poison input that crashes the process) is quarantined as ``failed`` here instead of claimed again.
        """
        now = utcnow()
        images = Image.__table__
        claimable = or_(images.c.status == "queued",
                        and_(images.c.status == "running", images.c.lease_expires_at < now))
        give_up = images.c.attempts >= max_attempts
        with self.db.engine.begin() as connection:
            # One statement: claim the row, or quarantine it when its attempts are used up.
            row = connection.execute(
                update(images)
                .where(images.c.id == image_id, claimable)
                .values(
                    status=case((give_up, "failed"), else_="running"),
                    lease_owner=case((give_up, images.c.lease_owner), else_=owner),
                    lease_expires_at=case((give_up, None), else_=now + timedelta(seconds=lease_seconds)),
                    fence=case((give_up, images.c.fence), else_=images.c.fence + 1),
                    attempts=case((give_up, images.c.attempts), else_=images.c.attempts + 1),
                    started_at=case((give_up, images.c.started_at), else_=now),
                    finished_at=case((give_up, now), else_=images.c.finished_at),
                    worker=case((give_up, images.c.worker), else_=owner),
                    error=case(
                        (give_up, func.coalesce(images.c.error + "; ", "") + f"quarantined: {max_attempts} attempts "
                         "ended without a result (the worker died or timed out each time)"),
                        else_=images.c.error,
                    ),
                )
                .returning(images.c.status, images.c.fence, images.c.attempts, images.c.run_id, images.c.category,
                           images.c.defect, images.c.image_path, images.c.mask_path, images.c.height,
                           images.c.width)
            ).first()
            if row is not None and row.status == "failed":
                self._mark_dirty(connection, row.run_id, row.category)
                return None
        if row is None:
            return None
        return Claim(image_id, int(row.fence), int(row.attempts), run_id=int(row.run_id), category=row.category,
                     defect=row.defect, image_path=row.image_path, mask_path=row.mask_path, height=row.height,
                     width=row.width)

    def complete(
        self, claim: Claim, *, object_key: str, image_score: float, diagnostics: dict[str, Any],
        timings: dict[str, Any], device: str | None,
    ) -> bool:
        """Commit a result if the claim's fence is still current; False for a stale writer."""
        images = Image.__table__
        with self.db.engine.begin() as connection:
            row = connection.execute(
                update(images)
                .where(images.c.id == claim.image_id, images.c.fence == claim.fence, images.c.status == "running")
                .values(
                    status="done", object_key=object_key, image_score=image_score, diagnostics=diagnostics,
                    timings=timings, device=device, finished_at=utcnow(), error=None, lease_expires_at=None,
                )
                .returning(images.c.run_id, images.c.category)
            ).first()
            if row is not None:
                self._mark_dirty(connection, row.run_id, row.category)
        return row is not None

    def fail(self, claim: Claim, error: str, *, max_attempts: int, permanent: bool = False) -> str | None:
        """Record a failed attempt: back to queued for a retry, or ``failed`` (quarantined) when the attempts
        are used up or the error is permanent (bad input). Returns the new status, None for a stale claim."""
        images = Image.__table__
        now = utcnow()
        give_up = or_(images.c.attempts >= max_attempts, permanent)
        status_value = case((give_up, "failed"), else_="queued")
        with self.db.engine.begin() as connection:
            row = connection.execute(
                update(images)
                .where(images.c.id == claim.image_id, images.c.fence == claim.fence, images.c.status == "running")
                .values(status=status_value, error=error, lease_expires_at=None,
                        finished_at=case((give_up, now), else_=None))
                .returning(images.c.status, images.c.run_id, images.c.category)
            ).first()
            if row is None:
                return None
            if row.status == "failed":
                self._mark_dirty(connection, row.run_id, row.category)
        return str(row.status)

    def release(self, claim: Claim, *, error: str | None = None) -> bool:
        """Give an image back without counting the attempt: graceful shutdown, or a storage outage that is
        not the image's fault (``error`` keeps the reason visible in ``readar status``)."""
        images = Image.__table__
        values: dict[str, Any] = {"status": "queued", "lease_expires_at": None,
                                  "attempts": images.c.attempts - 1}
        if error is not None:
            values["error"] = error
        with self.db.engine.begin() as connection:
            return bool(
                connection.execute(
                    update(images)
                    .where(images.c.id == claim.image_id, images.c.fence == claim.fence,
                           images.c.status == "running")
                    .values(**values)
                ).rowcount
            )

    def release_expired_or_orphaned(self, run_id: int, orphaned_owners: Iterable[str] = ()) -> int:
        """Requeue running rows whose lease expired or whose owner is known to be dead."""
        now = utcnow()
        owners = list(orphaned_owners)
        condition = Image.lease_expires_at < now
        if owners:
            condition = or_(condition, Image.lease_owner.in_(owners))
        with self.db.session() as session, session.begin():
            return session.execute(
                update(Image)
                .where(Image.run_id == run_id, Image.status == "running", condition)
                .values(status="queued", lease_expires_at=None)
            ).rowcount

    @staticmethod
    def _mark_dirty(connection: Any, run_id: int, category: str) -> None:
        """Flag the category for (re-)aggregation. Writes only when the flag is not set yet, so concurrent
        finishers of one category do not queue up on its row lock."""
        categories = Category.__table__
        connection.execute(
            update(categories)
            .where(categories.c.run_id == run_id, categories.c.category == category, categories.c.dirty.is_(False))
            .values(dirty=True)
        )

    # ---------------------------------------------------------------- queries
    def image(self, image_id: int) -> Image:
        with self.db.session() as session:
            row = session.get(Image, image_id)
        if row is None:
            raise LookupError(f"no image row with id {image_id}")
        return row

    def pending_image_ids(self, run_id: int) -> list[int]:
        """Images still to process: queued, or running with an expired lease."""
        now = utcnow()
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Image.id)
                    .where(
                        Image.run_id == run_id,
                        or_(Image.status == "queued", and_(Image.status == "running", Image.lease_expires_at < now)),
                    )
                    .order_by(Image.id)
                )
            )

    def images_to_enqueue(self, run_id: int, *, stale_after_s: int) -> list[int]:
        """Queued images with no queue message sent within ``stale_after_s`` (the visibility timeout): those a
        (re)submit must enqueue. Done, running and freshly enqueued images are left alone."""
        cutoff = utcnow() - timedelta(seconds=stale_after_s)
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Image.id)
                    .where(Image.run_id == run_id, Image.status == "queued",
                           or_(Image.enqueued_at.is_(None), Image.enqueued_at < cutoff))
                    .order_by(Image.id)
                )
            )

    def mark_enqueued(self, image_ids: Sequence[int]) -> None:
        now = utcnow()
        with self.db.session() as session, session.begin():
            for start in range(0, len(image_ids), 5000):
                chunk = list(image_ids[start : start + 5000])
                session.execute(update(Image).where(Image.id.in_(chunk)).values(enqueued_at=now))

    def clear_enqueued(self, run_id: int, *, only_started: bool = False) -> None:
        """Forget the message timestamps of queued rows, so the next (re)submit sends them new messages: all of
        them after a cancel, or ``only_started`` ones whose lease just expired (their messages were consumed)."""
        condition = [Image.run_id == run_id, Image.status == "queued"]
        if only_started:
            condition.append(Image.started_at.is_not(None))
        with self.db.session() as session, session.begin():
            session.execute(update(Image).where(*condition).values(enqueued_at=None))

    def running_owners(self, run_id: int) -> list[str]:
        with self.db.session() as session:
            return [
                o for o in session.scalars(
                    select(Image.lease_owner).where(Image.run_id == run_id, Image.status == "running").distinct()
                ) if o
            ]

    def images(
        self, run_id: int, *, category: str | None = None, status: str | None = None,
    ) -> list[Image]:
        query = select(Image).where(Image.run_id == run_id)
        if category:
            query = query.where(Image.category == category)
        if status:
            query = query.where(Image.status == status)
        with self.db.session() as session:
            return list(session.scalars(query.order_by(Image.category, Image.defect, Image.image_path)))

    def status_counts(self, run_id: int) -> dict[str, dict[str, int]]:
        """{category: {status: count}}."""
        with self.db.session() as session:
            rows = session.execute(
                select(Image.category, Image.status, func.count())
                .where(Image.run_id == run_id)
                .group_by(Image.category, Image.status)
            ).all()
        counts: dict[str, dict[str, int]] = {}
        for category, status, count in rows:
            counts.setdefault(category, {})[status] = int(count)
        return counts

    def finished_since(self, run_id: int, since: datetime) -> int:
        """Images that reached a terminal state after ``since`` (for rates and ETAs)."""
        with self.db.session() as session:
            return int(session.scalar(
                select(func.count()).select_from(Image)
                .where(Image.run_id == run_id, Image.finished_at.is_not(None), Image.finished_at >= since)
            ) or 0)

    def status_totals(self, run_id: int) -> dict[str, int]:
        """{status: count} over the whole run."""
        totals: dict[str, int] = {}
        for per_status in self.status_counts(run_id).values():
            for status, count in per_status.items():
                totals[status] = totals.get(status, 0) + count
        return totals

    def active_count(self, run_id: int) -> int:
        """Images still queued or running."""
        totals = self.status_totals(run_id)
        return sum(totals.get(status, 0) for status in ACTIVE_STATUSES)

    def categories(self, run_id: int) -> list[Category]:
        with self.db.session() as session:
            return list(session.scalars(select(Category).where(Category.run_id == run_id).order_by(Category.category)))

    # ---------------------------------------------------------------- aggregation
    def try_start_aggregation(self, run_id: int, category: str, *, stale_after_s: int = 3600) -> bool:
        """Compare-and-set: True for exactly one caller once the category has no active rows and new results
        since its last aggregation (or a previous aggregator died and its claim went stale)."""
        now = utcnow()
        # NOT EXISTS stops at the first active row (index on run, category, status): O(1) while a category
        # still has work, instead of counting thousands of rows after every image.
        no_active = ~exists().where(
            Image.run_id == run_id, Image.category == category, Image.status.in_(ACTIVE_STATUSES)
        )
        with self.db.session() as session, session.begin():
            return bool(
                session.execute(
                    update(Category)
                    .where(
                        Category.run_id == run_id,
                        Category.category == category,
                        no_active,
                        or_(
                            and_(Category.dirty.is_(True), Category.status != "aggregating"),
                            and_(Category.status == "aggregating",
                                 Category.aggregating_since < now - timedelta(seconds=stale_after_s)),
                        ),
                    )
                    .values(status="aggregating", dirty=False, aggregating_since=now)
                ).rowcount
            )

    def reopen_aggregation(self, run_id: int, category: str) -> None:
        """A failed aggregator gives the category back: it is due again."""
        with self.db.session() as session, session.begin():
            session.execute(
                update(Category)
                .where(Category.run_id == run_id, Category.category == category, Category.status == "aggregating")
                .values(status="open", dirty=True, aggregating_since=None)
            )

    def reset_stale_aggregations(self, run_id: int) -> int:
        """Embedded resume: an aggregation left 'aggregating' by a dead process becomes due again."""
        with self.db.session() as session, session.begin():
            return session.execute(
                update(Category)
                .where(Category.run_id == run_id, Category.status == "aggregating")
                .values(status="open", dirty=True, aggregating_since=None)
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
            record.status = "open" if record.dirty else "done"
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


