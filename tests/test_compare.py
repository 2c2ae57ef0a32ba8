"""``readar compare`` on real runs of generated data: the baseline detector against ``noop`` (a constant map that
flags every image at its F1-max threshold, so good images are where the two disagree). The page must carry the
stored numbers with the best marked, the PRO deltas and the disagreeing images, escape every name, refuse what
cannot be compared in one line, and render in headless Chromium (Debian's ``chromium`` package; CI installs
it)."""

from __future__ import annotations

import math
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from metrics.reporting.compare import best_flags
from metrics.results import load_logits
from scheduler.cli import cli
from scheduler.context import AppContext
from scheduler.sample_data import make_sample_data
from storage.settings import Settings

CHROMIUM = "/usr/bin/chromium"
METRIC_FIELDS = {"iAUROC": "iauroc", "pAUROC": "pauroc", "PRO": "pro", "PRO_hard": "pro_hard", "F1_max": "f1_max"}
# Names from folders and from older databases: each would run or break the page if written unescaped.
CATEGORY = "<img src=x onerror=alert(1)>&amp;"
DEFECT = '"><b>scratch'
HOSTILE_RUN = '<script>alert("run")</script>'


@dataclass(frozen=True)
class Work:
    """A work folder with finished runs ``base`` (baseline) and ``noop`` and :data:`HOSTILE_RUN` (noop again) of
    one dataset whose categories are :data:`CATEGORY` (with a defect type :data:`DEFECT`) and ``coffee``;
    ``other`` (noop) of a copy of that dataset elsewhere; ``planned``, a run with no metrics yet."""

    path: Path
    root: Path
    copy: Path

    def app(self) -> AppContext:
        return AppContext(settings=Settings(work_dir=self.path))


def _invoke(work: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--work-dir", str(work), *args], catch_exceptions=False)


def _ok(work: Path, *args: str) -> str:
    result = _invoke(work, *args)
    assert result.exit_code == 0, result.output
    return result.output


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return " ".join(lines[0].split())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    base = tmp_path_factory.mktemp("compare")
    root, copy = base / "data", base / "copy"
    make_sample_data(root, categories=("brick", "coffee"), size=48, per_class=4, train_per_class=2)
    (root / "brick").rename(root / CATEGORY)
    for part in ("test", "ground_truth"):
        (root / CATEGORY / part / "scratch").rename(root / CATEGORY / part / DEFECT)
    shutil.copytree(root, copy)
    folder = base / "work"
    _ok(folder, "run", "--mvtec-root", str(root), "--run-name", "base")
    for name in ("noop", "old"):
        _ok(folder, "run", "--mvtec-root", str(root), "--run-name", name, "--detector", "noop")
    _ok(folder, "run", "--mvtec-root", str(copy), "--run-name", "other", "--detector", "noop")
    with sqlite3.connect(folder / "readar.sqlite") as connection:  # a name from before names were checked
        connection.execute("UPDATE runs SET name = ? WHERE name = 'old'", (HOSTILE_RUN,))
    work = Work(folder, root, copy)
    work.app().repo.create_run(name="planned", detector="noop", dataset_root=str(root), config={},
                               code_version="test", model_fingerprint=None, identity_keys=())
    return work


class _Page(HTMLParser):
    """Table rows of an HTML page: per cell its text and attributes; linked pictures; the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, dict[str, str | None]]]]] = {}
        self.row_attributes: dict[str, list[dict[str, str | None]]] = {}
        self.links: list[str] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._attributes: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img" and attributes.get("src"):
            self.links.append(attributes["src"] or "")
        if tag == "table":
            self._table = attributes.get("id") or f"table-{len(self.tables)}"
            self.tables[self._table], self.row_attributes[self._table] = [], []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
            self.row_attributes[self._table].append(attributes)
        elif tag in ("td", "th"):
            self._cell, self._attributes = [], attributes

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._attributes))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _compare(work: Work, out: Path, *runs: str, top: int = 20) -> tuple[_Page, str]:
    output = _ok(work.path, "compare", *runs, "--out", str(out), "--top", str(top))
    assert f"comparison: {out / 'index.html'}" in " ".join(output.split())
    html = (out / "index.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    page.close()
    return page, html


@pytest.fixture(scope="module")
def compared(work: Work, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, _Page, str]:
    out = tmp_path_factory.mktemp("compared") / "cmp"
    page, html = _compare(work, out, "base", "noop")
    return out, page, html


def _stored(work: Work, run: str) -> list:
    app = work.app()
    return app.repo.metric_rows(app.repo.get_run(run).id)


def _value(rows: list, scope: str, category: str, metric: str, defect: str = "") -> float:
    row = next(r for r in rows if (r.scope, r.category, r.defect_type) == (scope, category, defect))
    value = getattr(row, METRIC_FIELDS[metric])
    return math.nan if value is None else value


def _number(cell: tuple[str, dict[str, str | None]]) -> float:
    return float(cell[1]["data-value"] or "nan")


def test_metrics_side_by_side_with_the_best_marked(work: Work, compared: tuple[Path, _Page, str]) -> None:
    _, page, _ = compared
    rows = page.tables["metrics"]
    assert [name for name, _ in rows[0]] == ["category", "metric", "base", "noop"]
    body = rows[1:]
    stored = {run: _stored(work, run) for run in ("base", "noop")}
    scopes = [("mean", "ALL"), ("overall", "ALL"), ("category", CATEGORY), ("category", "coffee")]
    assert len(body) == 5 * len(scopes)
    attributes = page.row_attributes["metrics"][1:]
    marked = 0
    for index, (scope, category) in enumerate(scopes):
        for offset, metric in enumerate(METRIC_FIELDS):
            row, attrs = body[5 * index + offset], attributes[5 * index + offset]
            assert row[0][0] == (scope if scope != "category" else category)
            assert attrs["data-category"] == category and row[1][0] == metric
            expected = [_value(stored[run], scope, category, metric) for run in ("base", "noop")]
            shown = [_number(cell) for cell in row[2:]]
            for value, want, cell in zip(shown, expected, row[2:], strict=True):
                if math.isnan(want):
                    assert math.isnan(value) and cell[0] == "—"
                else:
                    assert value == pytest.approx(want, abs=1e-12) and cell[0] == f"{100 * want:.2f}"
            best = ["best" in (cell[1].get("class") or "") for cell in row[2:]]
            top = max(v for v in expected if not math.isnan(v))
            assert best == [not math.isnan(v) and v == top for v in expected], (scope, category, metric)
            marked += sum(best)
    # The baseline beats a constant map on the image-level and pixel-level AUROCs of every scope.
    assert marked >= len(scopes) * 2
    assert all("best" in (row[2][1].get("class") or "") for row in body if row[1][0] == "iAUROC")


def test_best_flags_mark_ties_and_never_nan() -> None:
    assert best_flags([0.5, 0.9, 0.9]) == (False, True, True)
    assert best_flags([math.nan, 0.1]) == (False, True)
    assert best_flags([math.nan, math.nan]) == (False, False)


def test_pro_deltas_per_defect_type(work: Work, compared: tuple[Path, _Page, str]) -> None:
    _, page, _ = compared
    rows = page.tables["defect-pro"]
    assert [name for name, _ in rows[0]] == ["category", "defect_type", "PRO base", "PRO noop", "Δ noop"]
    base, noop = _stored(work, "base"), _stored(work, "noop")
    defects = sorted((r.category, r.defect_type) for r in base if r.scope == "defect")
    assert [(r[0][0], r[1][0]) for r in rows[1:]] == defects and (CATEGORY, DEFECT) in defects
    for row in rows[1:]:
        key = (row[0][0], row[1][0])
        first, second = (_value(stored, "defect", key[0], "PRO", key[1]) for stored in (base, noop))
        assert _number(row[2]) == pytest.approx(first, abs=1e-12)
        assert _number(row[3]) == pytest.approx(second, abs=1e-12)
        assert _number(row[4]) == pytest.approx(second - first, abs=1e-12)
        assert row[4][0] == f"{100 * (second - first):+.2f}"
        assert (row[4][1].get("class") == "up") == (second > first)


def _decisions(work: Work, run_name: str) -> dict[str, bool]:
    """Each done image's decision, worked out here: max logit >= the category row's F1-max threshold."""
    app = work.app()
    run = app.repo.get_run(run_name)
    thresholds = {r.category: (r.extra or {})["f1_threshold_logit"] for r in app.repo.metric_rows(run.id)
                  if r.scope == "category"}
    return {row.image_path: bool(np.float32(load_logits(app.store, row).max())
                                 >= np.float32(thresholds[row.category]))
            for row in app.repo.images(run.id, status="done")}


def test_disagreements_list_images_where_one_run_is_right(work: Work, compared: tuple[Path, _Page, str]) -> None:
    out, page, _ = compared
    base, noop = _decisions(work, "base"), _decisions(work, "noop")
    assert all(noop.values())  # a constant map reaches its own threshold everywhere: every image is flagged
    labels = {r.image_path: r.label for r in work.app().repo.images(work.app().repo.get_run("base").id)}
    expected = {path for path in base if base[path] != noop[path]}
    assert expected, "the baseline should clear at least one good image that noop flags"
    rows = page.tables["disagreement-list"][1:]
    assert {row[0][0] for row in rows} == expected
    for row in rows:
        path = row[0][0]
        verdicts = [cell[1]["data-correct"] for cell in row[3:5]]
        assert sorted(verdicts) == ["0", "1"]
        assert verdicts[0] == str(int(base[path] == (labels[path] == 1)))
        assert row[2][0] == ("anomalous" if labels[path] == 1 else "good")
    spreads = [_number(row[5]) for row in rows]
    assert spreads == sorted(spreads, reverse=True)
    text = " ".join(" ".join(page.text).split())
    assert f"{len(expected)} of {len(base)} images finished in every run are decided differently" in text
    # One panel per run and image, next to the page.
    assert len(page.links) == 2 * len(rows)
    for link in page.links:
        assert not link.startswith(("/", "file:", "http")), link
        with Image.open(out / link) as picture:
            assert picture.format == "PNG" and picture.width > 200


def test_top_limits_the_listed_images(work: Work, tmp_path: Path) -> None:
    page, _ = _compare(work, tmp_path / "one", "base", "noop", top=1)
    assert len(page.tables["disagreement-list"]) == 2 and len(page.links) == 2
    page, _ = _compare(work, tmp_path / "none", "noop", "base", top=0)
    assert "disagreement-list" not in page.tables and not page.links
    assert [name for name, _ in page.tables["metrics"][0]][2:] == ["noop", "base"]


def test_hostile_names_are_escaped(work: Work, tmp_path: Path) -> None:
    page, html = _compare(work, tmp_path / "hostile", "base", HOSTILE_RUN)
    for raw in (CATEGORY, DEFECT, HOSTILE_RUN, "<img src=x", "<script", '"><b>'):
        assert raw not in html, raw
    text = "".join(page.text)
    assert HOSTILE_RUN in text and CATEGORY in text and DEFECT in text  # shown literally once parsed
    assert [name for name, _ in page.tables["metrics"][0]][2:] == ["base", HOSTILE_RUN]
    assert any(row[0][0] == CATEGORY for row in page.tables["metrics"][1:])


@pytest.mark.parametrize(("runs", "message"), [
    ((), "compare needs at least two runs"),
    (("base",), "compare needs at least two runs"),
    (("base", "missing"), "no run named 'missing'; `readar runs` lists the runs"),
    (("base", "base"), "run 'base' is named twice"),
    (("base", "planned"), "run 'planned' has no metrics yet; wait for it to finish or run `readar aggregate planned`"),
])
def test_what_cannot_be_compared_is_one_line(work: Work, tmp_path: Path, runs: tuple[str, ...],
                                            message: str) -> None:
    line = _one_line_error(_invoke(work.path, "compare", *runs, "--out", str(tmp_path / "out")))
    assert message in line, line
    assert not (tmp_path / "out" / "index.html").exists()


def test_runs_of_different_datasets_are_refused_naming_both_roots(work: Work, tmp_path: Path) -> None:
    line = _one_line_error(_invoke(work.path, "compare", "base", "other", "--out", str(tmp_path / "out")))
    assert "runs 'base' and 'other' are on different datasets" in line, line
    assert str(work.root) in line and str(work.copy) in line
    assert not (tmp_path / "out").exists()


def test_compare_renders_in_headless_chromium(work: Work, compared: tuple[Path, _Page, str],
                                              tmp_path: Path) -> None:
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.fail("headless Chromium is needed to check the comparison renders: install Debian's chromium "
                    "(`apt-get install -y chromium`); CI installs it")
    binary = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    out, _, _ = compared
    screenshot = tmp_path / "shot.png"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1400,1000",
               (out / "index.html").resolve().as_uri()]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert screenshot.is_file(), completed.stderr[-2000:]
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.shape[:2] == (1000, 1400)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a blank page has one colour
    # The runs table and the side-by-side metrics sit at the top: table headers' dark blue, and the marked
    # best cells' green.
    header_blue = np.all(np.abs(pixels.astype(int) - np.array([0x24, 0x46, 0x6B])) <= 8, axis=2)
    assert header_blue.sum() > 2000
    best_green = np.all(np.abs(pixels.astype(int) - np.array([0xD5, 0xF5, 0xDC])) <= 4, axis=2)
    assert best_green.sum() > 1000
