"""``readar compare``: two or more finished runs of the same dataset side by side on one static HTML page."""

from __future__ import annotations

from pathlib import Path

import click

from scheduler.context import AppContext
from scheduler.tables import shown


@click.command("compare")
@click.argument("run_names", metavar="RUN RUN [RUN...]", nargs=-1)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for index.html and its panels/ (created; files of an older comparison are "
                   "overwritten).")
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=0),
              help="Images where the runs disagree most, listed with one panel per run.")
@click.pass_obj
def compare_command(app: AppContext, run_names: tuple[str, ...], out_dir: Path, top: int) -> None:
    """Compare finished runs of the same dataset (READ, LISA, baseline, ...) on one static HTML page.

    Per category the five metrics of every run side by side with the best marked, the PRO of every defect type
    with its change against the first run, and the images where one run is right and another wrong at each
    run's own F1-max threshold. It opens from disk (no server).
    """
    from rich.progress import Progress

    from metrics.reporting.compare import CompareError, compare_runs

    if len(run_names) < 2:
        raise click.ClickException("compare needs at least two runs: `readar compare RUN RUN [RUN...] --out DIR`")
    runs = [app.run(name) for name in run_names]
    with Progress(console=app.err, transient=True) as progress:
        task = progress.add_task("comparing runs", total=2)
        try:
            page = compare_runs(app.repo, app.store, runs, out_dir, top=top,
                                progress=lambda _step: progress.advance(task))
        except CompareError as exc:
            raise click.ClickException(str(exc)) from exc
    app.console.print(f"comparison: {shown(page)} (open it in a browser; it needs no server)")


COMMANDS = (compare_command,)
