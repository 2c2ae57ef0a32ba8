"""A killed worker costs seconds, not a lease or a visibility timeout: with the DEFAULT limits (20-minute
lease, 25-minute visibility timeout), SIGKILL of a worker child holding claimed and reserved images, at random
moments and several times, and the run still finishes within a minute of each kill without any command."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RabbitVhost
from test_distributed import TIMINGS, Cluster, RedisServer, _embedded_metrics

from workers.dispatch import find_lost_messages, message_census, send_images

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def redis_server(tmp_path: Path):  # noqa: ANN201
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def _deployment(tmp_path: Path, broker: RedisServer | RabbitVhost, postgres_url: str) -> Iterator[Cluster]:
    deployment = Cluster(tmp_path, broker, postgres_url, str(tmp_path / "objects"), {})
    for name in TIMINGS:  # the defaults: nothing may depend on a short lease or visibility timeout
        deployment.env.pop(name, None)
    yield deployment
    if deployment.workers is not None:
        deployment.stop_workers()


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer, postgres_url: str) -> Iterator[Cluster]:
    yield from _deployment(tmp_path, redis_server, postgres_url)


@pytest.fixture(params=["redis", "rabbitmq"])
def any_broker_cluster(request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    """The same deployment on a private Redis, or on a fresh virtual host of the local RabbitMQ."""
    broker = request.getfixturevalue("redis_server" if request.param == "redis" else "rabbitmq")
    yield from _deployment(tmp_path, broker, postgres_url)


def _held_by(cluster: Cluster, run_id: int, pids: list[int]) -> dict[int, int]:
    """Running images per child pid."""
    owners = {f"{socket.gethostname()}:{pid}": pid for pid in pids}
    held: dict[int, int] = {}
    for row in cluster.repo.images(run_id, status="running"):
        if row.lease_owner in owners:
            held[owners[row.lease_owner]] = held.get(owners[row.lease_owner], 0) + 1
    return held


def test_killed_children_cost_seconds_with_default_limits(any_broker_cluster: Cluster, sample_root: Path,
                                                          tmp_path: Path) -> None:
    cluster = any_broker_cluster
    rng = random.Random(7)
    cluster.env["READAR_TEST_DELAY_S"] = "0.8"
    # A child's death counts as an attempt of each image it held (an image that kills its worker every time must
    # end quarantined). Three kills can all hit one image (RabbitMQ hands a returned message out again first),
    # so one attempt more than kills keeps the test about recovery; the time limits stay the defaults.
    cluster.env["READAR_MAX_ATTEMPTS"] = "4"
    cluster.start_workers(processes=2, batch_size=2)
    cluster.readar("submit", "--mvtec-root", str(sample_root), "--detector", "slow_baseline", "--run-name", "kills")
    run = cluster.repo.get_run("kills")
    kills = []
    for _ in range(3):
        time.sleep(rng.uniform(0.0, 2.0))
        deadline = time.monotonic() + 60
        victim = None
        while time.monotonic() < deadline and victim is None:  # a child that holds claimed images right now
            held = _held_by(cluster, run.id, cluster.worker_children())
            victim = next(iter(held), None)
            time.sleep(0.05)
        if victim is None:
            break  # the run finished first
        os.kill(victim, signal.SIGKILL)
        kills.append((time.monotonic(), victim))
        # Within a minute every image the dead child held is back in play (done, or claimed by a live process).
        owner = f"{socket.gethostname()}:{victim}"
        while any(r.lease_owner == owner for r in cluster.repo.images(run.id, status="running")):
            assert time.monotonic() - kills[-1][0] < 60, f"images of killed process {victim} still held after 60 s"
            time.sleep(0.2)
    assert len(kills) >= 2, "the run finished before the workers could be killed twice"
    remaining = sum(c.get("queued", 0) + c.get("running", 0) for c in cluster.repo.status_counts(run.id).values())
    cluster.wait_finished("kills", timeout=60 + remaining)
    rows = cluster.repo.images(run.id)
    assert {r.status for r in rows} == {"done"}, [(r.image_path, r.status, r.attempts, r.error) for r in rows
                                                  if r.status != "done"]
    log = (tmp_path / "workers.log").read_text(errors="replace")
    assert "given back and sent again" in log
    assert cluster.metrics("kills") == _embedded_metrics(tmp_path, sample_root, ",".join(
        sorted({r.category for r in rows})))


def test_a_message_taken_by_a_killed_worker_is_found_and_sent_again(cluster: Cluster, sample_root: Path,
                                                                     redis_server: RedisServer) -> None:
    """The gap kombu leaves: BRPOP took the message, the worker died before recording it as unacked."""
    import redis

    cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "brick", "--detector", "baseline",
                   "--run-name", "gap")
    run = cluster.repo.get_run("gap")
    client = redis.Redis.from_url(redis_server.url)
    taken = client.rpop("readar.images")  # what a worker killed right after its BRPOP took with it
    assert taken is not None
    from celery import Celery

    from storage.settings import Settings
    from workers.celery_app import celery_config

    celery = Celery("readar-test", set_as_current=False)
    celery.conf.update(celery_config(Settings(broker_url=redis_server.url)))
    census = message_census(celery)
    assert census is not None and len(census.waiting) == redis_server.queue_length()
    assert find_lost_messages(cluster.repo, run.id, census) == []  # sent just now: inside the grace period
    lost = find_lost_messages(cluster.repo, run.id, census, absent_grace_s=0)
    assert len(lost) == 1 and lost[0] not in census.waiting
    send_images(celery, cluster.repo, run.id, lost)
    assert redis_server.queue_length() == len(census.waiting) + 1
    cluster.start_workers(processes=1, batch_size=2)
    cluster.wait_finished("gap", timeout=120)


def _celery(broker_url: str):  # noqa: ANN202
    from celery import Celery

    from storage.settings import Settings
    from workers.celery_app import celery_config

    celery = Celery("readar-test", set_as_current=False)
    celery.conf.update(celery_config(Settings(broker_url=broker_url)))
    return celery


def test_one_supervisor_reconciles_on_the_timer_redis(redis_server: RedisServer, sqlite_url: str) -> None:
    from storage.database import Database
    from storage.repository import Repository
    from workers.recovery import Leadership

    repo = Repository(Database(sqlite_url))
    first, second = (Leadership(_celery(redis_server.url), repo, ttl_s=30) for _ in range(2))
    second.identity += "-other"  # another supervisor (same host and pid in this test process)
    assert first.kind == "redis"
    assert first.acquire() and first.acquire()  # renewed by its holder
    assert not second.acquire()
    first.release()
    assert second.acquire() and not first.acquire()


def test_one_supervisor_reconciles_on_the_timer_postgresql(postgres_url: str) -> None:
    from storage.database import Database
    from storage.repository import Repository
    from workers.recovery import Leadership

    database = Database(postgres_url)
    database.migrate()
    first, second = (Leadership(_celery("amqp://guest:guest@127.0.0.1:5672//"), Repository(database), ttl_s=30)
                     for _ in range(2))
    assert first.kind == "postgresql"
    assert first.acquire() and first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire() and not first.acquire()
    second.release()


def test_a_worker_that_cannot_load_the_detector_takes_no_tasks(cluster: Cluster, sample_root: Path,
                                                                tmp_path: Path) -> None:
    """A missing shard on the worker machine: the worker takes no task, says so and is unhealthy; no image is
    charged; once the file is back, the run finishes without any command."""
    import shutil

    from read_fixtures import tiny_checkpoint

    read_dir, clip_dir = tiny_checkpoint()
    checkpoint = tmp_path / "read"
    shutil.copytree(read_dir, checkpoint)
    beat = tmp_path / "heartbeat"
    cluster.env.update(READAR_SETUP_RETRY_SECONDS="3", READAR_HEARTBEAT_FILE=str(beat))
    cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "brick", "--max-per-class", "3",
                   "--detector", "read", "--checkpoint", str(checkpoint), "--clip", str(clip_dir), "--run-name", "setup")
    run = cluster.repo.get_run("setup")
    shard = sorted(checkpoint.glob("pytorch_model-*.bin"))[1]
    hidden = shard.with_suffix(".away")
    shard.rename(hidden)  # the worker machine lacks a shard
    cluster.start_workers(processes=1, batch_size=2)
    deadline = time.monotonic() + 90
    while "cannot run here" not in (tmp_path / "workers.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, (tmp_path / "workers.log").read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    health = cluster.readar("healthcheck", check=False)
    assert "unhealthy" in health and "cannot run the detector" in health
    rows = cluster.repo.images(run.id)
    assert {(r.status, r.attempts) for r in rows} == {("queued", 0)}
    log = (tmp_path / "workers.log").read_text(errors="replace")
    assert "lists shards that are not there" in log and log.count("Traceback") == 0
    hidden.rename(shard)
    cluster.wait_finished("setup", timeout=150)
    assert "healthy" in cluster.readar("healthcheck")


def test_an_aggregation_whose_worker_died_is_taken_over(redis_server: RedisServer, sqlite_url: str) -> None:
    """A category left 'aggregating' by a killed worker (its message gone) is aggregated again within seconds,
    not after the 25-minute staleness limit; one whose message is still waiting is left alone."""
    from datetime import timedelta

    import redis
    from sqlalchemy import update

    from storage.database import Database
    from storage.models import Category, Image
    from storage.repository import PlannedImage, Repository, utcnow
    from workers.dispatch import reconcile_run

    database = Database(sqlite_url)
    database.migrate()
    repo = Repository(database)
    run = repo.create_run(name="agg", detector="noop", dataset_root="/data", config={}, code_version="test",
                          model_fingerprint=None, identity_keys=())
    repo.add_images(run.id, [PlannedImage(category=c, defect="good", label=0, image_path=f"{c}/test/good/0.png",
                                          mask_path=None, height=8, width=8) for c in ("lost", "queued")])
    with database.engine.begin() as connection:
        connection.execute(update(Image).values(status="done"))
        connection.execute(update(Category).values(status="aggregating", dirty=False,
                                                   aggregating_since=utcnow() - timedelta(seconds=30)))
    celery = _celery(redis_server.url)
    celery.send_task("readar.aggregate_category", args=[run.id, "queued"], queue="readar.aggregate")
    client = redis.Redis.from_url(redis_server.url)
    assert client.llen("readar.aggregate") == 1
    report = reconcile_run(celery, repo, run.id, visibility_timeout=1500, stale_aggregation_s=1500)
    assert report.aggregations == 1 and client.llen("readar.aggregate") == 2
    statuses = {c.category: c.status for c in repo.categories(run.id)}
    assert statuses == {"lost": "aggregating", "queued": "aggregating"}
    taken_over = {c.category: c.aggregating_since for c in repo.categories(run.id)}
    assert taken_over["lost"] > taken_over["queued"]  # a fresh aggregation of the lost one only
