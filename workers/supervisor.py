"""``readar worker``: one Celery worker process per GPU (or N CPU processes), supervised.

The supervisor never imports torch or touches CUDA: each child is a fresh interpreter (fork + exec) with
``CUDA_VISIBLE_DEVICES`` set to its GPU. A child that dies is restarted; a child whose heartbeat stalls past
the hard time limit (stuck inside a task: thread pools cannot be interrupted) is killed and restarted. The
images a dead child held are given back and sent again at once, and the supervisor reconciles on a timer
(workers/recovery.py), so nothing waits for a lease or the broker's visibility timeout. SIGTERM is forwarded for a graceful shutdown:
Celery finishes the tasks in flight, and unfinished ones stay unacknowledged for another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from storage.settings import DEFAULT_PIPELINE_DEPTH
from workers.batcher import task_threads
from workers.monitoring import heartbeat_age

if TYPE_CHECKING:
    from workers.recovery import Recovery

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    name: str
    env: dict[str, str]
    command: list[str]


# A child that cannot run the detector here exits with this (workers/celery_app.py SETUP_EXIT_CODE; the
# supervisor does not import that module, which pulls in Celery).
SETUP_EXIT_CODE = 78


@dataclass
class Child:
    spec: ChildSpec
    process: subprocess.Popen
    heartbeat: Path | None
    started: float = 0.0
    restart_at: float | None = None  # set while held back after a setup failure (its process has exited)


def children_progressing(children: list[Child], *, grace: float, now: float | None = None) -> bool:
    """True when every child made progress within ``grace`` seconds (a child still starting up counts as
    progressing until ``grace`` has passed since its start)."""
    now = time.time() if now is None else now
    for child in children:
        if child.restart_at is not None:  # held back: it cannot run the detector here
            return False
        if child.heartbeat is None:
            continue
        age = heartbeat_age(child.heartbeat)
        if age == float("inf"):
            age = now - child.started
        if age > grace:
            return False
    return True


def plan_children(*, gpus: list[int] | None, processes: int, batch_size: int, queues: str, work_dir: Path,
                  metrics_port: int | None, loglevel: str, settings_env: dict[str, str] | None = None,
                  pipeline_depth: int | None = None, torch_threads: int | None = None) -> list[ChildSpec]:
    """One child per GPU (or CPU process). ``settings_env`` (Settings.child_environment) pins the supervisor's
    resolved broker, database, object store and work folder in every child, over whatever the environment says.

    Each child runs batch size × pipeline depth task threads (``workers/batcher.py task_threads``) and caps
    torch's intra-op threads at ``torch_threads``; both default to what ``settings_env`` pins, then to the
    environment, then to the depth's default and to this machine's CPUs shared among the children."""
    host = socket.gethostname()
    slots: list[tuple[str, dict[str, str]]] = []
    if gpus:
        for gpu in gpus:
            slots.append((f"gpu{gpu}", {"CUDA_VISIBLE_DEVICES": str(gpu), "READAR_DEVICE": "cuda:0"}))
    else:
        for index in range(processes):
            slots.append((f"cpu{index}", {"CUDA_VISIBLE_DEVICES": "", "READAR_DEVICE": "cpu"}))
    inherited = dict(os.environ, **(settings_env or {}))
    depth = pipeline_depth or int(inherited.get("READAR_PIPELINE_DEPTH") or DEFAULT_PIPELINE_DEPTH)
    torch_count = torch_threads or int(inherited.get("READAR_TORCH_THREADS") or
                                       torch_threads_per_process(len(slots)))
    specs = []
    for position, (label, extra) in enumerate(slots):
        env = dict(inherited, **extra, READAR_BATCH_SIZE=str(batch_size), READAR_PIPELINE_DEPTH=str(depth),
                   READAR_TORCH_THREADS=str(torch_count),
                   READAR_HEARTBEAT_FILE=str(work_dir / "heartbeats" / f"{label}-{os.getpid()}"))
        if metrics_port:
            env["READAR_METRICS_PORT"] = str(metrics_port + position)
        else:
            env.pop("READAR_METRICS_PORT", None)
        command = [sys.executable, "-m", "workers.worker_main", "--name", f"readar-{label}@{host}",
                   "--queues", queues, "--concurrency", str(task_threads(batch_size, depth)),
                   "--loglevel", loglevel]
        specs.append(ChildSpec(label, env, command))
    return specs


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_per_process(processes: int) -> int:
    """Default torch intra-op threads of one of ``processes`` worker processes on this machine: an equal share of
    its CPUs, so the processes' thread pools do not oversubscribe the cores their task threads also need."""
    return max(1, available_cpus() // max(1, processes))


def unhealthy_marker(heartbeat_file: Path) -> Path:
    """The file that says why a worker machine is unhealthy (``readar healthcheck`` reads it)."""
    return heartbeat_file.with_name(heartbeat_file.name + ".unhealthy")


def _mark_health(heartbeat_file: Path, held_back: list[str]) -> None:
    marker = unhealthy_marker(heartbeat_file)
    if held_back:
        marker.write_text(f"worker process(es) {', '.join(held_back)} cannot run the detector here; see the "
                          "worker log\n", encoding="utf-8")
    else:
        marker.unlink(missing_ok=True)


def _start(spec: ChildSpec) -> Child:
    heartbeat = Path(spec.env["READAR_HEARTBEAT_FILE"])
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    heartbeat.unlink(missing_ok=True)
    process = subprocess.Popen(spec.command, env=spec.env)
    log.warning("started worker %s (pid %d)", spec.name, process.pid)
    return Child(spec, process, heartbeat, started=time.time())


def supervise(specs: list[ChildSpec], *, hard_time_limit: int, heartbeat_file: Path | None = None,
              check_every_s: float = 2.0, recovery: Recovery | None = None, setup_retry_s: float = 60.0) -> int:
    """Run the children until SIGTERM/SIGINT; returns the exit code.

    ``heartbeat_file`` (READAR_HEARTBEAT_FILE, what ``readar healthcheck`` reads) is touched while every
    child is making progress, so a liveness probe sees the whole worker machine's state. ``recovery`` (see
    workers/recovery.py) hears of every child that died and reconciles on a timer. A child that exits with
    SETUP_EXIT_CODE (it cannot run the detector here) is started again only after ``setup_retry_s``, and
    meanwhile the machine is unhealthy: its heartbeat file is not touched.
    """
    children = [_start(spec) for spec in specs]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.restart_at is None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    grace = hard_time_limit + 60
    if heartbeat_file is not None:
        heartbeat_file.parent.mkdir(parents=True, exist_ok=True)
        heartbeat_file.touch()
    while not stopping:
        time.sleep(check_every_s)
        if heartbeat_file is not None and children_progressing(children, grace=grace):
            heartbeat_file.touch()
        for index, child in enumerate(children):
            if stopping:
                break
            if child.restart_at is not None:  # held back after a setup failure
                if time.time() >= child.restart_at:
                    children[index] = _start(child.spec)
                continue
            code = child.process.poll()
            if code is not None:
                if recovery is not None:
                    recovery.child_died(child.process.pid)
                if code == SETUP_EXIT_CODE:
                    log.error("worker %s cannot run here (see its error above): UNHEALTHY; it takes no tasks and "
                              "starts again in %.0f s", child.spec.name, setup_retry_s)
                    child.restart_at = time.time() + setup_retry_s
                    continue
                log.warning("worker %s exited with %s; restarting it", child.spec.name, code)
                children[index] = _start(child.spec)
            elif child.heartbeat is not None and heartbeat_age(child.heartbeat) > grace and \
                    child.heartbeat.exists():
                log.warning("worker %s made no progress for %d s; killing and restarting it", child.spec.name, grace)
                child.process.kill()
                child.process.wait()
                if recovery is not None:
                    recovery.child_died(child.process.pid)
                children[index] = _start(child.spec)
        if heartbeat_file is not None:
            _mark_health(heartbeat_file, [c.spec.name for c in children if c.restart_at is not None])
        if recovery is not None and not stopping:
            recovery.tick()
    for child in children:
        try:
            child.process.wait(timeout=hard_time_limit + 30)
        except subprocess.TimeoutExpired:
            child.process.kill()
    if recovery is not None:
        recovery.close()
    return 0
