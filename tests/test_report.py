"""``readar report`` and ``readar show`` on real runs of generated data: the baseline detector and the tiny
random-weight READ checkpoint. The page must parse, link only files that exist, carry the run's numbers, and
render in headless Chromium (Debian's ``chromium`` package; CI installs it)."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scheduler.cli import cli
from scheduler.commands.report import COMMANDS
from scheduler.context import AppContext
from storage.settings import Settings
from tests.read_fixtures import tiny_checkpoint

CHROMIUM = "/usr/bin/chromium"
METRIC_FIELDS = {"iAUROC": "iauroc", "pAUROC": "pauroc", "PRO": "pro", "PRO_hard": "pro_hard", "F1_max": "f1_max"}


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


class _Page(HTMLParser):
    """Collects linked files, table rows (cells with their data-value) and the text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img" and attributes.get("src"):
            self.links.append(attributes["src"])
        if tag == "a" and attributes.get("href") and not attributes["href"].startswith("#"):
            self.links.append(attributes["href"])
        if tag == "table":
            self._table = attributes.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell, self._value = [], attributes.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._value))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _report(work: Path, run: str, out: Path) -> _Page:
    output = _invoke(["--work-dir", str(work), "report", run, "--out", str(out)])
    assert "index.html" in output
    page = _Page()
    page.feed((out / "index.html").read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.mark.parametrize("run_name", ["base", "read"])
def test_report_page(work: Path, tmp_path: Path, run_name: str) -> None:
    out = tmp_path / "report"
    page = _report(work, run_name, out)
    text = " ".join(page.text)

    # Every referenced file exists next to the page (relative links only) and is a real PNG.
    assert len(page.links) >= 6
    for link in page.links:
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
            shown = float(cells[column][1])
            if expected is None:
                assert math.isnan(shown), (row.scope, column)
            else:
                assert shown == pytest.approx(expected, abs=1e-12), (row.scope, row.category, column)
                assert cells[column][0] == f"{100 * expected:.2f}"
        assert int(cells["num_images"][1]) == row.num_images
        assert int(cells["num_anom_images"][1]) == row.num_anom_images

    # Per defect type: every defect row, sorted by PRO (worst first).
    defect_rows = page.tables["defect-types"][1:]
    assert len(defect_rows) == sum(r.scope == "defect" for r in stored)
    pros = [float(r[2][1]) for r in defect_rows]
    assert pros == sorted(pros)

    # Failure breakdown: every finished anomalous image is counted exactly once.
    anomalous = [r for r in app.repo.images(run.id, status="done") if r.label == 1]
    totals = [int(row[-1][1]) for row in page.tables["failures-by-category"][1:]]
    assert sum(totals) == len(anomalous) > 0
    assert sum(int(row[-1][1]) for row in page.tables["failures-by-defect"][1:]) == len(anomalous)
    classes = [name for name, _ in page.tables["failures-by-category"][0]][1:-1]
    if run_name == "base":
        assert classes == ["no_seg", "miss", "success"]
        assert "only as success or miss" in text
        assert "oracle" not in text
    else:
        assert classes == ["no_seg", "similarity_unstable", "points_wrong", "sam_incomplete", "success"]
        assert "oracle" in text  # the default prompt mode names the ground-truth defect
    assert "model fingerprint" in text and run.model_fingerprint in text and run.code_version in text


def _distinct_colours(path: Path) -> tuple[int, np.ndarray]:
    with Image.open(path) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    return len(np.unique(pixels.reshape(-1, 3), axis=0)), pixels


def test_report_renders_in_headless_chromium(work: Path, tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.fail("headless Chromium is needed to check the report renders: install Debian's chromium "
                    "(`apt-get install -y chromium`); CI installs it")
    binary = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    out = tmp_path / "report"
    _report(work, "read", out)
    screenshot = tmp_path / "shot.png"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1400,1000",
               (out / "index.html").resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), completed.stderr[-2000:]
    colours, pixels = _distinct_colours(screenshot)
    assert pixels.shape[:2] == (1000, 1400)
    assert colours > 50  # text, table shading and header colours; a blank page has one colour
    # The metrics table sits at the top: the table header's dark blue is there, and the top rows vary.
    top = pixels[:400]
    header_blue = np.all(np.abs(top.astype(int) - np.array([0x24, 0x46, 0x6B])) <= 8, axis=2)
    assert header_blue.sum() > 2000
    non_uniform_rows = sum(len(np.unique(row, axis=0)) > 3 for row in top)
    assert non_uniform_rows > 150


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
