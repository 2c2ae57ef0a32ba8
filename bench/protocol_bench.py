"""The delivery protocol on its own: claim, complete and the aggregation check against a real PostgreSQL.

Per batch of ``--batch`` images, as a worker process's group commit sends them: one ``claim_many``, one
``complete_many`` (diagnostics the size of READ's: a 24×24 similarity list), one ``try_start_aggregations`` of two
categories. Prints wall time and this process's CPU per image (the server's share is wall minus client CPU,
roughly). A temporary database is created and dropped.

    python bench/protocol_bench.py [--images 8000] [--batch 8] [--pg postgresql://postgres@127.0.0.1:5432/test]

Compare two versions by pointing PYTHONPATH at each worktree in turn; results are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    from storage.database import Database
    from storage.repository import Completion, PlannedImage, Repository

    name = f"readar_protocol_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database = Database(args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}")
    try:
        database.migrate()
        repo = Repository(database)
        run = repo.create_run(name="protocol-bench", detector="noop", dataset_root="/data", config={},
                              code_version="bench", model_fingerprint=None, identity_keys=())
        repo.add_images(run.id, [
            PlannedImage(category=f"c{i % 3}", defect="good", label=0, image_path=f"c{i % 3}/{i}.png",
                         mask_path=None, height=8, width=8)
            for i in range(args.images)
        ])
        ids = repo.pending_image_ids(run.id)
        diagnostics = {"similarity": [[0.1] * 24] * 24, "points": [[1, 2]], "text": "Sure, [SEG]."}
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(ids), args.batch):
            batch = ids[start : start + args.batch]
            claims = repo.claim_many([(run.id, image_id) for image_id in batch], "bench", lease_seconds=60)
            repo.complete_many([Completion(claims[i], f"k{i}", 0.5, diagnostics, {"ms": 1.0}, "cpu") for i in batch])
            repo.try_start_aggregations([(run.id, "c0"), (run.id, "c1")])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{len(ids)} images, batch {args.batch}: wall {1e3 * wall / len(ids):.3f} ms/image, "
              f"client CPU {1e3 * cpu / len(ids):.3f} ms/image")
    finally:
        database.dispose()
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
