"""Double buffering: task threads = batch size × pipeline depth keep batches full; the batcher still caps them.

The fill checks drive the real Batcher with simulated prepare and forward times (bench/batch_fill.py) and assert
fill, never wall time. The rest checks that the Celery worker, its command line, the embedded runner and torch
carry the settings.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from storage.settings import DEFAULT_PIPELINE_DEPTH, Settings
from workers.batcher import Batcher, task_threads
from workers.supervisor import plan_children, torch_threads_per_process

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> types.ModuleType:
    """bench/batch_fill.py (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("batch_fill", ROOT / "bench" / "batch_fill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_fill"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_double_buffering_fills_batches_that_one_batch_of_threads_splits() -> None:
    """Batch 8 under steady load: 16 threads keep every forward (nearly) full; 8 threads split them, because
    the threads that just got their results are not yet preparing when the batcher looks."""
    bench = _bench()
    # A longer forward than the bench's default leaves room for a busy test machine: the next batch must be
    # queued before the running one ends (prepare + between tasks, at most 130 ms, against 325 ms).
    costs = bench.Costs(batch_s=0.2)
    old = bench.simulate(8, 1, seconds=2.5, costs=costs)
    new = bench.simulate(8, 2, seconds=2.5, costs=costs)
    assert (old.threads, new.threads) == (8, 16)
    assert len(new.sizes) >= 3, new
    assert new.mean_fill >= 0.9, new
    assert old.mean_fill < new.mean_fill, (old, new)
    assert max(old.largest, new.largest) <= 8


def test_the_batcher_never_exceeds_its_cap() -> None:
    """Many more items queued than a batch holds (while the first batch runs) still go out in batches of 4."""
    release = threading.Event()
    sizes: list[int] = []

    def run_batch(items: Sequence[Any]) -> list[Any]:
        sizes.append(len(items))
        release.wait(5)
        return list(items)

    batcher = Batcher(run_batch, max_batch=4)
    first = [batcher.submit(i) for i in range(1)]
    while not sizes:  # the first batch is running: everything below queues behind it
        threading.Event().wait(0.01)
    rest = [batcher.submit(i) for i in range(1, 11)]
    release.set()
    assert [f.result(timeout=5) for f in first + rest] == list(range(11))
    batcher.close()
    assert sizes == [1, 4, 4, 2]


def test_task_threads_are_batch_size_times_depth() -> None:
    assert task_threads(8, 2) == 16 and task_threads(8, 1) == 8
    with pytest.raises(ValueError):
        task_threads(8, 0)
    assert Settings().pipeline_depth == DEFAULT_PIPELINE_DEPTH == 2
    with pytest.raises(ValueError, match="pipeline_depth"):
        Settings(pipeline_depth=0)
    with pytest.raises(ValueError, match="torch_threads"):
        Settings(torch_threads=0)


def _concurrency(command: list[str]) -> int:
    return int(command[command.index("--concurrency") + 1])


def test_worker_command_line_carries_the_double_buffered_concurrency(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("READAR_PIPELINE_DEPTH", raising=False)
    monkeypatch.delenv("READAR_TORCH_THREADS", raising=False)
    plan = dict(gpus=[0, 1], processes=1, batch_size=8, queues="q", work_dir=tmp_path, metrics_port=None,
                loglevel="WARNING")
    for spec in plan_children(**plan):
        assert _concurrency(spec.command) == 16  # prefetch multiplier 1: also 16 messages held
        assert spec.env["READAR_PIPELINE_DEPTH"] == "2"
        assert spec.env["READAR_TORCH_THREADS"] == str(torch_threads_per_process(2))
    pinned = Settings(pipeline_depth=1, torch_threads=3).child_environment()  # what `readar worker` resolved
    for spec in plan_children(**plan, settings_env=pinned):
        assert _concurrency(spec.command) == 8 and spec.env["READAR_TORCH_THREADS"] == "3"
    monkeypatch.setenv("READAR_PIPELINE_DEPTH", "1")
    assert all(_concurrency(spec.command) == 16 for spec in plan_children(**plan, pipeline_depth=2))


def test_celery_prefetch_follows_the_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefetch stays one message per thread: double buffering comes from the concurrency, so every message a
    worker holds is running (late ack, no message waiting unacknowledged in a local buffer)."""
    import workers.celery_app as celery_app
    from workers import worker_main

    config = celery_app.celery_config(Settings(broker_url="redis://127.0.0.1:6379/15"))
    assert config["worker_prefetch_multiplier"] == 1 and config["task_acks_late"]
    seen: list[list[str]] = []
    fake = types.SimpleNamespace(worker_main=seen.append)
    monkeypatch.setattr(celery_app, "default_app", lambda: fake)
    worker_main.main(["--name", "w@h", "--concurrency", "16"])
    (argv,) = seen
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--concurrency") + 1] == "16"


class _FakeTorch(types.ModuleType):
    """Stands for torch: records set_num_threads."""

    def __init__(self, default: int) -> None:
        super().__init__("torch")
        self.threads = [default]

    def get_num_threads(self) -> int:
        return self.threads[-1]

    def set_num_threads(self, count: int) -> None:
        self.threads.append(count)


def test_torch_threads_are_capped_once_per_worker_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker caps torch's threads at its share before building its first model; a cap never raises torch's own
    default, so the embedded runner (one process, no setting) keeps it."""
    import workers.runtime
    from storage.repository import PlannedImage
    from workers.detectors.base import DetectorConfig
    from workers.detectors.noop import NoopDetector
    from workers.runtime import WorkerRuntime, set_torch_threads

    torch = _FakeTorch(default=64)
    monkeypatch.setitem(sys.modules, "torch", torch)
    # The noop detector itself: loading every built-in one would import the real detectors over this fake torch.
    monkeypatch.setattr(workers.runtime, "build_detector", lambda _name, config: NoopDetector(config))
    assert set_torch_threads(None, processes=2) == torch_threads_per_process(2) == torch.threads[-1]
    assert set_torch_threads(1000) == torch_threads_per_process(2)  # never above what torch had
    torch.threads.append(64)
    assert set_torch_threads(None) == min(64, torch_threads_per_process(1))
    torch.threads.append(64)
    runtime = WorkerRuntime(Settings(work_dir=tmp_path, torch_threads=3))
    try:
        assert runtime.torch_threads is None and torch.threads[-1] == 64  # no model yet, torch left alone
        run_id = runtime.repo.create_run(name="r", detector="noop", dataset_root="/d",
                                         config={"detector_config": DetectorConfig().public()}, code_version="t",
                                         model_fingerprint=None, identity_keys=()).id
        runtime.repo.add_images(run_id, [PlannedImage("c", "good", 0, "c/test/good/0.png", None, 8, 8)])
        runtime.context_for_run(run_id)
        runtime.context_for_run(run_id)
        assert runtime.torch_threads == 3 and torch.threads[-2:] == [64, 3]  # set once
    finally:
        runtime.close()


def test_the_embedded_runner_double_buffers_and_sets_torch_threads(
    sqlite_url: str, sample_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import scheduler.runner as runner
    from scheduler.planner import RunRequest, plan_run
    from storage.database import Database
    from storage.objects import ObjectStore
    from storage.repository import Repository
    from workers.detectors.base import DetectorConfig
    from workers.detectors.noop import NoopDetector

    database = Database(sqlite_url)
    database.migrate()
    repo = Repository(database)
    request = RunRequest(mvtec_root=sample_root, detector="noop", detector_config=DetectorConfig().public(),
                         classes=("brick",), max_per_class=3, run_name="fill")
    run, _ = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False, settings_public={})
    pools: list[int] = []
    real_pool = runner.ThreadPoolExecutor

    def pool(max_workers: int, **kwargs: Any) -> Any:
        pools.append(max_workers)
        return real_pool(max_workers=max_workers, **kwargs)

    torch_calls: list[int | None] = []
    monkeypatch.setattr(runner, "ThreadPoolExecutor", pool)
    monkeypatch.setattr(runner, "set_torch_threads", torch_calls.append)
    outcome = runner.execute_run(repo, ObjectStore(str(tmp_path / "objects")), run,
                                 NoopDetector(DetectorConfig()), batch_size=4, lease_seconds=60,
                                 max_attempts=1, device="cpu", torch_threads=2)
    assert outcome.processed.get("done") == len(repo.images(run.id)) > 0
    assert pools == [8] and torch_calls == [2]


def test_a_setup_error_fails_the_whole_batch_at_once() -> None:
    """Broken weights fail every image alike: the batch is not retried item by item (each retry would load
    the weights again and print the same long error)."""
    from workers.detectors.base import SetupError

    calls: list[int] = []
    release = threading.Event()

    def run_batch(items: Sequence[Any]) -> list[Any]:
        calls.append(len(items))
        release.wait(5)
        raise SetupError("weight shard x is truncated")

    batcher = Batcher(run_batch, max_batch=4)
    first = batcher.submit(0)
    while not calls:
        threading.Event().wait(0.01)
    rest = [batcher.submit(i) for i in range(1, 5)]
    release.set()
    for future in [first, *rest]:
        with pytest.raises(SetupError, match="truncated"):
            future.result(timeout=5)
    batcher.close()
    assert calls == [1, 4]  # one call per batch, no retries one by one


def test_a_failed_detector_build_is_tried_again_by_the_next_task(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that raised (a bad READAR_* lever, a passing fault) left the run mapped to a context that did not
    exist: every later task of the run failed with KeyError and a distributed run stalled. Now the next task
    builds again and gets the detector once the cause is gone."""
    import workers.runtime
    from storage.repository import PlannedImage
    from workers.detectors.base import DetectorConfig
    from workers.detectors.noop import NoopDetector
    from workers.read.levers import LeverError
    from workers.runtime import WorkerRuntime

    builds: list[str] = []

    def build(_name: str, config: DetectorConfig) -> NoopDetector:
        builds.append(_name)
        if len(builds) == 1:
            raise LeverError("READAR_COMPILE='banana': use on, off or auto")
        return NoopDetector(config)

    monkeypatch.setattr(workers.runtime, "build_detector", build)
    runtime = WorkerRuntime(Settings(work_dir=tmp_path))
    try:
        run_id = runtime.repo.create_run(name="r", detector="noop", dataset_root="/d",
                                         config={"detector_config": DetectorConfig().public()}, code_version="t",
                                         model_fingerprint=None, identity_keys=()).id
        runtime.repo.add_images(run_id, [PlannedImage("c", "good", 0, "c/test/good/0.png", None, 8, 8)])
        with pytest.raises(LeverError):
            runtime.context_for_run(run_id)
        assert runtime.context_for_run(run_id).detector is runtime.context_for_run(run_id).detector
        assert len(builds) == 2
    finally:
        runtime.close()


def test_a_bad_lever_variable_is_a_setup_error() -> None:
    """So the embedded run stops with one line and a worker takes no task, as for missing weights."""
    from workers.detectors.base import SetupError
    from workers.read.levers import LeverError

    assert issubclass(LeverError, SetupError)
