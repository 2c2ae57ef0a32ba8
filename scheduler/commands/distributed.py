"""Scale-out commands: ``worker``, ``submit``, ``cancel``, ``aggregate``, ``reconcile``, ``healthcheck``."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from scheduler.commands.common import (
    BATCH_SIZE,
    celery_for,
    detector_config,
    resume_hint,
    run_options,
    run_request,
)
from scheduler.context import AppContext
from scheduler.planner import RunNameError, plan_run
from scheduler.tables import shown, visible
from storage.models import ImageStatus, RunStatus
from storage.redact import redact_url
from storage.settings import MAX_BATCH_SIZE
from workers.detectors.base import DetectorError, build_detector


@click.command("submit")
@run_options
@click.pass_obj
def submit_command(app: AppContext, **options: Any) -> None:
    """Plan a run and enqueue one task per unfinished image for the workers (needs READAR_BROKER_URL)."""
    from metrics.aggregator import finish_run_if_complete
    from scheduler.dataset import DatasetError
    from storage.repository import RunConflictError
    from workers.dispatch import enqueue_images

    celery = celery_for(app)
    config = detector_config(app, options)
    request = run_request(options, config)
    try:  # the config, tokenizer and weight files here; each worker checks its own device when it starts
        detector = build_detector(request.detector, dataclasses.replace(config, device="cpu"))
        detector.preflight()
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    try:  # the detector decides whether its prompts read ground-truth names, as in `readar run`
        run, new_rows = plan_run(app.repo, request, model_fingerprint=detector.fingerprint(),
                                 uses_ground_truth_names=detector.uses_ground_truth_names,
                                 settings_public=app.settings.public())
    except (DatasetError, RunConflictError, RunNameError) as exc:
        raise click.ClickException(str(exc)) from exc
    if run.status != RunStatus.RUNNING:  # new, cancelled, or done before: running, unless nothing is left to do
        app.repo.set_run_status(run.id, RunStatus.RUNNING)
        finish_run_if_complete(app.repo, app.store, run.id)
    try:
        sent = enqueue_images(celery, app.repo, run.id, visibility_timeout=app.settings.visibility_timeout)
    except Exception as exc:
        from scheduler.failures import describe_failure

        message = describe_failure(exc, database_url=app.settings.resolved_database_url,
                                   broker_url=app.settings.broker_url)
        if message is None:
            raise
        raise click.ClickException(
            f"{message}. Run {run.name} is planned ({new_rows} new image row(s)); once the broker is up, "
            f"`{resume_hint(app, run.name)}` sends its images"
        ) from exc
    app.console.print(f"run [bold]{shown(run.name)}[/]: {new_rows} new image row(s), {sent} task(s) enqueued on "
                      f"{shown(redact_url(app.settings.broker_url))}")
    app.console.print(f"watch it with: readar status {shown(run.name)} --watch")
    if detector.uses_ground_truth_names:  # said now, not only once the metrics are in
        from metrics.published import oracle_note

        app.err.print(f"note: {oracle_note(request.detector_config)}.", style="yellow", markup=False,
                      highlight=False)


@click.command("cancel")
@click.argument("run_name")
@click.pass_obj
def cancel_command(app: AppContext, run_name: str) -> None:
    """Stop a run: workers drop its remaining tasks; `readar resume` continues it later."""
    run = app.run(run_name)
    app.repo.set_run_status(run.id, RunStatus.CANCELLED)
    app.repo.clear_enqueued(run.id)
    app.console.print(f"run {shown(run.name)} cancelled; images already done are kept")


@click.command("aggregate")
@click.argument("run_name")
@click.option("--category", help="Only this category (default: every category with no pending images).")
@click.pass_obj
def aggregate_command(app: AppContext, run_name: str, category: str | None) -> None:
    """Recompute metric rows now, on this machine, from the stored logits."""
    from metrics.aggregator import LostResultsError, aggregate_category
    from scheduler.commands.common import summarise

    run = app.run(run_name)
    # The aggregator reads the masks under the stored root as it stands (no READAR_PATH_MAP here): a root that is
    # gone would turn every mask into a skip and rewrite the stored metrics with NaN.
    if not Path(run.dataset_root).is_dir():
        raise click.ClickException(
            f"the dataset root of run {run.name}, {run.dataset_root}, is not an existing folder (moved or "
            f"unmounted?): restore the dataset there, then run `readar aggregate {run.name}` again; the stored "
            "metrics are left as they were"
        )
    categories = [c.category for c in app.repo.categories(run.id)]
    if category and category not in categories:
        raise click.ClickException(f"run {run.name} has no category {category!r}; it has {', '.join(categories)}")
    counts = app.repo.status_counts(run.id)
    for name in [category] if category else categories:
        if any(counts.get(name, {}).get(s, 0) for s in (ImageStatus.QUEUED, ImageStatus.RUNNING)):
            app.err.print(f"[yellow]{shown(name)}: images still pending; aggregating what is done so far")
        try:  # after the run's last category it refreshes the summary and finishes the run (finish_run_if_complete)
            aggregate_category(app.repo, app.store, run.id, name)
        except LostResultsError as exc:
            app.err.print(f"[yellow]{shown(exc)}: `readar resume {shown(run.name)}` computes them here, or `readar "
                          f"reconcile {shown(run.name)}` sends them to the workers")
    summarise(app, run.id, run.name)


@click.command("reconcile")
@click.argument("run_name", required=False)
@click.pass_obj
def reconcile_command(app: AppContext, run_name: str | None) -> None:
    """Re-enqueue expired leases and lost messages; trigger missed aggregations (all unfinished runs)."""
    from workers.dispatch import reconcile_run

    celery = celery_for(app)
    from workers.recovery import is_distributed

    runs = [app.run(run_name)] if run_name else [
        r for r in app.repo.list_runs() if r.status not in (RunStatus.DONE, RunStatus.CANCELLED) and is_distributed(r)
    ]
    if not runs:
        app.console.print("nothing to reconcile: no unfinished run was submitted to workers (a run that `readar "
                          "run` started goes on with `readar resume RUN`)", markup=False, highlight=False)
    for run in runs:
        report = reconcile_run(celery, app.repo, run.id, visibility_timeout=app.settings.visibility_timeout,
                               stale_aggregation_s=app.settings.visibility_timeout)
        app.console.print(f"reconciled {shown(run.name)}: {report.leases_expired} expired lease(s) requeued, "
                          f"{report.enqueued} task(s) enqueued, {report.lost} lost message(s) sent again, "
                          f"{report.aggregations} aggregation(s) triggered")


@click.command("worker")
@click.option("--gpus", help="Comma-separated GPU indices: one worker process per GPU.")
@click.option("--device", type=click.Choice(["cpu"]), help="Run on the CPU instead of GPUs.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1, 64),
              help="CPU worker processes (with --device cpu).")
@click.option("--batch-size", type=BATCH_SIZE,
              help=f"Images per forward, 1-{MAX_BATCH_SIZE} (task threads per process: this × "
              "READAR_PIPELINE_DEPTH) [env READAR_BATCH_SIZE].")
@click.option("--queues", default="readar.images,readar.aggregate", show_default=True,
              help="Queues to take tasks from: readar.images (one task per image) and/or readar.aggregate "
              "(category metrics; CPU work that reads the masks).")
@click.option("--path-map", "path_map", multiple=True, metavar="OLD=NEW",
              help="Where this machine finds a folder that runs stored under OLD (the dataset root, the checkpoint "
              "or CLIP folder of the submitting machine); repeatable [env READAR_PATH_MAP, comma-separated].")
@click.pass_obj
def worker_command(app: AppContext, gpus: str | None, device: str | None, processes: int, batch_size: int | None,
                   queues: str, path_map: tuple[str, ...]) -> None:
    """Start workers that take image tasks from the broker (one process per GPU, model loaded once each)."""
    from workers.supervisor import plan_children, supervise

    celery = celery_for(app)  # refuses without a broker
    if gpus and device:
        raise click.UsageError("use either --gpus or --device cpu, not both")
    gpu_list = None
    if gpus:
        try:
            gpu_list = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise click.UsageError(f"--gpus takes comma-separated integers, e.g. 0,1; got {gpus!r}") from None
    elif device is None and app.settings.device.startswith("cuda"):
        gpu_list = [int(app.settings.device.partition(":")[2] or 0)]
    pinned = app.settings.child_environment()
    if path_map:
        from storage.paths import PathMap

        joined = ",".join(filter(None, [app.settings.path_map, *path_map]))
        try:
            PathMap(joined)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--path-map") from None
        pinned["READAR_PATH_MAP"] = joined
    specs = plan_children(
        gpus=gpu_list, processes=processes, batch_size=batch_size or app.settings.batch_size, queues=queues,
        work_dir=app.settings.work_dir.resolve(), metrics_port=app.settings.metrics_port,
        loglevel="INFO" if app.verbose else "WARNING", settings_env=pinned,
    )
    from workers.recovery import Recovery

    recovery = Recovery(celery, app.repo, visibility_timeout=app.settings.visibility_timeout)
    app.err.print(f"starting {len(specs)} worker process(es) on {shown(redact_url(app.settings.broker_url))}")
    sys.exit(supervise(specs, hard_time_limit=app.settings.hard_time_limit,
                       heartbeat_file=app.settings.heartbeat_file, recovery=recovery,
                       setup_retry_s=app.settings.setup_retry_seconds))


@click.command("healthcheck")
@click.option("--max-idle", default=900, show_default=True, type=click.IntRange(min=1),
              help="Unhealthy when the heartbeat is older than this many seconds.")
@click.option("--heartbeat-file", type=click.Path(path_type=Path), help="Default: READAR_HEARTBEAT_FILE.")
@click.pass_obj
def healthcheck_command(app: AppContext, max_idle: int, heartbeat_file: Path | None) -> None:
    """Exit 0 when a worker made progress recently (liveness probe)."""
    from workers.monitoring import heartbeat_age

    path = heartbeat_file or app.settings.heartbeat_file
    if path is None:
        raise click.UsageError("no heartbeat file: set READAR_HEARTBEAT_FILE or pass --heartbeat-file")
    from workers.supervisor import unhealthy_marker

    marker = unhealthy_marker(Path(path))
    if marker.is_file():
        click.echo(f"unhealthy: {visible(marker.read_text(encoding='utf-8').strip(), keep_newlines=True)}", err=True)
        sys.exit(1)
    age = heartbeat_age(path)
    if age > max_idle:
        click.echo(f"unhealthy: no progress for {age:.0f} s (limit {max_idle} s)", err=True)
        sys.exit(1)
    click.echo(f"healthy: last progress {age:.0f} s ago")


COMMANDS = (submit_command, cancel_command, aggregate_command, reconcile_command, worker_command,
            healthcheck_command)
