"""One Celery worker process (started by ``readar worker``): a thread pool of batch size × pipeline depth
(``--concurrency``, planned by workers/supervisor.py), so concurrently delivered image tasks share batched
forwards and the next batch is prepared while one runs; with prefetch multiplier 1 that is also how many
messages it holds. Settings come from the environment the supervisor prepared (device, heartbeat file, metrics
port, torch threads)."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.worker_main")
    parser.add_argument("--name", required=True)
    parser.add_argument("--queues", default="readar.images,readar.aggregate")
    parser.add_argument("--concurrency", type=int, required=True, help="task threads: batch size × pipeline depth")
    parser.add_argument("--loglevel", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(processName)s %(levelname)s %(message)s")
    from workers.celery_app import app

    # Task events follow READAR_TASK_EVENTS (worker_send_task_events in workers/celery_app.py).
    app.worker_main([
        "worker", "--pool", "threads", "--concurrency", str(args.concurrency), "--queues", args.queues,
        "--hostname", args.name, "--without-gossip", "--without-mingle", "--loglevel", args.loglevel,
    ])


if __name__ == "__main__":
    main()
