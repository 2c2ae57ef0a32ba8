"""``readar run``, ``readar resume`` and ``readar demo``: plan and execute runs on this machine."""

from __future__ import annotations

import math
import socket
import threading
import time
from typing import Any

import click
from rich.console import Console

from scheduler.commands.common import (
    BATCH_SIZE,
    DEVICE,
    detector_config,
    resume_hint,
    run_options,
    run_request,
    summarise,
)
from scheduler.context import AppContext
from scheduler.planner import RunNameError, RunRequest, plan_run
from scheduler.tables import shown, visible
from storage.models import ImageStatus, RunStatus
from storage.settings import MAX_BATCH_SIZE
from workers.detectors.base import DetectorConfig, DetectorError, build_detector

# Progress lines when stderr is not a terminal (a log file, CI): one whenever PROGRESS_EVERY_S seconds passed
# since the last line, and one at every tenth of the images of a run of at least PROGRESS_MIN_IMAGES images unless
# the last line is under PROGRESS_MIN_GAP_S old. A run that takes seconds prints none.
PROGRESS_EVERY_S = 30.0
PROGRESS_MIN_GAP_S = 5.0
PROGRESS_STEPS = 10
PROGRESS_MIN_IMAGES = 50


class PlainProgress:
    """The runner's ``image_hook`` that prints plain progress lines, e.g. ``run NAME: 40/180 images done
    (2 failed), 12.3 images/s, about 11 s left`` (the live progress bar is shown on terminals only)."""

    def __init__(self, console: Console, run_name: str, total: int) -> None:
        from workers.task import Outcome

        self.console, self.run_name, self.total = console, run_name, total
        self.every_s, self.min_gap_s = PROGRESS_EVERY_S, min(PROGRESS_MIN_GAP_S, PROGRESS_EVERY_S)
        # Only results count: a retry, a row another claim holds, a cancelled or stale delivery is not an image done.
        self.finished = {Outcome.DONE.value, Outcome.FAILED.value}
        self.failed_outcome = Outcome.FAILED.value
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()
        self.step = math.ceil(total / PROGRESS_STEPS) if total >= PROGRESS_MIN_IMAGES else 0
        self.next_mark = self.step
        self.lock = threading.Lock()

    def __call__(self, _image_id: int, outcome: str) -> None:
        if outcome not in self.finished:
            return
        with self.lock:  # called from the runner's task threads
            self.done += 1
            self.failed += outcome == self.failed_outcome
            now = time.monotonic()
            since = now - self.last
            at_mark = self.step and self.done >= self.next_mark
            if not (at_mark and since >= self.min_gap_s) and since < self.every_s:
                return
            while self.step and self.done >= self.next_mark:
                self.next_mark += self.step
            self.last = now
            self.console.print(self.line(now), markup=False, highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        total = max(self.total, self.done)  # images whose results were lost and that were computed again
        rate = self.done / max(now - self.start, 1e-6)
        remaining = (total - self.done) / rate if rate > 0 else 0.0
        left = f", about {_duration(remaining)} left" if remaining >= 1 else ""
        return (f"run {visible(self.run_name)}: {self.done}/{total} images done ({self.failed} failed), "
                f"{rate:.1f} images/s{left}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


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
                repo, request, model_fingerprint=detector.fingerprint(),  # compared below for an existing run
                uses_ground_truth_names=detector.uses_ground_truth_names, settings_public=app.settings.public(),
            )
        except (DatasetError, RunConflictError, RunNameError) as exc:
            raise click.ClickException(str(exc)) from exc
        app.err.print(f"run [bold]{shown(run.name)}[/]: {new_rows} new image row(s) planned")
    else:
        run = repo.get_run(run_name or "")
    fingerprint = detector.fingerprint()
    if run.model_fingerprint and fingerprint != run.model_fingerprint:
        # The same checkpoint path with other files in it (the path alone is part of the run's identity). While
        # no image has a result yet (a shard replaced after it failed to load, say) nothing can be mixed.
        if not repo.status_totals(run.id).get(ImageStatus.DONE, 0):
            repo.set_model_fingerprint(run.id, fingerprint)
            run = repo.get_run_by_id(run.id)
        else:
            raise click.ClickException(
                f"the model files of run {visible(run.name)} changed since its first results (fingerprint "
                f"{run.model_fingerprint} then, {fingerprint} now): going on would mix two models in one run; "
                f"put back the files it used ({visible(config.checkpoint or '-')}, {visible(config.clip or '-')}) "
                "or start a new run with another --run-name"
            )
    # On a terminal the runner shows a live bar; in a log file, plain lines now and then.
    progress = None if app.err.is_terminal else PlainProgress(app.err, run.name, _unfinished(app, run.id))
    outcome = execute_run(
        repo, app.store, run, detector, batch_size=config.batch_size, lease_seconds=app.settings.lease_seconds,
        max_attempts=app.settings.max_attempts, device=config.device, console=app.err, image_hook=progress,
        secrets=app.settings.secrets(), resume=shown(resume_hint(app, run.name)),  # the runner prints markup
        pipeline_depth=app.settings.pipeline_depth, torch_threads=app.settings.torch_threads,
    )
    if outcome.interrupted:
        raise SystemExit(outcome.exit_code)
    summarise(app, outcome.run.id, outcome.run.name)


def _unfinished(app: AppContext, run_id: int) -> int:
    """Images this invocation is to process: queued ones and running ones (those of a stopped process)."""
    totals = app.repo.status_totals(run_id)
    return totals.get(ImageStatus.QUEUED, 0) + totals.get(ImageStatus.RUNNING, 0)


@click.command("run")
@run_options
@click.pass_obj
def run_command(app: AppContext, **options: Any) -> None:
    """Plan a run over a dataset and execute it on this machine (embedded mode; resumable)."""
    config = detector_config(app, options)
    execute(app, options["detector"], config, run_request(options, config))


@click.command("resume")
@click.argument("run_name")
@click.option("--device", type=DEVICE, help="Override the device of the stored run configuration.")
@click.option("--batch-size", type=BATCH_SIZE, help=f"Override the batch size (1-{MAX_BATCH_SIZE}).")
@click.pass_obj
def resume_command(app: AppContext, run_name: str, device: str | None, batch_size: int | None) -> None:
    """Finish an interrupted run: images already done are not redone.

    With a broker configured, unfinished images are enqueued for the workers; otherwise they run here."""
    _continue(app, app.run(run_name), device=device, batch_size=batch_size, verb="resumed")


@click.command("retry")
@click.argument("run_name")
@click.option("--category", help="Only this category's failed images.")
@click.option("--device", type=DEVICE, help="Override the device of the stored run configuration.")
@click.option("--batch-size", type=BATCH_SIZE, help=f"Override the batch size (1-{MAX_BATCH_SIZE}).")
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
        from metrics.aggregator import finish_run_if_complete
        from scheduler.commands.common import celery_for
        from workers.dispatch import reconcile_run

        app.repo.set_run_status(run.id, RunStatus.RUNNING)
        finish_run_if_complete(app.repo, app.store, run.id)  # a run with nothing left to do is done again
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
    from workers.task import dead_local_owners

    run = app.run(run_name)
    # A process of this machine still working on the run would go on writing into a deleted run (and its
    # objects into the key space of the next run that gets this id): it is stopped first.
    executor = (run.config or {}).get("executor")
    owners = [*([executor] if executor and run.status == RunStatus.RUNNING else []), *app.repo.running_owners(run.id)]
    host = socket.gethostname()
    live = sorted({o for o in owners if o.rpartition(":")[0] == host} - set(dead_local_owners(owners)))
    if live:
        raise click.ClickException(
            f"run {visible(run.name)} is being worked on by {', '.join(live)} on this machine; stop that first "
            f"(Ctrl-C the `readar run`, or `readar cancel {visible(run.name)}` for workers), then delete it"
        )
    images = sum(app.repo.status_totals(run.id).values())
    if not yes and not click.confirm(f"delete run {visible(run.name)} ({images} images) and its stored logits?"):
        app.console.print(f"nothing deleted: run {shown(run.name)} is kept")
        return
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
    execute(app, detector, config, run_request(options, config))
    app.console.print(
        "[dim]These numbers come from generated images"
        + (" and a random-weight model" if detector == "read" else "")
        + "; they say nothing about READ's accuracy on real data.[/]"
    )


COMMANDS = (run_command, resume_command, retry_command, delete_command, demo_command)
