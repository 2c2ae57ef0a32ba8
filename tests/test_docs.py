"""The README documents every setting and every command (a new one without docs fails here); the defaults the
docs state are the code's defaults; the docs stand alone (no reference to files outside the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from scheduler.cli import cli
from storage.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DEPLOY_README = (ROOT / "deploy" / "README.md").read_text()
# Settings whose default is a number: every figure the docs give for them must be the code's.
NUMERIC_DEFAULTS = {
    f"READAR_{name.upper()}": field.default
    for name, field in Settings.model_fields.items()
    if isinstance(field.default, int) and not isinstance(field.default, bool)
}
# The figures deploy/README.md must state (its time-limit section explains how they relate).
DEPLOY_MUST_STATE = {"READAR_SOFT_TIME_LIMIT", "READAR_HARD_TIME_LIMIT", "READAR_LEASE_SECONDS",
                     "READAR_VISIBILITY_TIMEOUT"}


def test_every_setting_is_documented() -> None:
    missing = [name for name in Settings.model_fields if f"READAR_{name.upper()}" not in README]
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_every_command_is_documented() -> None:
    missing = [name for name in cli.commands if not re.search(rf"`readar {re.escape(name)}\b", README)]
    assert not missing, f"commands missing from the README: {missing}"


def test_reliability_cites_only_tests_that_exist() -> None:
    """docs/RELIABILITY.md names its evidence as `test_file.py::test_name` (and `::test_name` for the same file
    again); each one must be a test function of that file, or the table vouches for nothing."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    missing, cited = [], 0
    for line in text.splitlines():
        current = None
        for file_name, name in re.findall(r"`(test_\w+\.py)?::(\w+)[^`]*`", line):
            current = file_name or current
            assert current, f"RELIABILITY.md cites ::{name} without a file before it on its line"
            cited += 1
            if not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / current).read_text(), flags=re.M):
                missing.append(f"{current}::{name}")
    assert cited > 40, "the citation pattern no longer matches RELIABILITY.md's style"
    assert not missing, f"RELIABILITY.md cites tests that do not exist: {missing}"


def test_readme_lists_every_detector() -> None:
    from workers.detectors.base import available_detectors

    listed = re.search(r"`--detector ([a-z_]+(?:\|[a-z_]+)+)`", README)
    assert listed, "the README's run options no longer list the detectors as `--detector a|b|…`"
    assert listed.group(1).split("|") == available_detectors()


def test_readme_opens_with_the_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "readar demo" in blocks[0] and "tests/run.sh" in blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci, ".ci/run must call the README's test command"


# --- stated defaults = code defaults ---------------------------------------------------------------------


def _code_default(variable: str) -> Any:
    name = variable.removeprefix("READAR_").lower()
    assert name in Settings.model_fields, f"{variable} is documented but is not a setting of storage/settings.py"
    return Settings.model_fields[name].default


def _as_text(value: Any) -> str | None:
    """A code default as the README's table writes it; None for "no default" (unset or empty)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def configuration_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """(variables, stated defaults) per row of the configuration table: `| `READAR_X` | `default` | ... |`.

    Defaults are the back-quoted values of the second cell; a cell without one (e.g. "—") states no default."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `READAR_") or len(cells) < 3:
            continue
        variables = re.findall(r"`(READAR_[A-Z0-9_]+)`", cells[0])
        rows.append((variables, re.findall(r"`([^`]*)`", cells[1])))
    return rows


def _section(text: str, heading: str) -> str:
    """The text from ``heading`` (a line of its own) up to the next heading of the same level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    following = re.search(rf"\n{level} ", text[start + len(heading) + 2 :])
    return text[start : start + len(heading) + 2 + following.start()] if following else text[start:]


def test_readme_lever_table_states_the_code_defaults() -> None:
    """Every speed lever is in the README's lever table with the defaults workers.read.levers gives it."""
    from workers.read.levers import Levers

    section = _section(README, "## Configuration").split("### Speed levers")[1]
    stated = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `READAR_") and len(cells) == 4:
            stated[cells[0].strip("`")] = (cells[1] == "on", cells[2] == "on")
    expected = {
        Levers.variable(name): (getattr(Levers.from_env("cuda", {}), name), getattr(Levers.from_env("cpu", {}), name))
        for name in Levers.names()
    }
    assert stated == expected


def test_readme_configuration_table_states_the_code_defaults() -> None:
    rows = configuration_rows(_section(README, "## Configuration").split("\n### ")[0])
    documented = {variable for variables, _ in rows for variable in variables}
    expected = {f"READAR_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected, (
        f"configuration table rows do not match the settings: missing {sorted(expected - documented)}, "
        f"unknown {sorted(documented - expected)}"
    )
    wrong = []
    for variables, stated in rows:
        if stated and len(stated) != len(variables):
            wrong.append(f"{variables}: {len(stated)} defaults for {len(variables)} variables")
            continue
        for index, variable in enumerate(variables):
            code = _as_text(_code_default(variable))
            value = stated[index] if stated else None
            if value is not None and "<" in value:  # derived at run time (e.g. `<work dir>/objects`)
                value = None
            if value != code:
                wrong.append(f"{variable}: README says {value!r}, storage/settings.py says {code!r}")
    assert not wrong, "README configuration table disagrees with storage/settings.py:\n" + "\n".join(wrong)


def test_the_table_parser_reads_single_and_paired_rows() -> None:
    text = "| `READAR_BATCH_SIZE` | `5` | images |\n| `READAR_SOFT_TIME_LIMIT`, `READAR_HARD_TIME_LIMIT` | `1`, `2` | s |"
    assert configuration_rows(text) == [
        (["READAR_BATCH_SIZE"], ["5"]), (["READAR_SOFT_TIME_LIMIT", "READAR_HARD_TIME_LIMIT"], ["1", "2"]),
    ]


# `READAR_X` (600 s) / `READAR_X` (default 3) / `READAR_X`, default 4 / READAR_X=8 (an example setting).
_STATED = re.compile(
    r"`(READAR_[A-Z0-9_]+)`\s*(?:\(|,\s*)(?:default\s+)?(\d[\d,]*)(?![\d.])"
    r"|\b(READAR_[A-Z0-9_]+)=(\d+)\b"
)


def stated_numbers(text: str) -> list[tuple[str, int]]:
    """(variable, number) for every figure the text gives for a setting with a numeric default."""
    found = []
    for match in _STATED.finditer(text):
        variable = match.group(1) or match.group(3)
        number = match.group(2) or match.group(4)
        if variable in NUMERIC_DEFAULTS:
            found.append((variable, int(number.replace(",", ""))))
    return found


def test_stated_numbers_parser() -> None:
    text = ("`READAR_SOFT_TIME_LIMIT` (600 s) < `READAR_VISIBILITY_TIMEOUT` (1200 s); `READAR_MAX_ATTEMPTS` "
            "(default 3); `READAR_BATCH_SIZE`, default 4; READAR_LEASE_SECONDS=99; `READAR_METRICS_PORT` (9808")
    assert stated_numbers(text) == [("READAR_SOFT_TIME_LIMIT", 600), ("READAR_VISIBILITY_TIMEOUT", 1200),
                                    ("READAR_MAX_ATTEMPTS", 3), ("READAR_BATCH_SIZE", 4),
                                    ("READAR_LEASE_SECONDS", 99)]


def test_deploy_guide_states_the_code_defaults() -> None:
    stated = stated_numbers(DEPLOY_README)
    wrong = [f"{where}: {variable} is given as {number}, storage/settings.py says {NUMERIC_DEFAULTS[variable]}"
             for where, text in (("deploy/README.md", DEPLOY_README), ("README.md", README))
             for variable, number in stated_numbers(text) if number != NUMERIC_DEFAULTS[variable]]
    assert not wrong, "the docs disagree with storage/settings.py:\n" + "\n".join(wrong)
    missing = DEPLOY_MUST_STATE - {variable for variable, _ in stated}
    assert not missing, f"deploy/README.md no longer states the defaults of {sorted(missing)}"


# --- the docs stand alone --------------------------------------------------------------------------------

OUTSIDE = "../" + "shared/"  # split so that this file does not mention it


def test_no_tracked_file_points_outside_the_repository() -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    offenders = []
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        offenders += [f"{name}:{number}" for number, line in enumerate(text.splitlines(), start=1)
                      if OUTSIDE in line]
    assert not offenders, f"files referring to {OUTSIDE} (outside the repository): {offenders}"


def test_every_option_has_help() -> None:
    """`readar COMMAND --help` describes every option (a new option without help fails here)."""
    import click

    missing = [f"{name} {param.opts[0]}" for name, command in cli.commands.items() for param in command.params
               if isinstance(param, click.Option) and not param.help]
    missing += [f"readar {param.opts[0]}" for param in cli.params if isinstance(param, click.Option) and not param.help]
    assert not missing, f"options without help: {missing}"
