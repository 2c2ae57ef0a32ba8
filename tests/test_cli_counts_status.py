"""Counts and progress as the CLI reports them: num_failed / num_skipped per metric row, `readar status` rate/ETA."""

from __future__ import annotations

import csv
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image as PILImage
from rich.console import Console
from sqlalchemy import update

from scheduler.cli import cli
from scheduler.commands.query import Throughput, measure_throughput, status_command
from scheduler.context import AppContext
from scheduler.sample_data import make_sample_data
from storage.models import Image
from storage.repository import PlannedImage
from storage.settings import Settings


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _counts(path: Path) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(scope, category, defect_type) → (num_failed, num_skipped)."""
    with path.open() as handle:
        return {(r["scope"], r["category"], r["defect_type"]): (int(r["num_failed"]), int(r["num_skipped"]))
                for r in csv.DictReader(handle)}


def _truncate(path: Path) -> None:
    """Keep the PNG header (the index accepts the file) but cut the pixel data (decoding fails)."""
    path.write_bytes(path.read_bytes()[:120])


def test_every_metric_row_counts_the_failed_and_skipped_images_of_its_own_scope(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_sample_data(root, categories=("brick", "chelsea"), size=64, per_class=9, train_per_class=2)
    # brick: two images fail in the worker (corrupt pixel data), one of them a good image.
    _truncate(root / "brick" / "test" / "patch" / "001.png")
    _truncate(root / "brick" / "test" / "good" / "002.png")
    # chelsea: a mask of the wrong size fails its image when the dataset is indexed ...
    wrong_size = root / "chelsea" / "ground_truth" / "patch" / "000_mask.png"
    PILImage.open(wrong_size).resize((32, 32)).save(wrong_size)
    # ... an anomalous image without a mask is skipped when indexed, and one whose mask cannot be decoded is
    # skipped when the metrics are aggregated.
    (root / "chelsea" / "ground_truth" / "scratch" / "001_mask.png").unlink()
    _truncate(root / "chelsea" / "ground_truth" / "blob" / "000_mask.png")

    work = tmp_path / "work"
    _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "counts"])
    counts = _counts(work / "results" / "counts.csv")

    assert counts == {
        ("mean", "ALL", ""): (3, 2),
        ("overall", "ALL", ""): (3, 2),
        ("category", "brick", ""): (2, 0),
        ("category", "chelsea", ""): (1, 2),
        ("defect", "brick", "blob"): (0, 0),
        ("defect", "brick", "patch"): (1, 0),
        ("defect", "brick", "scratch"): (0, 0),
        ("defect", "chelsea", "blob"): (0, 1),
        ("defect", "chelsea", "patch"): (1, 0),
        ("defect", "chelsea", "scratch"): (0, 1),
    }
    printed = _invoke(["--work-dir", str(work), "metrics", "counts"])
    assert "3 failed and 2 skipped" in printed


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_a_run_that_took_15_seconds_is_measured_over_15_seconds_and_has_no_eta() -> None:
    throughput = measure_throughput(now=NOW, finished=36, first_started=NOW - timedelta(seconds=20),
                                    last_finished=NOW - timedelta(seconds=5), remaining=0)
    assert throughput.window_s == pytest.approx(15.0)
    assert throughput.rate == pytest.approx(36 / 15)
    assert throughput.eta_s is None


def test_a_moving_run_is_measured_since_its_first_start_with_an_eta() -> None:
    throughput = measure_throughput(now=NOW, finished=10, first_started=NOW - timedelta(seconds=20),
                                    last_finished=NOW - timedelta(seconds=1), remaining=20)
    assert throughput.window_s == pytest.approx(20.0)
    assert throughput.rate == pytest.approx(0.5)
    assert throughput.eta_s == pytest.approx(40.0)


def test_a_long_run_is_measured_over_the_last_five_minutes() -> None:
    throughput = measure_throughput(now=NOW, finished=600, first_started=NOW - timedelta(seconds=301),
                                    last_finished=NOW, remaining=1200)
    assert throughput.window_s == 300.0 and throughput.rate == pytest.approx(2.0)
    assert throughput.eta_s == pytest.approx(600.0)


def test_a_stalled_run_has_no_rate_and_no_eta() -> None:
    throughput = measure_throughput(now=NOW, finished=0, first_started=None, last_finished=None, remaining=7)
    assert throughput == Throughput(0, 300.0, 7)
    assert throughput.rate == 0.0 and throughput.eta_s is None


def _app(work: Path) -> AppContext:
    settings = Settings(work_dir=work, database_url=f"sqlite:///{work / 'readar.sqlite'}",
                        object_store_url=str(work / "objects"), broker_url=None)
    return AppContext(settings=settings, console=Console(width=200, record=True))


def _status_title(work: Path, *, done: int, queued: int, started_s_ago: float, finished_s_ago: float) -> str:
    """`readar status` over a run of ``done`` images that started/finished that long ago and ``queued`` more."""
    work.mkdir(parents=True, exist_ok=True)
    app = _app(work)
    repo = app.repo
    run = repo.create_run(name="r", detector="baseline", dataset_root=str(work), config={}, code_version="test",
                          model_fingerprint=None, identity_keys=())
    repo.set_run_status(run.id, "running")
    repo.add_images(run.id, [
        PlannedImage(category="bottle", defect="good", label=0, image_path=f"bottle/test/good/{i:03d}.png",
                     mask_path=None, height=8, width=8)
        for i in range(done + queued)
    ])
    now = datetime.now(UTC)
    ids = [row.id for row in repo.images(run.id)][:done]
    with repo.db.engine.begin() as connection:
        connection.execute(update(Image).where(Image.id.in_(ids)).values(
            status="done", started_at=now - timedelta(seconds=started_s_ago),
            finished_at=now - timedelta(seconds=finished_s_ago)))
    result = CliRunner().invoke(status_command, ["r"], obj=app, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = app.console.export_text().splitlines()
    header = next(i for i, line in enumerate(lines) if "category" in line and "progress" in line)
    return " ".join(line.strip(" ┏━┳┓") for line in lines[:header])  # the title wraps at the table's width


def test_status_of_a_finished_run_shows_its_real_rate_and_no_eta(tmp_path: Path) -> None:
    title = _status_title(tmp_path / "work", done=36, queued=0, started_s_ago=20, finished_s_ago=5)
    assert "ETA" not in title, title
    assert "2.40 images/s" in title and "0 left" in title, title


def test_status_of_a_moving_run_shows_an_eta_from_the_elapsed_window(tmp_path: Path) -> None:
    title = _status_title(tmp_path / "work", done=10, queued=20, started_s_ago=20, finished_s_ago=1)
    match = re.search(r"([\d.]+) images/s .*20 left, ETA (\d+) s", title)
    assert match, title
    assert 0.45 <= float(match.group(1)) <= 0.5 and 40 <= int(match.group(2)) <= 45, title


def test_status_of_a_stalled_run_shows_no_eta(tmp_path: Path) -> None:
    title = _status_title(tmp_path / "work", done=5, queued=5, started_s_ago=900, finished_s_ago=600)
    assert "ETA" not in title and "no image finished" in title and "5 left" in title, title
