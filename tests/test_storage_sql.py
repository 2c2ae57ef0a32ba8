"""SQL repository and the delivery protocol, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import inspect

from storage.database import Database
from storage.repository import Completion, PlannedImage, Repository, RunConflictError, RunNotFoundError

# The SQLite half of each test runs without servers; the PostgreSQL half (and the PostgreSQL-only tests) carry
# the `services` marker (tests/conftest.py database_url).


def _repo(url: str) -> Repository:
    database = Database(url)
    database.migrate()
    return Repository(database)


def _planned(n: int, category: str = "bottle") -> list[PlannedImage]:
    return [
        PlannedImage(category=category, defect="good" if i % 2 == 0 else "crack", label=i % 2,
                     image_path=f"{category}/test/x/{i:03d}.png", mask_path=None, height=8, width=8)
        for i in range(n)
    ]


def _run(repo: Repository, name: str = "r1", **config: object) -> int:
    return repo.create_run(
        name=name, detector="baseline", dataset_root="/data", config={"classes": None, **config},
        code_version="test", model_fingerprint=None, identity_keys=("classes", "max_per_class"),
    ).id


def test_migrations_create_the_schema_and_are_idempotent(database_url: str) -> None:
    database = Database(database_url)
    database.migrate()
    database.migrate()
    tables = set(inspect(database.engine).get_table_names())
    assert {"runs", "images", "categories", "metric_rows", "alembic_version"} <= tables
    columns = {c["name"] for c in inspect(database.engine).get_columns("images")}
    assert {"status", "attempts", "lease_owner", "lease_expires_at", "fence", "object_key", "image_score"} <= columns


def test_runs_are_found_by_name_and_conflicting_configs_refused(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    assert _run(repo) == run_id  # same identity: the same run (resume)
    with pytest.raises(RunConflictError, match="max_per_class"):
        _run(repo, max_per_class=5)
    with pytest.raises(RunNotFoundError, match="readar runs"):
        repo.get_run("missing")


def test_planning_is_idempotent(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    assert repo.add_images(run_id, _planned(6)) == 6
    assert repo.add_images(run_id, _planned(6)) == 0
    assert len(repo.images(run_id)) == 6
    assert [c.category for c in repo.categories(run_id)] == ["bottle"]


def test_claim_complete_and_the_fence_refuses_a_stale_writer(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(2))
    image_id = repo.pending_image_ids(run_id)[0]
    first = repo.claim(image_id, "w1", lease_seconds=1)
    assert first is not None and first.fence == 1 and first.attempts == 1
    assert repo.claim(image_id, "w2", lease_seconds=60) is None  # lease held
    time.sleep(1.2)
    second = repo.claim(image_id, "w2", lease_seconds=60)  # lease expired: redelivery
    assert second is not None and second.fence == 2 and second.attempts == 2
    result = {"object_key": "k", "image_score": 0.5, "diagnostics": {}, "timings": {}, "device": "cpu"}
    assert repo.complete(second, **result) is True
    assert repo.complete(first, **result) is False  # the stale duplicate cannot overwrite
    row = repo.image(image_id)
    assert (row.status, row.fence, row.attempts, row.worker) == ("done", 2, 2, "w2")
    assert repo.claim(image_id, "w3", lease_seconds=60) is None  # done is terminal


def test_batched_claim_and_complete_keep_each_rows_fence(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(5))
    ids = repo.pending_image_ids(run_id)
    held = repo.claim(ids[0], "other", lease_seconds=60)
    exhausted = repo.claim(ids[1], "dead", lease_seconds=60, max_attempts=1)
    repo.release_expired_or_orphaned(run_id, ["dead"])  # its worker died; its one attempt is used up
    claims = repo.claim_many([(run_id, i) for i in ids], "w", lease_seconds=60, max_attempts=1)
    assert sorted(claims) == ids[2:]  # the held row is skipped, the exhausted one quarantined
    assert held is not None and exhausted is not None
    assert repo.image(ids[1]).status == "failed" and "quarantined" in repo.image(ids[1]).error
    stale = Completion(held, "k0", 0.1, {}, {}, "cpu")
    current = [Completion(claims[i], f"k{i}", 0.5, {"n": i}, {"ms": 1.0}, "cpu") for i in ids[2:]]
    repo.release_expired_or_orphaned(run_id, ["other"])
    newer = repo.claim(ids[0], "w2", lease_seconds=60)  # the held row moves on: `held` is now stale
    assert newer is not None and newer.fence == held.fence + 1
    assert repo.complete_many([stale, *current]) == [False, True, True, True]
    for i in ids[2:]:
        row = repo.image(i)
        assert (row.status, row.object_key, row.diagnostics, row.fence) == ("done", f"k{i}", {"n": i}, 1)
    assert repo.image(ids[0]).status == "running"
    with pytest.raises(ValueError, match="two results for one image"):
        repo.complete_many([current[0], current[0]])


def test_completing_flags_the_category_for_aggregation(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(2))
    first, second = repo.pending_image_ids(run_id)
    done = repo.claim(first, "w", lease_seconds=60)
    repo.complete(done, object_key="k", image_score=0.1, diagnostics={}, timings={}, device="cpu")
    later = repo.claim(second, "w", lease_seconds=60)
    assert repo.try_start_aggregation(run_id, "bottle") is False  # still one image running
    repo.complete(later, object_key="k", image_score=0.1, diagnostics={}, timings={}, device="cpu")
    assert repo.try_start_aggregations([(run_id, "bottle"), (run_id, "bottle")]) == [True, False]
    repo.finish_aggregation(run_id, "bottle", rows=[], state_key="s", num_used=2, num_skipped=0, num_failed=0)
    (category,) = repo.categories(run_id)
    assert (category.status, category.dirty) == ("done", False)
    # A result arriving after the aggregation (a re-run image) flags the category again.
    with repo.db.engine.begin() as connection:
        connection.exec_driver_sql(f"UPDATE images SET status = 'queued' WHERE id = {first}")
    again = repo.claim(first, "w", lease_seconds=60)
    repo.complete(again, object_key="k", image_score=0.2, diagnostics={}, timings={}, device="cpu")
    (category,) = repo.categories(run_id)
    assert category.dirty is True
    assert repo.try_start_aggregation(run_id, "bottle") is True


def test_failures_retry_then_quarantine(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(1))
    (image_id,) = repo.pending_image_ids(run_id)
    statuses = []
    for _ in range(3):
        claim = repo.claim(image_id, "w", lease_seconds=60, max_attempts=3)
        assert claim is not None
        statuses.append(repo.fail(claim, "boom", max_attempts=3))
    assert statuses == ["queued", "queued", "failed"]
    assert repo.image(image_id).error == "boom"


def test_an_image_whose_worker_always_dies_is_quarantined_at_claim(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(1))
    (image_id,) = repo.pending_image_ids(run_id)
    for owner in ("w1", "w2"):
        assert repo.claim(image_id, owner, lease_seconds=60, max_attempts=2) is not None
        repo.release_expired_or_orphaned(run_id, [owner])  # the owner died
    with repo.db.engine.begin() as connection:  # as after an earlier aggregation: nothing new to aggregate
        connection.exec_driver_sql("UPDATE categories SET dirty = false")
    assert repo.claim(image_id, "w3", lease_seconds=60, max_attempts=2) is None
    row = repo.image(image_id)
    assert row.status == "failed" and "quarantined" in row.error
    # The quarantine finished the category in the same statement: it is flagged, and aggregates.
    (category,) = repo.categories(run_id)
    assert category.dirty is True
    assert repo.try_start_aggregation(run_id, "bottle") is True


def test_permanent_errors_fail_at_once_and_release_does_not_count(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(2))
    first, second = repo.pending_image_ids(run_id)
    claim = repo.claim(first, "w", lease_seconds=60)
    assert repo.fail(claim, "corrupt file", max_attempts=5, permanent=True) == "failed"
    claim = repo.claim(second, "w", lease_seconds=60)
    assert repo.release(claim) is True
    row = repo.image(second)
    assert (row.status, row.attempts) == ("queued", 0)


def test_exactly_one_aggregation_trigger_among_concurrent_finishers(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(4))
    assert repo.try_start_aggregation(run_id, "bottle") is False  # images still queued
    for image_id in repo.pending_image_ids(run_id):
        claim = repo.claim(image_id, "w", lease_seconds=60)
        repo.complete(claim, object_key="k", image_score=0.1, diagnostics={}, timings={}, device="cpu")
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def attempt() -> None:
        barrier.wait()
        wins.append(repo.try_start_aggregation(run_id, "bottle"))

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 5 + [True]
    version = repo.finish_aggregation(run_id, "bottle", rows=[{"scope": "category", "category": "bottle",
                                      "iAUROC": 0.5, "num_images": 4}], state_key="s", num_used=4,
                                      num_skipped=0, num_failed=0)
    assert version == 1
    assert repo.try_start_aggregation(run_id, "bottle") is False  # nothing new since
    (row,) = repo.metric_rows(run_id)
    assert (row.scope, row.iauroc, row.num_images, row.version) == ("category", 0.5, 4, 1)


def test_two_schedulers_planning_the_same_run_at_once(database_url: str) -> None:
    repos = [_repo(database_url) for _ in range(4)]
    run_ids: list[int] = []
    inserted: list[int] = []
    barrier = threading.Barrier(4)

    def plan(repo: Repository) -> None:
        barrier.wait()
        run_id = _run(repo, name="shared")
        run_ids.append(run_id)
        inserted.append(repo.add_images(run_id, _planned(300)))

    threads = [threading.Thread(target=plan, args=(repo,)) for repo in repos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(run_ids)) == 1 and len(run_ids) == 4
    assert sum(inserted) == 300  # every image got exactly one row
    assert len(repos[0].images(run_ids[0])) == 300


def test_old_messages_are_resent_only_when_asked(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(3))
    ids = repo.pending_image_ids(run_id)
    assert repo.images_to_enqueue(run_id, stale_after_s=60, resend_stale=False) == ids  # never sent
    repo.mark_enqueued(ids[:2])
    assert repo.images_to_enqueue(run_id, stale_after_s=60) == ids[2:]
    time.sleep(1.1)
    assert repo.images_to_enqueue(run_id, stale_after_s=1, resend_stale=False) == ids[2:]  # backlog: waiting
    assert repo.images_to_enqueue(run_id, stale_after_s=1, resend_stale=True) == ids  # no backlog: lost


@pytest.mark.slow
@pytest.mark.services
def test_bulk_marks_and_batched_claims_never_deadlock(postgres_url: str) -> None:
    """The full-size load run hit a deadlock: a 5,000-row enqueue mark against workers' batched claims, each
    locking rows in its own scan order. Both now lock in id order; here they race on a scrambled table."""
    import random

    repo = _repo(postgres_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(3000))
    ids = repo.pending_image_ids(run_id)
    with repo.db.engine.begin() as connection:  # new row versions in reverse order: heap order ≠ id order
        for start in range(len(ids), 0, -100):
            connection.exec_driver_sql(
                f"UPDATE images SET error = 'x' WHERE id BETWEEN {ids[max(start - 100, 0)]} AND {ids[start - 1]}")
    errors: list[BaseException] = []
    stop = time.monotonic() + 4

    def marker() -> None:
        try:
            while time.monotonic() < stop:
                repo.mark_enqueued(list(reversed(ids)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def claimer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                batch = rng.sample(ids, 8)
                claims = repo.claim_many([(run_id, i) for i in batch], f"w{seed}", lease_seconds=60)
                repo.complete_many([Completion(c, "k", 0.0, {}, {}, "cpu") for c in claims.values()])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=marker), threading.Thread(target=marker)]
    threads += [threading.Thread(target=claimer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_lost_results_go_back_to_the_queue_under_a_new_fence(database_url: str) -> None:
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(3))
    done, running, queued = repo.pending_image_ids(run_id)
    claim = repo.claim(done, "w", lease_seconds=60)
    repo.complete(claim, object_key="k", image_score=0.3, diagnostics={}, timings={}, device="cpu")
    repo.claim(running, "w", lease_seconds=60)
    repo.mark_enqueued([done, running, queued])
    assert repo.requeue_lost_results(run_id, [done, running, queued], "result lost") == 1  # only the done row
    row = repo.image(done)
    assert (row.status, row.object_key, row.image_score, row.enqueued_at, row.fence, row.attempts, row.error) == (
        "queued", None, None, None, 2, 1, "result lost")
    assert repo.complete(claim, object_key="k", image_score=0.3, diagnostics={}, timings={}, device="cpu") is False
    assert repo.image(running).status == "running" and repo.image(queued).enqueued_at is not None
    assert repo.images_to_enqueue(run_id, stale_after_s=600, resend_stale=False) == [done]


@pytest.mark.services
def test_protocol_statements_run_in_autocommit_with_generic_plans(postgres_url: str) -> None:
    repo = _repo(postgres_url)
    with repo.db.protocol.connect() as connection:
        assert connection.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_generic_plan"
        assert connection.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
        assert connection.connection.driver_connection.autocommit is True
    with repo.db.engine.connect() as connection:  # every other query keeps PostgreSQL's own choice
        assert connection.exec_driver_sql("SHOW plan_cache_mode").scalar() == "auto"


def test_a_claim_names_its_run_and_never_takes_another_runs_image(database_url: str) -> None:
    """A message [run 1, image of run 2] must leave run 2's image untouched (it used to be claimed by id alone
    and then failed, or scored on run 1's files and stored under run 1)."""
    repo = _repo(database_url)
    first, second = _run(repo, name="one"), _run(repo, name="two")
    repo.add_images(first, _planned(2))
    repo.add_images(second, _planned(2))
    theirs = repo.pending_image_ids(second)[0]
    before = repo.image(theirs)
    assert repo.claim_many([(first, theirs)], "w", lease_seconds=60) == {}
    after = repo.image(theirs)
    assert (after.status, after.attempts, after.fence, after.lease_owner) == \
        (before.status, before.attempts, before.fence, before.lease_owner) == ("queued", 0, 0, None)
    claims = repo.claim_many([(second, theirs)], "w", lease_seconds=60)
    assert list(claims) == [theirs] and claims[theirs].run_id == second


def test_results_travel_as_json_unchanged(database_url: str) -> None:
    """A batch of results is one JSON parameter: quotes, backslashes, non-ASCII text, nesting and nulls in the
    diagnostics, and a missing device, come back exactly as written on both dialects."""
    repo = _repo(database_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(2))
    ids = repo.pending_image_ids(run_id)
    claims = repo.claim_many([(run_id, i) for i in ids], "w", lease_seconds=60)
    tricky = {"text": 'a "quoted" \\ path\nß 漢字 ✓', "nested": {"list": [1, 2.5, None, True]}, "empty": {}}
    completions = [Completion(claims[ids[0]], "k'0", 0.25, tricky, {"ms": 1.5}, None),
                   Completion(claims[ids[1]], "k1", 1.0, {}, {}, "cuda:0")]
    assert repo.complete_many(completions) == [True, True]
    first, second = repo.image(ids[0]), repo.image(ids[1])
    assert (first.object_key, first.image_score, first.diagnostics, first.timings, first.device) == \
        ("k'0", 0.25, tricky, {"ms": 1.5}, None)
    assert (second.diagnostics, second.device) == ({}, "cuda:0")
    with pytest.raises(ValueError):  # a non-finite score is refused before it reaches SQL
        repo.complete_many([Completion(claims[ids[0]], "k", float("nan"), {}, {}, None)])


@pytest.mark.services
def test_each_protocol_step_is_one_statement_on_postgresql(postgres_url: str) -> None:
    """One round trip per step, the category flag included: claim (with a quarantine), a batch of
    completions, a permanent failure, a release and the compare-and-set."""
    from sqlalchemy import event

    repo = _repo(postgres_url)
    run_id = _run(repo)
    repo.add_images(run_id, _planned(4))
    ids = repo.pending_image_ids(run_id)
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001 - SQLAlchemy event signature
        statements.append(statement)

    for engine in (repo.db.protocol, repo.db.engine):
        event.listen(engine, "before_cursor_execute", count)
    try:
        claims = repo.claim_many([(run_id, i) for i in ids], "w", lease_seconds=60)
        assert len(statements) == 1
        assert repo.complete_many([Completion(claims[i], "k", 0.5, {}, {}, "cpu") for i in ids[:2]]) == [True] * 2
        assert repo.fail(claims[ids[2]], "corrupt", max_attempts=3, permanent=True) == "failed"
        assert repo.release(claims[ids[3]]) is True
        assert repo.try_start_aggregation(run_id, "bottle") is False  # one image queued again
        assert len(statements) == 5
    finally:
        for engine in (repo.db.protocol, repo.db.engine):
            event.remove(engine, "before_cursor_execute", count)
    (category,) = repo.categories(run_id)
    assert category.dirty is True
