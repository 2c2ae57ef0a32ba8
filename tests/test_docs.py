"""The README documents every setting and every command (a new one without docs fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from scheduler.cli import cli
from scheduler.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name for name in Settings.model_fields if f"READAR_{name.upper()}" not in README]
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_every_command_is_documented() -> None:
    missing = [name for name in cli.commands if not re.search(rf"`readar {re.escape(name)}\b", README)]
    assert not missing, f"commands missing from the README: {missing}"


def test_readme_opens_with_the_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "readar demo" in blocks[0] and "tests/run.sh" in blocks[1]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci, ".ci/run must call the README's test command"
