"""Metric tables of a run from SQL: the CSV (DESIGN.md section 6 column order) and the printed table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from metrics.published import published_setting_note
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


def print_metrics(console: Console, repo: Repository, run: Run, *, include_defects: bool = False) -> None:
    """Print the run's metrics (percent) with its oracle warning where the prompt used defect names."""
    table = Table(title=f"run {run.name} — metrics (%)", title_justify="left")
    for column in ("scope", "category", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "images", "anomalous"):
        table.add_column(column, justify="left" if column in ("scope", "category") else "right")
    for row in metric_dicts(repo, run.id):
        if row["scope"] == "defect" and not include_defects:
            continue
        category = row["category"] + (f"/{row['defect_type']}" if row["defect_type"] else "")
        table.add_row(row["scope"], category, *(_fmt(row[c]) for c in CSV_COLUMNS[2:]))
    console.print(table)
    note = published_setting_note(run.detector, run.config.get("detector_config") or {})
    if note:
        console.print(f"[cyan]{note}[/]")
    if run.config.get("uses_ground_truth_names"):
        console.print(
            "[yellow]note: the 'anomaly' prompt names the ground-truth defect folder (\"good\" for normal images), "
            "so iAUROC here is an oracle setting, not a zero-shot image-level result.[/]"
        )
