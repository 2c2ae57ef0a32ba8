"""Process-wide worker state: storage handles and one model per detector configuration, loaded once.

A Celery worker process serves tasks of any run; the detector a run needs (name + configuration stored with
the run, with this worker's device and batch size) is built on first use and then reused.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from storage.database import Database
from storage.objects import ObjectStore
from storage.paths import PathMap
from storage.repository import Repository
from storage.settings import Settings  # a leaf module: pydantic + storage.redact only
from workers.batcher import Batcher
from workers.detectors.base import DetectorConfig, build_detector
from workers.monitoring import record_batch
from workers.supervisor import torch_threads_per_process
from workers.task import WorkerContext

log = logging.getLogger(__name__)


def import_plugins(spec: str) -> None:
    """Import the comma-separated plug-in modules (they register detectors on import)."""
    for module in (m.strip() for m in spec.split(",")):
        if module:
            importlib.import_module(module)


def set_torch_threads(requested: int | None, *, processes: int = 1) -> int | None:
    """Cap torch's intra-op threads in this process, once, before its first model runs: left alone, every
    worker process on a machine starts one per core, and they compete with each other and with the task threads
    for the CPUs. The cap is ``requested`` (READAR_TORCH_THREADS), else an equal share of the machine's CPUs;
    it only ever lowers torch's own default (one per core, or OMP_NUM_THREADS), so a single process such as
    ``readar run`` keeps exactly what it had. Returns the count, or None when torch is not installed.

    Only the thread count changes, never what is computed; on the CPU a reduction split over fewer threads may
    round differently in the last bit, as it does between two machines with different core counts."""
    torch = sys.modules.get("torch")
    if torch is None:
        if importlib.util.find_spec("torch") is None:
            return None
        torch = importlib.import_module("torch")
    count = min(requested or torch_threads_per_process(processes), torch.get_num_threads())
    torch.set_num_threads(count)
    log.info("torch uses %d intra-op thread(s) in this process", count)
    return count


def detector_config_from_run(stored: dict[str, Any], *, device: str | None = None,
                             batch_size: int | None = None) -> DetectorConfig:
    """Rebuild a run's DetectorConfig from its stored public form, with this worker's device and batch size."""
    extra = {k.removeprefix("extra."): v for k, v in stored.items() if k.startswith("extra.")}
    return DetectorConfig(
        checkpoint=Path(stored["checkpoint"]) if stored.get("checkpoint") else None,
        clip=Path(stored["clip"]) if stored.get("clip") else None,
        device=device or stored["device"], dtype=stored.get("dtype"), prompt_mode=stored["prompt_mode"],
        prompt_template=stored.get("prompt_template"), decode_mode=stored["decode_mode"],
        conversation=stored["conversation"], batch_size=batch_size or stored["batch_size"], extra=extra,
    )


class WorkerRuntime:
    """Everything a worker process keeps between tasks."""

    def __init__(self, settings: Settings, *, on_category_complete: Callable[[int, str], None] | None = None,
                 device: str | None = None, batch_size: int | None = None) -> None:
        self.settings = settings
        self.device = device or settings.device
        self.batch_size = batch_size or settings.batch_size
        self.on_category_complete = on_category_complete
        self.path_map = PathMap(settings.path_map)
        self.torch_threads: int | None = None  # set with the first detector (torch is imported with it)
        self._torch_capped = False
        import_plugins(settings.plugins)
        self.database = Database(settings.resolved_database_url,
                                 tls_ca_file=str(settings.database_tls_ca_file) if settings.database_tls_ca_file else None)
        self.database.migrate()
        self.repo = Repository(self.database)
        self.store = ObjectStore(settings.resolved_object_store_url, settings.storage_options())
        self._contexts: dict[str, WorkerContext] = {}
        self._runs: dict[int, str] = {}
        self._status: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def context_for_run(self, run_id: int) -> WorkerContext:
        """The context (model + batcher) serving this run; built once per detector configuration."""
        with self._lock:
            key = self._runs.get(run_id)
            if key is None:
                run = self.repo.get_run_by_id(run_id)
                config = detector_config_from_run(run.config["detector_config"], device=self.device,
                                                  batch_size=self.batch_size)
                if self.path_map:  # the checkpoint and CLIP folders at this machine's mount points
                    config = dataclasses.replace(
                        config, checkpoint=self.path_map(config.checkpoint) if config.checkpoint else None,
                        clip=self.path_map(config.clip) if config.clip else None)
                key = json.dumps({"detector": run.detector, **config.public()}, sort_keys=True)
                if key not in self._contexts:  # the run is remembered only once its context exists (below)
                    self._cap_torch_threads()
                    detector = build_detector(run.detector, config)
                    detector.preflight()  # a broken setup stops the worker before it claims an image
                    self._contexts[key] = WorkerContext(
                        repo=self.repo, store=self.store, detector=detector,
                        batcher=Batcher(detector.detect, max_batch=config.batch_size, on_batch=record_batch),
                        lease_seconds=self.settings.lease_seconds, max_attempts=self.settings.max_attempts,
                        device=config.device, on_category_complete=self.on_category_complete,
                        # The soft limit counts from when an item's batch starts; with pipeline depth d
                        # (READAR_PIPELINE_DEPTH) it may first queue behind up to d - 1 batches, each bounded the
                        # same way (workers/task.py await_detection). A task that gives up still frees its thread,
                        # and its item still runs: the batcher cannot take back a queued item.
                        secrets=self.settings.secrets(), detect_timeout_s=float(self.settings.soft_time_limit),
                        pipeline_depth=self.settings.pipeline_depth,
                        path_map=self.path_map,
                    )
                # Not before: a build that raised must be tried again by the next task, not leave a key
                # without a context (every later task of the run failed with KeyError, and the run stalled).
                self._runs[run_id] = key
            return self._contexts[key]

    def _cap_torch_threads(self) -> None:
        """Once per process, before its first model is built (at worker start for the runs in progress): the
        supervisor pins each child's share in READAR_TORCH_THREADS (workers/supervisor.py plan_children). Not in
        ``__init__``: a runtime that builds no detector (aggregation, tests) need not import torch."""
        if not self._torch_capped:
            self._torch_capped = True
            self.torch_threads = set_torch_threads(self.settings.torch_threads)

    def run_status(self, run_id: int, *, max_age_s: float = 5.0) -> str:
        """The run's status, re-read at most every ``max_age_s`` (cancellation reaches workers within that)."""
        now = time.monotonic()
        cached = self._status.get(run_id)
        if cached is None or now - cached[1] > max_age_s:
            cached = (self.repo.get_run_by_id(run_id).status, now)
            self._status[run_id] = cached
        return cached[0]

    def close(self) -> None:
        for context in self._contexts.values():
            context.batcher.close()
        self.database.dispose()
