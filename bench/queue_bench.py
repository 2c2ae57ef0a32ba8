"""Queue throughput: submit N images through Redis + PostgreSQL, then process M of them with worker processes.

The detector is ``noop`` (a constant map), so the figures are READAR's own per-task overhead: claim, image
read, batcher, logit object write, fenced commit, completion check — plus Celery and Redis.

    python bench/queue_bench.py                      # 100,000 submitted, 20,000 processed by 2 processes
    python bench/queue_bench.py --images 20000 --process 5000

Needs PostgreSQL on 127.0.0.1 (a temporary database is created and dropped) and redis-server on PATH (a
private instance is started on a free port). Prints a table of figures against the targets.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import redis
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_dataset(root: Path, images: int, categories: int) -> None:
    """``images`` tiny test images as hard links of one PNG per category (fast to create, real files to index;
    one source per category keeps below the file system's link limit)."""
    root.mkdir(parents=True, exist_ok=True)
    per_category = images // categories
    for category in range(categories):
        source = root / f"source-{category}.png"
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(source)
        folder = root / f"cat{category:02d}" / "test" / "good"
        folder.mkdir(parents=True)
        for index in range(per_category):
            os.link(source, folder / f"{index:06d}.png")
        source.unlink()


def cpu_seconds_by_program() -> dict[str, float]:
    """CPU time (user + system) of every process on this machine, summed by program: the worker processes,
    PostgreSQL and Redis share the cores, so the cost of one image is all of theirs (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        name = Path(command[0].decode(errors="replace")).name if command and command[0] else "kernel"
        if command[0].startswith(b"postgres"):
            name = "postgres"
        elif b"workers.worker_main" in command or b"worker" in command[2:4]:
            name = "worker processes"
        elif name.startswith("redis-server"):
            name = "redis-server"
        elif b"queue_bench.py" in b" ".join(command):
            name = "benchmark (polling)"
        else:
            name = "other"
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--process", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    from scheduler.dataset import index_dataset
    from scheduler.planner import RunRequest, plan_run
    from storage.database import Database
    from storage.repository import Repository
    from storage.settings import Settings
    from workers.celery_app import make_app
    from workers.detectors.base import DetectorConfig
    from workers.dispatch import enqueue_images

    tmp = Path(tempfile.mkdtemp(prefix="readar-queue-bench-"))
    database = f"readar_bench_{uuid.uuid4().hex[:8]}"
    port = _free_port()
    redis_process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)
    workers = None
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    database_url = args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"
    env = {**os.environ, "READAR_BROKER_URL": f"redis://127.0.0.1:{port}/0", "READAR_DATABASE_URL": database_url,
           "READAR_OBJECT_STORE_URL": str(tmp / "objects"), "READAR_WORK_DIR": str(tmp / "work")}
    figures: list[tuple[str, str, str]] = []
    try:
        time.sleep(0.5)
        started = time.perf_counter()
        make_dataset(tmp / "data", args.images, args.categories)
        print(f"dataset of {args.images} images written in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        settings = Settings(broker_url=env["READAR_BROKER_URL"], database_url=database_url,
                            object_store_url=env["READAR_OBJECT_STORE_URL"], work_dir=tmp / "work")
        db = Database(database_url)
        db.migrate()
        repo = Repository(db)
        celery = make_app(settings)
        config = DetectorConfig(prompt_mode="generic", batch_size=args.batch_size)
        request = RunRequest(mvtec_root=tmp / "data", detector="noop", detector_config=config.public(),
                             run_name="queue-bench")

        t0 = time.perf_counter()
        index_dataset(tmp / "data")  # timed separately: plan_run indexes again below
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        run, new_rows = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False,
                                 settings_public=settings.public())
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        sent = enqueue_images(celery, repo, run.id, visibility_timeout=settings.visibility_timeout)
        t_enqueue = time.perf_counter() - t0
        submit = t_plan + t_enqueue
        figures += [
            ("submit: index the dataset", f"{t_index:.1f} s", ""),
            ("submit: plan (index + insert rows)", f"{t_plan:.1f} s", f"{new_rows} rows"),
            ("submit: enqueue", f"{t_enqueue:.1f} s", f"{sent} tasks, {1e6 * t_enqueue / max(sent, 1):.0f} µs/task"),
            ("submit total (plan + enqueue)", f"{submit:.1f} s", f"target ≤ 30 s for 100,000: "
             f"{'met' if submit <= 30 * args.images / 100_000 else 'missed'}"),
        ]

        workers = subprocess.Popen(
            [sys.executable, "-m", "scheduler", "worker", "--device", "cpu", "--processes", str(args.workers),
             "--batch-size", str(args.batch_size)], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
            stderr=open(tmp / "workers.log", "wb"),  # noqa: SIM115 - lives as long as the workers
        )
        from sqlalchemy import text

        def done_count() -> int:  # a cheap count, polled once a second: the poll's own cost stays negligible
            with db.engine.connect() as connection:
                return int(connection.execute(text(
                    "SELECT count(*) FROM images WHERE run_id = :run AND status = 'done'"), {"run": run.id}).scalar())

        first_done: float | None = None
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            done = done_count()
            if done and first_done is None:
                first_done, first_count = time.perf_counter(), done
                cpu_before = cpu_seconds_by_program()
            if done >= args.process:
                break
            time.sleep(1.0)
        elapsed = time.perf_counter() - first_done
        cpu_after = cpu_seconds_by_program()
        # The rate from the rows' own finish times: independent of when this loop happened to look.
        with db.engine.connect() as connection:
            count, first, last = connection.execute(text(
                "SELECT count(*), min(finished_at), max(finished_at) FROM images WHERE run_id = :run "
                "AND status = 'done'"), {"run": run.id}).one()
        span = (last - first).total_seconds()
        rate = (count - 1) / span
        figures += [
            (f"process {count} images, {args.workers} worker processes", f"{span:.1f} s",
             "first to last finish time of the done rows"),
            ("throughput", f"{rate:.0f} images/s", f"target ≥ 300: {'met' if rate >= 300 else 'missed'}"),
            ("per-task overhead", f"{1000 * args.workers / rate:.2f} ms", "per worker process (wall / image)"),
        ]
        images_timed = max(done - first_count, 1)
        cpu_total = 0.0
        for program in sorted(cpu_after, key=lambda k: -(cpu_after[k] - cpu_before.get(k, 0.0))):
            used = cpu_after[program] - cpu_before.get(program, 0.0)
            if used >= 0.005 * elapsed:
                cpu_total += used
                figures.append((f"CPU: {program}", f"{1000 * used / images_timed:.2f} ms/image",
                                f"{100 * used / elapsed:.0f} % of one core"))
        figures.append(("CPU: all processes", f"{1000 * cpu_total / images_timed:.2f} ms/image",
                        f"{os.cpu_count()} cores allow {os.cpu_count() / max(cpu_total / images_timed, 1e-9):.0f} "
                        "images/s at full load"))
        queue_left = redis.Redis(port=port).llen("readar.images")
        figures.append(("queue left", str(queue_left), ""))
    finally:
        if workers is not None:
            workers.send_signal(signal.SIGTERM)
            try:
                workers.wait(timeout=60)
            except subprocess.TimeoutExpired:
                workers.kill()
        redis_process.terminate()
        with contextlib.suppress(NameError):
            db.dispose()
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n## Queue benchmark — {time.strftime('%Y-%m-%d')} — {platform.node()}, {os.cpu_count()} cores\n")
    print(f"Command: `python bench/queue_bench.py --images {args.images} --process {args.process} --workers "
          f"{args.workers} --batch-size {args.batch_size}`\n")
    print("| step | figure | note |\n|---|---|---|")
    for step, figure, note in figures:
        print(f"| {step} | {figure} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
