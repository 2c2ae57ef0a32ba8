"""``readar report`` (a static HTML report of a run) and ``readar show`` (one image's diagnostic panel)."""

from __future__ import annotations

from pathlib import Path

import click

from scheduler.context import AppContext
from scheduler.tables import shown


@click.command("report")
@click.argument("run_name")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for index.html and its plots/ and panels/ (created; files of an older report are "
                   "overwritten).")
@click.option("--best", default=3, show_default=True, type=click.IntRange(min=0),
              help="Best-overlap images shown per category.")
@click.option("--worst", default=3, show_default=True, type=click.IntRange(min=0),
              help="Worst-overlap images shown per category.")
@click.option("--examples", default=3, show_default=True, type=click.IntRange(min=0),
              help="Example images per failure class.")
@click.pass_obj
def report_command(app: AppContext, run_name: str, out_dir: Path, best: int, worst: int, examples: int) -> None:
    """Write a static HTML report of a run: metrics, curves, galleries and the failure breakdown.

    It opens from disk (no server): pictures are files next to index.html, linked by relative paths.
    """
    from rich.progress import Progress

    from metrics.reporting import ReportError, ReportOptions, build_report
    from scheduler.tables import metric_dicts

    run = app.run(run_name)
    rows = metric_dicts(app.repo, run.id)
    if not rows:
        app.err.print(f"[yellow]run {shown(run.name)} has no metric rows yet; the report shows per-image results "
                      f"only (`readar aggregate {shown(run.name)}` computes the metrics)[/]")
    categories = len(app.repo.status_counts(run.id))
    options = ReportOptions(best=best, worst=worst, examples=examples)
    with Progress(console=app.err, transient=True) as progress:
        task = progress.add_task("analysing categories", total=categories)
        try:
            page = build_report(app.repo, app.store, run, rows, out_dir, options=options,
                                progress=lambda _category: progress.advance(task))
        except ReportError as exc:
            raise click.ClickException(str(exc)) from exc
    app.console.print(f"report: {shown(page)} (open it in a browser; it needs no server)")


@click.command("show")
@click.argument("run_name")
@click.argument("image")
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.pass_obj
def show_command(app: AppContext, run_name: str, image: str, out_file: Path) -> None:
    """Draw one image's panel: image + ground truth, probability, similarity map, SasP points.

    IMAGE is the image's path relative to the dataset root (e.g. brick/test/scratch/003.png) or its numeric id
    (`readar results RUN` lists both).
    """
    from metrics.reporting import ReportError, render_image

    run = app.run(run_name)
    try:
        path = render_image(app.repo, app.store, run, image, out_file)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    app.console.print(f"panel: {shown(path)}")


COMMANDS = (report_command, show_command)
