"""Queries over stored runs: ``runs``, ``status``, ``results`` and ``export``."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from metrics.output import csv_cell, make_folder, write_output
from metrics.results import load_logits
from scheduler.context import AppContext
from scheduler.tables import add_number_column, add_text_column, compact_table, shown, visible
from storage.logits import LogitFormatError
from storage.models import IMAGE_STATUSES, CategoryStatus, Image, ImageStatus, RunStatus
from storage.objects import ObjectMissingError
from storage.paths import resolve_inside
from storage.repository import Repository, utcnow

RESULT_COLUMNS = ("id", "category", "defect", "label", "status", "image_score", "attempts", "image_path",
                  "object_key", "error")
RATE_WINDOW_S = 300.0  # the rate looks at most this far back
# Short headers for the image statuses, so that the status table fits 80 columns.
STATUS_HEADERS = {ImageStatus.QUEUED: "queue", ImageStatus.RUNNING: "run", ImageStatus.DONE: "done",
                  ImageStatus.FAILED: "fail", ImageStatus.SKIPPED: "skip"}


def shown_status(run: Any) -> str:
    """The run's status, except that an embedded run whose executing process on this host is gone (killed,
    machine restarted) is ``interrupted``, however its status column was left."""
    from workers.task import dead_local_owners

    executor = (run.config or {}).get("executor")
    if run.status == RunStatus.RUNNING and executor and dead_local_owners([executor]):
        return RunStatus.INTERRUPTED
    return run.status


@click.command("runs")
@click.pass_obj
def runs_command(app: AppContext) -> None:
    """List the runs in the database."""
    table = compact_table("runs")
    for header in ("name", "status", "detector", "created"):
        add_text_column(table, header)
    for header in ("images", "done", "fail", "skip"):
        add_number_column(table, header)
    for run in app.repo.list_runs():
        totals = app.repo.status_totals(run.id)
        table.add_row(shown(run.name), shown(shown_status(run)), shown(run.detector),
                      f"{run.created_at:%Y-%m-%d %H:%M}",
                      str(sum(totals.values())), str(totals.get(ImageStatus.DONE, 0)),
                      str(totals.get(ImageStatus.FAILED, 0)), str(totals.get(ImageStatus.SKIPPED, 0)))
    app.console.print(table)


@dataclass(frozen=True)
class Throughput:
    """How fast a run's images finish: ``finished`` images over the last ``window_s`` seconds of work."""

    finished: int
    window_s: float
    remaining: int  # images still queued or running

    @property
    def rate(self) -> float:
        """Images per second (0 when nothing finished in the window)."""
        return self.finished / self.window_s if self.finished and self.window_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds until the remaining images are done at this rate; None unless work is moving: images are
        left and some finished recently (a finished or a stalled run has no ETA)."""
        return self.remaining / self.rate if self.remaining and self.rate > 0 else None


def measure_throughput(
    *, now: datetime, finished: int, first_started: datetime | None, last_finished: datetime | None,
    remaining: int, window_s: float = RATE_WINDOW_S,
) -> Throughput:
    """The rate over the real elapsed window, not a fixed one.

    finished: images that finished in the last ``window_s`` seconds; first_started / last_finished: when the
    earliest of them started and the latest finished. While images remain the window runs from that first start
    to ``now``; once none remain it ends at the last finish (so a run that took 15 s is measured over 15 s);
    either way it is at most ``window_s`` long (and at least 1 s).
    """
    if not finished or first_started is None:
        return Throughput(0, window_s, remaining)
    end = now if remaining or last_finished is None else last_finished
    elapsed = (end - first_started).total_seconds()
    return Throughput(finished, min(window_s, max(elapsed, 1.0)), remaining)


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes (stored in UTC); PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _recent_work(repo: Repository, run_id: int, since: datetime) -> tuple[int, datetime | None, datetime | None]:
    """(images finished since ``since``, earliest start among them, latest finish)."""
    from sqlalchemy import func, select

    with repo.db.session() as session:
        count, first_started, last_finished = session.execute(
            select(func.count(), func.min(Image.started_at), func.max(Image.finished_at))
            .where(Image.run_id == run_id, Image.finished_at.is_not(None), Image.finished_at >= since)
        ).one()
    return int(count or 0), _aware(first_started), _aware(last_finished)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _throughput_text(throughput: Throughput, *, moving: bool = True) -> str:
    """The rate line; ``moving`` False (an interrupted or cancelled run, or nothing finished for a while) drops
    the ETA: nothing is working towards it."""
    left = f"{throughput.remaining} left"
    if not throughput.finished:
        return f"no image finished in the last {_duration(throughput.window_s)}, {left}"
    rate = f"{throughput.rate:.2f} images/s over the last {_duration(throughput.window_s)} of work"
    eta = throughput.eta_s if moving else None
    return f"{rate}, {left}" + (f", ETA {_duration(eta)}" if eta is not None else "")


def _status_table(app: AppContext, run: Any) -> Table:
    counts = app.repo.status_counts(run.id)
    categories = {c.category: c for c in app.repo.categories(run.id)}
    now = utcnow()
    finished, first_started, last_finished = _recent_work(app.repo, run.id, now - timedelta(seconds=RATE_WINDOW_S))
    remaining = sum(c.get(ImageStatus.QUEUED, 0) + c.get(ImageStatus.RUNNING, 0) for c in counts.values())
    throughput = measure_throughput(now=now, finished=finished, first_started=first_started,
                                    last_finished=last_finished, remaining=remaining)
    status = shown_status(run)
    moving = status == RunStatus.RUNNING and last_finished is not None and (now - last_finished).total_seconds() < 120
    table = compact_table(f"run {shown(run.name)} ({shown(status)}) — {_throughput_text(throughput, moving=moving)}",
                          caption="metrics: vN = how many times the category's metrics were computed, then its "
                          "state (open: images unfinished or results since; aggregating; done)")
    for header in ("category", "progress"):
        add_text_column(table, header)
    for status in IMAGE_STATUSES:
        add_number_column(table, STATUS_HEADERS.get(status, status))
    add_text_column(table, "metrics")
    for category, per_status in sorted(counts.items()):
        record = categories.get(category)
        total = sum(per_status.values())
        done = total - per_status.get(ImageStatus.QUEUED, 0) - per_status.get(ImageStatus.RUNNING, 0)
        filled = int(10 * done / total) if total else 10
        bar = "█" * filled + "░" * (10 - filled) + f" {int(100 * done / total) if total else 100:>3}%"
        aggregated = f"v{record.version} {shown(record.status)}" if record else "—"
        table.add_row(shown(category), bar, *(str(per_status.get(s, 0)) for s in IMAGE_STATUSES), aggregated)
    return table


@click.command("status")
@click.argument("run_name")
@click.option("--watch", is_flag=True, help="Refresh until the run finishes (reconciles every refresh when a "
              "broker is configured).")
@click.option("--interval", default=5.0, show_default=True, type=click.FloatRange(min=0.5),
              help="Seconds between refreshes with --watch.")
@click.pass_obj
def status_command(app: AppContext, run_name: str, watch: bool, interval: float) -> None:
    """Per-category progress of a run: counts, rate, ETA, aggregation state and failures."""
    import time

    from rich.live import Live

    run = app.run(run_name)
    if shown_status(run) == RunStatus.INTERRUPTED:
        from scheduler.commands.common import resume_hint

        app.console.print(f"run {visible(run.name)} was interrupted; finished images are kept. Resume with: "
                          f"{visible(resume_hint(app, run.name))}", markup=False, highlight=False)
    if not watch:
        app.console.print(_status_table(app, run))
    else:
        with Live(_status_table(app, run), console=app.console, refresh_per_second=1) as live:
            while True:
                if app.settings.broker_url:
                    from scheduler.commands.common import celery_for
                    from workers.dispatch import reconcile_run

                    reconcile_run(celery_for(app), app.repo, run.id,
                                  visibility_timeout=app.settings.visibility_timeout,
                                  stale_aggregation_s=app.settings.visibility_timeout)
                run = app.repo.get_run_by_id(run.id)
                live.update(_status_table(app, run))
                categories = app.repo.categories(run.id)
                if run.status == RunStatus.CANCELLED or (app.repo.active_count(run.id) == 0
                                                         and all(c.status == CategoryStatus.DONE for c in categories)):
                    break
                if shown_status(run) == RunStatus.INTERRUPTED:  # nothing works on it: watching would never end
                    from scheduler.commands.common import resume_hint

                    live.stop()
                    app.console.print(f"run {visible(run.name)} is interrupted; nothing is working on it. Resume "
                                      f"with: {visible(resume_hint(app, run.name))}", markup=False, highlight=False)
                    break
                time.sleep(interval)
    failed = app.repo.images(run.id, status=ImageStatus.FAILED)
    for row in failed[:20]:
        app.console.print(f"[red]failed[/] {shown(row.image_path)}: {shown(row.error)}")
    if len(failed) > 20:
        app.console.print(f"and {len(failed) - 20} more failed image(s): `readar results {visible(run.name)} --status "
                          "failed` lists them all", markup=False, highlight=False)
    if failed:
        app.console.print(
            f"once the cause is fixed (a file replaced, a checkpoint copied), `readar retry {visible(run.name)}` gives "
            "the failed images a fresh start and recomputes the metrics",
            markup=False, highlight=False,
        )
    for row in [r for r in app.repo.images(run.id, status=ImageStatus.QUEUED) if r.error][:20]:
        app.console.print(f"[yellow]queued again[/] {shown(row.image_path)}: {shown(row.error)}")
    if watch and app.repo.metric_rows(run.id):
        from scheduler.commands.common import summarise

        summarise(app, run.id, run.name)


@click.command("metrics")
@click.argument("run_name")
@click.option("--out-csv", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the CSV (default: <work-dir>/results/<run>.csv).")
@click.option("--defects", is_flag=True, help="Also print the per-defect-type rows.")
@click.pass_obj
def metrics_command(app: AppContext, run_name: str, out_csv: Path | None, defects: bool) -> None:
    """Print a run's stored metrics and write its CSV (no recomputation)."""
    from scheduler.tables import print_metrics, run_csv_path, write_run_csv

    run = app.run(run_name)
    if not app.repo.metric_rows(run.id):  # not an empty table and a header-only CSV
        app.console.print(f"run {visible(run.name)} has no metrics yet: no category has finished (no CSV written); "
                          f"`readar status {visible(run.name)}` shows its progress, `readar resume "
                          f"{visible(run.name)}` finishes it", markup=False, highlight=False, soft_wrap=True)
        return
    path = write_run_csv(app.repo, run.id, out_csv or run_csv_path(app.settings.work_dir, run.name))
    print_metrics(app.console, app.repo, run, include_defects=defects)
    app.console.print(f"metrics CSV: {shown(path)}")


@click.command("results")
@click.argument("run_name")
@click.option("--category", help="Only this category.")
@click.option("--status", type=click.Choice(IMAGE_STATUSES), help="Only rows in this status.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="table for reading, csv or json for other programs.")
@click.pass_obj
def results_command(app: AppContext, run_name: str, category: str | None, status: str | None,
                    output_format: str) -> None:
    """Per-image rows of a run."""
    run = app.run(run_name)
    if category:
        known = sorted(c.category for c in app.repo.categories(run.id))
        if category not in known:
            raise click.BadParameter(
                f"run {run.name} has no category {category!r}; its categories: {', '.join(known) or 'none'}",
                param_hint="--category",
            )
    rows = [
        {column: getattr(row, column) for column in RESULT_COLUMNS}
        for row in app.repo.images(run.id, category=category, status=status)
    ]
    if output_format == "json":
        click.echo(json.dumps(rows, indent=1))
    elif output_format == "csv":
        # Cells a spreadsheet would run are neutralised; terminal controls in names are shown as escapes.
        writer = csv.DictWriter(sys.stdout, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        writer.writerows({column: _csv_text(value) for column, value in row.items()} for row in rows)
    else:
        # The image path names the category and the defect type (<category>/test/<defect>/<file>); errors are
        # listed under the table, where they have the whole width.
        table = compact_table(f"run {shown(run.name)}: {len(rows)} image(s)",
                              caption="score: the image's anomaly score (image_score: the highest pixel probability "
                              "of its full-resolution map); tries: attempts" if rows else None)
        add_number_column(table, "id")
        add_text_column(table, "image")
        add_number_column(table, "label")
        add_text_column(table, "status")
        for header in ("score", "tries"):
            add_number_column(table, header)
        for row in rows:
            score = "" if row["image_score"] is None else f"{row['image_score']:.4f}"
            table.add_row(str(row["id"]), shown(row["image_path"]), str(row["label"]), shown(row["status"]), score,
                          str(row["attempts"]))
        app.console.print(table)
        for row in (r for r in rows if r["error"]):
            app.console.print(f"{row['id']} ({visible(row['status'])}): {visible(row['error'])}", markup=False,
                              highlight=False)


def _csv_text(value: Any) -> Any:
    return csv_cell(visible(value)) if isinstance(value, str) else value


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
    rows = app.repo.images(run.id, status=ImageStatus.DONE)
    if directory.is_dir() and any(directory.iterdir()):
        # Another run's export (or anything else) there would be mixed into this one, and `readar eval` of the
        # folder would report the mix.
        raise click.ClickException(f"export folder {directory} is not empty: choose an empty or new folder")
    make_folder(directory)
    lost: list[str] = []
    for row in rows:
        try:
            logits = load_logits(app.store, row)
        except (ObjectMissingError, LogitFormatError) as exc:  # one image's object, not the export, is broken
            lost.append(f"{row.image_path} ({exc})")
            continue
        folder = make_folder(directory / f"{row.id:06d}")
        metadata = {
            "image_path": str(resolve_inside(root, row.image_path)), "category": row.category,
            "anomaly_type": row.defect, "label": row.label, "image_score": row.image_score,
        }
        write_output(folder / "metadata.json", json.dumps(metadata, indent=1))
        array = io.BytesIO()
        np.save(array, logits.astype(np.float32))
        write_output(folder / "pred_logits_0.npy", array.getvalue())
    app.console.print(f"exported {len(rows) - len(lost)} image folder(s) to {shown(directory)} ({layout} layout)")
    if lost:
        app.err.print(f"[yellow]{len(lost)} image(s) left out: their logit objects are missing or damaged (first: "
                      f"{visible(lost[0])}); `readar aggregate {shown(run.name)}` queues them to be computed again")


COMMANDS = (runs_command, status_command, metrics_command, results_command, export_command)
