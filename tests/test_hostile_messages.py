"""Hostile task messages: a malformed body, ids that are not ids, an id beyond any row, and a message that names
an image of another run. Each is dropped once with a log line; no worker process dies, no run changes, and the
fleet goes on to finish a normal run with the embedded run's metrics."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from test_distributed import Cluster, RedisServer, _embedded_metrics

from workers.consumer import malformed_message
from workers.dispatch import TaskMessages
from workers.queues import AGGREGATE_CATEGORY, IMAGE_QUEUE, MAX_ID, PROCESS_IMAGE, task_args_problem

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer, postgres_url: str) -> Iterator[Cluster]:
    deployment = Cluster(tmp_path, redis_server, postgres_url, str(tmp_path / "objects"), {})
    yield deployment
    if deployment.workers is not None:
        deployment.stop_workers()


def _raw(args: object, *, body: object = None) -> str:
    """A task message as kombu stores it in Redis, with any arguments (or any body) at all."""
    message = json.loads(TaskMessages(PROCESS_IMAGE, IMAGE_QUEUE).encode([1, 1, 0.0]))
    payload = body if body is not None else [args, {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                         "chord": None}]
    message["body"] = base64.b64encode(json.dumps(payload).encode()).decode()
    message["headers"]["argsrepr"] = repr(args)
    return json.dumps(message)


def test_argument_rules() -> None:
    assert task_args_problem(PROCESS_IMAGE, [1, 2, 1.5], {}) is None
    assert task_args_problem(PROCESS_IMAGE, [1, 2], {}) is None
    for bad in (["x", "y"], [2**70, 1], [1, 2**70], [0, 1], [1, -3], [True, 1], [1.0, 2], [1], [1, 2, "t"], {"a": 1}):
        assert task_args_problem(PROCESS_IMAGE, bad, {}) is not None, bad
    assert task_args_problem(PROCESS_IMAGE, [1, MAX_ID], {}) is None
    assert task_args_problem(PROCESS_IMAGE, [1, 2], {"image_id": 3}) is not None
    assert task_args_problem(AGGREGATE_CATEGORY, [1, "brick"], {}) is None
    assert task_args_problem(AGGREGATE_CATEGORY, [1, ""], {}) is not None
    assert task_args_problem("someone.elses_task", ["anything"], {}) is None  # Celery's unknown-task handling


def test_malformed_bodies_are_recognised() -> None:
    class Message:
        def __init__(self, body: str, content_type: str = "application/json") -> None:
            self.body, self.content_type = body, content_type
            self.headers = {"task": PROCESS_IMAGE, "id": "x"}

    assert malformed_message(Message(json.dumps([[1, 2, 0.0], {}, {}]))) is None
    assert "not [args, kwargs, options]" in malformed_message(Message(json.dumps({"a": 1})))
    assert "not JSON" in malformed_message(Message("[" * 200_000))
    assert malformed_message(Message("\x80\x04pickle", "application/x-python-serialize")) is None  # Celery refuses


def test_hostile_messages_cost_nothing_and_the_fleet_finishes_a_run(
    cluster: Cluster, redis_server: RedisServer, sample_root: Path, tmp_path: Path,
) -> None:
    # Two runs, planned and sent before any worker runs; then the hostile messages go to the consuming end of the
    # queue, so the workers meet them first.
    cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "brick", "--run-name", "one")
    cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "coffee", "--run-name", "two")
    one, two = cluster.repo.get_run("one"), cluster.repo.get_run("two")
    target = cluster.repo.images(two.id)[0]
    client = redis.Redis.from_url(redis_server.url)
    hostile = [_raw(None, body={"a": 1}), _raw(["x", "y"]), _raw([2**70, 1]), _raw([one.id, 2**40]),
               _raw([one.id, target.id, 0.0])]
    client.rpush(IMAGE_QUEUE, *hostile)
    cluster.start_workers(processes=2, batch_size=2)
    cluster.wait_finished("one")
    cluster.wait_finished("two")
    cluster.stop_workers()

    log = (tmp_path / "workers.log").read_text(errors="replace")
    assert "exited with" not in log and "Unrecoverable error" not in log, log[-3000:]  # no process died
    assert log.count("dropped a malformed task message") == 4, log[-3000:]
    assert f"dropped a message for image {target.id} of run {one.id}: that image belongs to run {two.id}" in log
    assert "retrying" not in log
    # Run two's image was processed once, by its own message, and stored under run two.
    row = cluster.repo.image(target.id)
    assert (row.status, row.attempts, row.run_id) == ("done", 1, two.id)
    assert row.object_key.startswith(f"runs/{two.id}/")
    assert not any(key for key in _objects(tmp_path / "objects") if key.startswith(f"runs/{one.id}/")
                   and key.endswith(f"/{target.id}.npz"))
    assert {r.status for r in cluster.repo.images(one.id)} == {"done"}
    assert cluster.metrics("one") == _embedded_metrics(tmp_path / "e1", sample_root, "brick")
    assert cluster.metrics("two") == _embedded_metrics(tmp_path / "e2", sample_root, "coffee")


def _objects(root: Path) -> list[str]:
    return [str(Path(folder, name).relative_to(root)) for folder, _, names in os.walk(root) for name in names]
