"""Metric tables of a run from SQL: the CSV (DESIGN.md section 6 column order) and the printed tables.

Printed tables fit an 80-column terminal: no outer or vertical borders, short headers, numbers that never
wrap, and text cells that wrap (fold) instead of being cut with an ellipsis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from metrics.published import oracle_note, published_setting_note
from metrics.report import write_metrics_csv
from storage.models import MetricRow, Run
from storage.repository import Repository

CSV_COLUMNS = ("scope", "category", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "num_images",
               "num_anom_images")
EXTRA_COLUMNS = ("defect_type", "num_skipped", "num_failed")
_SCOPE_ORDER = {"mean": 0, "overall": 1, "category": 2, "defect": 3}


def metric_dicts(repo: Repository, run_id: int) -> list[dict[str, Any]]:
    """The run's metric rows as dicts with the CSV's column names: mean, overall, categories, defects."""
    rows = [_as_dict(row) for row in repo.metric_rows(run_id)]
    return sorted(rows, key=lambda r: (_SCOPE_ORDER.get(r["scope"], 9), r["category"], r["defect_type"]))


def _as_dict(row: MetricRow) -> dict[str, Any]:
    extra = row.extra or {}
    return {
        "scope": row.scope, "category": row.category,
        "iAUROC": _nan(row.iauroc), "pAUROC": _nan(row.pauroc), "PRO": _nan(row.pro),
        "PRO_hard": _nan(row.pro_hard), "F1_max": _nan(row.f1_max),
        "num_images": row.num_images, "num_anom_images": row.num_anom_images,
        "defect_type": row.defect_type, "num_skipped": extra.get("num_skipped", 0),
        "num_failed": extra.get("num_failed", 0),
    }


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def write_run_csv(repo: Repository, run_id: int, path: Path) -> Path:
    return write_metrics_csv(metric_dicts(repo, run_id), path, columns=(*CSV_COLUMNS, *EXTRA_COLUMNS))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{100 * value:.1f}"
    return str(value)


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


def _display_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """mean, overall, then each category row followed by its defect rows."""
    summary = [r for r in rows if r["scope"] not in ("category", "defect")]
    ordered = [*summary]
    for category_row in (r for r in rows if r["scope"] == "category"):
        ordered.append(category_row)
        ordered.extend(r for r in rows if r["scope"] == "defect" and r["category"] == category_row["category"])
    listed = {id(r) for r in ordered}
    return ordered + [r for r in rows if id(r) not in listed]  # defect rows of a category without its row


def _row_name(row: dict[str, Any]) -> str:
    if row["scope"] == "defect":
        return f"  {row['defect_type']}"  # under its category's row
    if row["scope"] == "category":
        return str(row["category"])
    return str(row["scope"])  # mean, overall


def print_metrics(console: Console, repo: Repository, run: Run, *, include_defects: bool = False) -> None:
    """Print the run's metrics (percent) with its oracle warning where the prompt used defect names.

    One name column: ``mean``, ``overall``, each category, and (``include_defects``) its defect types indented
    under it."""
    rows = [r for r in metric_dicts(repo, run.id) if include_defects or r["scope"] != "defect"]
    table = compact_table(f"run {run.name} — metrics (%)",
                          caption="mean: average of the category rows; overall: all images pooled; "
                                  "anom.: anomalous images" if rows else None)
    add_text_column(table, "category" if not include_defects else "category / defect")
    for header in (*CSV_COLUMNS[2:7], "images", "anom."):
        add_number_column(table, header)
    for row in _display_order(rows):
        table.add_row(_row_name(row), *(_fmt(row[c]) for c in CSV_COLUMNS[2:]),
                      style="bold" if row["scope"] in ("mean", "overall") else None,
                      end_section=row["scope"] == "overall")
    console.print(table)
    overall = next((r for r in rows if r["scope"] == "overall"), None)
    if overall is not None and (overall["num_failed"] or overall["num_skipped"]):
        console.print(
            f"left out of these metrics: {overall['num_failed']} failed and {overall['num_skipped']} skipped "
            f"image(s); `readar results {run.name} --status failed` lists the failed ones and why",
            markup=False, highlight=False,
        )
    note = published_setting_note(run.detector, run.config.get("detector_config") or {})
    if note:
        console.print(f"[cyan]{note}[/]")
    if run.config.get("uses_ground_truth_names"):
        console.print(f"note: {oracle_note(run.config.get('detector_config') or {})}.", style="yellow",
                      markup=False, highlight=False)
