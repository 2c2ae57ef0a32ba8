"""Runs, their planned images, and the queries over image rows that are not steps of the delivery protocol
(storage/protocol.py): status counts, enqueue bookkeeping, requeueing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from storage.database import Database
from storage.models import (
    ACTIVE_STATUSES,
    Category,
    CategoryStatus,
    Image,
    ImageStatus,
    MetricRow,
    Run,
    RunStatus,
    utcnow,
)
from storage.protocol import locked_in_id_order


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
    status: str = ImageStatus.QUEUED  # or skipped/failed when the index already found a problem
    reason: str | None = None



class RunRecords:
    """Runs and image rows on one database."""

    db: Database

    def get_run(self, name: str) -> Run:
        with self.db.session() as session:
            run = session.scalar(select(Run).where(Run.name == name))
        if run is None:
            raise RunNotFoundError(f"no run named {name!r}; `readar runs` lists the runs in this database")
        return run

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
                            name=name, created_at=utcnow(), status=RunStatus.PLANNED, detector=detector,
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

    def set_run_status(self, run_id: int, status: RunStatus) -> None:
        with self.db.session() as session, session.begin():
            session.execute(update(Run).where(Run.id == run_id).values(status=status))

    def set_model_fingerprint(self, run_id: int, fingerprint: str) -> None:
        """Record the model a run's images are computed with (only while none has been, see the `run` command)."""
        with self.db.session() as session, session.begin():
            session.execute(update(Run).where(Run.id == run_id).values(model_fingerprint=fingerprint))

    def set_run_executor(self, run_id: int, owner: str | None) -> None:
        """Record (``host:pid``) or clear the process executing an embedded run, kept in the run's config, so
        that a run whose process is gone can be shown as interrupted."""
        with self.db.session() as session, session.begin():
            run = session.get(Run, run_id)
            if run is not None:
                run.config = {**(run.config or {}), "executor": owner}

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
                Category(run_id=run_id, category=c, status=CategoryStatus.OPEN, dirty=True, version=0, num_used=0,
                         num_skipped=0, num_failed=0)
                for c in sorted(categories - known_categories)
            )
        return len(new_rows)

    def queued_sent_before(self, run_id: int, before: datetime) -> list[int]:
        """Queued images whose message went out before ``before`` (candidates for a lost message)."""
        with self.db.session() as session:
            return list(session.scalars(
                select(Image.id).where(Image.run_id == run_id, Image.status == ImageStatus.QUEUED, Image.enqueued_at < before)
                .order_by(Image.id)
            ))

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
                        or_(Image.status == ImageStatus.QUEUED, and_(Image.status == ImageStatus.RUNNING, Image.lease_expires_at < now)),
                    )
                    .order_by(Image.id)
                )
            )

    def images_to_enqueue(self, run_id: int, *, stale_after_s: int, resend_stale: bool = True) -> list[int]:
        """Queued images that need a queue message: never sent one, or (``resend_stale``) sent one more than
        ``stale_after_s`` (the visibility timeout) ago. Done, running and freshly enqueued images are left alone.

        Pass ``resend_stale=False`` while the queue still holds a backlog: a message waiting in the queue list
        does not expire, so an old timestamp then means "still waiting", not "lost"."""
        condition = Image.enqueued_at.is_(None)
        if resend_stale:
            condition = or_(condition, Image.enqueued_at < utcnow() - timedelta(seconds=stale_after_s))
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Image.id)
                    .where(Image.run_id == run_id, Image.status == ImageStatus.QUEUED, condition)
                    .order_by(Image.id)
                )
            )

    def mark_enqueued(self, image_ids: Sequence[int]) -> None:
        now = utcnow()
        for start in range(0, len(image_ids), 1000):
            chunk = list(image_ids[start : start + 1000])
            with self.db.engine.begin() as connection:  # short transactions: workers claim these rows meanwhile
                connection.execute(
                    update(Image.__table__).where(locked_in_id_order(Image.__table__.c.id.in_(chunk)))
                    .values(enqueued_at=now)
                )

    def clear_enqueued(self, run_id: int, *, only_started: bool = False) -> None:
        """Forget the message timestamps of queued rows, so the next (re)submit sends them new messages: all of
        them after a cancel, or ``only_started`` ones whose lease just expired (their messages were consumed)."""
        condition = [Image.run_id == run_id, Image.status == ImageStatus.QUEUED]
        if only_started:
            condition.append(Image.started_at.is_not(None))
        with self.db.engine.begin() as connection:
            connection.execute(update(Image.__table__).where(locked_in_id_order(*condition)).values(enqueued_at=None))

    def running_owners(self, run_id: int) -> list[str]:
        with self.db.session() as session:
            return [
                o for o in session.scalars(
                    select(Image.lease_owner).where(Image.run_id == run_id, Image.status == ImageStatus.RUNNING).distinct()
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

    def requeue_lost_results(self, run_id: int, image_ids: Sequence[int], error: str) -> int:
        """Done images whose logit object is missing or damaged go back to ``queued`` to be computed again (a
        new fence: a late writer of the old result cannot commit). Attempts are kept, so an image whose result
        keeps getting lost ends quarantined like any other repeated failure. Returns how many were queued."""
        images = Image.__table__
        with self.db.engine.begin() as connection:
            return int(connection.execute(
                update(images)
                .where(locked_in_id_order(images.c.id.in_(list(image_ids)), images.c.run_id == run_id,
                                           images.c.status == ImageStatus.DONE))
                .values(status=ImageStatus.QUEUED, object_key=None, image_score=None, enqueued_at=None, lease_owner=None,
                        lease_expires_at=None, finished_at=None, fence=images.c.fence + 1, error=error)
            ).rowcount)

    def requeue_failed(self, run_id: int, *, category: str | None = None) -> int:
        """Quarantined (failed) images get a fresh start: queued, attempts and error cleared, a new fence; their
        categories are due for aggregation again once they finish. Returns how many."""
        images = Image.__table__
        selected = [images.c.run_id == run_id, images.c.status == ImageStatus.FAILED]
        if category is not None:
            selected.append(images.c.category == category)
        with self.db.engine.begin() as connection:
            count = int(connection.execute(
                update(images).where(locked_in_id_order(*selected), *selected)
                .values(status=ImageStatus.QUEUED, attempts=0, error=None, enqueued_at=None, lease_owner=None,
                        lease_expires_at=None, finished_at=None, fence=images.c.fence + 1)
            ).rowcount)
            if count:
                condition = [Category.run_id == run_id, Category.status != CategoryStatus.AGGREGATING]
                if category is not None:
                    condition.append(Category.category == category)
                connection.execute(update(Category.__table__).where(*condition).values(status=CategoryStatus.OPEN, dirty=True))
                connection.execute(update(Run.__table__).where(Run.id == run_id).values(status=RunStatus.RUNNING))
        return count

    def delete_run(self, run_id: int) -> None:
        """The run and everything SQL holds for it (images, categories, metric rows)."""
        with self.db.engine.begin() as connection:
            for table in (MetricRow.__table__, Category.__table__, Image.__table__):
                connection.execute(delete(table).where(table.c.run_id == run_id))
            connection.execute(delete(Run.__table__).where(Run.__table__.c.id == run_id))

