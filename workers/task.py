"""The per-image task: claim the row → load the image → detect → write the logits object → commit the row.

This one function is what every execution mode runs: the embedded local executor and the Celery workers.
It is the only place where model output meets storage (DESIGN.md section 1).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from storage.jsonvalue import json_value
from storage.logits import encode_logits, full_resolution_logits, max_full_resolution_logit
from storage.models import ACTIVE_STATUSES, ImageStatus
from storage.objects import ObjectStore, ObjectStoreError, image_object_key
from storage.paths import PathEscapeError, PathMap, RootResolver, reference_folder
from storage.redact import redact_text
from storage.repository import Claim, Completion, Repository
from workers.batcher import Batcher
from workers.detectors.base import Detection, Detector, ImageSample, SetupError
from workers.groupcommit import GroupCommit, first_per_key

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What :func:`process_image` did with one delivery (strings, so logs, metrics labels and counts read them
    as they are)."""

    DONE = "done"  # the result is committed
    FAILED = "failed"  # the image is failed for good (bad input, or attempts used up)
    RETRY = "retry"  # the detector failed; the row is queued for another attempt
    TRANSIENT = "transient"  # storage, not the image, failed; the row is queued without spending an attempt
    STALE = "stale"  # a newer claim owns the row; this result was dropped
    HELD = "held"  # another live claim holds the row (or it was just given back): look again later
    NOT_CLAIMED = "not-claimed"  # the row is finished already
    REJECTED = "rejected"  # the message names an image that is not in its run: nothing was touched
    CANCELLED = "cancelled"  # the run is cancelled: the row was left as it is

    @property
    def queued_again(self) -> bool:
        """The row waits for another delivery of this image."""
        return self in (Outcome.RETRY, Outcome.TRANSIENT)


def worker_identity() -> str:
    """``host:pid`` — also how the embedded mode recognises leases of dead local processes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_owners(owners: list[str]) -> list[str]:
    """Lease owners ``host:pid`` on this host whose process no longer exists."""
    host = socket.gethostname()
    dead = []
    for owner in owners:
        owner_host, _, pid_text = owner.rpartition(":")
        if owner_host != host or not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            dead.append(owner)
        except PermissionError:
            pass
    return dead


@dataclass(frozen=True)
class RunInfo:
    """What a task needs to know about its run (read once per run and cached)."""

    run_id: int
    dataset_root: Path
    category_defects: dict[str, tuple[str, ...]]
    max_image_pixels: int | None = None  # the run's pixel budget (None: this process's)
    resolve: RootResolver = field(init=False)  # image paths under the dataset root, each directory resolved once
    train_dirs: dict[str, Path | None] = field(default_factory=dict)  # per category, looked up once

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolve", RootResolver(self.dataset_root))

    def train_dir(self, category: str) -> Path | None:
        """``train/good`` of a category; None only when there is none. A loop or a link out of the dataset root
        comes back as the folder, so that the detector refuses it with the reason instead of doing without."""
        if category not in self.train_dirs:
            self.train_dirs[category] = reference_folder(self.dataset_root, category)
        return self.train_dirs[category]


@dataclass
class WorkerContext:
    """Long-lived per-process state: storage handles, the model, the batcher."""

    repo: Repository
    store: ObjectStore
    detector: Detector
    batcher: Batcher
    owner: str = field(default_factory=worker_identity)
    lease_seconds: int = 600
    max_attempts: int = 3
    device: str = "cpu"
    # Called with (run_id, category) by the one task that wins a category's aggregation compare-and-set.
    on_category_complete: Callable[[int, str], None] | None = None
    secrets: list[str] = field(default_factory=list)
    # Longest wait for a detection (the soft time limit) once its batch runs: thread pools cannot interrupt a
    # task, so the task stops waiting, records a retryable failure and frees its slot (:func:`await_detection`).
    detect_timeout_s: float | None = None
    pipeline_depth: int = 1  # batches in flight per process: an item may queue behind depth - 1 of them
    # Stored dataset roots → where this machine mounts them (READAR_PATH_MAP).
    path_map: PathMap = field(default_factory=PathMap)
    _runs: dict[int, RunInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each step is a call (claim, complete, try_start_aggregation); concurrent tasks of this process share
        # one statement per step (workers/groupcommit.py).
        self.claim: GroupCommit[tuple[int, int], Claim | None] = GroupCommit(first_per_key(self._claim_rows))
        self.complete: GroupCommit[Completion, bool] = GroupCommit(self.repo.complete_many)
        self.try_start_aggregation: GroupCommit[tuple[int, str], bool | None] = GroupCommit(
            first_per_key(self.repo.try_start_aggregations))

    def _claim_rows(self, keys: list[tuple[int, int]]) -> list[Claim | None]:
        """Claims of ``(run id, image id)`` pairs; an image that is not in the named run is never claimed."""
        claims = self.repo.claim_many(keys, self.owner, self.lease_seconds, max_attempts=self.max_attempts)
        return [claims.get(image_id) for _, image_id in keys]

    def run_info(self, run_id: int) -> RunInfo:
        if run_id not in self._runs:
            run = self.repo.get_run_by_id(run_id)
            defects = {k: tuple(v) for k, v in run.config.get("category_defects", {}).items()}
            budget = (run.config.get("settings") or {}).get("max_image_pixels")
            self._runs[run_id] = RunInfo(run_id, self.path_map(run.dataset_root), defects, budget)
        return self._runs[run_id]


class DetectionTimeout(RuntimeError):
    """The detector did not answer within the soft time limit."""


class PermanentImageError(RuntimeError):
    """The image itself is unusable (bad file, path outside the root): retrying cannot help."""


def _load_sample(info: RunInfo, row: Any) -> ImageSample:
    from workers.images import ImageLoadError, load_rgb

    try:
        path = info.resolve(row.image_path)
        image = load_rgb(path, max_pixels=info.max_image_pixels)
    except (PathEscapeError, ImageLoadError) as exc:
        raise PermanentImageError(str(exc)) from exc
    if row.height and row.width and image.shape[:2] != (row.height, row.width):
        raise PermanentImageError(
            f"{row.image_path} is {image.shape[0]}×{image.shape[1]} now but was {row.height}×{row.width} when "
            "the run was planned; the dataset changed under the run — plan a new run"
        )
    return ImageSample(
        image=image, category=row.category, defect=row.defect,
        category_defects=info.category_defects.get(row.category, ()), train_dir=info.train_dir(row.category),
        key=row.image_path,
    )


def switch_on(value: str | None) -> bool:
    """An on/off environment switch that defaults to on: ``0``, ``off``, ``false`` or ``no`` turn it off."""
    return (value or "on").strip().lower() not in {"0", "off", "false", "no"}


# READAR_FAST_IMAGE_SCORE (read once): find the image score's top logit without building the full-resolution
# map (storage.logits.max_full_resolution_logit, the same value bit for bit); off builds the map as the metrics do.
FAST_IMAGE_SCORE = switch_on(os.environ.get("READAR_FAST_IMAGE_SCORE"))


def await_detection(future: Future, limit_s: float | None, depth: int) -> Detection:
    """The detection of a submitted item, waiting at most ``limit_s`` from when its batch starts (the batcher
    marks the future running then).

    Queueing is not the detector's time on this image: with double buffering an item normally waits for the
    batch ahead. That wait is bounded too — by ``depth`` limits (up to depth − 1 batches ahead, each of which runs
    at most the limit before its own tasks give up, plus the batcher picking the item up; with depth 1 that pick-up
    still takes a moment) — so a hung forward still frees every waiting thread. Raises TimeoutError.
    """
    if limit_s is None:
        return future.result()
    queued_until = time.monotonic() + limit_s * max(depth, 1)  # depth - 1 batches ahead, and the batcher's own pick-up
    while not future.running() and not future.done():
        remaining = queued_until - time.monotonic()
        if remaining <= 0:
            raise FutureTimeoutError
        wait([future], timeout=min(remaining, _QUEUE_POLL_S))  # returns at once when it is done
    return future.result(timeout=limit_s)


_QUEUE_POLL_S = 0.01  # a queued item notices its batch starting within this


def image_score(detection: Detection) -> float:
    """Max probability of the image's score map: the sigmoid of its top full-resolution float16 logit."""
    if FAST_IMAGE_SCORE:
        top = max_full_resolution_logit(detection.logits)
    else:
        top = float(full_resolution_logits(detection.logits).max())
    return 1.0 / (1.0 + math.exp(-top)) if top > -700 else 0.0


def process_image(ctx: WorkerContext, run_id: int, image_id: int) -> Outcome:
    """Run one image end to end and say what happened (:class:`Outcome`).

    Transient errors (object store) leave the row queued for another attempt; permanent input errors fail it
    at once; other detector errors are retried until ``max_attempts`` and then quarantined.
    """
    claim = ctx.claim((run_id, image_id))
    if claim is None:
        try:
            current = ctx.repo.image(image_id)
        except LookupError:
            current = None
        if current is None or current.run_id != run_id:
            log.error("dropped a message for image %d of run %d: %s", image_id, run_id,
                      "no such image" if current is None else f"that image belongs to run {current.run_id}")
            return Outcome.REJECTED
        if current.status in ACTIVE_STATUSES:
            # running: another claim holds a live lease (a duplicate delivery, or a redelivery that arrived
            # before the dead owner's lease ran out). queued: the row was running when the claim looked and has
            # been given back since (another attempt's failure committed in between). Either way this message
            # may be the image's only one: the caller retries it later instead of dropping it.
            return Outcome.HELD
        _maybe_aggregate(ctx, run_id, current.category)  # a quarantine may have completed the category
        return Outcome.NOT_CLAIMED
    row = claim  # the claim carries the row's category, defect, paths and size
    info = ctx.run_info(run_id)
    timings: dict[str, float] = {}
    try:
        with ctx.batcher.reservation():  # the batcher waits for this image while it is being prepared
            started = time.perf_counter()
            sample = _load_sample(info, row)
            timings["load_ms"] = (time.perf_counter() - started) * 1e3
            started = time.perf_counter()
            prepared = ctx.detector.prepare(sample)
            timings["prepare_ms"] = (time.perf_counter() - started) * 1e3
            future = ctx.batcher.submit(prepared)
        started = time.perf_counter()
        try:
            detection = await_detection(future, ctx.detect_timeout_s, ctx.pipeline_depth)
        except FutureTimeoutError:
            raise DetectionTimeout(
                f"the detector took longer than the soft time limit ({ctx.detect_timeout_s:.0f} s) on "
                f"{row.image_path}"
            ) from None
        timings["detect_ms"] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        score = image_score(detection)
        key = image_object_key(run_id, image_id)
        ctx.store.put(key, encode_logits(detection.logits))
        timings["store_ms"] = (time.perf_counter() - started) * 1e3
    except PermanentImageError as exc:
        return _record_failure(ctx, claim, run_id, row.category, str(exc), permanent=True)
    except ObjectStoreError as exc:
        # The store, not the image, failed (full disk, unreachable server): give the image back without
        # spending an attempt; the caller retries after a pause.
        log.warning("object store error on %s: %s", row.image_path, exc)
        ctx.repo.release(claim, error=redact_text(f"retrying: {exc}", ctx.secrets))
        return Outcome.TRANSIENT
    except SetupError as exc:
        # The machine, not the image, cannot run the detector (weights missing, no GPU): give the image back
        # untouched; the caller stops (embedded run) or the worker stops taking tasks until the setup is fixed.
        ctx.repo.release(claim, error=redact_text(f"waiting for a working setup: {exc}", ctx.secrets))
        raise
    except Exception as exc:  # noqa: BLE001 - any detector failure is recorded against this image
        log.exception("detector failed on %s", row.image_path)
        return _record_failure(ctx, claim, run_id, row.category, f"{type(exc).__name__}: {exc}", permanent=False)
    committed = ctx.complete(Completion(
        claim, object_key=key, image_score=score, diagnostics=json_value(detection.diagnostics),
        timings=timings, device=ctx.device,
    ))
    if not committed:
        log.info("stale result for %s dropped: a newer claim owns the row", row.image_path)
        return Outcome.STALE
    _maybe_aggregate(ctx, run_id, row.category)
    return Outcome.DONE


def _record_failure(ctx: WorkerContext, claim: Claim, run_id: int, category: str, error: str, *, permanent: bool
                    ) -> Outcome:
    error = redact_text(error, ctx.secrets)
    status = ctx.repo.fail(claim, error, max_attempts=ctx.max_attempts, permanent=permanent)
    if status == ImageStatus.FAILED:
        log.warning("image %d failed: %s", claim.image_id, error)
        _maybe_aggregate(ctx, run_id, category)
        return Outcome.FAILED
    return Outcome.RETRY if status == ImageStatus.QUEUED else Outcome.STALE


def _maybe_aggregate(ctx: WorkerContext, run_id: int, category: str) -> None:
    if ctx.on_category_complete is not None and ctx.try_start_aggregation((run_id, category)):
        ctx.on_category_complete(run_id, category)
