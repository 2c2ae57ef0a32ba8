"""workers/celery_app.py: apps come from a factory and own their worker state; importing reads no environment."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from celery import Celery
from celery.app.utils import find_app
from celery.signals import worker_ready
from pydantic import ValidationError

import workers.celery_app as celery_app
from storage.models import ImageStatus, RunStatus
from storage.repository import PlannedImage
from storage.settings import Settings
from workers.queues import AGGREGATE_CATEGORY, PROCESS_IMAGE
from workers.task import Outcome


def test_importing_the_module_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READAR_DATABASE_URL", "bogus://database")
    monkeypatch.setenv("READAR_BROKER_URL", "bogus://broker")
    monkeypatch.setenv("READAR_BATCH_SIZE", "not a number")  # Settings() refuses this environment
    module = importlib.reload(celery_app)
    with pytest.raises(ValidationError, match="batch_size"):
        _ = module.app  # the environment is read here, on first access


def test_celery_finds_one_app_built_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("READAR_WORK_DIR", str(tmp_path))
    monkeypatch.setenv("READAR_BROKER_URL", "redis://127.0.0.1:6379/15")
    celery_app.default_app.cache_clear()
    try:
        app = find_app("workers.celery_app")  # what `celery -A workers.celery_app flower` looks up
        assert app is celery_app.app
        assert app.worker_state.settings.work_dir == tmp_path
        assert PROCESS_IMAGE in app.tasks
    finally:
        celery_app.default_app.cache_clear()


def test_make_app_registers_both_tasks_on_that_app_alone(tmp_path: Path) -> None:
    app = celery_app.make_app(Settings(work_dir=tmp_path))
    assert {PROCESS_IMAGE, AGGREGATE_CATEGORY} <= set(app.tasks)
    assert not {PROCESS_IMAGE, AGGREGATE_CATEGORY} & set(Celery("other", set_as_current=False).tasks)


class _Consumer:
    """Stands for the consumer that Celery's worker_ready names as its sender."""

    def __init__(self, app: Celery) -> None:
        self.app = app


def test_each_app_keeps_its_own_worker_state(tmp_path: Path) -> None:
    first = celery_app.make_app(Settings(work_dir=tmp_path / "first"))
    second = celery_app.make_app(Settings(work_dir=tmp_path / "second"))
    worker_ready.send(sender=_Consumer(first))  # what Celery sends once first's worker is up
    runtime = first.worker_state.runtime()
    try:
        assert first.worker_state.heartbeat is not None and second.worker_state.heartbeat is None
        assert runtime.settings.work_dir == tmp_path / "first"
        assert runtime is first.worker_state.runtime()
    finally:
        runtime.close()


def test_an_image_of_a_cancelled_run_is_left_alone(tmp_path: Path) -> None:
    app = celery_app.make_app(Settings(work_dir=tmp_path))
    runtime = app.worker_state.runtime()
    repo = runtime.repo
    try:
        run_id = repo.create_run(name="r", detector="noop", dataset_root="/d", config={}, code_version="t",
                                 model_fingerprint=None, identity_keys=()).id
        repo.add_images(run_id, [PlannedImage("c", "good", 0, "c/test/good/0.png", None, 8, 8)])
        repo.set_run_status(run_id, RunStatus.CANCELLED)
        (image_id,) = repo.pending_image_ids(run_id)
        assert app.tasks[PROCESS_IMAGE](run_id, image_id) is Outcome.CANCELLED
        assert repo.image(image_id).status == ImageStatus.QUEUED
    finally:
        runtime.close()
