"""``readar eval``: the original READAR evaluator's command, on its original output layout, streaming."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metrics.errors import LegacyInputError
from metrics.legacy_evaluation import evaluate_legacy
from metrics.output import csv_order, metrics_table, shown, visible, write_metrics_csv


def _parse_classes(value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give category names separated by commas, e.g. bottle,cable", param_hint="--classes")
    return names


def _skip_table(skips) -> Table:
    table = Table(title=f"{len(skips)} image(s) skipped", title_style="bold yellow")
    table.add_column("category")
    table.add_column("folder", overflow="fold")
    table.add_column("reason", overflow="fold")
    for skip in skips:
        table.add_row(shown(skip.category or "?"), shown(Path(skip.folder).name), shown(skip.reason))
    return table


@click.command("eval")
@click.option("--pred-root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder with one sub-folder per image (metadata.json + pred_logits_*.npy).")
@click.option("--mvtec-root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="MVTec-format dataset root (for <category>/ground_truth/<defect>/<stem>_mask.png).")
@click.option("--out-csv", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the metric rows.")
@click.option("--pro-hard/--no-pro-hard", default=True, show_default=True,
              help="Also compute the official MVTec AD PRO (PRO_hard).")
@click.option("--strict", is_flag=True, help="Exit non-zero (and write no CSV) if any image is skipped.")
@click.option("--classes", default=None, help="Comma-separated categories to evaluate (default: all found).")
@click.option("--workers", type=click.IntRange(1, 64), default=min(2, os.cpu_count() or 1), show_default=True,
              help="Processes, one category each at a time.")
def eval_command(pred_root: Path, mvtec_root: Path, out_csv: Path, pro_hard: bool, strict: bool,
                 classes: str | None, workers: int) -> None:
    """Compute iAUROC, pAUROC, PRO, PRO_hard and F1_max per category, defect type, overall and mean.

    Logits are read one image at a time; memory does not grow with the number of images. Unusable images
    are skipped with a printed reason (--strict turns any skip into an error), and the others are evaluated:
    an unreadable, oversized or non-regular file (FIFO, device), a metadata.json over 1 MiB or nested too
    deeply, an .npy whose header does not fit its mask or a sane size, a mask beyond Pillow's
    decompression-bomb limit or linked out of --mvtec-root, a category that is not under --mvtec-root, and
    every folder of an image that several folders claim (the reason names them all). Names are printed with
    control characters escaped.

    Rows (CSV and table, as `readar metrics`): mean, overall, categories, defect types. A warning names both
    folders when the predictions' metadata.json image paths are not under --mvtec-root (right for a copy of
    their dataset, wrong for another one); when not one anomalous prediction has its mask under --mvtec-root,
    the command fails without evaluating.
    """
    class_names = _parse_classes(classes)
    out = Console()
    err = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=True)
    with progress:
        task = progress.add_task("evaluating", total=None)

        def started(total: int) -> None:
            progress.update(task, total=total)

        def advanced(category: str) -> None:
            progress.update(task, advance=1, description=f"evaluating {shown(category)}")

        try:
            result = evaluate_legacy(pred_root, mvtec_root, classes=class_names, pro_hard=pro_hard,
                                     workers=workers, on_image=advanced, on_start=started, require_match=True)
        except LegacyInputError as exc:
            raise click.ClickException(visible(exc)) from exc
    mismatch = result.survey.mismatch_warning() if result.survey else None
    if mismatch:
        err.print(f"[yellow]warning:[/] {shown(mismatch)}", soft_wrap=True)
    if class_names:
        found = {row["category"] for row in result.rows}
        for name in class_names:
            if name not in found:
                err.print(f"[yellow]warning:[/] no prediction of category {shown(repr(name))} was evaluated")
    if result.skips:
        err.print(_skip_table(result.skips))
    if strict and result.skips:
        raise click.ClickException(f"{len(result.skips)} image(s) skipped and --strict is set; no CSV written")
    if not result.rows:
        raise click.ClickException(f"no usable prediction under {visible(pred_root)}; nothing to write")
    try:
        write_metrics_csv(csv_order(result.rows), out_csv)
    except OSError as exc:
        raise click.ClickException(visible(exc)) from exc
    out.print(metrics_table(result.rows, title=f"eval of {visible(pred_root)} — metrics (%)"))
    err.print(f"{result.num_evaluated} image(s) evaluated, {len(result.skips)} skipped; wrote {shown(out_csv)}")


if __name__ == "__main__":  # `python -m scheduler.commands.eval ...` (the benchmark runs it this way)
    eval_command()
