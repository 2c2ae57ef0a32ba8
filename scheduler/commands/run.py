"""``readar run``, ``readar resume`` and ``readar demo``: plan and execute runs on this machine."""

from __future__ import annotations

import functools
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from scheduler.context import AppContext
from scheduler.planner import RUN_NAME_RULE, RunNameError, RunRequest, check_run_name, parse_list, plan_run
from scheduler.tables import print_metrics, run_csv_path, shown, visible, write_run_csv
from storage.redact import redact_text
from workers.detectors.base import (
    CONVERSATIONS,
    DECODE_MODES,
    DETECTOR_DEFAULTS,
    PROMPT_MODES,
    DetectorConfig,
    DetectorError,
    build_detector,
)
from workers.read import MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP


def _check_detector(ctx: click.Context, _param: click.Parameter, name: str) -> str:
    """Unknown detector names are usage errors (exit 2) listing the registered ones."""
    from workers.detectors.base import DETECTOR_REGISTRY, load_builtin_detectors
    from workers.runtime import import_plugins

    app = ctx.find_object(AppContext)
    if app is not None:
        import_plugins(app.settings.plugins)
    if name not in DETECTOR_REGISTRY:
        load_builtin_detectors()
    if name not in DETECTOR_REGISTRY:
        raise click.BadParameter(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTOR_REGISTRY))}")
    return name


def _check_run_name(_ctx: click.Context, _param: click.Parameter, name: str | None) -> str | None:
    """A new run's name follows the rule (an older run with another name continues with ``readar resume``)."""
    if name is None:
        return None
    try:
        return check_run_name(name)
    except RunNameError as exc:
        raise click.BadParameter(f"{exc} (a run named before this rule goes on with `readar resume NAME`)") from None


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The dataset and detector options shared by ``run`` (and ``submit``)."""
    options = [
        click.option("--mvtec-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Dataset root: <root>/<category>/test/<defect>/<image>."),
        click.option("--classes", help="Comma-separated categories (default: all)."),
        click.option("--max-per-class", default=-1, show_default=True, type=click.IntRange(min=-1),
                     help="First N images per category in sorted order (-1 = all)."),
        click.option("--exclude-defects", help="Comma-separated defect types to leave out, e.g. color,combined."),
        click.option("--detector", default="baseline", show_default=True, callback=_check_detector,
                     help="baseline (weight-free statistics), read (READ's own inference: SasP points + [SEG] "
                     "to SAM), lisa (the [SEG] token alone), read_as_published (the setting of the published "
                     "READAR numbers: [SEG] + one not-a-point padding point, vicuna_v1, anomaly prompt, up to "
                     "2,048 new tokens), noop, or one a plug-in registers."),
        click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Released READ checkpoint folder [env READAR_CHECKPOINT]."),
        click.option("--clip", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="CLIP ViT-L/14-336 folder [env READAR_CLIP]."),
        click.option("--prompt-mode", type=click.Choice(PROMPT_MODES),
                     help="The question per image. generic: 'Segment any anomaly on the {class}.'; binary: 'Is "
                     "there any anomaly in the image?'; template: --prompt-template; all_types: one query per "
                     "defect type of the category, maps combined by max; anomaly: names the ground-truth defect "
                     "folder, an ORACLE setting. Only anomaly leaks labels. [default: generic; anomaly for "
                     "read_as_published]"),
        click.option("--prompt-template", help="User template for --prompt-mode template ({class_name}, "
                     "{anomaly_type})."),
        click.option("--decode-mode", type=click.Choice(DECODE_MODES), default="generate", show_default=True,
                     help="generate: greedy decoding, [SEG] state from the step that emits it (as READ); "
                     "teacher_forced: one forward pass over the answer 'Sure, [SEG].' (faster, approximate)."),
        click.option("--conversation", type=click.Choice(CONVERSATIONS),
                     help="LLaVA template: llava_v1 (READ's training template) or vicuna_v1 (the wording of the "
                     "original READAR scripts). [default: llava_v1; vicuna_v1 for read_as_published]"),
        click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS_CAP),
                     help=f"READ detectors: most tokens generated per question (1-{MAX_NEW_TOKENS_CAP}). "
                     f"[default: {MAX_NEW_TOKENS}; {MAX_NEW_TOKENS_CAP} for read_as_published]"),
        click.option("--device", help="cpu, cuda or cuda:N [env READAR_DEVICE; cpu]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward [env READAR_BATCH_SIZE; 4]."),
        click.option("--run-name", callback=_check_run_name,
                     help=f"Name of the run: {RUN_NAME_RULE} (default: derived from the dataset and options)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _absolute(path: Path | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


def detector_config(app: AppContext, options: dict[str, Any]) -> DetectorConfig:
    """The detector configuration of ``options``; options left out take the detector's defaults."""
    settings = app.settings
    defaults = DETECTOR_DEFAULTS.get(options["detector"], {})
    extra: dict[str, Any] = {}
    if "max_new_tokens" in defaults:
        extra["max_new_tokens"] = options.get("max_new_tokens") or defaults["max_new_tokens"]
    elif options.get("max_new_tokens") is not None:
        raise click.UsageError(
            f"--max-new-tokens applies to the READ detectors (read, lisa, read_as_published); "
            f"{options['detector']} generates no text"
        )
    try:
        return DetectorConfig(
            # Stored absolute: `resume` from another folder and workers elsewhere must find the same folders.
            checkpoint=_absolute(options.get("checkpoint") or settings.checkpoint),
            clip=_absolute(options.get("clip") or settings.clip),
            device=options.get("device") or settings.device,
            prompt_mode=options.get("prompt_mode") or defaults.get("prompt_mode", "generic"),
            prompt_template=options.get("prompt_template"),
            decode_mode=options["decode_mode"],
            conversation=options.get("conversation") or defaults.get("conversation", "llava_v1"),
            batch_size=options.get("batch_size") or settings.batch_size,
            extra=extra,
        )
    except DetectorError as exc:
        raise click.UsageError(str(exc)) from exc


def _request(options: dict[str, Any], config: DetectorConfig) -> RunRequest:
    return RunRequest(
        mvtec_root=options["mvtec_root"], detector=options["detector"], detector_config=config.public(),
        classes=parse_list(options.get("classes")), max_per_class=options["max_per_class"],
        exclude_defects=parse_list(options.get("exclude_defects")) or (), run_name=options.get("run_name"),
    )


def execute(app: AppContext, detector_name: str, config: DetectorConfig, request: RunRequest | None,
            run_name: str | None = None) -> None:
    """Plan (when ``request`` is given), run every pending image, print and write the metrics."""
    from scheduler.dataset import DatasetError
    from scheduler.runner import execute_run
    from storage.repository import RunConflictError

    try:
        detector = build_detector(detector_name, config)
        detector.preflight()  # device and weight files, before any image is claimed
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    repo = app.repo
    if request is not None:
        try:
            run, new_rows = plan_run(
                repo, request, model_fingerprint=detector.fingerprint(),
                uses_ground_truth_names=detector.uses_ground_truth_names, settings_public=app.settings.public(),
            )
        except (DatasetError, RunConflictError, RunNameError) as exc:
            raise click.ClickException(str(exc)) from exc
        app.err.print(f"run [bold]{shown(run.name)}[/]: {new_rows} new image row(s) planned")
    else:
        run = repo.get_run(run_name or "")
    outcome = execute_run(
        repo, app.store, run, detector, batch_size=config.batch_size, lease_seconds=app.settings.lease_seconds,
        max_attempts=app.settings.max_attempts, device=config.device, console=app.err,
        secrets=app.settings.secrets(), resume=shown(resume_hint(app, run.name)),  # the runner prints markup
    )
    if outcome.interrupted:
        raise SystemExit(outcome.exit_code)
    summarise(app, outcome.run.id, outcome.run.name)


def resume_hint(app: AppContext, run_name: str) -> str:
    """The command that continues ``run_name`` from any folder (the work folder named when not the default)."""
    work_dir = app.settings.work_dir
    flag = "" if work_dir == Path("readar-work") else f"--work-dir {shlex.quote(str(work_dir.resolve()))} "
    return f"readar {flag}resume {shlex.quote(run_name)}"


def summarise(app: AppContext, run_id: int, run_name: str) -> Path:
    """Print the metrics table and where everything lives; returns the CSV path."""
    csv_path = write_run_csv(app.repo, run_id, run_csv_path(app.settings.work_dir, run_name))
    run = app.repo.get_run_by_id(run_id)
    print_metrics(app.console, app.repo, run)
    totals = app.repo.status_totals(run_id)
    app.console.print("images: " + ", ".join(f"{n} {shown(s)}" for s, n in sorted(totals.items())))
    app.console.print(f"metrics CSV:  {shown(csv_path)}")
    app.console.print(f"database:     {shown(redact_text(app.settings.resolved_database_url))}")
    app.console.print(f"logits:       {shown(app.store.describe())}/runs/{run_id}/images/")
    return csv_path


@click.command("run")
@run_options
@click.pass_obj
def run_command(app: AppContext, **options: Any) -> None:
    """Plan a run over a dataset and execute it on this machine (embedded mode; resumable)."""
    config = detector_config(app, options)
    execute(app, options["detector"], config, _request(options, config))


@click.command("resume")
@click.argument("run_name")
@click.option("--device", help="Override the device of the stored run configuration.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override the batch size.")
@click.pass_obj
def resume_command(app: AppContext, run_name: str, device: str | None, batch_size: int | None) -> None:
    """Finish an interrupted run: images already done are not redone.

    With a broker configured, unfinished images are enqueued for the workers; otherwise they run here."""
    _continue(app, app.run(run_name), device=device, batch_size=batch_size, verb="resumed")


@click.command("retry")
@click.argument("run_name")
@click.option("--category", help="Only this category's failed images.")
@click.option("--device", help="Override the device of the stored run configuration.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Override the batch size.")
@click.pass_obj
def retry_command(app: AppContext, run_name: str, category: str | None, device: str | None,
                  batch_size: int | None) -> None:
    """Give the run's failed (quarantined) images a fresh start, e.g. after fixing a file, and finish the run.

    Their attempts and errors are cleared; the metrics are recomputed once they are done."""
    run = app.run(run_name)
    if category is not None and category not in {c.category for c in app.repo.categories(run.id)}:
        known = ", ".join(sorted(c.category for c in app.repo.categories(run.id)))
        raise click.BadParameter(f"run {run.name} has no category {category!r}; it has: {known}",
                                 param_hint="--category")
    count = app.repo.requeue_failed(run.id, category=category)
    app.console.print(f"run {shown(run.name)}: {count} failed image(s) queued again")
    _continue(app, app.repo.get_run_by_id(run.id), device=device, batch_size=batch_size, verb="retried")


def _continue(app: AppContext, run: Any, *, device: str | None, batch_size: int | None, verb: str) -> None:
    """Process a planned run's unfinished images: through the workers when a broker is set, else here."""
    if app.settings.broker_url:  # scale-out: hand the unfinished images back to the workers
        from scheduler.commands.distributed import celery_for
        from workers.dispatch import reconcile_run

        app.repo.set_run_status(run.id, "running")
        report = reconcile_run(celery_for(app), app.repo, run.id, visibility_timeout=app.settings.visibility_timeout,
                               stale_aggregation_s=app.settings.visibility_timeout)
        app.console.print(f"run {shown(run.name)} {verb}: {report.enqueued + report.lost} task(s) enqueued, "
                          f"{report.leases_expired} expired lease(s) requeued, {report.aggregations} aggregation(s) "
                          "triggered")
        return
    from workers.runtime import detector_config_from_run

    config = detector_config_from_run(run.config["detector_config"], device=device, batch_size=batch_size)
    execute(app, run.detector, config, None, run_name=run.name)


@click.command("delete")
@click.argument("run_name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def delete_command(app: AppContext, run_name: str, yes: bool) -> None:
    """Delete a run: its rows in the database and its logits in the object store (the dataset is untouched)."""
    run = app.run(run_name)
    images = sum(app.repo.status_totals(run.id).values())
    if not yes:
        click.confirm(f"delete run {visible(run.name)} ({images} images) and its stored logits?", abort=True)
    keys = app.store.list(f"runs/{run.id}")
    for key in keys:
        app.store.delete(key)
    app.repo.delete_run(run.id)
    app.console.print(f"run {shown(run.name)} deleted: {images} image row(s), {len(keys)} object(s)")


@click.command("demo")
@click.option("--detector", type=click.Choice(["baseline", "read"]), default="baseline", show_default=True,
              help="baseline: weight-free statistics; read: READ with a tiny random-weight checkpoint.")
@click.pass_obj
def demo_command(app: AppContext, detector: str) -> None:
    """Generate sample data and run the whole pipeline on it (plan → tasks → objects + SQL → metrics)."""
    from scheduler.sample_data import make_sample_data

    work = app.settings.work_dir
    data_dir = work / "sample-data"
    if not data_dir.exists():
        make_sample_data(data_dir)
        app.err.print(f"sample dataset written to {shown(data_dir)}")
    options: dict[str, Any] = {
        "mvtec_root": data_dir, "detector": detector, "max_per_class": -1, "decode_mode": "generate",
        "run_name": f"demo-{detector}",
    }
    if detector == "read":
        from workers.read.tiny import make_tiny_checkpoint

        tiny_dir = work / "tiny-checkpoint"
        checkpoint, clip = make_tiny_checkpoint(tiny_dir)
        options.update(checkpoint=checkpoint, clip=clip)
    config = detector_config(app, options)
    execute(app, detector, config, _request(options, config))
    app.console.print(
        "[dim]These numbers come from generated images"
        + (" and a random-weight model" if detector == "read" else "")
        + "; they say nothing about READ's accuracy on real data.[/]"
    )


COMMANDS = (run_command, resume_command, retry_command, delete_command, demo_command)
