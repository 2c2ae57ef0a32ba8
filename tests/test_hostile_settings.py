"""Settings at their edges: every numeric setting has documented bounds that the settings object enforces (a
one-line error naming the variable, never an OverflowError at the first claim), errors never echo a value, and
the Prometheus endpoint listens on loopback unless told otherwise."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from annotated_types import Ge, Le
from pydantic import ValidationError

from storage.settings import Settings
from workers.monitoring import start_metrics_server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
NUMERIC = [name for name, field in Settings.model_fields.items() if field.annotation in (int, int | None)]


def _bounds(name: str) -> tuple[int, int]:
    metadata = Settings.model_fields[name].metadata
    low = next(m.ge for m in metadata if isinstance(m, Ge))
    high = next(m.le for m in metadata if isinstance(m, Le))
    return low, high


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_setting_has_bounds_and_the_readme_states_them(name: str) -> None:
    low, high = _bounds(name)
    row = next((line for line in README.splitlines() if f"`READAR_{name.upper()}`" in line and line.startswith("|")),
               None)
    assert row is not None, f"READAR_{name.upper()} is missing from the README's table"
    assert re.search(rf"\b{low}–{high}\b", row), f"the README row of READAR_{name.upper()} must say {low}–{high}"


@pytest.mark.parametrize("name", ["lease_seconds", "visibility_timeout", "hard_time_limit", "max_attempts",
                                  "batch_size", "max_image_pixels", "setup_retry_seconds"])
def test_a_huge_value_is_refused_by_the_settings_object(name: str) -> None:
    with pytest.raises(ValidationError):
        Settings(**{name: 10**20})


def test_the_cli_says_one_line_and_never_the_value() -> None:
    env = {**os.environ, "READAR_VISIBILITY_TIMEOUT": "99999999999999999999",
           "READAR_BROKER_URL": "redis://127.0.0.1:6379/0?password=hunter2"}
    result = subprocess.run([sys.executable, "-m", "scheduler", "runs"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    assert "READAR_VISIBILITY_TIMEOUT" in error_lines[0] and "READAR_BROKER_URL" in error_lines[0]
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and "Overflow" not in result.stderr


def test_prometheus_binds_loopback_by_default() -> None:
    assert Settings().metrics_host == "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_metrics_server(port, Settings().metrics_host)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
