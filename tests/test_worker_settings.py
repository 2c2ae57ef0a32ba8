"""What the supervisor resolved (flags over environment over defaults) is what every worker child uses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.settings import Settings
from workers.supervisor import plan_children

REPO_ROOT = Path(__file__).resolve().parent.parent
FLAG_BROKER, ENV_BROKER = "redis://127.0.0.1:6379/9", "redis://127.0.0.1:6379/8"


def test_child_environment_pins_the_resolved_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READAR_BROKER_URL", ENV_BROKER)
    monkeypatch.setenv("READAR_DATABASE_URL", "sqlite:////elsewhere.sqlite")
    monkeypatch.chdir(tmp_path)
    settings = Settings(broker_url=FLAG_BROKER, work_dir=Path("relative-work"), database_url=None)
    pinned = settings.child_environment()
    assert pinned["READAR_BROKER_URL"] == FLAG_BROKER
    assert pinned["READAR_WORK_DIR"] == str(tmp_path / "relative-work")  # absolute: children may chdir
    specs = plan_children(gpus=None, processes=2, batch_size=1, queues="q", work_dir=tmp_path, metrics_port=None,
                          loglevel="WARNING", settings_env=pinned)
    for spec in specs:
        assert spec.env["READAR_BROKER_URL"] == FLAG_BROKER  # over the environment's ENV_BROKER
        assert spec.env["READAR_DATABASE_URL"] == pinned["READAR_DATABASE_URL"]
        assert spec.env["READAR_OBJECT_STORE_URL"] == str(tmp_path / "relative-work" / "objects")


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("source", ["flags", "environment", "both"])
def test_worker_children_use_what_the_supervisor_resolved(tmp_path: Path, source: str) -> None:
    """readar worker started with flags only, environment only, or both disagreeing (flags win)."""
    database = f"sqlite:///{tmp_path / 'flag.sqlite'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("READAR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    flags: list[str] = []
    if source in ("environment", "both"):
        env.update(READAR_BROKER_URL=ENV_BROKER if source == "both" else FLAG_BROKER,
                   READAR_DATABASE_URL=f"sqlite:///{tmp_path / 'env.sqlite'}" if source == "both" else database,
                   READAR_WORK_DIR=str(tmp_path / ("env-work" if source == "both" else "work")))
    if source in ("flags", "both"):
        flags = ["--broker-url", FLAG_BROKER, "--database-url", database, "--work-dir", str(tmp_path / "work")]
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        supervisor = subprocess.Popen([sys.executable, "-m", "scheduler", *flags, "worker", "--device", "cpu"],
                                      env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and "uses broker" not in log.read_text(errors="replace"):
                time.sleep(0.2)
        finally:
            supervisor.send_signal(signal.SIGTERM)
            supervisor.wait(timeout=60)
    text = " ".join(log.read_text(errors="replace").split())
    assert f"starting 1 worker process(es) on {FLAG_BROKER}" in text, text[-2000:]
    assert f"uses broker {FLAG_BROKER}, database {database}, objects {tmp_path / 'work' / 'objects'}" in text, (
        text[-2000:]
    )


def test_path_map_uses_the_longest_matching_prefix() -> None:
    from storage.paths import PathMap

    mapping = PathMap("/data=/mnt/data, /data/mvtec=/fast/mvtec,/models=/opt/models")
    assert mapping("/data/mvtec/bottle") == Path("/fast/mvtec/bottle")
    assert mapping("/data/other") == Path("/mnt/data/other")
    assert mapping("/models") == Path("/opt/models")
    assert mapping("/database/x") == Path("/database/x")  # a prefix of the name, not of the path
    assert mapping("/elsewhere") == Path("/elsewhere") and not PathMap("")
    with pytest.raises(ValueError, match="'data=/x' must be OLD=NEW with two absolute paths"):
        PathMap("data=/x")


@pytest.mark.services
@pytest.mark.slow
def test_a_worker_finds_a_moved_dataset_and_checkpoint_through_the_path_map(tmp_path: Path, sample_root: Path,
                                                                            postgres_url: str) -> None:
    """Submitted from one mount point, run by a worker that mounts the same folders elsewhere."""
    import shutil

    from read_fixtures import tiny_checkpoint
    from test_distributed import Cluster, RedisServer

    server = RedisServer(tmp_path)
    cluster = Cluster(tmp_path, server, postgres_url, str(tmp_path / "objects"), {})
    try:
        submitted_data, submitted_models = tmp_path / "submit-host" / "data", tmp_path / "submit-host" / "models"
        shutil.copytree(sample_root / "brick", submitted_data / "brick")
        read_dir, clip_dir = tiny_checkpoint()
        shutil.copytree(read_dir, submitted_models / "read")
        shutil.copytree(clip_dir, submitted_models / "clip")
        cluster.readar("submit", "--mvtec-root", str(submitted_data), "--max-per-class", "3", "--detector", "read",
                       "--checkpoint", str(submitted_models / "read"), "--clip", str(submitted_models / "clip"),
                       "--run-name", "mapped")
        worker_host = tmp_path / "worker-host"
        (tmp_path / "submit-host").rename(worker_host)  # the worker mounts the same folders elsewhere
        cluster.env["READAR_PATH_MAP"] = f"{submitted_models}={worker_host / 'models'}"
        cluster.workers = None
        cluster.log = open(tmp_path / "workers.log", "ab")  # noqa: SIM115 - closed in stop_workers
        cluster.workers = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "worker", "--device", "cpu", "--batch-size", "2",
             "--path-map", f"{submitted_data}={worker_host / 'data'}"],
            env=cluster.env, cwd=REPO_ROOT, stdout=cluster.log, stderr=subprocess.STDOUT)
        cluster.wait_finished("mapped", timeout=150)
        run = cluster.repo.get_run("mapped")
        assert {r.status for r in cluster.repo.images(run.id)} == {"done"}
        assert run.dataset_root == str(submitted_data)  # the run keeps what was submitted
    finally:
        if cluster.workers is not None:
            cluster.stop_workers()
        server.stop()
