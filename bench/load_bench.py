"""Load under faults: N queued images, four worker processes, one of them SIGKILLed every minute.

The detector is ``noop`` (a constant map), so the figures are READAR's own delivery machinery under churn:
claim, image read, batcher, logit object write, fenced commit, completion check, Celery and Redis, with
messages of killed processes redelivered after the visibility timeout.

    python bench/load_bench.py                              # 100,000 images, 10 minutes, a kill per minute
    python bench/load_bench.py --images 5000 --minutes 2    # the reduced run recorded in docs/RELIABILITY.md
    python bench/load_bench.py --images 5000 --minutes 3 --kill-every 20 --default-limits   # unattended recovery
    python bench/load_bench.py --images 5000 --minutes 3 --kill-every 20 --default-limits --broker rabbitmq

After the timed part the kills stop and the run drains (reconciling now and then). Then it counts lost and
duplicated images: every image must have exactly one row, in a terminal state, and done rows exactly one
object at their own key; no row may be left running. Needs PostgreSQL on 127.0.0.1 (a temporary database is
created and dropped) and redis-server on PATH (a private instance on a free port), or with ``--broker rabbitmq``
the local RabbitMQ (a temporary virtual host, made and removed with rabbitmqctl).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from queue_bench import _free_port, make_dataset  # noqa: E402 - the same tiny hard-linked dataset

# Short limits, so that the messages of killed workers come back within seconds; the visibility timeout stays
# above a category's aggregation time (1,000 images a category), or Redis would hand running aggregations out
# again (a 6 s timeout with 10,000-image categories did: aggregations piled up on every worker).
TIMINGS = {"READAR_SOFT_TIME_LIMIT": "8", "READAR_HARD_TIME_LIMIT": "10", "READAR_LEASE_SECONDS": "15",
           "READAR_VISIBILITY_TIMEOUT": "20"}


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


class Broker:
    """A private redis-server on a free port, or a temporary virtual host on the local RabbitMQ."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "redis":
            self.port = _free_port()
            self.process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{self.port}/0"
            time.sleep(0.5)
        else:
            self.vhost = f"readar_load_{uuid.uuid4().hex[:8]}"
            self._ctl("add_vhost", self.vhost)
            self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
            self.url = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    @staticmethod
    def _ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)

    def memory(self) -> int:
        """Redis's used_memory in bytes (0 for RabbitMQ, whose memory is not the bench's to read)."""
        return int(redis.Redis(port=self.port).info("memory")["used_memory"]) if self.kind == "redis" else 0

    def close(self) -> None:
        if self.kind == "redis":
            self.process.terminate()
            self.process.wait()
        else:
            self._ctl("delete_vhost", self.vhost)


def _counts(repo, run_id: int) -> dict[str, int]:  # noqa: ANN001
    return repo.status_totals(run_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="timed part, with kills")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between SIGKILLs of a worker")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--drain-minutes", type=float, default=30.0, help="longest wait for the rest after the timed part")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default-limits", action="store_true",
                        help="keep READAR's default lease and visibility timeout (20 and 25 minutes) and let the "
                        "workers recover by themselves: the bench never reconciles")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis",
                        help="a private redis-server, or a temporary virtual host on the local RabbitMQ")
    args = parser.parse_args()
    timings = {} if args.default_limits else TIMINGS

    from scheduler.planner import RunRequest, plan_run
    from storage.database import Database
    from storage.objects import ObjectStore, image_object_key
    from storage.redact import redact_url
    from storage.repository import Repository
    from storage.settings import Settings
    from workers.celery_app import make_app
    from workers.detectors.base import DetectorConfig
    from workers.dispatch import enqueue_images, reconcile_run

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="readar-load-bench-"))
    database = f"readar_load_{uuid.uuid4().hex[:8]}"
    broker = Broker(args.broker)
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    database_url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    env = {**os.environ, **timings, "READAR_BROKER_URL": broker.url,
           "READAR_DATABASE_URL": database_url, "READAR_OBJECT_STORE_URL": str(tmp / "objects"),
           "READAR_WORK_DIR": str(tmp / "work"), "READAR_MAX_ATTEMPTS": "5"}
    workers: subprocess.Popen | None = None
    log = open(tmp / "workers.log", "wb")  # noqa: SIM115 - closed at the end
    figures: list[tuple[str, str, str]] = []
    try:
        make_dataset(tmp / "data", args.images, args.categories)
        settings = Settings(broker_url=env["READAR_BROKER_URL"], database_url=database_url,
                            object_store_url=env["READAR_OBJECT_STORE_URL"], work_dir=tmp / "work",
                            **{k.removeprefix("READAR_").lower(): int(v) for k, v in timings.items()})
        db = Database(database_url)
        db.migrate()
        repo = Repository(db)
        celery = make_app(settings)
        request = RunRequest(mvtec_root=tmp / "data", detector="noop",
                             detector_config=DetectorConfig(prompt_mode="generic", batch_size=args.batch_size).public(),
                             run_name="load-bench")
        run, planned = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False,
                                settings_public=settings.public())
        repo.set_run_status(run.id, "running")  # as `readar submit` does
        sent = enqueue_images(celery, repo, run.id, visibility_timeout=settings.visibility_timeout)
        figures.append(("queued", f"{sent}", f"{planned} rows, {args.categories} categories"))
        peak_memory = broker.memory()

        workers = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "worker", "--device", "cpu", "--processes", str(args.workers),
             "--batch-size", str(args.batch_size)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        started = time.monotonic()
        end = started + 60 * args.minutes
        next_kill = started + args.kill_every
        kills = 0
        waiting: list[tuple[float, str]] = []  # (kill time, owner) of killed processes still holding images
        recoveries: list[float] = []  # seconds from a kill until no image is held by the dead process
        host = socket.gethostname()
        while time.monotonic() < end:
            time.sleep(1.0)
            peak_memory = max(peak_memory, broker.memory())
            if time.monotonic() >= next_kill:
                children = _children(workers.pid)
                if children:
                    victim = rng.choice(children)
                    os.kill(victim, signal.SIGKILL)
                    waiting.append((time.monotonic(), f"{host}:{victim}"))
                    kills += 1
                next_kill += args.kill_every
            if waiting:
                held = set(repo.running_owners(run.id))
                recoveries += [time.monotonic() - at for at, owner in waiting if owner not in held]
                waiting = [(at, owner) for at, owner in waiting if owner in held]
            counts = _counts(repo, run.id)
            if counts.get("queued", 0) + counts.get("running", 0) == 0:
                break
        timed = time.monotonic() - started
        done_in_time = _counts(repo, run.id).get("done", 0)
        print(f"timed part over after {timed:.0f} s: {done_in_time} done, {kills} kill(s); draining",
              file=sys.stderr)

        drain_end = time.monotonic() + 60 * args.drain_minutes
        last_reconcile = time.monotonic()
        while time.monotonic() < drain_end:
            counts = _counts(repo, run.id)
            if counts.get("queued", 0) + counts.get("running", 0) == 0:
                break
            if not args.default_limits and time.monotonic() - last_reconcile > 15:
                reconcile_run(celery, repo, run.id, visibility_timeout=settings.visibility_timeout,
                              stale_aggregation_s=settings.visibility_timeout)
                last_reconcile = time.monotonic()
            peak_memory = max(peak_memory, broker.memory())
            time.sleep(1.0)
        drained = time.monotonic() - started

        with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
            first, last, p50, p99 = connection.execute(
                "SELECT min(finished_at), max(finished_at), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) "
                "FROM images WHERE run_id = %s AND status = 'done'", (run.id,)).fetchone()
            duplicates = connection.execute(
                "SELECT count(*) FROM (SELECT image_path FROM images WHERE run_id = %s GROUP BY image_path "
                "HAVING count(*) > 1) d", (run.id,)).fetchone()[0]
            statuses = dict(connection.execute(
                "SELECT status, count(*) FROM images WHERE run_id = %s GROUP BY status", (run.id,)).fetchall())
            redelivered = connection.execute(
                "SELECT count(*) FROM images WHERE run_id = %s AND attempts > 1", (run.id,)).fetchone()[0]
            db_size = connection.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            done_ids = [r[0] for r in connection.execute(
                "SELECT id FROM images WHERE run_id = %s AND status = 'done'", (run.id,))]
        store = ObjectStore(str(tmp / "objects"))
        objects = set(store.list(f"runs/{run.id}/images"))
        expected_objects = {image_object_key(run.id, i) for i in done_ids}
        rows_total = sum(statuses.values())
        not_terminal = sum(n for s, n in statuses.items() if s not in ("done", "failed", "skipped"))
        lost = (args.images // args.categories * args.categories - rows_total) + not_terminal + \
            len(expected_objects - objects)
        duplicated = duplicates + len(objects - expected_objects)
        span = (last - first).total_seconds() if first and last else float("nan")
        rate = len(done_ids) / span if span else float("nan")
        figures += [
            ("timed part", f"{timed:.0f} s", f"{args.workers} worker processes, batch {args.batch_size}, "
             f"{kills} SIGKILL(s) every {args.kill_every:.0f} s"),
            ("done within the timed part", f"{done_in_time}", ""),
            ("drained after", f"{drained:.0f} s", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))),
            ("throughput", f"{rate:.0f} images/s", "first to last finished image"),
            ("task latency p50 / p99", f"{1000 * p50:.0f} / {1000 * p99:.0f} ms", "finished_at − started_at (claim → "
             "commit)"),
            ("redelivered images", f"{redelivered}", "attempts > 1 (held by a killed process)"),
            ("time to recover (median / max)",
             f"{statistics.median(recoveries):.0f} / {max(recoveries):.0f} s" if recoveries else "—",
             f"kill until no image is held by the dead process ({len(recoveries)} of {kills} kills, 1 s polls; "
             + ("default limits, no reconcile by the bench" if args.default_limits else "short limits") + ")"),
            *([("Redis used_memory (peak / end)", f"{peak_memory / 2**20:.1f} / "
                f"{broker.memory() / 2**20:.1f} MiB", "INFO memory")] if args.broker == "redis" else []),
            ("broker", redact_url(broker.url), ""),
            ("database size", f"{db_size / 2**20:.1f} MiB", "pg_database_size"),
            ("lost images", f"{lost}", "must be 0 (missing row, row not terminal, or done without object)"),
            ("duplicated images", f"{duplicated}", "must be 0 (two rows, or an object without a done row)"),
        ]
    finally:
        if workers is not None and workers.poll() is None:
            for pid in _children(workers.pid):
                os.kill(pid, signal.SIGKILL)
            workers.kill()
            workers.wait()
        log.close()
        broker.close()
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(f[0]) for f in figures)
    print(f"load bench: {args.images} images, {platform.node()}, {os.cpu_count()} cores")
    for name, value, note in figures:
        print(f"  {name:<{width}}  {value:>16}  {note}")
    return 0 if all(f[1] == "0" for f in figures if f[0] in ("lost images", "duplicated images")) else 1


if __name__ == "__main__":
    sys.exit(main())
