"""``readar report`` and ``readar show`` on real runs of generated data: the baseline detector and the tiny
random-weight READ checkpoint. The page must parse, link only files that exist, carry the run's numbers, and
render in headless Chromium (Debian's ``chromium`` package; CI installs it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scheduler.cli import cli
from scheduler.commands.report import COMMANDS
from scheduler.context import AppContext
from storage.settings import Settings
from tests.cli_pages import HEADER_BLUE, METRIC_FIELDS, TablePage, chromium_screenshot, data_value, near
from tests.read_fixtures import tiny_checkpoint


@pytest.fixture(scope="module")
def command_line() -> Iterator[None]:
    """The report commands registered on the CLI group (scheduler/cli.py registers them for users)."""
    added = [c for c in COMMANDS if c.name not in cli.commands]
    for command in added:
        cli.add_command(command)
    yield
    for command in added:
        cli.commands.pop(command.name, None)


def _invoke(args: list[str], *, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
    return result.output


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, command_line: None) -> Path:
    """A work folder holding two finished runs of the same small dataset: ``base`` and ``read``."""
    from scheduler.sample_data import make_sample_data

    folder = tmp_path_factory.mktemp("report")
    root = folder / "data"
    make_sample_data(root, categories=("brick", "coffee"), size=96, per_class=7, train_per_class=4)
    work = folder / "work"
    _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "base",
             "--max-per-class", "7"])
    read_dir, clip_dir = tiny_checkpoint()
    _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "read", "--detector", "read",
             "--checkpoint", str(read_dir), "--clip", str(clip_dir), "--max-per-class", "7",
             "--prompt-mode", "anomaly"])
    return work


def _report(work: Path, run: str, out: Path) -> TablePage:
    output = _invoke(["--work-dir", str(work), "report", run, "--out", str(out)])
    assert "index.html" in output
    return TablePage.read(out / "index.html")


@pytest.mark.parametrize("run_name", ["base", "read"])
def test_report_page(work: Path, tmp_path: Path, run_name: str) -> None:
    out = tmp_path / "report"
    page = _report(work, run_name, out)
    text = " ".join(page.text)

    # Every referenced file exists next to the page (relative links only) and is a real PNG.
    links = page.images + page.anchors
    assert len(links) >= 6
    for link in links:
        assert not link.startswith(("/", "file:", "http")), link
        target = out / link
        assert target.is_file(), link
        with Image.open(target) as picture:
            assert picture.format == "PNG" and picture.width > 200

    # The metrics table holds the run's stored numbers, mean and overall first.
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run(run_name)
    stored = app.repo.metric_rows(run.id)
    rows = page.tables["metrics"]
    header = [name for name, _ in rows[0]]
    assert header[:9] == ["scope", "category", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "num_images",
                          "num_anom_images"]
    body = [dict(zip(header, row, strict=True)) for row in rows[1:]]
    assert [r["scope"][0] for r in body[:2]] == ["mean", "overall"]
    assert len(body) == len(stored)
    by_key = {(r["scope"][0], r["category"][0], r["defect_type"][0]): r for r in body}
    for row in stored:
        cells = by_key[(row.scope, row.category, row.defect_type)]
        for column, attribute in METRIC_FIELDS.items():
            expected = getattr(row, attribute)
            shown = float(data_value(cells[column]))
            if expected is None:
                assert math.isnan(shown), (row.scope, column)
            else:
                assert shown == pytest.approx(expected, abs=1e-12), (row.scope, row.category, column)
                assert cells[column][0] == f"{100 * expected:.2f}"
        assert int(data_value(cells["num_images"])) == row.num_images
        assert int(data_value(cells["num_anom_images"])) == row.num_anom_images

    # Per defect type: every defect row, sorted by PRO (worst first).
    defect_rows = page.tables["defect-types"][1:]
    assert len(defect_rows) == sum(r.scope == "defect" for r in stored)
    pros = [float(data_value(r[2])) for r in defect_rows]
    assert pros == sorted(pros)

    # Failure breakdown: every finished anomalous image is counted exactly once.
    anomalous = [r for r in app.repo.images(run.id, status="done") if r.label == 1]
    totals = [int(data_value(row[-1])) for row in page.tables["failures-by-category"][1:]]
    assert sum(totals) == len(anomalous) > 0
    assert sum(int(data_value(row[-1])) for row in page.tables["failures-by-defect"][1:]) == len(anomalous)
    classes = [name for name, _ in page.tables["failures-by-category"][0]][1:-1]
    if run_name == "base":
        assert classes == ["no_seg", "miss", "success"]
        assert "only as success or miss" in text
        assert "oracle" not in text
    else:
        assert classes == ["no_seg", "similarity_unstable", "points_wrong", "sam_incomplete", "success"]
        assert "oracle" in text  # the default prompt mode names the ground-truth defect
    assert "model fingerprint" in text and run.model_fingerprint in text and run.code_version in text


def test_report_renders_in_headless_chromium(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    _report(work, "read", out)
    pixels = chromium_screenshot(out / "index.html", tmp_path)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, shading, headers; a blank page has one
    # The metrics table sits at the top: the table header's dark blue is there, and the top rows vary.
    top = pixels[:400]
    assert near(top, HEADER_BLUE, 8).sum() > 2000
    non_uniform_rows = sum(len(np.unique(row, axis=0)) > 3 for row in top)
    assert non_uniform_rows > 150


def _distinct_colours(path: Path) -> tuple[int, np.ndarray]:
    with Image.open(path) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)), pixels


def test_show_draws_one_image_by_path_and_by_id(work: Path, tmp_path: Path) -> None:
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("read")
    row = next(r for r in app.repo.images(run.id, status="done") if r.label == 1)
    by_path = tmp_path / "by-path.png"
    by_id = tmp_path / "by-id.png"
    _invoke(["--work-dir", str(work), "show", "read", row.image_path, "--out", str(by_path)])
    _invoke(["--work-dir", str(work), "show", "read", str(row.id), "--out", str(by_id)])
    colours, pixels = _distinct_colours(by_path)
    assert colours > 100 and pixels.shape[1] > 600
    assert by_path.read_bytes() == by_id.read_bytes()
    # The baseline run's panel: no similarity map and no points, so only image and score map (two views of four).
    _invoke(["--work-dir", str(work), "show", "base", row.image_path, "--out", str(tmp_path / "base.png")])
    _, base_pixels = _distinct_colours(tmp_path / "base.png")
    assert base_pixels.shape[1] < 0.6 * pixels.shape[1]


def test_show_and_report_explain_unknown_runs_and_images(work: Path, tmp_path: Path) -> None:
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("read")
    row = next(r for r in app.repo.images(run.id, status="done") if r.label == 1)
    typo = row.image_path.replace("test", "tset")
    output = _invoke(["--work-dir", str(work), "show", "read", typo, "--out", str(tmp_path / "x.png")], ok=False)
    assert f"no image {typo!r}" in output and "readar results read" in output
    output = _invoke(["--work-dir", str(work), "show", "read", "999999", "--out", str(tmp_path / "x.png")],
                     ok=False)
    assert "no image with id 999999" in output
    base_row = app.repo.images(app.repo.get_run("base").id)[0]
    output = _invoke(["--work-dir", str(work), "show", "read", str(base_row.id), "--out", str(tmp_path / "x.png")],
                     ok=False)
    assert "has no image with id" in output  # an id of another run's image
    output = _invoke(["--work-dir", str(work), "report", "missing", "--out", str(tmp_path / "r")], ok=False)
    assert "no run named 'missing'" in output and "readar runs" in output
    assert not (tmp_path / "x.png").exists()
