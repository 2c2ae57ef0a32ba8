"""Adversarial CLI use: a dataset that moved after its run, an export folder that already holds files, a work
folder or store URL that cannot work, a database URL READAR has no driver for, a run with no metrics yet. Each
ends in one line (or a one-line note) instead of a traceback, NaN metrics or a mixed export."""

from __future__ import annotations

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from scheduler.sample_data import make_sample_data
from tests.cli_pages import invoke, ok, one_line_error


@dataclass(frozen=True)
class Finished:
    """A work folder with a finished run ``moved`` over ``data``, a copy of the sample data; each test that
    moves or deletes that copy makes its own (:func:`_own_run`)."""

    base: Path
    source: Path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    base = tmp_path_factory.mktemp("adversarial")
    source = base / "source"
    make_sample_data(source, categories=("brick",), size=32, per_class=4, train_per_class=2)
    return Finished(base, source)


def _own_run(finished: Finished, tmp_path: Path, name: str = "moved") -> tuple[Path, Path]:
    """(work folder, dataset root) of a fresh finished run over a private copy of the sample data."""
    root, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(finished.source, root)
    ok(work, "run", "--mvtec-root", str(root), "--run-name", name)
    return work, root


def _metric_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("mean", "overall", "brick"))]


# --- 1. aggregate of a run whose dataset root is gone ------------------------------------------------------------


def test_aggregate_refuses_a_run_whose_dataset_root_is_gone(finished: Finished, tmp_path: Path) -> None:
    work, root = _own_run(finished, tmp_path)
    before = _metric_lines(ok(work, "metrics", "moved"))
    assert before and not any("nan" in line.lower() for line in before)
    shutil.rmtree(root)
    error = one_line_error(invoke(work, "aggregate", "moved"))
    assert str(root) in error and "not an existing folder" in error and "restore" in error
    assert _metric_lines(ok(work, "metrics", "moved")) == before


# --- 2. export into a folder that already holds files ------------------------------------------------------------


def test_export_refuses_a_folder_that_already_holds_files(finished: Finished, tmp_path: Path) -> None:
    work, _root = _own_run(finished, tmp_path)
    older = tmp_path / "older-export"
    ok(work, "export", "moved", str(older))
    before = sorted(p.relative_to(older) for p in older.rglob("*"))
    error = one_line_error(invoke(work, "export", "moved", str(older)))
    assert str(older) in error and "not empty" in error and "empty or new folder" in error
    assert sorted(p.relative_to(older) for p in older.rglob("*")) == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep me")
    one_line_error(invoke(work, "export", "moved", str(stray)))
    assert [p.name for p in stray.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "exported 4 image folder(s)" in ok(work, "export", "moved", str(empty))


# --- 3. settings that cannot work: one line, nothing planned -----------------------------------------------------


SETTINGS_THAT_CANNOT_WORK = [
    (["--work-dir", "{file}"], ["{file}", "--work-dir", "not a folder"]),
    (["--work-dir", "{file}/sub"], ["{file}", "--work-dir", "not a folder"]),
    (["--work-dir", "{work}", "--object-store-url", "{file}"], ["{file}", "--object-store-url", "not a folder"]),
    (["--work-dir", "{work}", "--object-store-url", "{file}/objects"], ["{file}", "--object-store-url"]),
    (["--work-dir", "{work}", "--object-store-url", "foo://bar"], ["foo://bar", "unknown protocol",
                                                                   "--object-store-url"]),
    (["--work-dir", "{work}", "--database-url", "mysql://user:secret@127.0.0.1/readar"],
     ["mysql://user:***@127.0.0.1/readar", "MySQLdb", "sqlite", "postgresql+psycopg"]),
]
# A work folder that cannot be created (no such mount): `readar runs` said so already ("no READAR database").
UNCREATABLE_WORK_DIR = (["--work-dir", "/proc/readar-no-such/work"], ["/proc/readar-no-such", "--work-dir"])


@pytest.mark.parametrize(("command", "options", "expected"), [
    *(("run", *case) for case in [*SETTINGS_THAT_CANNOT_WORK, UNCREATABLE_WORK_DIR]),
    *(("runs", *case) for case in SETTINGS_THAT_CANNOT_WORK),
])
def test_settings_that_cannot_work_are_one_line_before_anything_is_planned(
        finished: Finished, tmp_path: Path, command: str, options: list[str], expected: list[str]) -> None:
    from click.testing import CliRunner

    from scheduler.cli import cli

    file, work = tmp_path / "plain-file", tmp_path / "work"
    file.write_text("not a folder")
    fill = {"{file}": str(file), "{work}": str(work)}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    args = [filled(o) for o in options] + (
        ["run", "--mvtec-root", str(finished.source), "--run-name", "never"] if command == "run" else ["runs"])
    error = one_line_error(CliRunner().invoke(cli, args, catch_exceptions=False))
    for part in expected:
        assert filled(part) in error, error
    assert "secret" not in error
    assert not (work / "readar.sqlite").exists()  # nothing planned
    assert file.read_text() == "not a folder"


# --- 4. show after the dataset moved ------------------------------------------------------------------------------


def test_show_after_the_dataset_moved_names_the_missing_file(finished: Finished, tmp_path: Path) -> None:
    work, root = _own_run(finished, tmp_path)
    root.rename(tmp_path / "elsewhere")
    for image, missing in (("brick/test/blob/000.png", "brick/ground_truth/blob/000_mask.png"),
                           ("brick/test/good/000.png", "brick/test/good/000.png")):
        error = one_line_error(invoke(work, "show", "moved", image, "--out", str(tmp_path / "panel.png")))
        assert str(root / missing) in error and "moved" in error, error
    assert not (tmp_path / "panel.png").exists()


# --- 5. metrics of a run with no finished category -----------------------------------------------------------------


def test_metrics_of_a_run_without_metric_rows_is_a_note_and_no_csv(finished: Finished, tmp_path: Path) -> None:
    work, _root = _own_run(finished, tmp_path, name="early")
    (work / "results" / "early.csv").unlink()
    with sqlite3.connect(work / "readar.sqlite") as connection:  # as before its first category finished
        connection.execute("DELETE FROM metric_rows")
    out_csv = tmp_path / "m.csv"
    output = ok(work, "metrics", "early", "--out-csv", str(out_csv))
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "no metrics yet" in lines[0] and "readar status early" in lines[0] and "readar resume early" in lines[0]
    assert "no CSV written" in lines[0]
    assert not out_csv.exists() and not (work / "results" / "early.csv").exists()
