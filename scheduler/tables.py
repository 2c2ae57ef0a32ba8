"""Metric tables of a run from SQL: the CSV (DESIGN.md section 6 column order) and the printed tables.

Printed tables fit an 80-column terminal: no outer or vertical borders, short headers, numbers that never
wrap, and text cells that wrap (fold) instead of being cut with an ellipsis.

Names (runs, categories, defect types, file paths) and error texts come from folders, files and the database
and may hold anything: every one printed through rich goes through :func:`shown` (markup escaped, terminal
controls made visible), every one printed without markup through :func:`visible`.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from metrics.output import (
    OutputError,
    csv_order,
    metrics_table,
    shown,  # noqa: F401 - re-exported: the command modules print names through it
    visible,
    write_metrics_csv,
)
from metrics.published import oracle_note, published_setting_note
from storage.models import ImageStatus, MetricRow, Run
from storage.repository import Repository

_FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def metric_dicts(repo: Repository, run_id: int) -> list[dict[str, Any]]:
    """The run's metric rows as dicts with the CSV's column names: mean, overall, categories, defects."""
    return csv_order(_as_dict(row) for row in repo.metric_rows(run_id))  # type: ignore[return-value]


def _as_dict(row: MetricRow) -> dict[str, Any]:
    extra = row.extra or {}
    return {
        "scope": row.scope, "category": row.category,
        "iAUROC": _nan(row.iauroc), "pAUROC": _nan(row.pauroc), "PRO": _nan(row.pro),
        "PRO_hard": _nan(row.pro_hard), "F1_max": _nan(row.f1_max),
        "num_images": row.num_images, "num_anom_images": row.num_anom_images,
        "defect_type": row.defect_type, "num_regions": extra.get("num_regions", 0),
        "num_skipped": extra.get("num_skipped", 0), "num_failed": extra.get("num_failed", 0),
        "f1_threshold_logit": _nan(extra.get("f1_threshold_logit")),
    }


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def write_run_csv(repo: Repository, run_id: int, path: Path) -> Path:
    return write_metrics_csv(metric_dicts(repo, run_id), path)


def run_csv_path(work_dir: Path, run_name: str) -> Path:
    """``<work_dir>/results/<run>.csv``, always inside ``<work_dir>/results``.

    A run name that is not a plain file name (runs made before names were checked may hold ``/``, ``..``,
    anything) becomes one: unsafe characters replaced by ``_`` plus a hash of the whole name, so that two such
    names never share a file."""
    from scheduler.planner import valid_run_name

    stem = run_name
    if not valid_run_name(run_name):
        digest = hashlib.sha256(run_name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        stem = f"{_FILE_NAME_UNSAFE.sub('_', run_name).strip('._-')[:80] or 'run'}-{digest}"
    folder = (work_dir / "results").resolve()
    path = (folder / f"{stem}.csv").resolve()
    if path.parent != folder:  # e.g. a symlink planted at that name
        raise OutputError(f"the CSV of run {visible(run_name)} would be written to {visible(path)}, outside "
                          f"{visible(folder)}; remove the link {visible(folder / f'{stem}.csv')}")
    return path


def compact_table(title: str, *, caption: str | None = None) -> Table:
    """An empty table in the compact style every printed table uses (two spaces between columns)."""
    return Table(title=title, title_justify="left", caption=caption, caption_justify="left", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False, collapse_padding=True)


def add_text_column(table: Table, header: str) -> None:
    """A column of names: long ones wrap onto more lines, nothing is cut off."""
    table.add_column(header, overflow="fold")


def add_number_column(table: Table, header: str) -> None:
    """A right-aligned column of numbers that never wraps nor shrinks below its header."""
    table.add_column(header, justify="right", no_wrap=True, min_width=len(header))


def left_out_line(run_name: str, failed: int, skipped: int, skipped_rows: int | None = None) -> str:
    """The line under the metrics naming the images they leave out and the ``results`` filter of each kind.

    Only kinds with images are named: ``--status failed`` lists failed images, ``--status skipped`` skipped ones.
    ``skipped_rows``: how many image rows are ``skipped``; the metrics may count more, images whose mask went
    missing or changed after they were computed (their rows stay done), which no filter lists."""
    later = max(skipped - skipped_rows, 0) if skipped_rows is not None else 0
    listed = [(n, status) for n, status in ((failed, "failed"), (skipped - later, "skipped")) if n]
    counts = " and ".join(f"{n} {status}" for n, status in ((failed, "failed"), (skipped, "skipped")) if n)
    line = f"left out of these metrics: {counts} image(s)"
    if listed:
        commands = " and ".join(f"`readar results {visible(run_name)} --status {status}`" for _, status in listed)
        line += f"; {commands} {'list' if len(listed) > 1 else 'lists'} them and why"
    if later:
        line += (f"; {later} skipped image(s) were done, but their mask was missing or unusable when the metrics "
                 f"were computed: put the masks back and run `readar aggregate {visible(run_name)}`")
    return line


def print_metrics(console: Console, repo: Repository, run: Run, *, include_defects: bool = False) -> None:
    """Print the run's metrics (percent) with its oracle warning where the prompt used defect names.

    One name column: ``mean``, ``overall``, each category, and (``include_defects``) its defect types indented
    under it."""
    rows = [r for r in metric_dicts(repo, run.id) if include_defects or r["scope"] != "defect"]
    console.print(metrics_table(rows, title=f"run {run.name} — metrics (%)"))  # the table escapes the title
    overall = next((r for r in rows if r["scope"] == "overall"), None)
    if overall is not None and (overall["num_failed"] or overall["num_skipped"]):
        skipped_rows = repo.status_totals(run.id).get(ImageStatus.SKIPPED, 0)
        console.print(left_out_line(run.name, overall["num_failed"], overall["num_skipped"], skipped_rows),
                      markup=False, highlight=False)
    note = published_setting_note(run.detector, run.config.get("detector_config") or {})
    if note:
        console.print(f"[cyan]{note}[/]")
    if run.config.get("uses_ground_truth_names"):
        console.print(f"note: {oracle_note(run.config.get('detector_config') or {})}.", style="yellow",
                      markup=False, highlight=False)
