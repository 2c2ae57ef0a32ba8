"""The delivery protocol of DESIGN.md section 2: claim, complete, fail, release and the aggregation
compare-and-set, each written once as a SQLAlchemy Core statement that runs on SQLite and on PostgreSQL.

SQL is the record of truth. A worker *claims* an image (status running, a lease, the fence incremented,
attempts counted), writes its logits to the image's fixed object key, then *completes* the row only if its
fence is still current, so a stale duplicate can never overwrite a newer result. A row that reaches a terminal
status (done, or failed: quarantined) flags its category for aggregation. A category is complete when none of
its rows is queued or running; the first finisher that sees that wins a compare-and-set on the category row and
runs (or enqueues) the aggregator exactly once per change.

Where the two dialects really differ, and only there:
- the category flag: PostgreSQL writes it in the same statement, as a data-modifying ``WITH`` (each step is one
  autocommit statement, one round trip); SQLite has no DML inside ``WITH``, so there the flag is a second
  statement in the step's transaction (SQLite locks the whole database for it anyway);
- a batch of results arrives as one JSON parameter, unpacked by ``json_to_recordset`` (PostgreSQL) or
  ``json_each`` (SQLite);
- ``FOR UPDATE`` row locks, which SQLite does not have (and does not need).

Statements are built once per dialect: building a Core statement costs more Python time than running it, and
SQLAlchemy then finds the compiled form in its cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    column,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.sql import Executable

from storage.database import Database
from storage.models import ACTIVE_STATUSES, Category, CategoryStatus, Image, ImageStatus, utcnow

IMAGES, CATEGORIES = Image.__table__, Category.__table__
# A row that reaches one of these flags its category: the category's metrics are due again.
TERMINAL = (ImageStatus.DONE, ImageStatus.FAILED)


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


def locked_in_id_order(*conditions: Any) -> Any:
    """``images.id IN (...)`` over the rows matching ``conditions``, row-locked in id order first (PostgreSQL;
    SQLite locks the whole database). Every statement that changes many image rows at once goes through this,
    so two of them (a bulk mark and a batched claim, say) can never lock rows in opposite orders and deadlock."""
    return IMAGES.c.id.in_(select(IMAGES.c.id).where(*conditions).order_by(IMAGES.c.id).with_for_update())


def _claimable() -> Any:
    """Queued, or running under a lease that has expired (its worker is presumed dead)."""
    return or_(IMAGES.c.status == ImageStatus.QUEUED,
               and_(IMAGES.c.status == ImageStatus.RUNNING, IMAGES.c.lease_expires_at < bindparam("now")))


def _claim() -> Any:
    """Claim each named row, or quarantine it (failed) when its attempts are used up without a recorded
    failure: its worker died every time, e.g. on a poison input that crashes the process."""
    now = bindparam("now")
    give_up = IMAGES.c.attempts >= bindparam("max_attempts")
    named = (IMAGES.c.id.in_(bindparam("ids", expanding=True)),
             tuple_(IMAGES.c.run_id, IMAGES.c.id).in_(bindparam("pairs", expanding=True)))

    def unless_given_up(value: Any, column_: Any) -> Any:
        return case((give_up, column_), else_=value)

    return (
        update(IMAGES)
        .where(locked_in_id_order(*named, _claimable()), _claimable())  # re-checked once the rows are locked
        .values(
            status=case((give_up, ImageStatus.FAILED), else_=ImageStatus.RUNNING),
            lease_owner=unless_given_up(bindparam("owner"), IMAGES.c.lease_owner),
            lease_expires_at=case((give_up, None), else_=bindparam("expires")),
            fence=unless_given_up(IMAGES.c.fence + 1, IMAGES.c.fence),
            attempts=unless_given_up(IMAGES.c.attempts + 1, IMAGES.c.attempts),
            started_at=unless_given_up(now, IMAGES.c.started_at),
            finished_at=case((give_up, now), else_=IMAGES.c.finished_at),
            worker=unless_given_up(bindparam("owner"), IMAGES.c.worker),
            error=case((give_up, func.coalesce(IMAGES.c.error + "; ", "") + bindparam("quarantine_note")),
                       else_=IMAGES.c.error),
        )
        .returning(IMAGES.c.id, IMAGES.c.status, IMAGES.c.fence, IMAGES.c.attempts, IMAGES.c.run_id,
                   IMAGES.c.category, IMAGES.c.defect, IMAGES.c.image_path, IMAGES.c.mask_path,
                   IMAGES.c.height, IMAGES.c.width)
    )


_RESULT_FIELDS = {"id": Integer, "fence": Integer, "object_key": Text, "image_score": Float, "diagnostics": JSON,
                  "timings": JSON, "device": Text}


def _results(dialect: str) -> Any:
    """The batch of results (one JSON array of objects, parsed once) as a table with one row per result."""
    payload = bindparam("results", type_=Text)
    if dialect == "postgresql":
        unpacked = (func.json_to_recordset(cast(payload, JSON))
                    .table_valued(*(column(name, type_) for name, type_ in _RESULT_FIELDS.items()))
                    .render_derived(name="unpacked", with_types=True))
        return select(unpacked).cte("results")
    each = func.json_each(payload).table_valued("value")
    return select(*(func.json_extract(each.c.value, f"$.{name}").label(name) for name in _RESULT_FIELDS)
                  ).cte("results")


def _complete(dialect: str) -> Any:
    """Commit a whole batch of results in one statement, each under its own fence."""
    results = _results(dialect)
    running = IMAGES.c.status == ImageStatus.RUNNING
    # The rows are named by id as well (``ids``): the lock then starts from the primary key. Joined to the
    # results instead, PostgreSQL's generic plan walked every running row of the table.
    locked = locked_in_id_order(IMAGES.c.id.in_(bindparam("ids", expanding=True)), running)
    return (
        update(IMAGES)
        .where(IMAGES.c.id == results.c.id, IMAGES.c.fence == results.c.fence, running, locked)
        .values(status=ImageStatus.DONE, object_key=results.c.object_key, image_score=results.c.image_score,
                diagnostics=results.c.diagnostics, timings=results.c.timings, device=results.c.device,
                finished_at=bindparam("now"), error=None, lease_expires_at=None)
        .returning(IMAGES.c.id, IMAGES.c.status, IMAGES.c.run_id, IMAGES.c.category)
    )


def _fail() -> Any:
    """A failed attempt under a current claim: queued again for a retry, or failed (quarantined) when the
    attempts are used up or the error is permanent (bad input)."""
    give_up = or_(IMAGES.c.attempts >= bindparam("max_attempts"), bindparam("permanent", type_=Boolean))
    return (
        update(IMAGES)
        .where(*_held())
        .values(status=case((give_up, ImageStatus.FAILED), else_=ImageStatus.QUEUED), error=bindparam("new_error"),
                lease_expires_at=None, finished_at=case((give_up, bindparam("now")), else_=None))
        .returning(IMAGES.c.id, IMAGES.c.status, IMAGES.c.run_id, IMAGES.c.category)
    )


def _held() -> tuple[Any, ...]:
    """The row is still held by this claim: running, under the claim's fence."""
    return (IMAGES.c.id == bindparam("held_id"), IMAGES.c.fence == bindparam("held_fence"),
            IMAGES.c.status == ImageStatus.RUNNING)


def _release() -> Any:
    """Give a held image back without counting the attempt; ``error`` (may be NULL) keeps a reason visible."""
    return (
        update(IMAGES)
        .where(*_held())
        .values(status=ImageStatus.QUEUED, lease_expires_at=None, attempts=IMAGES.c.attempts - 1,
                error=func.coalesce(bindparam("new_error", type_=Text), IMAGES.c.error))
    )


def _start_aggregation() -> Any:
    """The compare-and-set: the category has no active row, and new results since its last aggregation (or an
    aggregator that died long ago still holds it).

    One ``NOT EXISTS`` per active status, each an equality on all three columns of the (run, category,
    status) index: it stops at the first active row, O(1) while a category still has work. (With ``status IN
    (...)`` PostgreSQL filtered on the status instead, reading every done row of the category on each check.)"""
    run, category = bindparam("cas_run"), bindparam("cas_category")
    idle = [~exists().where(IMAGES.c.run_id == run, IMAGES.c.category == category, IMAGES.c.status == status)
            for status in ACTIVE_STATUSES]
    aggregating = CATEGORIES.c.status == CategoryStatus.AGGREGATING
    due = or_(and_(CATEGORIES.c.dirty.is_(True), ~aggregating),
              and_(aggregating, CATEGORIES.c.aggregating_since < bindparam("stale")))
    return (
        update(CATEGORIES)
        .where(CATEGORIES.c.run_id == run, CATEGORIES.c.category == category, *idle, due)
        .values(status=CategoryStatus.AGGREGATING, dirty=False, aggregating_since=bindparam("now"))
    )


def _flag(categories: Any) -> Any:
    """Flag these (run id, category) pairs for aggregation. Only unflagged rows are written, so concurrent
    finishers of one category do not queue on its row lock (the flag cannot be cleared before their commit: an
    aggregation starts only once no row is active, and theirs are)."""
    return (update(CATEGORIES)
            .where(CATEGORIES.c.dirty.is_(False), tuple_(CATEGORIES.c.run_id, CATEGORIES.c.category).in_(categories))
            .values(dirty=True))


def _flagging(statement: Any, name: str) -> Any:
    """PostgreSQL: ``statement`` (an UPDATE ... RETURNING) with the category flag of its terminal rows written
    in the same statement."""
    changed = statement.cte(name)
    finished = select(changed.c.run_id, changed.c.category).where(
        or_(*(changed.c.status == status for status in TERMINAL)))  # no expanding IN: nothing to render per call
    return select(changed).add_cte(_flag(finished).cte(f"{name}_flagged"))


@dataclass(frozen=True)
class Statements:
    """One dialect's protocol statements. ``flag`` is None where the steps write the flag themselves."""

    claim: Executable
    complete: Executable
    fail: Executable
    release: Executable
    start_aggregation: Executable
    flag: Executable | None


@cache
def statements(dialect: str) -> Statements:
    steps = {"claim": _claim(), "complete": _complete(dialect), "fail": _fail()}
    if dialect == "postgresql":
        return Statements(**{name: _flagging(step, name) for name, step in steps.items()},
                          release=_release(), start_aggregation=_start_aggregation(), flag=None)
    return Statements(**steps, release=_release(), start_aggregation=_start_aggregation(),
                      flag=_flag(bindparam("finished", expanding=True)))


class DeliveryProtocol:
    """The protocol's steps on one database. Each step is one statement (PostgreSQL: autocommit, one round trip)
    or one short transaction (SQLite)."""

    db: Database

    def _statements(self) -> Statements:
        return statements(self.db.engine.dialect.name)

    def _step(self, statement: Executable, parameters: dict[str, Any]) -> list[Any]:
        """Run one step; its terminal rows flag their categories in the same transaction."""
        flag = self._statements().flag
        if flag is None:
            with self.db.protocol.connect() as connection:
                return connection.execute(statement, parameters).all()
        with self.db.engine.begin() as connection:
            rows = connection.execute(statement, parameters).all()
            finished = sorted({(row.run_id, row.category) for row in rows if row.status in TERMINAL})
            if finished:
                connection.execute(flag, {"finished": finished})
        return rows

    def claim(self, image_id: int, owner: str, lease_seconds: int, *, max_attempts: int = 3,
              run_id: int | None = None) -> Claim | None:
        """Claim an image if it is queued or its lease expired; None when someone else holds it or it is done.

        An image whose attempts are used up without a recorded failure is quarantined here instead of claimed
        again. ``run_id`` defaults to the image's own run."""
        if run_id is None:
            with self.db.engine.connect() as connection:
                run_id = connection.scalar(select(IMAGES.c.run_id).where(IMAGES.c.id == image_id))
            if run_id is None:
                return None
        return self.claim_many([(run_id, image_id)], owner, lease_seconds, max_attempts=max_attempts).get(image_id)

    def claim_many(self, keys: Sequence[tuple[int, int]], owner: str, lease_seconds: int, *, max_attempts: int = 3
                   ) -> dict[int, Claim]:
        """:meth:`claim` for several ``(run id, image id)`` pairs in one statement; the result holds the images
        that were claimed. A pair whose image belongs to another run claims nothing: a message names its run, and
        the dataset root, object key and aggregation it leads to all come from that run."""
        if not keys:
            return {}
        now = utcnow()
        rows = self._step(self._statements().claim, {
            "ids": [image_id for _, image_id in keys], "pairs": [tuple(key) for key in keys], "now": now,
            "owner": owner, "max_attempts": max_attempts, "expires": now + timedelta(seconds=lease_seconds),
            "quarantine_note": f"quarantined: {max_attempts} attempts ended without a result (the worker "
                               "died or timed out each time)",
        })
        return {
            int(r.id): Claim(int(r.id), int(r.fence), int(r.attempts), run_id=int(r.run_id), category=r.category,
                             defect=r.defect, image_path=r.image_path, mask_path=r.mask_path, height=r.height,
                             width=r.width)
            for r in rows if r.status == ImageStatus.RUNNING
        }

    def complete(
        self, claim: Claim, *, object_key: str, image_score: float, diagnostics: dict[str, Any],
        timings: dict[str, Any], device: str | None,
    ) -> bool:
        """Commit a result if the claim's fence is still current; False for a stale writer."""
        return self.complete_many([Completion(claim, object_key, image_score, diagnostics, timings, device)])[0]

    def complete_many(self, completions: Sequence[Completion]) -> list[bool]:
        """:meth:`complete` for several results in one statement, each under its own fence; each touched
        category is flagged for aggregation in the same transaction."""
        if len({c.claim.image_id for c in completions}) != len(completions):
            raise ValueError("complete_many got two results for one image")
        if not completions:
            return []
        results = json.dumps([  # scores are finite (workers.task.image_score), diagnostics JSON-safe (json_value)
            {"id": c.claim.image_id, "fence": c.claim.fence, "object_key": c.object_key,
             "image_score": c.image_score, "diagnostics": c.diagnostics, "timings": c.timings, "device": c.device}
            for c in completions
        ], allow_nan=False)
        accepted = {int(row.id) for row in self._step(self._statements().complete, {
            "results": results, "ids": [c.claim.image_id for c in completions], "now": utcnow()})}
        return [c.claim.image_id in accepted for c in completions]

    def fail(self, claim: Claim, error: str, *, max_attempts: int, permanent: bool = False) -> str | None:
        """Record a failed attempt: back to queued for a retry, or ``failed`` (quarantined) when the attempts
        are used up or the error is permanent (bad input). Returns the new status, None for a stale claim."""
        rows = self._step(self._statements().fail, {
            "held_id": claim.image_id, "held_fence": claim.fence, "new_error": error, "max_attempts": max_attempts,
            "permanent": permanent, "now": utcnow(),
        })
        return str(rows[0].status) if rows else None

    def release(self, claim: Claim, *, error: str | None = None) -> bool:
        """Give an image back without counting the attempt: graceful shutdown, or a storage outage that is
        not the image's fault (``error`` keeps the reason visible in ``readar status``)."""
        with self.db.protocol.connect() as connection:
            return bool(connection.execute(self._statements().release, {
                "held_id": claim.image_id, "held_fence": claim.fence, "new_error": error}).rowcount)

    def try_start_aggregation(self, run_id: int, category: str, *, stale_after_s: int = 3600) -> bool:
        """Compare-and-set: True for exactly one caller once the category has no active rows and new results
        since its last aggregation (or a previous aggregator died and its claim went stale)."""
        return self.try_start_aggregations([(run_id, category)], stale_after_s=stale_after_s)[0]

    def try_start_aggregations(self, keys: Sequence[tuple[int, str]], *, stale_after_s: int = 3600) -> list[bool]:
        """:meth:`try_start_aggregation` for several (run id, category) pairs; each compare-and-set is one
        statement and commits on its own."""
        now = utcnow()
        stale = now - timedelta(seconds=stale_after_s)
        statement = self._statements().start_aggregation
        with self.db.protocol.connect() as connection:
            return [bool(connection.execute(statement, {"cas_run": run_id, "cas_category": category, "now": now,
                                                        "stale": stale}).rowcount)
                    for run_id, category in keys]

    def release_expired_or_orphaned(self, run_id: int, orphaned_owners: Iterable[str] = ()) -> int:
        """Requeue running rows whose lease expired or whose owner is known to be dead."""
        owners = list(orphaned_owners)
        condition = IMAGES.c.lease_expires_at < utcnow()
        if owners:
            condition = or_(condition, IMAGES.c.lease_owner.in_(owners))
        selected = (IMAGES.c.run_id == run_id, IMAGES.c.status == ImageStatus.RUNNING, condition)
        with self.db.engine.begin() as connection:
            return connection.execute(
                update(IMAGES)
                .where(locked_in_id_order(*selected), *selected)  # re-checked once the rows are locked
                .values(status=ImageStatus.QUEUED, lease_expires_at=None)
            ).rowcount

    def release_owners(self, owners: Iterable[str]) -> dict[int, list[int]]:
        """Requeue the running rows of every run held by these owners (``host:pid`` of processes known to be
        dead) and forget their message timestamps, so the next enqueue sends them at once; run id → image ids.
        The attempt stays counted: an image that kills its worker every time still ends quarantined."""
        owners = list(owners)
        if not owners:
            return {}
        selected = (IMAGES.c.status == ImageStatus.RUNNING, IMAGES.c.lease_owner.in_(owners))
        with self.db.engine.begin() as connection:
            rows = connection.execute(
                update(IMAGES)
                .where(locked_in_id_order(*selected), *selected)  # re-checked once the rows are locked
                .values(status=ImageStatus.QUEUED, lease_expires_at=None, enqueued_at=None)
                .returning(IMAGES.c.run_id, IMAGES.c.id)
            ).all()
        released: dict[int, list[int]] = {}
        for run_id, image_id in rows:
            released.setdefault(int(run_id), []).append(int(image_id))
        return released
