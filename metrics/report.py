"""Writers for metric rows: the CSV file and a rich table for the terminal."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
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


def _scope_name(row: Mapping[str, Any]) -> str:
    if row["scope"] in ("overall", "mean"):
        return str(row["scope"])
    if row["scope"] == "defect":
        return f"  {row.get('defect_type', '')}"  # under its category's row
    return str(row["category"])


def metrics_table(rows: Iterable[Mapping[str, Any]], *, title: str = "READAR metrics (%)") -> Table:
    """A rich Table of rows: scope name, the five metrics in percent, image counts (and skips if any).

    It fits 80 columns: no outer border, two spaces between columns, numbers that never wrap, and long scope
    names that wrap instead of being cut off."""
    rows = list(rows)
    show_skipped = any(int(row.get("num_skipped", 0)) for row in rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("scope", overflow="fold")
    for column in METRIC_COLUMNS:
        table.add_column(column, justify="right", no_wrap=True, min_width=max(len(column), 6))
    table.add_column("images", justify="right", no_wrap=True, min_width=6)
    table.add_column("anom.", justify="right", no_wrap=True, min_width=5)
    if show_skipped:
        table.add_column("skip", justify="right", no_wrap=True, min_width=4)
    for row in rows:
        cells = [_scope_name(row), *(_percent(row[column]) for column in METRIC_COLUMNS),
                 str(row["num_images"]), str(row["num_anom_images"])]
        if show_skipped:
            cells.append(str(row.get("num_skipped", 0)))
        table.add_row(*cells, style="bold" if row["scope"] in ("overall", "mean") else None,
                      end_section=row["scope"] == "overall")
    return table
