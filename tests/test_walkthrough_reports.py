"""What a fresh-user walkthrough found in the report pages and in ``readar eval``: a PixelLM run's prompt settings
on its report and comparison pages, eval's rows in the order (and with the numbers and legend) of ``readar
metrics``, and eval against an ``--mvtec-root`` that is not the predictions' dataset."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from metrics.reporting.summary import uses_prompt
from scheduler.sample_data import make_sample_data
from storage.settings import Settings
from tests.cli_pages import TablePage, invoke, ok, one_line_error

KEY_COLUMNS = ("scope", "category", "defect_type")
NUMBER_COLUMNS = ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "num_images", "num_anom_images")
PROMPT_FIELDS = ("prompt mode", "decoding mode", "conversation")


def _config_cells(page: TablePage, table: str) -> dict[str, list[str]]:
    """A configuration table of a page: first cell → the other cells of its row."""
    return {row[0][0]: [cell[0] for cell in row[1:]] for row in page.tables[table] if row}


# --- 1. a PixelLM run's prompt settings on the report and compare pages -----------------------------------------

@pytest.fixture(scope="module")
def pixellm_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with a finished tiny-PixelLM run ``pix`` and a baseline run ``base`` of one dataset."""
    from workers.pixellm.tiny import make_tiny_pixellm

    folder = tmp_path_factory.mktemp("pixellm-pages")
    root = folder / "data"
    make_sample_data(root, categories=("brick",), size=64, per_class=4, train_per_class=2)
    model_dir, clip_dir = make_tiny_pixellm(folder / "checkpoints")
    work = folder / "work"
    ok(work, "run", "--mvtec-root", str(root), "--max-per-class", "4", "--run-name", "pix", "--detector", "pixellm",
       "--checkpoint", str(model_dir), "--clip", str(clip_dir))
    ok(work, "run", "--mvtec-root", str(root), "--max-per-class", "4", "--run-name", "base")
    return work


def test_the_report_of_a_pixellm_run_shows_its_prompt_settings(pixellm_work: Path, tmp_path: Path) -> None:
    ok(pixellm_work, "report", "pix", "--out", str(tmp_path / "report"))
    config = _config_cells(TablePage.read(tmp_path / "report" / "index.html"), "config")
    assert [config[field][0] for field in PROMPT_FIELDS] == ["generic", "generate", "llava_v1"], config


def test_the_comparison_shows_pixellm_prompt_settings_and_none_for_the_baseline(pixellm_work: Path,
                                                                               tmp_path: Path) -> None:
    ok(pixellm_work, "compare", "pix", "base", "--out", str(tmp_path / "compare"))
    runs = _config_cells(TablePage.read(tmp_path / "compare" / "index.html"), "runs")
    assert [runs[field] for field in PROMPT_FIELDS] == [
        ["generic", "— (no prompt)"], ["generate", "—"], ["llava_v1", "—"]], runs


def test_every_detector_that_reads_a_prompt_mode_is_reported_as_prompted() -> None:
    """A detector whose registered defaults name a prompt mode gets its prompt settings on the pages, any other
    gets none: checked on the configuration `run` stores for each registered detector."""
    from scheduler.commands.common import detector_config
    from workers.detectors.base import DETECTOR_DEFAULTS, available_detectors

    app = SimpleNamespace(settings=Settings())
    names = available_detectors()
    assert {"read", "lisa", "read_as_published", "pixellm", "baseline", "noop"} <= set(names)
    for name in names:
        stored = detector_config(app, {"detector": name, "decode_mode": "generate"}).public()
        run = SimpleNamespace(detector=name, config={"detector_config": stored})
        assert uses_prompt(run) == ("prompt_mode" in DETECTOR_DEFAULTS[name]), name


# --- 2. and 3. `readar eval` of an export ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A finished baseline run ``base`` of a two-category dataset, its metrics CSV and its export."""
    folder = tmp_path_factory.mktemp("eval-export")
    root = folder / "data"
    make_sample_data(root, categories=("brick", "coffee"), size=64, per_class=6, train_per_class=2)
    work = folder / "work"
    ok(work, "run", "--mvtec-root", str(root), "--run-name", "base")
    metrics_csv = folder / "metrics.csv"
    metrics_output = ok(work, "metrics", "base", "--defects", "--out-csv", str(metrics_csv))
    export = folder / "export"
    ok(work, "export", "base", str(export))
    return SimpleNamespace(folder=folder, work=work, root=root, metrics_csv=metrics_csv,
                           metrics_output=metrics_output, export=export)


def _eval(ex: SimpleNamespace, mvtec_root: Path, out_csv: Path, *extra: str):
    return invoke(ex.work, "eval", "--pred-root", str(ex.export), "--mvtec-root", str(mvtec_root),
                  "--out-csv", str(out_csv), "--workers", "1", *extra)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _table_names(output: str) -> list[str]:
    """The first cell of each row of a printed metrics table (mean, overall, categories, indented defects)."""
    names = []
    for line in output.splitlines():
        cells = line.split()
        if len(cells) >= 8 and cells[-1].isdigit() and cells[-2].isdigit():
            names.append(line[: len(line) - len(line.lstrip())] + cells[0])
    return names


def test_eval_rows_come_in_the_order_and_with_the_numbers_of_readar_metrics(exported: SimpleNamespace,
                                                                            tmp_path: Path) -> None:
    result = _eval(exported, exported.root, tmp_path / "ev.csv")
    assert result.exit_code == 0, result.output
    evaluated, stored = _rows(tmp_path / "ev.csv"), _rows(exported.metrics_csv)
    scopes = [row["scope"] for row in evaluated]
    assert scopes[:2] == ["mean", "overall"] and scopes == sorted(
        scopes, key=["mean", "overall", "category", "defect"].index), scopes
    assert [[row[c] for c in KEY_COLUMNS] for row in evaluated] == [[row[c] for c in KEY_COLUMNS] for row in stored]
    for mine, theirs in zip(evaluated, stored, strict=True):
        for column in NUMBER_COLUMNS:
            a, b = float(mine[column]), float(theirs[column])
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-6), (mine, column)

    # The printed table: the rows of `readar metrics --defects`, in its order, one decimal, with its legend.
    assert _table_names(result.output) == _table_names(exported.metrics_output)
    assert _table_names(result.output)[:2] == ["mean", "overall"]
    legend = "mean: average of the category rows; overall: all images pooled"
    assert legend in " ".join(result.output.split()) and legend in " ".join(exported.metrics_output.split())
    mean_line = next(line for line in result.output.splitlines() if line.split()[:1] == ["mean"])
    assert all(len(cell.split(".")[1]) == 1 for cell in mean_line.split()[1:6] if "." in cell), mean_line


def test_eval_against_a_copy_of_the_dataset_warns_and_gives_the_same_numbers(exported: SimpleNamespace,
                                                                             tmp_path: Path) -> None:
    copy = tmp_path / "copy of data"
    shutil.copytree(exported.root, copy)
    result = _eval(exported, copy, tmp_path / "copy.csv")
    assert result.exit_code == 0, result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert str(exported.root.resolve()) in warning and f"--mvtec-root {copy}" in warning, warning
    _eval(exported, exported.root, tmp_path / "same.csv")
    assert _rows(tmp_path / "copy.csv") == _rows(tmp_path / "same.csv")


def test_eval_against_its_own_dataset_does_not_warn(exported: SimpleNamespace, tmp_path: Path) -> None:
    result = _eval(exported, exported.root, tmp_path / "ev.csv")
    assert result.exit_code == 0 and "warning" not in result.output, result.output


@pytest.mark.parametrize("other", ["without_masks", "other_categories"])
def test_eval_against_another_dataset_fails_in_one_line(exported: SimpleNamespace, tmp_path: Path,
                                                        other: str) -> None:
    """The walkthrough's case: the good images "evaluate" against any dataset with their category, the anomalous
    ones find no mask, and the CSV was all NaN with exit 0."""
    wrong = tmp_path / "wrong"
    if other == "without_masks":  # the same categories and file names, no ground truth
        shutil.copytree(exported.root, wrong, ignore=shutil.ignore_patterns("ground_truth"))
    else:
        make_sample_data(wrong, categories=("grass",), size=64, per_class=4, train_per_class=2)
    out_csv = tmp_path / "ev.csv"
    line = one_line_error(_eval(exported, wrong, out_csv))
    assert f"no prediction matches --mvtec-root {wrong}" in line, line
    assert str(exported.root.resolve()) in line and "anomalous image(s) has its mask there" in line, line
    assert not out_csv.exists()
    strict = _eval(exported, wrong, out_csv, "--strict")
    assert strict.exit_code == 1 and not out_csv.exists(), strict.output


def test_predictions_recorded_through_a_link_to_the_dataset_do_not_warn(exported: SimpleNamespace,
                                                                        tmp_path: Path) -> None:
    """Predictions whose metadata.json paths go through a symbolic link to the dataset (as the original tool
    wrote whatever path it was given) are not from "another root", whichever of the two --mvtec-root names."""
    link = tmp_path / "linked data"
    link.symlink_to(exported.root.resolve(), target_is_directory=True)
    predictions = tmp_path / "predictions"
    shutil.copytree(exported.export, predictions)
    for metadata in predictions.glob("*/metadata.json"):
        record = json.loads(metadata.read_text())
        record["image_path"] = record["image_path"].replace(str(exported.root.resolve()), str(link), 1)
        metadata.write_text(json.dumps(record))
    for root in (exported.root, link):
        result = invoke(exported.work, "eval", "--pred-root", str(predictions), "--mvtec-root", str(root),
                        "--out-csv", str(tmp_path / "ev.csv"), "--workers", "1")
        assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_masks_refused_as_links_out_of_the_root_are_named_as_such(exported: SimpleNamespace, tmp_path: Path) -> None:
    """Every mask a link leading out of --mvtec-root: the error says they were refused, not that they are missing."""
    linked = tmp_path / "linked"
    shutil.copytree(exported.root, linked)
    outside = tmp_path / "outside"
    for mask in sorted(linked.glob("*/ground_truth/*/*.png")):
        target = outside / mask.relative_to(linked)
        target.parent.mkdir(parents=True, exist_ok=True)
        mask.rename(target)
        mask.symlink_to(target)
    line = one_line_error(_eval(exported, linked, tmp_path / "ev.csv"))
    assert "is refused" in line and "replace links that lead out of it" in line and "is missing" not in line, line
