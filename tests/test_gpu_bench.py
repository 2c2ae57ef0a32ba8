"""bench/gpu_throughput.py end to end at its smallest: every row kind, on the CPU, with the real Celery worker on a
private redis-server (or 127.0.0.1:6379) and PostgreSQL on 127.0.0.1:5432.

It checks that the script runs and records what it should (rows, equality verdicts, positive rates), never how
fast: figures on a shared two-core machine mean nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.services, pytest.mark.slow]


# The PostgreSQL the service tests use (tests/conftest.py); the bench makes a fresh database there and drops it.
PG_ADMIN_URL = os.environ.get("READAR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing_services() -> str | None:
    """Why the worker row cannot run here, or None (the bench's own defaults find the same services)."""
    if shutil.which("redis-server") is None and not _reachable("127.0.0.1", 6379):
        return "no redis-server on PATH and no Redis on 127.0.0.1:6379"
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        return f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc})"
    return None


def test_gpu_bench_runs_every_row_kind_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = _missing_services()
    if reason is not None:
        print(f"skipping the GPU bench smoke test: {reason}")
        pytest.skip(reason)
    bench = importlib.import_module("bench.gpu_throughput")
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--images", "2", "--batch-sizes", "2", "--subset", "1",
                       "--pg-admin-url", PG_ADMIN_URL, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out

    assert report["machine"]["torch"] and report["machine"]["transformers"]
    assert report["sam_attention_kernels"] == {"skipped": "not a CUDA device"}  # probed on CUDA only
    rows = report["rows"]
    assert {row["kind"] for row in rows} == set(bench.ROW_KINDS)
    errors = [(row["label"], row["error"]) for row in rows if row["status"] == "error"]
    assert not errors, errors
    for row in rows:
        assert f"| {row['label']} |" in printed  # each row was printed as a markdown line
        if row["kind"] in ("original", "direct", "worker", "embedded"):
            assert row["status"] == "ok" and row["images_per_s"] > 0, row
        if row["status"] == "ok" and row["kind"] in ("lever", "compile"):
            assert row["images_per_s"] > 0, row
            if row.get("lever"):
                assert row["equality"]["passed"], row
                assert row["equality"]["texts_equal"] and row["equality"]["points_equal"], row
    worker = next(row for row in rows if row["kind"] == "worker")
    assert worker["ratio_to_direct"] > 0 and any("PostgreSQL" in note for note in worker["services"])
    if report["levers_available"]:
        assert any(row["kind"] == "lever" and row.get("equality") for row in rows)
