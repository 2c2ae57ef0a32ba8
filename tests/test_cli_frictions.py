"""What a new user runs into: tables in an 80-column terminal, reruns with other execution settings, typos in
names, and hints that name commands which exist."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from scheduler.cli import cli
from scheduler.context import AppContext
from scheduler.sample_data import make_sample_data
from storage.settings import Settings


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _ok(args: list[str]) -> str:
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small categories; read-only for tests (copy it before changing files)."""
    root = tmp_path_factory.mktemp("frictions") / "data"
    make_sample_data(root, categories=("brick", "chelsea"), size=64, per_class=9, train_per_class=2)
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> tuple[Path, str]:
    """(work folder, run name) of a finished run over a copy of ``dataset`` where one image fails."""
    root = tmp_path_factory.mktemp("frictions-run") / "data"
    shutil.copytree(dataset, root)
    broken = root / "chelsea" / "test" / "scratch" / "001.png"
    broken.write_bytes(broken.read_bytes()[:120])  # the header passes the index, decoding fails
    work = root.parent / "work"
    name = "a-run-with-a-fairly-long-name-as-default-names-are"
    _ok(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", name])
    return work, name


def _render(work: Path, args: list[str], width: int = 80) -> str:
    """The text a command prints to a terminal ``width`` columns wide."""
    settings = Settings(work_dir=work, database_url=f"sqlite:///{work / 'readar.sqlite'}",
                        object_store_url=str(work / "objects"), broker_url=None)
    app = AppContext(settings=settings, console=Console(width=width, record=True))
    result = CliRunner().invoke(cli.commands[args[0]], args[1:], obj=app, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return app.console.export_text()


@pytest.mark.parametrize("args", [["runs"], ["status", "{run}"], ["metrics", "{run}"], ["metrics", "{run}", "--defects"],
                                  ["results", "{run}"]])
def test_tables_fit_80_columns_without_cutting_a_cell(finished_run: tuple[Path, str], args: list[str]) -> None:
    work, name = finished_run
    text = _render(work, [a.format(run=name) for a in args])
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    # The console crops what is wider than 80 columns: every header, the last one included, must be there whole.
    headers = {"runs": ("name", "status", "detector", "created", "images", "done", "fail", "skip"),
               "status": ("category", "progress", "queue", "run", "done", "fail", "skip", "metrics"),
               "metrics": ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "images", "anom."),
               "results": ("id", "image", "label", "status", "score", "tries")}[args[0]]
    header = next(line for line in text.splitlines() if headers[-1] in line.split())
    assert all(column in header.split() for column in headers), text
    if args[0] == "metrics":
        assert "brick" in text and "chelsea" in text and "overall" in text
        if "--defects" in args:
            assert all(defect in text for defect in ("blob", "patch", "scratch")), text


def test_the_eval_table_fits_80_columns_with_long_defect_names() -> None:
    from metrics.output import metrics_table

    names = [("mean", "ALL", ""), ("overall", "ALL", ""), ("category", "carpet", ""),
             ("defect", "carpet", "metal_contamination"), ("defect", "transistor", "manipulated_front")]
    rows = [{"scope": scope, "category": category, "defect_type": defect, "iAUROC": 1.0, "pAUROC": 0.99,
             "PRO": 0.9, "PRO_hard": 0.8, "F1_max": 0.5, "num_images": 1000, "num_anom_images": 600,
             "num_skipped": 3} for scope, category, defect in names]
    console = Console(width=80, record=True)
    console.print(metrics_table(rows))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    assert "skip" in text.splitlines()[1].split(), text  # the last column is not cropped away


def test_a_rerun_may_change_the_batch_size_and_the_device(tmp_path: Path, dataset: Path) -> None:
    work = tmp_path / "work"
    base = ["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--max-per-class", "3"]
    _ok([*base, "--run-name", "r", "--batch-size", "1"])
    again = _invoke([*base, "--run-name", "r", "--batch-size", "3", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "0 new image row(s)" in again.output
    # Without --run-name the default name does not depend on execution settings either: the same run again.
    _ok([*base, "--batch-size", "2"])
    _ok([*base, "--batch-size", "4"])
    runs = _ok(["--work-dir", str(work), "runs"])
    assert len(re.findall(r"^baseline-data-", runs, flags=re.MULTILINE)) == 1, runs


@pytest.mark.parametrize(("options", "named"), [
    (["--prompt-mode", "binary"], r"--prompt-mode\b[^;]*'generic'[^;]*'binary'"),
    (["--max-per-class", "2"], r"--max-per-class\b[^;]*\b3\b[^;]*\b2\b"),
    (["--detector", "noop"], r"--detector\b[^;]*'baseline'[^;]*'noop'"),
])
def test_a_rerun_that_changes_a_result_setting_is_refused_naming_it(
    tmp_path: Path, dataset: Path, options: list[str], named: str,
) -> None:
    """The refusal names the setting with the run's value and the requested one."""
    work = tmp_path / "work"
    base = ["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--run-name", "r"]
    _ok([*base, "--max-per-class", "3"])
    rest = [] if "--max-per-class" in options else ["--max-per-class", "3"]
    refused = _invoke([*base, *rest, *options])
    assert refused.exit_code != 0, refused.output
    message = " ".join(refused.output.split())
    assert re.search(named, message), message
    assert "--batch-size" in message and "readar resume r" in message, message


def test_unknown_defect_types_and_categories_are_errors_that_list_the_valid_names(
    tmp_path: Path, dataset: Path, finished_run: tuple[Path, str],
) -> None:
    work = tmp_path / "work"
    typo = _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--exclude-defects", "colour"])
    assert typo.exit_code != 0, typo.output
    message = " ".join(typo.output.split())
    assert "'colour'" in message and "blob, patch, scratch" in message, message

    category = _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--classes", "nosuch"])
    assert category.exit_code != 0 and "nosuch" in category.output and "brick, chelsea" in category.output

    run_work, name = finished_run
    results = _invoke(["--work-dir", str(run_work), "results", name, "--category", "nosuch"])
    assert results.exit_code == 2, results.output
    message = " ".join(results.output.split())
    assert "'nosuch'" in message and "brick, chelsea" in message, message
    assert "baseline-" not in _ok(["--work-dir", str(work), "runs"])  # nothing was planned


def test_hints_about_failed_images_name_commands_that_exist(finished_run: tuple[Path, str]) -> None:
    work, name = finished_run
    text = " ".join(_render(work, ["status", name], width=200).split())
    text += " " + " ".join(_render(work, ["metrics", name], width=200).split())
    assert f"readar retry {name}" in text and f"readar results {name} --status failed" in text, text
    suggested = set(re.findall(r"`readar (?:--\S+ \S+ )*([a-z-]+)", text))
    assert suggested and suggested <= set(cli.commands), suggested
