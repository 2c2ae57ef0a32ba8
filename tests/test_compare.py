"""``readar compare`` on real runs of generated data: the baseline detector against ``noop`` (a constant map that
flags every image at its F1-max threshold, so good images are where the two disagree). The page must carry the
stored numbers with the best marked, the PRO deltas and the disagreeing images, escape every name, refuse what
cannot be compared in one line, and render in headless Chromium (Debian's ``chromium`` package; CI installs
it)."""

from __future__ import annotations

import math
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.reporting.compare import best_flags
from metrics.results import load_logits
from scheduler.context import AppContext
from scheduler.sample_data import make_sample_data
from storage.settings import Settings
from tests.cli_pages import (
    HEADER_BLUE,
    METRIC_FIELDS,
    Cell,
    TablePage,
    chromium_screenshot,
    data_value,
    invoke,
    near,
    ok,
    one_line_error,
)

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
    ok(folder, "run", "--mvtec-root", str(root), "--run-name", "base")
    for name in ("noop", "old"):
        ok(folder, "run", "--mvtec-root", str(root), "--run-name", name, "--detector", "noop")
    ok(folder, "run", "--mvtec-root", str(copy), "--run-name", "other", "--detector", "noop")
    with sqlite3.connect(folder / "readar.sqlite") as connection:  # a name from before names were checked
        connection.execute("UPDATE runs SET name = ? WHERE name = 'old'", (HOSTILE_RUN,))
    work = Work(folder, root, copy)
    work.app().repo.create_run(name="planned", detector="noop", dataset_root=str(root), config={},
                               code_version="test", model_fingerprint=None, identity_keys=())
    return work


def _compare(work: Work, out: Path, *runs: str, top: int = 20) -> tuple[TablePage, str]:
    output = ok(work.path, "compare", *runs, "--out", str(out), "--top", str(top))
    assert f"comparison: {out / 'index.html'}" in " ".join(output.split())
    return TablePage.read(out / "index.html"), (out / "index.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compared(work: Work, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TablePage, str]:
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


def _number(cell: Cell) -> float:
    return float(data_value(cell) or "nan")


def test_metrics_side_by_side_with_the_best_marked(work: Work, compared: tuple[Path, TablePage, str]) -> None:
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


def test_pro_deltas_per_defect_type(work: Work, compared: tuple[Path, TablePage, str]) -> None:
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


def test_disagreements_list_images_where_one_run_is_right(work: Work, compared: tuple[Path, TablePage, str]) -> None:
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
    assert len(page.images) == 2 * len(rows)
    for link in page.images:
        assert not link.startswith(("/", "file:", "http")), link
        with Image.open(out / link) as picture:
            assert picture.format == "PNG" and picture.width > 200


def test_top_limits_the_listed_images(work: Work, tmp_path: Path) -> None:
    page, _ = _compare(work, tmp_path / "one", "base", "noop", top=1)
    assert len(page.tables["disagreement-list"]) == 2 and len(page.images) == 2
    page, _ = _compare(work, tmp_path / "none", "noop", "base", top=0)
    assert "disagreement-list" not in page.tables and not page.images
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
    line = " ".join(one_line_error(invoke(work.path, "compare", *runs, "--out", str(tmp_path / "out"))).split())
    assert message in line, line
    assert not (tmp_path / "out" / "index.html").exists()


def test_runs_of_different_datasets_are_refused_naming_both_roots(work: Work, tmp_path: Path) -> None:
    line = " ".join(one_line_error(invoke(work.path, "compare", "base", "other", "--out", str(tmp_path / "out"))).split())
    assert "runs 'base' and 'other' are on different datasets" in line, line
    assert str(work.root) in line and str(work.copy) in line
    assert not (tmp_path / "out").exists()


def test_compare_renders_in_headless_chromium(work: Work, compared: tuple[Path, TablePage, str],
                                              tmp_path: Path) -> None:
    out, _, _ = compared
    pixels = chromium_screenshot(out / "index.html", tmp_path)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a blank page has one colour
    # The runs table and the side-by-side metrics sit at the top: table headers' dark blue, and the marked
    # best cells' green.
    assert near(pixels, HEADER_BLUE, 8).sum() > 2000
    assert near(pixels, (0xD5, 0xF5, 0xDC), 4).sum() > 1000
