"""Worker monitoring: the Prometheus endpoint, the heartbeat and `readar healthcheck`."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from scheduler.cli import cli
from workers.monitoring import IMAGES, Heartbeat, heartbeat_age, record_batch, start_metrics_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prometheus_endpoint_serves_worker_counters() -> None:
    port = _free_port()
    start_metrics_server(port)
    IMAGES.labels("done").inc()
    record_batch(8, 0.4)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'readar_images_total{outcome="done"}' in body
    assert "readar_batch_size_count" in body and "readar_model_seconds_per_image_sum" in body
    assert "readar_queue_wait_seconds" in body


def test_heartbeat_goes_stale_only_while_a_task_is_stuck(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    heartbeat = Heartbeat(path, interval=0.1)
    assert heartbeat_age(path) < 1
    heartbeat.task_started()
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert heartbeat_age(path) > 50  # busy: the idle ticker does not refresh it
    heartbeat.task_finished()
    assert heartbeat_age(path) < 1
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert heartbeat_age(path) < 1  # idle: refreshed by the ticker


def test_healthcheck_command(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    runner = CliRunner()
    missing = runner.invoke(cli, ["healthcheck", "--heartbeat-file", str(path), "--max-idle", "60"])
    assert missing.exit_code == 1 and "unhealthy" in missing.output
    path.touch()
    fresh = runner.invoke(cli, ["healthcheck", "--heartbeat-file", str(path), "--max-idle", "60"])
    assert fresh.exit_code == 0 and "healthy" in fresh.output
    old = time.time() - 3600
    os.utime(path, (old, old))
    stale = runner.invoke(cli, ["healthcheck", "--heartbeat-file", str(path), "--max-idle", "60"])
    assert stale.exit_code == 1


def test_tls_options_reach_the_broker_and_database_clients(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import contextlib
    import ssl

    from storage.database import Database
    from storage.settings import Settings
    from workers.celery_app import celery_config

    ca = tmp_path / "ca.pem"
    plain = celery_config(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert plain["broker_use_ssl"] is None
    secured = celery_config(Settings(broker_url="rediss://127.0.0.1:6380/0", broker_tls_ca_file=ca,
                                     broker_tls_cert_file=tmp_path / "c.pem", broker_tls_key_file=tmp_path / "k.pem"))
    assert secured["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca),
                                         "ssl_certfile": str(tmp_path / "c.pem"),
                                         "ssl_keyfile": str(tmp_path / "k.pem")}
    rabbit = celery_config(Settings(broker_url="amqps://u:p@127.0.0.1:5671/readar", broker_tls_ca_file=ca))
    assert rabbit["broker_use_ssl"] == {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": str(ca)}  # py-amqp's names
    database = Database("postgresql+psycopg://readar@db.invalid/readar", tls_ca_file=str(ca))
    captured: dict = {}

    def connect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - psycopg.connect's signature
        captured.update(kwargs)
        raise ConnectionError("stop before the network")

    monkeypatch.setattr(database.engine.dialect.loaded_dbapi, "connect", connect)
    with contextlib.suppress(Exception):  # the connection is meant to fail here
        database.engine.connect()
    assert captured.get("sslmode") == "verify-full" and captured.get("sslrootcert") == str(ca)
