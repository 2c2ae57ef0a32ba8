"""Hostile names and output paths: run names are identifiers, names from folders, files and the database are
printed and drawn literally (no rich markup, no terminal escape sequences, no matplotlib math), CSV cells never
run as spreadsheet formulas, and writes to --out fail with one line instead of a traceback or a false success."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from scheduler.cli import cli
from scheduler.sample_data import make_sample_data
from tests.cli_pages import invoke, ok, one_line_error

CATEGORY = "[bold]$x^$"  # rich markup and matplotlib math (a parse error) in one folder name
FORMULA_DEFECT = "=SUM(1)"  # a defect folder a spreadsheet would run
ESCAPE_FILE = "\x1b[2Jclear.png"  # clears the terminal when printed raw
RUN_NAME_MAX = 100
# Run names from before names were checked, as an older version could have stored them.
PATH_NAME = "../../evil"
MARKUP_NAME = "a[/]b\x1b[2J"
MARKUP_NAME_SHOWN = "a[/]b\\x1b[2J"  # as printed: the escape character written as \x1b


@dataclass(frozen=True)
class Runs:
    """A work folder with four finished runs: ``hostile`` over one category named :data:`CATEGORY` with a
    defect type :data:`FORMULA_DEFECT` and a good image :data:`ESCAPE_FILE`; ``clean`` over a plain dataset; and
    two more of the plain dataset renamed in the database to :data:`PATH_NAME` and :data:`MARKUP_NAME`. The work
    folder's parent holds only ``data``, ``plain`` and ``work``."""

    work: Path

    def image_id(self, run: str, *, label: int) -> int:
        with sqlite3.connect(self.work / "readar.sqlite") as connection:
            (image_id,) = connection.execute(
                "SELECT images.id FROM images JOIN runs ON runs.id = images.run_id WHERE runs.name = ? AND "
                "images.label = ? ORDER BY images.id", (run, label)).fetchone()
        return image_id


def _no_raw_controls(text: str) -> None:
    assert "\x1b" not in text, repr(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("hostile")
    root, plain = base / "data", base / "plain"
    for folder in (root, plain):
        make_sample_data(folder, categories=("brick",), size=48, per_class=4, train_per_class=2)
    (root / "brick").rename(root / CATEGORY)
    for part in ("test", "ground_truth"):
        (root / CATEGORY / part / "scratch").rename(root / CATEGORY / part / FORMULA_DEFECT)
    good = sorted((root / CATEGORY / "test" / "good").iterdir())[0]
    good.rename(good.with_name(ESCAPE_FILE))
    work = base / "work"
    ok(work, "run", "--mvtec-root", str(root), "--run-name", "hostile")
    for name in ("clean", "old-1", "old-2"):
        ok(work, "run", "--mvtec-root", str(plain), "--run-name", name)
    with sqlite3.connect(work / "readar.sqlite") as connection:
        for old, new in (("old-1", PATH_NAME), ("old-2", MARKUP_NAME)):
            connection.execute("UPDATE runs SET name = ? WHERE name = ?", (new, old))
    return Runs(work)


# --- item 3: run names are identifiers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-small") / "data"
    make_sample_data(root, categories=("brick",), size=32, per_class=4, train_per_class=2)
    return root


@pytest.mark.parametrize("name", ["../../etc/evil", "{tmp}/absolute/evil", "a[/]b", "-x", ".hidden",
                                  "x" * (RUN_NAME_MAX + 1), "tab\tname"])
@pytest.mark.parametrize("command", ["run", "submit"])
def test_run_names_outside_the_rule_are_refused(small_dataset: Path, tmp_path: Path, command: str,
                                                name: str) -> None:
    work = tmp_path / "nested" / "work"
    name = name.replace("{tmp}", str(tmp_path))
    result = invoke(work, command, "--mvtec-root", str(small_dataset), "--run-name", name)
    assert result.exit_code == 2, result.output
    assert "run name" in result.output and "letters A-Z a-z, digits, '.', '_' and '-'" in result.output
    assert "at most 100 characters" in result.output
    _no_raw_controls(result.output)
    assert not list(tmp_path.rglob("*.csv"))
    assert not (work / "readar.sqlite").exists()


def test_the_run_name_rule() -> None:
    from scheduler.planner import check_run_name, valid_run_name

    for name in ("mvtec-read-generic", "r", "A.b_c-1", "9" * RUN_NAME_MAX):
        assert check_run_name(name) == name
    for name in ("", ".x", "-x", "_x", "a/b", "a b", "ä", "x" * (RUN_NAME_MAX + 1), "a\n"):
        assert not valid_run_name(name), name


def test_default_names_of_odd_dataset_folders_follow_the_rule(tmp_path: Path) -> None:
    from scheduler.planner import RunRequest, valid_run_name

    request = RunRequest(mvtec_root=tmp_path / ("My Data [v2] $x$ " + "long" * 40), detector="baseline",
                         detector_config={})
    name = request.default_name()
    assert valid_run_name(name), name
    assert name.startswith("baseline-My_Data_v2_x_long")
    # a run that an older version named from the folder as it is goes on under that name
    assert request.unchecked_default_name().startswith("baseline-My Data [v2] $x$ long")


def test_a_run_under_an_older_default_name_goes_on(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "my data"
    shutil.copytree(small_dataset, root)
    work = tmp_path / "work"
    ok(work, "run", "--mvtec-root", str(root))
    with sqlite3.connect(work / "readar.sqlite") as connection:
        (name,) = connection.execute("SELECT name FROM runs").fetchone()
        assert name.startswith("baseline-my_data-"), name
        connection.execute("UPDATE runs SET name = ?", (name.replace("my_data", "my data"),))
    ok(work, "run", "--mvtec-root", str(root))
    with sqlite3.connect(work / "readar.sqlite") as connection:
        assert connection.execute("SELECT name FROM runs").fetchall() == [(name.replace("my_data", "my data"),)]


def test_metrics_of_a_run_with_a_path_for_a_name_writes_inside_the_work_folder(runs: Runs) -> None:
    output = ok(runs.work, "metrics", PATH_NAME)
    assert sorted(p.name for p in runs.work.parent.iterdir()) == ["data", "plain", "work"]
    written = [p.name for p in (runs.work / "results").iterdir()]
    assert any(name.startswith("evil-") and name.endswith(".csv") for name in written), written
    assert f"metrics CSV: {(runs.work / 'results').resolve()}/evil-" in output


# --- item 6: names are not markup ---------------------------------------------------------------------------


def test_runs_and_resume_show_a_name_with_brackets(runs: Runs) -> None:
    listed = ok(runs.work, "runs")
    assert MARKUP_NAME_SHOWN in listed
    _no_raw_controls(listed)
    resumed = ok(runs.work, "resume", MARKUP_NAME)
    assert f"run {MARKUP_NAME_SHOWN} — metrics" in resumed
    _no_raw_controls(resumed)


def test_categories_and_defect_types_with_brackets_are_shown(runs: Runs) -> None:
    output = ok(runs.work, "metrics", "hostile", "--defects")
    assert CATEGORY in output and FORMULA_DEFECT in output and "blob" in output


def test_terminal_escapes_in_file_names_are_shown_not_emitted(runs: Runs, tmp_path: Path) -> None:
    for args in (["results", "hostile"], ["results", "hostile", "--format", "csv"]):
        output = ok(runs.work, *args)
        _no_raw_controls(output)
        assert "\\x1b[2Jclear.png" in output
    # in an error message: the close matches come from the database
    result = invoke(runs.work, "show", "hostile", f"{CATEGORY}/test/good/[2Jclear.png", "--out",
                     str(tmp_path / "p.png"))
    line = one_line_error(result)
    assert "Did you mean" in line and "\\x1b[2Jclear.png" in line
    _no_raw_controls(result.output)


def test_log_lines_show_terminal_escapes() -> None:
    from scheduler.context import VisibleFormatter

    record = logging.LogRecord("readar", logging.WARNING, __file__, 1, "image failed: %s", (ESCAPE_FILE,), None)
    text = VisibleFormatter("%(levelname)s %(message)s").format(record)
    assert text == "WARNING image failed: \\x1b[2Jclear.png"


def test_show_and_report_draw_dollar_names_literally(runs: Runs, tmp_path: Path) -> None:
    panel = tmp_path / "panel.png"
    output = ok(runs.work, "show", "hostile", str(runs.image_id("hostile", label=1)), "--out", str(panel))
    assert panel.read_bytes().startswith(b"\x89PNG") and f"panel: {panel}" in output
    ok(runs.work, "report", "hostile", "--out", str(tmp_path / "report"))
    assert (tmp_path / "report" / "index.html").is_file() and any((tmp_path / "report" / "plots").iterdir())


def test_out_paths_with_brackets_are_printed(runs: Runs, tmp_path: Path) -> None:
    panel = tmp_path / "p[/]x.png"
    output = ok(runs.work, "show", "clean", str(runs.image_id("clean", label=1)), "--out", str(panel))
    assert f"panel: {panel}" in output and panel.is_file()
    folder = tmp_path / "r[/]x"
    output = ok(runs.work, "report", "clean", "--out", str(folder), "--best", "1", "--worst", "0",
                 "--examples", "0")
    assert f"report: {folder / 'index.html'}" in output


# --- item 10: --out, ids and CSV cells ----------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["99999999999999999999999", "²"])
def test_show_with_an_id_beyond_any_image_is_one_line(runs: Runs, tmp_path: Path, reference: str) -> None:
    line = one_line_error(invoke(runs.work, "show", "clean", reference, "--out", str(tmp_path / "p.png")))
    assert "has no image" in line and "readar results clean" in line
    assert not (tmp_path / "p.png").exists()


def test_report_into_an_unusable_folder_is_one_line(runs: Runs, tmp_path: Path) -> None:
    line = one_line_error(invoke(runs.work, "report", "clean", "--out", "/proc/self"))
    assert line == ("Error: cannot create the folder /proc/self/plots: No such file or directory; choose another "
                    "output path")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = one_line_error(invoke(runs.work, "show", "clean", str(runs.image_id("clean", label=1)), "--out",
                                   str(blocker / "p.png")))
    assert line.startswith(f"Error: cannot create the folder {blocker}: ")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_writes_to_a_full_disk_fail(runs: Runs) -> None:
    line = one_line_error(invoke(runs.work, "show", "clean", str(runs.image_id("clean", label=1)), "--out",
                                   "/dev/full"))
    assert line == "Error: cannot write /dev/full: no space left on the device; choose another output path"
    line = one_line_error(invoke(runs.work, "metrics", "clean", "--out-csv", "/dev/full"))
    assert line == "Error: cannot write /dev/full: no space left on the device; choose another output path"


def test_csv_cells_that_a_spreadsheet_would_run_get_a_quote(tmp_path: Path) -> None:
    from metrics.output import csv_cell, write_metrics_csv

    cells = {"=1+1": "'=1+1", "+cmd": "'+cmd", "-2+3": "'-2+3", "@SUM(A1)": "'@SUM(A1)", "\tx": "'\tx",
             "\rx": "'\rx", "-0.5": "-0.5", "+3": "+3", "-1e-3": "-1e-3", "plain": "plain", "a=b": "a=b"}
    assert {text: csv_cell(text) for text in cells} == cells
    assert csv_cell(-0.25) == -0.25 and csv_cell(-3) == -3
    rows = [{"scope": "category", "category": text, "iAUROC": -0.5, "num_images": -1} for text in cells]
    path = write_metrics_csv(rows, tmp_path / "m.csv", columns=("scope", "category", "iAUROC", "num_images"))
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [row["category"] for row in read] == list(cells.values())
    assert {row["iAUROC"] for row in read} == {"-0.5"} and {row["num_images"] for row in read} == {"-1"}


def test_csv_of_runs_neutralise_formula_cells(runs: Runs) -> None:
    rows = list(csv.DictReader(io.StringIO(ok(runs.work, "results", "hostile", "--format", "csv"))))
    assert f"'{FORMULA_DEFECT}" in {row["defect"] for row in rows}
    assert all(not row["image_path"].startswith(("=", "+", "-", "@")) for row in rows)
    ok(runs.work, "metrics", "hostile", "--out-csv", str(runs.work / "m.csv"))
    with (runs.work / "m.csv").open(newline="") as handle:
        defects = {row["defect_type"] for row in csv.DictReader(handle)}
    assert f"'{FORMULA_DEFECT}" in defects and FORMULA_DEFECT not in defects


def test_export_leaves_out_broken_objects_and_refuses_an_unwritable_folder(small_dataset: Path,
                                                                           tmp_path: Path) -> None:
    """One image's missing or damaged logit object costs that image, not the export; a target that cannot be a
    folder is one line."""
    work = tmp_path / "work"
    ok(work, "run", "--mvtec-root", str(small_dataset), "--run-name", "exported")
    objects = sorted((work / "objects").rglob("images/*.npz"))
    objects[0].unlink()
    objects[1].write_bytes(b"not a zip at all")
    result = CliRunner().invoke(cli, ["--work-dir", str(work), "export", "exported", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"exported {len(objects) - 2} image folder(s)" in result.output
    assert "2 image(s) left out" in result.output and "readar aggregate exported" in result.output
    assert len(list((tmp_path / "out").glob("*/pred_logits_0.npy"))) == len(objects) - 2
    (tmp_path / "file").write_text("x")
    error = one_line_error(invoke(work, "export", "exported", str(tmp_path / "file" / "sub")))
    assert "cannot create the folder" in error
