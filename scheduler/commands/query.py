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

RESULT_COLUMNS = ("id", "category", "defect", "label", "status", "image_score", "attempts", "image_path",
                  "object_key", "error")



@click.command("runs")
@click.pass_obj
def runs_command(app: AppContext) -> None:
    """List the runs in the database."""
    table = Table(title="runs", title_justify="left")
    for column in ("name", "status", "detector", "created", "images", "done", "failed", "skipped"):
        table.add_column(column)
    for run in app.repo.list_runs():
        totals = app.repo.status_totals(run.id)
        table.add_row(run.name, run.status, run.detector, f"{run.created_at:%Y-%m-%d %H:%M}",
                      str(sum(totals.values())), str(totals.get("done", 0)), str(totals.get("failed", 0)),
                      str(totals.get("skipped", 0)))
    app.console.print(table)


def _status_table(app: AppContext, run: Any) -> Table:
    from datetime import timedelta

    from storage.repository import utcnow

    counts = app.repo.status_counts(run.id)
    categories = {c.category: c for c in app.repo.categories(run.id)}
    recent = app.repo.finished_since(run.id, utcnow() - timedelta(minutes=5))
    rate = recent / 300.0
    remaining = sum(c.get("queued", 0) + c.get("running", 0) for c in counts.values())
    eta = f"{remaining / rate / 60:.1f} min" if rate > 0 else "—"
    title = f"run {run.name} ({run.status}) — {rate:.2f} images/s over 5 min, {remaining} left, ETA {eta}"
    table = Table(title=title, title_justify="left")
    for column in ("category", "progress", *IMAGE_STATUSES, "metrics"):
        table.add_column(column, justify="left" if column in ("category", "progress") else "right")
    for category, per_status in sorted(counts.items()):
        record = categories.get(category)
        total = sum(per_status.values())
        finished = total - per_status.get("queued", 0) - per_status.get("running", 0)
        filled = int(20 * finished / total) if total else 20
        bar = "█" * filled + "░" * (20 - filled) + f" {finished}/{total}"
        aggregated = f"v{record.version} {record.status}" if record else "—"
        table.add_row(category, bar, *(str(per_status.get(s, 0)) for s in IMAGE_STATUSES), aggregated)
    return table


@click.command("status")
@click.argument("run_name")
@click.option("--watch", is_flag=True, help="Refresh until the run finishes (reconciles every refresh when a "
              "broker is configured).")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.5))
@click.pass_obj
def status_command(app: AppContext, run_name: str, watch: bool, interval: float) -> None:
    """Per-category progress of a run: counts, rate, ETA, aggregation state and failures."""
    import time

    from rich.live import Live

    run = app.run(run_name)
    if not watch:
        app.console.print(_status_table(app, run))
    else:
        with Live(_status_table(app, run), console=app.console, refresh_per_second=1) as live:
            while True:
                if app.settings.broker_url:
                    from scheduler.commands.distributed import celery_for
                    from scheduler.dispatch import reconcile_run

                    reconcile_run(celery_for(app), app.repo, run.id,
                                  visibility_timeout=app.settings.visibility_timeout,
                                  stale_aggregation_s=app.settings.visibility_timeout)
                run = app.repo.get_run_by_id(run.id)
                live.update(_status_table(app, run))
                categories = app.repo.categories(run.id)
                if run.status == "cancelled" or (app.repo.active_count(run.id) == 0
                                                 and all(c.status == "done" for c in categories)):
                    break
                time.sleep(interval)
    for row in app.repo.images(run.id, status="failed")[:20]:
        app.console.print(f"[red]failed[/] {row.image_path}: {row.error}")
    for row in [r for r in app.repo.images(run.id, status="queued") if r.error][:20]:
        app.console.print(f"[yellow]queued again[/] {row.image_path}: {row.error}")
    if watch and app.repo.metric_rows(run.id):
        from scheduler.commands.run import summarise

        summarise(app, run.id, run.name)


@click.command("metrics")
@click.argument("run_name")
@click.option("--out-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSV (default: <work-dir>/results/<run>.csv).")
@click.option("--defects", is_flag=True, help="Also print the per-defect-type rows.")
@click.pass_obj
def metrics_command(app: AppContext, run_name: str, out_csv: Path | None, defects: bool) -> None:
    """Print a run's stored metrics and write its CSV (no recomputation)."""
    from scheduler.tables import print_metrics, write_run_csv

    run = app.run(run_name)
    path = write_run_csv(app.repo, run.id, out_csv or app.settings.work_dir / "results" / f"{run.name}.csv")
    print_metrics(app.console, app.repo, run, include_defects=defects)
    app.console.print(f"metrics CSV: {path}")


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
    run = app.run(run_name)
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
    run = app.run(run_name)
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


COMMANDS = (runs_command, status_command, metrics_command, results_command, export_command)
