"""Queries over stored runs: ``runs``, ``status``, ``results`` and ``export``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from scheduler.context import AppContext
from storage.logits import decode_logits, full_resolution_logits
from storage.models import IMAGE_STATUSES
from storage.paths import resolve_inside
from storage.repository import RunNotFoundError

RESULT_COLUMNS = ("id", "category", "defect", "label", "status", "image_score", "attempts", "image_path",
                  "object_key", "error")


def _run(app: AppContext, name: str) -> Any:
    try:
        return app.repo.get_run(name)
    except RunNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("runs")
@click.pass_obj
def runs_command(app: AppContext) -> None:
    """List the runs in the database."""
    table = Table(title="runs", title_justify="left")
    for column in ("name", "status", "detector", "created", "images", "done", "failed", "skipped"):
        table.add_column(column)
    for run in app.repo.list_runs():
        totals: dict[str, int] = {}
        for per_status in app.repo.status_counts(run.id).values():
            for status, n in per_status.items():
                totals[status] = totals.get(status, 0) + n
        table.add_row(run.name, run.status, run.detector, f"{run.created_at:%Y-%m-%d %H:%M}",
                      str(sum(totals.values())), str(totals.get("done", 0)), str(totals.get("failed", 0)),
                      str(totals.get("skipped", 0)))
    app.console.print(table)


@click.command("status")
@click.argument("run_name")
@click.pass_obj
def status_command(app: AppContext, run_name: str) -> None:
    """Per-category progress of a run, with failures."""
    run = _run(app, run_name)
    table = Table(title=f"run {run.name} ({run.status})", title_justify="left")
    for column in ("category", *IMAGE_STATUSES, "aggregated"):
        table.add_column(column, justify="left" if column == "category" else "right")
    categories = {c.category: c for c in app.repo.categories(run.id)}
    for category, counts in sorted(app.repo.status_counts(run.id).items()):
        record = categories.get(category)
        aggregated = f"v{record.version} {record.status}" if record else "—"
        table.add_row(category, *(str(counts.get(s, 0)) for s in IMAGE_STATUSES), aggregated)
    app.console.print(table)
    for row in app.repo.images(run.id, status="failed")[:20]:
        app.console.print(f"[red]failed[/] {row.image_path}: {row.error}")


@click.command("results")
@click.argument("run_name")
@click.option("--category", help="Only this category.")
@click.option("--status", type=click.Choice(IMAGE_STATUSES), help="Only rows in this status.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@click.pass_obj
def results_command(app: AppContext, run_name: str, category: str | None, status: str | None,
                    output_format: str) -> None:
    """Per-image rows of a run."""
    run = _run(app, run_name)
    rows = [
        {column: getattr(row, column) for column in RESULT_COLUMNS}
        for row in app.repo.images(run.id, category=category, status=status)
    ]
    if output_format == "json":
        click.echo(json.dumps(rows, indent=1))
    elif output_format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = Table(title=f"run {run.name}: {len(rows)} image(s)", title_justify="left")
        for column in RESULT_COLUMNS[:-2]:
            table.add_column(column)
        table.add_column("error")
        for row in rows:
            score = "" if row["image_score"] is None else f"{row['image_score']:.4f}"
            table.add_row(str(row["id"]), row["category"], row["defect"], str(row["label"]), row["status"], score,
                          str(row["attempts"]), row["image_path"], row["error"] or "")
        app.console.print(table)


@click.command("export")
@click.argument("run_name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--layout", type=click.Choice(["readar"]), default="readar", show_default=True,
              help="readar: the original per-image folders (metadata.json + pred_logits_0.npy).")
@click.pass_obj
def export_command(app: AppContext, run_name: str, directory: Path, layout: str) -> None:
    """Write finished images' full-resolution float32 logits in the original READAR folder layout."""
    run = _run(app, run_name)
    root = Path(run.dataset_root)
    rows = app.repo.images(run.id, status="done")
    directory.mkdir(parents=True, exist_ok=True)
    for row in rows:
        stored = decode_logits(app.store.get(row.object_key), source=row.object_key)
        folder = directory / f"{row.id:06d}"
        folder.mkdir(exist_ok=True)
        metadata = {
            "image_path": str(resolve_inside(root, row.image_path)), "category": row.category,
            "anomaly_type": row.defect, "label": row.label, "image_score": row.image_score,
        }
        (folder / "metadata.json").write_text(json.dumps(metadata, indent=1))
        np.save(folder / "pred_logits_0.npy", full_resolution_logits(stored).astype(np.float32))
    app.console.print(f"exported {len(rows)} image folder(s) to {directory} ({layout} layout)")


COMMANDS = (runs_command, status_command, results_command, export_command)
