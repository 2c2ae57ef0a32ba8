"""Writers for metric rows: the CSV file and a rich table for the terminal."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from metrics.scopes import CSV_COLUMNS, METRIC_COLUMNS


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_metrics_csv(rows: Iterable[Mapping[str, Any]], path: str | Path,
                      columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Write rows with the DESIGN.md column order (extra keys of a row are ignored); returns the path.

    Floats keep full precision; NaN is written as ``nan``. Parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(column, "")) for column in columns])
    return target


def _percent(value: Any) -> str:
    number = float(value)
    return "–" if math.isnan(number) else f"{100.0 * number:.2f}"


def metrics_table(rows: Iterable[Mapping[str, Any]], *, title: str = "READAR metrics (%)") -> Table:
    """A rich Table of rows: scope, category / defect type, the five metrics in percent, image counts."""
    table = Table(title=title, show_lines=False)
    table.add_column("scope")
    table.add_column("category")
    table.add_column("defect")
    for column in METRIC_COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("images", justify="right")
    table.add_column("anomalous", justify="right")
    table.add_column("skipped", justify="right")
    for row in rows:
        style = "bold" if row["scope"] in ("overall", "mean") else None
        table.add_row(
            str(row["scope"]), str(row["category"]), str(row.get("defect_type", "")),
            *(_percent(row[column]) for column in METRIC_COLUMNS),
            str(row["num_images"]), str(row["num_anom_images"]), str(row.get("num_skipped", 0)),
            style=style,
        )
    return table
