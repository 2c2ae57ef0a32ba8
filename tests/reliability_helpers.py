"""Private, restartable servers and run checks shared by the reliability and security tests.

Each server here belongs to one test: it can be stopped, restarted on the same port and data folder, or
protected by a password, without touching the shared services on 127.0.0.1:5432 / 6379.
"""

from __future__ import annotations

import csv
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import SeaweedS3
from tests.test_distributed import REPO_ROOT, Cluster

MetricTable = dict[tuple[str, str, str], tuple[str, ...]]
TERMINAL = {"done", "failed", "skipped"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server on a free port with append-only persistence; ``password`` turns on ``requirepass``."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.port = free_port()
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--appendonly", "yes",
                   "--appendfsync", "always", "--dir", str(self.directory), "--save", ""]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)

    def used_memory(self) -> int:
        return int(redis.Redis.from_url(self.url).info("memory")["used_memory"])


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(f"PostgreSQL's {name} is missing under /usr/lib/postgresql/*/bin")
    return found[-1]


def _as_postgres(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120, **kwargs)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb into a temporary folder) on a free port.

    With ``password`` the TCP connections need scram-sha-256 authentication as user ``postgres``."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        # The postgres OS user must own the data folder, so it lives outside pytest's root-only tmp_path.
        self.base = Path(tempfile.mkdtemp(prefix="readar-pg-"))
        os.chmod(self.base, 0o777)
        self.data = self.base / "data"
        self.port = free_port()
        command = [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--no-sync", "-E", "UTF8"]
        if password:
            pwfile = self.base / "pw"
            pwfile.write_text(password)
            os.chmod(pwfile, 0o644)
            command += ["--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}"]
        else:
            command += ["--auth=trust"]
        done = _as_postgres(command)
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr}")
        if password:
            (self.base / "pw").unlink()
        self.start()
        _as_postgres(["psql", "-h", str(self.base), "-p", str(self.port), "-U", "postgres", "-c",
                      "CREATE DATABASE readar"])
        auth = f":{password}" if password else ""
        self.url = f"postgresql+psycopg://postgres{auth}@127.0.0.1:{self.port}/readar"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                             str(self.base / "server.log"), "-w", "-t", "60", "start"])
        if done.returncode != 0:
            pytest.fail(f"pg_ctl start failed: {done.stdout}{done.stderr}")

    def stop(self) -> None:
        _as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class RestartableSeaweed(SeaweedS3):
    """SeaweedFS + S3 gateway that can be stopped and started again on the same ports and folder."""

    def __init__(self, directory: Path) -> None:  # noqa: D107 - same server as SeaweedS3
        self.directory = directory
        original = subprocess.Popen

        def capture(command: list[str], **kwargs: object) -> subprocess.Popen:
            self.command = list(command)
            return original(command, **kwargs)

        subprocess.Popen = capture  # type: ignore[assignment] - record the command SeaweedS3 builds
        try:
            super().__init__(directory)
        finally:
            subprocess.Popen = original  # type: ignore[assignment]

    def start(self) -> None:
        self.log = open(self.directory / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        last: Exception | None = None
        while time.monotonic() < deadline:  # the probe bucket exists already: write into it again
            if self.process.poll() is not None:
                pytest.fail(f"SeaweedFS exited on restart; see {self.directory / 'weed.log'}")
            try:
                self.client().put_object(Bucket="readar-probe", Key="probe", Body=b"again")
                return
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last = exc
                time.sleep(0.5)
        pytest.fail(f"SeaweedFS S3 did not come back within 60 s: {last}")


def run_embedded_reference(tmp_path: Path, root: Path, classes: str | None = None, name: str = "reference"
                           ) -> MetricTable:
    """Metrics of a fault-free embedded `readar run` (SQLite, local objects, baseline detector)."""
    work = tmp_path / f"embedded-{name}"
    env = {**os.environ, "READAR_WORK_DIR": str(work)}
    for key in ("READAR_DATABASE_URL", "READAR_OBJECT_STORE_URL", "READAR_BROKER_URL"):
        env.pop(key, None)
    command = [sys.executable, "-m", "scheduler", "run", "--mvtec-root", str(root), "--run-name", name]
    if classes:
        command += ["--classes", classes]
    subprocess.run(command, env=env, cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    return read_metrics_csv(work / "results" / f"{name}.csv")


def read_metrics_csv(path: Path) -> MetricTable:
    with open(path) as handle:
        return {(r["scope"], r["category"], r["defect_type"]):
                (r["iAUROC"], r["pAUROC"], r["PRO"], r["PRO_hard"], r["F1_max"], r["num_images"])
                for r in csv.DictReader(handle)}


def wait_for_done(cluster: Cluster, run_name: str, count: int, timeout: float = 120) -> None:
    """Block until ``count`` images of the run are done."""
    run = cluster.repo.get_run(run_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(c.get("done", 0) for c in cluster.repo.status_counts(run.id).values()) >= count:
            return
        time.sleep(0.1)
    pytest.fail(f"run {run_name}: fewer than {count} images done after {timeout} s: "
                f"{cluster.repo.status_counts(run.id)}")


def wait_for_restart(cluster: Cluster, old_children: list[int], timeout: float = 30) -> list[int]:
    """The supervisor's children once it has replaced a dead one (same count, a new pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = cluster.worker_children()
        if len(children) == len(old_children) and set(children) != set(old_children):
            return children
        time.sleep(0.1)
    pytest.fail(f"the supervisor did not restart a worker within {timeout} s (children {cluster.worker_children()})")


def busy_child(cluster: Cluster, run_id: int, timeout: float = 30) -> int:
    """A worker child that currently holds a running image (its pid is in the lease owner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = set(cluster.worker_children())
        for owner in cluster.repo.running_owners(run_id):
            pid = int(owner.rpartition(":")[2])
            if pid in children:
                return pid
        time.sleep(0.05)
    pytest.fail("no worker child held a running image")


def assert_run_integrity(cluster: Cluster, run_name: str, store_url: str, *, expected_rows: int) -> None:
    """Every image exactly once, in a terminal state, done rows with one readable object at their own key."""
    from storage.logits import decode_logits
    from storage.objects import ObjectStore, image_object_key
    from storage.settings import Settings

    run = cluster.repo.get_run(run_name)
    rows = cluster.repo.images(run.id)
    paths = [r.image_path for r in rows]
    assert len(rows) == expected_rows and len(set(paths)) == expected_rows, "an image row is missing or duplicated"
    assert {r.status for r in rows} <= TERMINAL, {r.image_path: r.status for r in rows if r.status not in TERMINAL}
    done = [r for r in rows if r.status == "done"]
    assert len({r.object_key for r in done}) == len(done)
    settings = Settings(object_store_url=store_url)
    store = ObjectStore(store_url, settings.storage_options())
    listed = store.list(f"runs/{run.id}/images")
    assert sorted(listed) == sorted(image_object_key(run.id, r.id) for r in done), "objects lost or duplicated"
    for row in done:
        assert row.object_key == image_object_key(run.id, row.id)
        decode_logits(store.get(row.object_key), source=row.image_path)  # whole, not a partial write
    metric_rows = cluster.repo.metric_rows(run.id)
    keys = [(m.scope, m.category, m.defect_type) for m in metric_rows]
    assert len(keys) == len(set(keys)), "duplicated metric rows"


def terminate(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a process this test started, then SIGKILL it if it does not exit."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
