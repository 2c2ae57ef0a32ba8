"""The embedded executor: runs every pending image of a run on this machine, no servers needed.

It uses the same per-image task function as the Celery workers, through a thread pool of batch size × pipeline
depth threads (``workers/batcher.py task_threads``), so concurrently processed images share batched forwards and
the next batch is prepared while one runs. Because SQL holds all state, an
interrupted run (Ctrl-C, kill -9) resumes where it stopped: finished images are never redone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from metrics.aggregator import LostResultsError, aggregate_category, finish_run_if_complete
from metrics.output import shown
from storage.models import ImageStatus, Run, RunStatus
from storage.objects import ObjectStore
from storage.repository import Repository
from storage.settings import DEFAULT_PIPELINE_DEPTH
from workers.batcher import Batcher, task_threads
from workers.detectors.base import Detector, SetupError
from workers.runtime import set_torch_threads
from workers.task import Outcome, WorkerContext, dead_local_owners, process_image, worker_identity

log = logging.getLogger(__name__)


# Pauses between passes that made no progress (every image hit a storage outage); then the run stops.
STALL_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)


class StorageUnavailable(RuntimeError):
    """Every remaining image keeps failing on storage; the run stops and can be resumed later."""


def _last_error(repo: Repository, run_id: int) -> str:
    errors = [row.error for row in repo.images(run_id, status=ImageStatus.QUEUED) if row.error]
    return errors[-1] if errors else "images could not be processed"


@dataclass
class RunOutcome:
    run: Run
    processed: dict[str, int]
    interrupted: bool = False
    exit_code: int = 0  # 130 after Ctrl-C, 1 when storage kept failing


def execute_run(
    repo: Repository, store: ObjectStore, run: Run, detector: Detector, *, batch_size: int, lease_seconds: int,
    max_attempts: int, device: str, console: Console | None = None, secrets: list[str] | None = None,
    image_hook: Callable[[int, str], None] | None = None, resume: str | None = None,
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH, torch_threads: int | None = None,
) -> RunOutcome:
    """Process every pending image, aggregating each category as it completes. ``resume``: the command that
    continues this run, shown when it stops early (default ``readar resume <name>``). ``pipeline_depth`` and
    ``torch_threads``: READAR_PIPELINE_DEPTH and READAR_TORCH_THREADS (unset: every CPU, the only process)."""
    set_torch_threads(torch_threads)  # before the first forward; the model loads lazily on it
    console = console or Console(stderr=True)
    resume = resume or f"readar resume {run.name}"
    released = repo.release_expired_or_orphaned(run.id, dead_local_owners(repo.running_owners(run.id)))
    if released:
        console.print(f"[yellow]resuming: {released} image(s) left running by a stopped process are queued again")
    if not repo.running_owners(run.id):  # no live process holds this run: a half-done aggregation is due again
        repo.reset_stale_aggregations(run.id)
    repo.set_run_status(run.id, RunStatus.RUNNING)
    repo.set_run_executor(run.id, worker_identity())  # `readar status` shows the run interrupted once we are gone
    lock = threading.Lock()

    def aggregate(run_id: int, category: str) -> None:
        with lock:  # one aggregation at a time keeps memory flat
            try:
                aggregate_category(repo, store, run_id, category)
            except LostResultsError as exc:  # those images are queued again; this run computes them below
                console.print(f"[yellow]{shown(exc)}")

    batcher = Batcher(detector.detect, max_batch=batch_size)
    ctx = WorkerContext(
        repo=repo, store=store, detector=detector, batcher=batcher, lease_seconds=lease_seconds,
        max_attempts=max_attempts, device=device, on_category_complete=aggregate, secrets=secrets or [],
    )
    outcomes: dict[str, int] = {}
    interrupted = False
    exit_code = 130
    stop = threading.Event()

    def task(image_id: int) -> Outcome:
        if stop.is_set():  # a setup error stopped the run: the row is left as it is
            return Outcome.CANCELLED
        try:
            outcome = process_image(ctx, run.id, image_id)
        except SetupError:
            stop.set()  # the setup, not the images, is broken: start no more of them
            raise
        if image_hook is not None:
            image_hook(image_id, outcome)
        return outcome

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
            pending = repo.pending_image_ids(run.id)
            bar = progress.add_task(f"run {run.name}", total=len(pending))
            stalled_passes = 0
            threads = task_threads(batch_size, pipeline_depth)
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="readar-task") as pool:
                while pending and not stop.is_set():
                    futures = [pool.submit(task, image_id) for image_id in pending]
                    finished_this_pass = 0
                    try:
                        for future in as_completed(futures):
                            outcome = future.result()
                            outcomes[outcome] = outcomes.get(outcome, 0) + 1
                            if not outcome.queued_again:
                                progress.advance(bar)
                                finished_this_pass += 1
                    except KeyboardInterrupt:
                        stop.set()
                        for future in futures:
                            future.cancel()
                        raise
                    pending = repo.pending_image_ids(run.id)  # retries, leases that expired meanwhile
                    stalled_passes = 0 if finished_this_pass else stalled_passes + 1
                    if pending and stalled_passes:
                        if stalled_passes > len(STALL_BACKOFF_S):
                            raise StorageUnavailable(_last_error(repo, run.id))
                        time.sleep(STALL_BACKOFF_S[stalled_passes - 1])  # storage outage: wait, then retry
    except KeyboardInterrupt:
        interrupted = True
        console.print(f"[yellow]interrupted; finished images are kept. Resume with: {resume}")
    except SetupError as exc:
        interrupted, exit_code = True, 1
        console.print(f"[red]{shown(exc)}[/]\nNo image was charged for this. Fix it, then run: {resume}")
    except StorageUnavailable as exc:
        interrupted, exit_code = True, 1
        console.print(f"[red]no progress after repeated retries: {shown(exc)}\nFinished images are kept; fix the cause "
                      f"(e.g. free disk space, bring the object store back) and run: {resume}")
    finally:
        batcher.close()
        repo.set_run_executor(run.id, None)
    if interrupted:
        repo.set_run_status(run.id, RunStatus.INTERRUPTED)
        return RunOutcome(run, outcomes, interrupted=True, exit_code=exit_code)
    # Categories that completed before this invocation (or whose aggregator died) are aggregated here.
    for record in repo.categories(run.id):
        if repo.try_start_aggregation(run.id, record.category, stale_after_s=0):
            aggregate(run.id, record.category)
    if repo.pending_image_ids(run.id):  # results found lost while aggregating: compute those images again
        again = execute_run(repo, store, run, detector, batch_size=batch_size, lease_seconds=lease_seconds,
                            max_attempts=max_attempts, device=device, console=console, secrets=secrets,
                            image_hook=image_hook, resume=resume, pipeline_depth=pipeline_depth,
                            torch_threads=torch_threads)
        for outcome, count in outcomes.items():
            again.processed[outcome] = again.processed.get(outcome, 0) + count
        return again
    finish_run_if_complete(repo, store, run.id)  # done unless another process holds images or it was cancelled
    return RunOutcome(repo.get_run_by_id(run.id), outcomes)
