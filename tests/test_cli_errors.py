"""Connection and URL errors end as one line naming what failed and what to do; -v adds the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.services


def _readar(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("READAR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "scheduler", "--work-dir", str(tmp_path / "work"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_postgres_scheme_names_the_right_one(tmp_path: Path) -> None:
    line = _one_line_error(_readar(tmp_path, "--database-url", "postgres://postgres@127.0.0.1/test", "runs"))
    assert "postgres://postgres@127.0.0.1/test" in line and "postgresql+psycopg://" in line


def test_unknown_role_and_database_are_one_line(tmp_path: Path) -> None:
    line = _one_line_error(_readar(tmp_path, "--database-url",
                                   "postgresql+psycopg://readar_nosuchrole:secret-pw@127.0.0.1/test", "runs"))
    assert 'role "readar_nosuchrole" does not exist' in line and "secret-pw" not in line
    line = _one_line_error(_readar(tmp_path, "--database-url",
                                   "postgresql+psycopg://postgres@127.0.0.1/readar_nosuchdb", "runs"))
    assert 'database "readar_nosuchdb" does not exist' in line


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    result = _readar(tmp_path, "-v", "--database-url", "postgres://postgres@127.0.0.1/test", "runs")
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_submit_with_the_broker_down_says_how_to_finish(tmp_path: Path) -> None:
    from scheduler.sample_data import make_sample_data

    make_sample_data(tmp_path / "data", categories=("brick",), size=64, per_class=4, train_per_class=2)
    server = RedisServer(tmp_path)
    url = server.url
    server.stop()
    line = _one_line_error(_readar(tmp_path, "--broker-url", url, "submit", "--mvtec-root", str(tmp_path / "data"),
                                   "--run-name", "down"))
    assert f"cannot reach the broker {url}" in line and "readar --work-dir" in line and "resume down" in line
    server.start()
    try:
        result = _readar(tmp_path, "--broker-url", url, "resume", "down")
        assert result.returncode == 0, result.stderr
        assert "4 task(s) enqueued" in result.stdout and server.queue_length() == 4
    finally:
        server.stop()


def test_rabbitmq_wrong_password_and_unknown_vhost_are_one_line(tmp_path: Path) -> None:
    from conftest import AMQP_URL

    from scheduler.sample_data import make_sample_data

    make_sample_data(tmp_path / "data", categories=("brick",), size=64, per_class=4, train_per_class=2)
    host = AMQP_URL.split("@", 1)[1]
    for url, expected in ((f"amqp://guest:not-the-password@{host}//", "ACCESS_REFUSED"),
                          (f"{AMQP_URL}/readar_no_such_vhost", "vhost readar_no_such_vhost not found")):
        line = _one_line_error(_readar(tmp_path, "--broker-url", url, "submit", "--mvtec-root",
                                       str(tmp_path / "data"), "--run-name", "refused"))
        assert "refused the connection" in line and expected in line and "not-the-password" not in line
