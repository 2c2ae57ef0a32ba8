"""Writers for metric rows: the CSV file and a rich table for the terminal; the text and file helpers every
writer of names uses (names come from folder and file names, which may hold anything)."""

from __future__ import annotations

import csv
import errno
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from metrics.scopes import CSV_COLUMNS, METRIC_COLUMNS

# Characters a terminal acts on instead of showing: C0 and C1 controls (escape sequences clear the screen,
# move the cursor), zero-width and bidirectional marks (they reorder or hide the text around them).
# Lone surrogates too: they stand for undecodable bytes in file names and break a strict UTF-8 terminal.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_INVISIBLE_KEEPING_NEWLINES = re.compile("(?!\n)" + _INVISIBLE.pattern)
# A spreadsheet runs a cell that starts with one of these (OWASP's CSV injection rule); tab and carriage return
# too, as some spreadsheets drop them and look at the next character.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


class OutputError(OSError):
    """A file or folder the user asked for (or a default one) cannot be written; the message says which and
    why."""


def visible(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with the characters a terminal would act on written as escapes (``\\x1b``, ``\\u202e``)."""
    pattern = _INVISIBLE_KEEPING_NEWLINES if keep_newlines else _INVISIBLE
    return pattern.sub(lambda m: _escape_code(m.group()), str(text))


def _escape_code(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object) -> str:
    """``text`` for rich output with markup: brackets escaped, terminal controls made visible."""
    return escape(visible(text))


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell that a spreadsheet shows instead of running: a string starting with ``= + - @``,
    tab or carriage return gets a leading ``'``; numbers (and strings that are just a number, e.g. ``-0.5``)
    are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def _csv_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(csv_cell(value))


def write_output(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` (parent folders created), checking every step: a full disk, a folder or a
    path nothing can be written to raise :class:`OutputError` with a one-line message."""
    target = Path(path)
    make_folder(target.parent)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with target.open("wb") as handle:  # not atomic on purpose: the target may be a device or a pipe
            handle.write(payload)
            handle.flush()
    except OSError as exc:
        raise OutputError(f"cannot write {visible(target)}: {_reason(exc)}; choose another output path") from exc
    return target


def make_folder(path: str | Path) -> Path:
    """Create the folder ``path`` (and its parents); :class:`OutputError` when that is impossible."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the folder {visible(folder)}: {_reason(exc)}; choose another output "
                          "path") from exc
    return folder


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if exc.errno == errno.EISDIR:
        return "it is a folder"
    return exc.strerror or str(exc)


def write_metrics_csv(rows: Iterable[Mapping[str, Any]], path: str | Path,
                      columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Write rows with the DESIGN.md column order (extra keys of a row are ignored); returns the path.

    Floats keep full precision; NaN is written as ``nan``; text cells a spreadsheet would run as a formula get a
    leading ``'`` (:func:`csv_cell`). Parent folders are created; :class:`OutputError` when the file cannot be
    written.
    """
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column, "")) for column in columns])
    return write_output(path, buffer.getvalue())


# The row order of every metrics CSV and table (README "Metrics"): mean, overall, categories, defect types.
SCOPE_ORDER = {"mean": 0, "overall": 1, "category": 2, "defect": 3}
# The legend under every printed metrics table.
METRICS_LEGEND = "mean: average of the category rows; overall: all images pooled; anom.: anomalous images"


def csv_order(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows in the CSV order: ``mean``, ``overall``, the category rows, the defect rows (each by name)."""
    return sorted(rows, key=lambda r: (SCOPE_ORDER.get(str(r["scope"]), 9), str(r.get("category", "")),
                                       str(r.get("defect_type", ""))))


def display_order(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows in the printed order: ``mean``, ``overall``, then each category row followed by its defect rows."""
    rows = csv_order(rows)
    ordered = [r for r in rows if r["scope"] not in ("category", "defect")]
    for category_row in (r for r in rows if r["scope"] == "category"):
        ordered.append(category_row)
        ordered.extend(r for r in rows if r["scope"] == "defect" and r["category"] == category_row["category"])
    listed = {id(r) for r in ordered}
    return ordered + [r for r in rows if id(r) not in listed]  # defect rows of a category without its row


def percent_text(value: Any) -> str:
    """A metric (0-1) as printed: percent with one decimal, ``—`` for NaN."""
    number = float(value)
    return "—" if math.isnan(number) else f"{100.0 * number:.1f}"


def _scope_name(row: Mapping[str, Any]) -> str:
    if row["scope"] == "defect":
        return f"  {shown(row.get('defect_type', ''))}"  # under its category's row
    if row["scope"] == "category":
        return shown(row["category"])
    return shown(row["scope"])  # mean, overall


def metrics_table(rows: Iterable[Mapping[str, Any]], *, title: str = "READAR metrics (%)") -> Table:
    """A rich Table of rows in :func:`display_order`: scope name, the five metrics in percent (one decimal),
    image counts (and skips if any), with :data:`METRICS_LEGEND` under it.

    It fits 80 columns: no outer border, two spaces between columns, numbers that never wrap, and long scope
    names that wrap instead of being cut off."""
    rows = list(rows)
    show_skipped = any(int(row.get("num_skipped", 0)) for row in rows)
    has_defects = any(row["scope"] == "defect" for row in rows)
    table = Table(title=shown(title), title_justify="left", caption=METRICS_LEGEND if rows else None,
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    table.add_column("category / defect" if has_defects else "category", overflow="fold")
    for column in (*METRIC_COLUMNS, "images", "anom."):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
    if show_skipped:
        table.add_column("skip", justify="right", no_wrap=True, min_width=4)
    for row in display_order(rows):
        cells = [_scope_name(row), *(percent_text(row[column]) for column in METRIC_COLUMNS),
                 str(row["num_images"]), str(row["num_anom_images"])]
        if show_skipped:
            cells.append(str(row.get("num_skipped", 0)))
        table.add_row(*cells, style="bold" if row["scope"] in ("overall", "mean") else None,
                      end_section=row["scope"] == "overall")
    return table
