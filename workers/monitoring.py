"""Worker monitoring: Prometheus metrics and a heartbeat file for liveness probes based on progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

IMAGES = Counter("readar_images_total", "Images finished by this worker, by outcome.", ["outcome"])
BATCH_SIZE = Histogram("readar_batch_size", "Images per batched forward.", buckets=(1, 2, 4, 8, 16, 32, 64))
MODEL_SECONDS = Histogram("readar_model_seconds_per_image", "Batched forward time divided by batch size.")
QUEUE_WAIT = Histogram("readar_queue_wait_seconds", "Time from enqueue to the start of processing.",
                       buckets=(0.01, 0.1, 1, 10, 60, 300, 1800, 7200))


def record_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    MODEL_SECONDS.observe(seconds / max(size, 1))


def start_metrics_server(port: int | None, host: str = "127.0.0.1") -> Any:
    """Serve the Prometheus metrics on ``host:port`` (loopback unless told otherwise); None when off."""
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server


class Heartbeat:
    """Touches a file on progress. While no task is in flight it also touches it every ``interval`` seconds,
    so an idle worker stays healthy and only a worker stuck inside a task goes stale."""

    def __init__(self, path: Path | None, interval: float = 30.0) -> None:
        self.path = path
        self.interval = interval
        self._in_flight = 0
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.beat()
            threading.Thread(target=self._idle_loop, name="readar-heartbeat", daemon=True).start()

    def beat(self) -> None:
        if self.path is not None:
            self.path.touch()

    def task_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def task_finished(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.beat()

    def _idle_loop(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                idle = self._in_flight == 0
            if idle:
                self.beat()


def heartbeat_age(path: Path) -> float:
    """Seconds since the heartbeat file was last touched (inf when missing)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
