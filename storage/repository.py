"""Repository: every read and write of run state, with the delivery protocol of DESIGN.md section 2.

SQL is the record of truth. A worker *claims* an image (status running, a lease, the fence incremented,
attempts counted), writes its logits to the image's fixed object key, then *completes* the row only if its
fence is still current, so a stale duplicate can never overwrite a newer result. A category is complete when
none of its rows is queued or running; the first finisher that sees that wins a compare-and-set on the
category row and runs (or enqueues) the aggregator exactly once per change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, exists, func, insert, or_, select, tuple_, update
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


@dataclass(frozen=True)
class Completion:
    """A finished image's result, to be committed under its claim's fence."""

    claim: Claim
    object_key: str
    image_score: float
    diagnostics: dict[str, Any]
    timings: dict[str, Any]
    device: str | None


def _json_text(value: Any) -> str | None:
    """A JSON column value as the text PostgreSQL parses (what SQLAlchemy's JSON type would send)."""
    return None if value is None else json.dumps(value)


def _locked_in_id_order(*conditions: Any) -> Any:
    """``images.id IN (...)`` over the rows matching ``conditions``, row-locked in id order first (PostgreSQL;
    SQLite locks the whole database). Every statement that changes many image rows at once goes through this,
    so two of them (a bulk mark and a batched claim, say) can never lock rows in opposite orders and deadlock."""
    images = Image.__table__
    return images.c.id.in_(
        select(images.c.id).where(*conditions).order_by(images.c.id).with_for_update()
    )


def _hot_statements() -> dict[str, Any]:
    """The delivery protocol's statements for SQLite (PostgreSQL has its own texts: _PG_HOT), built once.

    Building a Core statement costs more Python time than executing it: these run several times per image, so
    they are built here once and reused; SQLAlchemy then finds their compiled form in its cache."""
    images, categories = Image.__table__, Category.__table__
    now = bindparam("now")
    give_up = images.c.attempts >= bindparam("max_attempts")
    claim = (
        update(images)
        .where(_locked_in_id_order(images.c.id.in_(bindparam("ids", expanding=True)),
                                   tuple_(images.c.run_id, images.c.id).in_(bindparam("pairs", expanding=True))),
               or_(images.c.status == "queued",
                   and_(images.c.status == "running", images.c.lease_expires_at < now)))
        .values(
            status=case((give_up, "failed"), else_="running"),
            lease_owner=case((give_up, images.c.lease_owner), else_=bindparam("owner")),
            lease_expires_at=case((give_up, None), else_=bindparam("expires")),
            fence=case((give_up, images.c.fence), else_=images.c.fence + 1),
            attempts=case((give_up, images.c.attempts), else_=images.c.attempts + 1),
            started_at=case((give_up, images.c.started_at), else_=now),
            finished_at=case((give_up, now), else_=images.c.finished_at),
            worker=case((give_up, images.c.worker), else_=bindparam("owner")),
            error=case((give_up, func.coalesce(images.c.error + "; ", "") + bindparam("quarantine_note")),
                       else_=images.c.error),
        )
        .returning(images.c.id, images.c.status, images.c.fence, images.c.attempts, images.c.run_id,
                   images.c.category, images.c.defect, images.c.image_path, images.c.mask_path,
                   images.c.height, images.c.width)
    )
    fenced = (images.c.id == bindparam("row_id"), images.c.fence == bindparam("row_fence"),
              images.c.status == "running")
    complete = (
        update(images)
        .where(*fenced)
        .values(status="done", object_key=bindparam("key"), image_score=bindparam("score"),
                diagnostics=bindparam("diagnostics", type_=images.c.diagnostics.type),
                timings=bindparam("timings", type_=images.c.timings.type), device=bindparam("dev"),
                finished_at=now, error=None, lease_expires_at=None)
        .returning(images.c.run_id, images.c.category)
    )
    mark_dirty = (
        update(categories)
        .where(categories.c.run_id == bindparam("dirty_run"), categories.c.category == bindparam("dirty_category"),
               categories.c.dirty.is_(False))
        .values(dirty=True)
    )
    # NOT EXISTS stops at the first active row (index on run, category, status): O(1) while a category still
    # has work, instead of counting thousands of rows after every image.
    no_active = ~exists().where(
        images.c.run_id == bindparam("cas_run"), images.c.category == bindparam("cas_category"),
        images.c.status.in_(ACTIVE_STATUSES),
    )
    start_aggregation = (
        update(categories)
        .where(
            categories.c.run_id == bindparam("cas_run"), categories.c.category == bindparam("cas_category"),
            no_active,
            or_(and_(categories.c.dirty.is_(True), categories.c.status != "aggregating"),
                and_(categories.c.status == "aggregating", categories.c.aggregating_since < bindparam("stale"))),
        )
        .values(status="aggregating", dirty=False, aggregating_since=now)
    )
    return {"claim": claim, "complete": complete, "mark_dirty": mark_dirty,
            "start_aggregation": start_aggregation}


_HOT = _hot_statements()

# PostgreSQL runs each step of the delivery protocol as one autocommit statement: one round trip instead of
# BEGIN, the statement(s) and COMMIT (7 round trips per image became 3). The category flag that used to be a
# second statement in the transaction is a data-modifying CTE, so each step stays atomic. Rows are locked in id
# order first, like every multi-row update of ``images`` (see _locked_in_id_order). The texts go straight to
# the driver (pyformat parameters): no statement compilation on the hot path.
_NO_ACTIVE_SQL = " AND ".join(
    f"NOT EXISTS (SELECT 1 FROM images WHERE run_id = %(run)s AND category = %(category)s AND status = '{status}')"
    for status in ACTIVE_STATUSES)
_PG_HOT = {
    "claim": """
WITH locked AS (
    SELECT id FROM images
    WHERE id = ANY(%(ids)s::bigint[])
      AND (run_id, id) IN (SELECT * FROM unnest(%(runs)s::bigint[], %(ids)s::bigint[]))
      AND (status = 'queued' OR (status = 'running' AND lease_expires_at < %(now)s))
    ORDER BY id FOR UPDATE
), claimed AS (
    UPDATE images SET
        status = CASE WHEN attempts >= %(max_attempts)s THEN 'failed' ELSE 'running' END,
        lease_owner = CASE WHEN attempts >= %(max_attempts)s THEN lease_owner ELSE %(owner)s END,
        lease_expires_at = CASE WHEN attempts >= %(max_attempts)s THEN NULL ELSE %(expires)s END,
        fence = CASE WHEN attempts >= %(max_attempts)s THEN fence ELSE fence + 1 END,
        attempts = CASE WHEN attempts >= %(max_attempts)s THEN attempts ELSE attempts + 1 END,
        started_at = CASE WHEN attempts >= %(max_attempts)s THEN started_at ELSE %(now)s END,
        finished_at = CASE WHEN attempts >= %(max_attempts)s THEN %(now)s ELSE finished_at END,
        worker = CASE WHEN attempts >= %(max_attempts)s THEN worker ELSE %(owner)s END,
        error = CASE WHEN attempts >= %(max_attempts)s THEN coalesce(error || '; ', '') || %(quarantine_note)s
                     ELSE error END
    WHERE id IN (SELECT id FROM locked)
      AND (status = 'queued' OR (status = 'running' AND lease_expires_at < %(now)s))
    RETURNING id, status, fence, attempts, run_id, category, defect, image_path, mask_path, height, width
), flagged AS (
    UPDATE categories SET dirty = true
    WHERE NOT dirty AND (run_id, category) IN (SELECT run_id, category FROM claimed WHERE status = 'failed')
)
SELECT * FROM claimed""",
    # One statement for a whole group of results, each under its own fence; the flag is written only when the
    # category is not flagged yet, so concurrent finishers of one category do not queue on its row lock (it
    # cannot be cleared before this commit: an aggregation starts only once no row is active, and these are).
    "complete": """
WITH results AS (
    SELECT * FROM unnest(%(ids)s::integer[], %(fences)s::integer[], %(keys)s::text[], %(scores)s::float8[],
                         %(diagnostics)s::text[], %(timings)s::text[], %(devices)s::text[])
        AS r(id, fence, object_key, image_score, diagnostics, timings, device)
), locked AS (
    SELECT images.id FROM images JOIN results ON images.id = results.id
    WHERE images.fence = results.fence AND images.status = 'running'
    ORDER BY images.id FOR UPDATE OF images
), done AS (
    UPDATE images SET status = 'done', object_key = results.object_key, image_score = results.image_score,
        diagnostics = results.diagnostics::json, timings = results.timings::json, device = results.device,
        finished_at = %(now)s, error = NULL, lease_expires_at = NULL
    FROM results
    WHERE images.id = results.id AND images.fence = results.fence AND images.status = 'running'
      AND images.id IN (SELECT id FROM locked)
    RETURNING images.id, images.run_id, images.category
), flagged AS (
    UPDATE categories SET dirty = true
    WHERE NOT dirty AND (run_id, category) IN (SELECT run_id, category FROM done)
)
SELECT id FROM done""",
    # One NOT EXISTS per active status, each an equality on all three columns of the (run, category, status)
    # index: it stops at the first active row. (With ``status IN (...)`` PostgreSQL filtered the status
    # instead, reading every done row of the category on every check.)
    "start_aggregation": f"""
UPDATE categories SET status = 'aggregating', dirty = false, aggregating_since = %(now)s
WHERE run_id = %(run)s AND category = %(category)s
  AND {_NO_ACTIVE_SQL}
  AND ((dirty AND status <> 'aggregating') OR (status = 'aggregating' AND aggregating_since < %(stale)s))""",
}


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
                Category(run_id=run_id, category=c, status="open", dirty=True, version=0, num_used=0,
                         num_skipped=0, num_failed=0)
                for c in sorted(categories - known_categories)
            )
        return len(new_rows)

    # ---------------------------------------------------------------- delivery protocol
    # The hot path runs on Core connections: one short transaction per step, no ORM unit of work.
    def claim(self, image_id: int, owner: str, lease_seconds: int, *, max_attempts: int = 3,
              run_id: int | None = None) -> Claim | None:
        """Claim an image if it is queued or its lease expired; None when someone else holds it or it is done.

        An image whose attempts are used up without a recorded failure (its worker died every time, e.g. a
        poison input that crashes the process) is quarantined as ``failed`` here instead of claimed again.
        ``run_id`` defaults to the image's own run.
        """
        if run_id is None:
            run_id = self.image(image_id).run_id
        return self.claim_many([(run_id, image_id)], owner, lease_seconds, max_attempts=max_attempts).get(image_id)

    def claim_many(self, keys: Sequence[tuple[int, int]], owner: str, lease_seconds: int, *, max_attempts: int = 3
                   ) -> dict[int, Claim]:
        """:meth:`claim` for several ``(run id, image id)`` pairs in one statement; the result holds the images
        that were claimed. A pair whose image belongs to another run claims nothing: a message names its run, and
        the dataset root, object key and aggregation it leads to all come from that run."""
        now = utcnow()
        parameters = {
            "ids": [image_id for _, image_id in keys], "runs": [run_id for run_id, _ in keys],
            "pairs": [tuple(key) for key in keys], "now": now, "owner": owner, "max_attempts": max_attempts,
            "expires": now + timedelta(seconds=lease_seconds),
            "quarantine_note": f"quarantined: {max_attempts} attempts ended without a result (the worker "
                               "died or timed out each time)",
        }
        if self.db.is_sqlite:
            with self.db.engine.begin() as connection:
                # One statement: claim each row, or quarantine it when its attempts are used up.
                rows = connection.execute(_HOT["claim"], parameters).all()
                for run_id, category in sorted({(r.run_id, r.category) for r in rows if r.status == "failed"}):
                    self._mark_dirty(connection, run_id, category)
        else:
            with self.db.protocol.connect() as connection:
                rows = connection.exec_driver_sql(_PG_HOT["claim"], parameters).all()
        return {
            int(r.id): Claim(int(r.id), int(r.fence), int(r.attempts), run_id=int(r.run_id), category=r.category,
                             defect=r.defect, image_path=r.image_path, mask_path=r.mask_path, height=r.height,
                             width=r.width)
            for r in rows if r.status == "running"
        }

    def complete(
        self, claim: Claim, *, object_key: str, image_score: float, diagnostics: dict[str, Any],
        timings: dict[str, Any], device: str | None,
    ) -> bool:
        """Commit a result if the claim's fence is still current; False for a stale writer."""
        return self.complete_many([Completion(claim, object_key, image_score, diagnostics, timings, device)])[0]

    def complete_many(self, completions: Sequence[Completion]) -> list[bool]:
        """:meth:`complete` for several results in one transaction (one commit), each under its own fence;
        each touched category is flagged for aggregation once."""
        if len({c.claim.image_id for c in completions}) != len(completions):
            raise ValueError("complete_many got two results for one image")
        if not completions:
            return []
        now = utcnow()
        if not self.db.is_sqlite:
            with self.db.protocol.connect() as connection:
                accepted = set(connection.exec_driver_sql(_PG_HOT["complete"], {
                    "ids": [c.claim.image_id for c in completions],
                    "fences": [c.claim.fence for c in completions],
                    "keys": [c.object_key for c in completions],
                    "scores": [c.image_score for c in completions],
                    "diagnostics": [_json_text(c.diagnostics) for c in completions],
                    "timings": [_json_text(c.timings) for c in completions],
                    "devices": [c.device for c in completions], "now": now,
                }).scalars())
            return [c.claim.image_id in accepted for c in completions]
        touched: set[tuple[int, str]] = set()
        done: set[int] = set()
        with self.db.engine.begin() as connection:  # SQLite: the database is locked whole; one row at a time
            for c in sorted(completions, key=lambda c: c.claim.image_id):
                row = connection.execute(_HOT["complete"], {
                    "row_id": c.claim.image_id, "row_fence": c.claim.fence, "key": c.object_key,
                    "score": c.image_score, "diagnostics": c.diagnostics, "timings": c.timings, "dev": c.device,
                    "now": now,
                }).first()
                if row is not None:
                    done.add(c.claim.image_id)
                    touched.add((row.run_id, row.category))
            for run_id, category in sorted(touched):
                self._mark_dirty(connection, run_id, category)
        return [c.claim.image_id in done for c in completions]

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
        selected = (Image.run_id == run_id, Image.status == "running", condition)
        with self.db.engine.begin() as connection:
            return connection.execute(
                update(Image.__table__)
                .where(_locked_in_id_order(*selected), *selected)  # re-checked once the rows are locked
                .values(status="queued", lease_expires_at=None)
            ).rowcount

    def release_owners(self, owners: Iterable[str]) -> dict[int, list[int]]:
        """Requeue the running rows of every run held by these owners (``host:pid`` of processes known to be
        dead) and forget their message timestamps, so the next enqueue sends them at once; run id → image ids.
        The attempt stays counted: an image that kills its worker every time still ends quarantined."""
        owners = list(owners)
        if not owners:
            return {}
        images = Image.__table__
        selected = (images.c.status == "running", images.c.lease_owner.in_(owners))
        with self.db.engine.begin() as connection:
            rows = connection.execute(
                update(images)
                .where(_locked_in_id_order(*selected), *selected)  # re-checked once the rows are locked
                .values(status="queued", lease_expires_at=None, enqueued_at=None)
                .returning(images.c.run_id, images.c.id)
            ).all()
        released: dict[int, list[int]] = {}
        for run_id, image_id in rows:
            released.setdefault(int(run_id), []).append(int(image_id))
        return released

    def queued_sent_before(self, run_id: int, before: datetime) -> list[int]:
        """Queued images whose message went out before ``before`` (candidates for a lost message)."""
        with self.db.session() as session:
            return list(session.scalars(
                select(Image.id).where(Image.run_id == run_id, Image.status == "queued", Image.enqueued_at < before)
                .order_by(Image.id)
            ))

    @staticmethod
    def _mark_dirty(connection: Any, run_id: int, category: str) -> None:
        """Flag the category for (re-)aggregation."""
        connection.execute(_HOT["mark_dirty"], {"dirty_run": run_id, "dirty_category": category})

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
                    .where(Image.run_id == run_id, Image.status == "queued", condition)
                    .order_by(Image.id)
                )
            )

    def mark_enqueued(self, image_ids: Sequence[int]) -> None:
        now = utcnow()
        for start in range(0, len(image_ids), 1000):
            chunk = list(image_ids[start : start + 1000])
            with self.db.engine.begin() as connection:  # short transactions: workers claim these rows meanwhile
                connection.execute(
                    update(Image.__table__).where(_locked_in_id_order(Image.__table__.c.id.in_(chunk)))
                    .values(enqueued_at=now)
                )

    def clear_enqueued(self, run_id: int, *, only_started: bool = False) -> None:
        """Forget the message timestamps of queued rows, so the next (re)submit sends them new messages: all of
        them after a cancel, or ``only_started`` ones whose lease just expired (their messages were consumed)."""
        condition = [Image.run_id == run_id, Image.status == "queued"]
        if only_started:
            condition.append(Image.started_at.is_not(None))
        with self.db.engine.begin() as connection:
            connection.execute(update(Image.__table__).where(_locked_in_id_order(*condition)).values(enqueued_at=None))

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
        return self.try_start_aggregations([(run_id, category)], stale_after_s=stale_after_s)[0]

    def try_start_aggregations(self, keys: Sequence[tuple[int, str]], *, stale_after_s: int = 3600) -> list[bool]:
        """:meth:`try_start_aggregation` for several (run id, category) pairs; each compare-and-set is one
        statement and commits on its own."""
        now = utcnow()
        stale = now - timedelta(seconds=stale_after_s)
        with self.db.protocol.connect() as connection:
            if self.db.is_sqlite:
                return [
                    bool(connection.execute(_HOT["start_aggregation"], {
                        "cas_run": run_id, "cas_category": category, "now": now, "stale": stale}).rowcount)
                    for run_id, category in keys
                ]
            return [
                bool(connection.exec_driver_sql(_PG_HOT["start_aggregation"], {
                    "run": run_id, "category": category, "now": now, "stale": stale}).rowcount)
                for run_id, category in keys
            ]

    def requeue_lost_results(self, run_id: int, image_ids: Sequence[int], error: str) -> int:
        """Done images whose logit object is missing or damaged go back to ``queued`` to be computed again (a
        new fence: a late writer of the old result cannot commit). Attempts are kept, so an image whose result
        keeps getting lost ends quarantined like any other repeated failure. Returns how many were queued."""
        images = Image.__table__
        with self.db.engine.begin() as connection:
            return int(connection.execute(
                update(images)
                .where(_locked_in_id_order(images.c.id.in_(list(image_ids)), images.c.run_id == run_id,
                                           images.c.status == "done"))
                .values(status="queued", object_key=None, image_score=None, enqueued_at=None, lease_owner=None,
                        lease_expires_at=None, finished_at=None, fence=images.c.fence + 1, error=error)
            ).rowcount)

    def requeue_failed(self, run_id: int, *, category: str | None = None) -> int:
        """Quarantined (failed) images get a fresh start: queued, attempts and error cleared, a new fence; their
        categories are due for aggregation again once they finish. Returns how many."""
        images = Image.__table__
        selected = [images.c.run_id == run_id, images.c.status == "failed"]
        if category is not None:
            selected.append(images.c.category == category)
        with self.db.engine.begin() as connection:
            count = int(connection.execute(
                update(images).where(_locked_in_id_order(*selected), *selected)
                .values(status="queued", attempts=0, error=None, enqueued_at=None, lease_owner=None,
                        lease_expires_at=None, finished_at=None, fence=images.c.fence + 1)
            ).rowcount)
            if count:
                condition = [Category.run_id == run_id, Category.status != "aggregating"]
                if category is not None:
                    condition.append(Category.category == category)
                connection.execute(update(Category.__table__).where(*condition).values(status="open", dirty=True))
                connection.execute(update(Run.__table__).where(Run.id == run_id).values(status="running"))
        return count

    def delete_run(self, run_id: int) -> None:
        """The run and everything SQL holds for it (images, categories, metric rows)."""
        with self.db.engine.begin() as connection:
            for table in (MetricRow.__table__, Category.__table__, Image.__table__):
                connection.execute(delete(table).where(table.c.run_id == run_id))
            connection.execute(delete(Run.__table__).where(Run.__table__.c.id == run_id))

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
