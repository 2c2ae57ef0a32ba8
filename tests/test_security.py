"""Security checks of issue 7: no pickle is ever executed, and credentials never show anywhere.

Covered elsewhere (referenced in docs/RELIABILITY.md): pickled queue messages
(test_distributed.py::test_a_pickled_message_is_refused_not_executed), object keys and dataset paths that would
escape their prefix (test_storage_objects.py::test_keys_cannot_escape_the_prefix, test_dataset.py's
resolve_inside tests), non-root containers and unpublished Redis/PostgreSQL ports (test_deploy.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import SeaweedS3
from tests.reliability_helpers import PrivatePostgres, PrivateRedis, _as_postgres, terminate
from tests.test_distributed import REPO_ROOT, Cluster


class _CreatesFile:
    """Unpickling this object creates ``target``: proof that a loader executed pickled code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.target, "w"))


# ---------------------------------------------------------------- pickles in checkpoints and arrays
def test_a_malicious_checkpoint_shard_is_refused_and_not_executed(tmp_path: Path) -> None:
    import torch

    from tests.read_fixtures import tiny_checkpoint
    from workers.read.errors import CheckpointError
    from workers.read.loader import load_read_model, read_state_dict

    read_dir, clip_dir = tiny_checkpoint()
    folder = tmp_path / "read"
    shutil.copytree(read_dir, folder)
    marker = tmp_path / "executed-by-the-shard"
    shard = folder / "pytorch_model-00001-of-00002.bin"
    tensors = torch.load(shard, weights_only=True)
    tensors["model.norm.weight"] = _CreatesFile(str(marker))
    torch.save(tensors, shard)
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00002.bin"):
        read_state_dict(folder)
    with pytest.raises(CheckpointError):
        load_read_model(folder, clip_dir)
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    torch.load(shard, weights_only=False)  # the control: an unsafe loader would have run it
    assert marker.exists()


def test_a_malicious_npy_in_eval_input_is_skipped_and_not_executed(tmp_path: Path) -> None:
    from scheduler.commands.eval import eval_command
    from tests.test_metrics_legacy import _dataset

    pred_root, mvtec_root, _ = _dataset(tmp_path)
    marker = tmp_path / "executed-by-the-npy"
    victim = sorted(pred_root.glob("*/pred_logits_0.npy"))[0]
    np.save(victim, np.array([_CreatesFile(str(marker))], dtype=object), allow_pickle=True)
    out_csv = tmp_path / "metrics.csv"
    result = CliRunner(env={"COLUMNS": "250"}).invoke(eval_command, ["--pred-root", str(pred_root), "--mvtec-root", str(mvtec_root),
                                               "--out-csv", str(out_csv), "--workers", "1", "--no-pro-hard"])
    assert result.exit_code == 0, result.output
    assert "pickled objects are refused" in result.output and out_csv.exists()
    assert not marker.exists(), "readar eval executed a pickled array"
    np.load(victim, allow_pickle=True)  # the control: allow_pickle=True would have run it
    assert marker.exists()


# ---------------------------------------------------------------- credentials never shown
REDIS_PASSWORD = "redis-Secret-7f3a9c"
PG_PASSWORD = "pg-Secret-b41d2e"
WRONG_PG_PASSWORD = "pg-Wrong-Secret-0c9e1a"
WRONG_REDIS_PASSWORD = "redis-Wrong-Secret-55e2"
WRONG_S3_SECRET = "s3-Wrong-Secret-aa71f0"


@pytest.fixture
def secured(tmp_path: Path, seaweed: SeaweedS3) -> Iterator[tuple[Cluster, PrivateRedis, PrivatePostgres]]:
    redis_server = PrivateRedis(tmp_path, password=REDIS_PASSWORD)
    postgres = PrivatePostgres(password=PG_PASSWORD)
    store_url = f"s3://{seaweed.new_bucket()}/secured-{os.getpid()}-{int(time.time())}"
    env = {"READAR_S3_ENDPOINT_URL": seaweed.endpoint, "READAR_S3_KEY": seaweed.access_key,
           "READAR_S3_SECRET": seaweed.secret_key, "READAR_TEST_DELAY_S": "0.1"}
    cluster = Cluster(tmp_path, redis_server, postgres.url, store_url, env)
    yield cluster, redis_server, postgres
    if cluster.workers is not None and cluster.workers.poll() is None:
        terminate(cluster.workers, timeout=60)
        cluster.log.close()
    redis_server.stop()
    postgres.destroy()


def _readar(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str]:
    try:
        result = subprocess.run([sys.executable, "-m", "scheduler", *args], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return -1, text
    return result.returncode, result.stdout + result.stderr


@pytest.mark.services
@pytest.mark.slow
def test_credentials_never_appear_in_output_logs_errors_or_the_database(
    secured: tuple[Cluster, PrivateRedis, PrivatePostgres], sample_root: Path, seaweed: SeaweedS3, tmp_path: Path,
) -> None:
    cluster, redis_server, postgres = secured
    secrets = [REDIS_PASSWORD, PG_PASSWORD, seaweed.secret_key, seaweed.access_key, WRONG_PG_PASSWORD,
               WRONG_REDIS_PASSWORD, WRONG_S3_SECRET]
    texts: dict[str, str] = {}
    cluster.start_workers(processes=1, batch_size=2)
    texts["submit"] = cluster.readar("--verbose", "submit", "--mvtec-root", str(sample_root), "--classes", "brick",
                                     "--max-per-class", "4", "--detector", "slow_baseline", "--run-name", "secure")
    cluster.wait_finished("secure", timeout=120)
    for command in (["status", "secure"], ["results", "secure"], ["results", "secure", "--format", "json"],
                    ["runs"], ["metrics", "secure"], ["reconcile", "secure"], ["--verbose", "resume", "secure"]):
        texts[" ".join(command)] = cluster.readar(*command)

    # Deliberately failing calls: wrong PostgreSQL password, wrong Redis password, wrong S3 secret.
    wrong_pg = postgres.url.replace(PG_PASSWORD, WRONG_PG_PASSWORD)
    code, texts["wrong pg password"] = _readar({**cluster.env, "READAR_DATABASE_URL": wrong_pg}, "runs")
    assert code not in (0, -1) and "password authentication failed" in texts["wrong pg password"]
    wrong_redis = redis_server.url.replace(REDIS_PASSWORD, WRONG_REDIS_PASSWORD)
    code, texts["wrong redis password"] = _readar(  # a submit that must publish: the broker refuses it
        {**cluster.env, "READAR_BROKER_URL": wrong_redis}, "submit", "--mvtec-root", str(sample_root), "--classes",
        "brick", "--max-per-class", "1", "--detector", "slow_baseline", "--run-name", "wrong-redis", timeout=45)
    assert code != 0, texts["wrong redis password"]
    code, texts["wrong s3 secret"] = _readar(
        {**cluster.env, "READAR_S3_SECRET": WRONG_S3_SECRET, "READAR_BROKER_URL": "", "READAR_MAX_ATTEMPTS": "1"},
        "run", "--mvtec-root", str(sample_root), "--classes", "brick", "--max-per-class", "2", "--run-name",
        "wrong-s3", "--batch-size", "1",
    )
    with cluster.repo.db.engine.connect() as connection:
        from sqlalchemy import text

        errors = [e for (e,) in connection.execute(text(
            "select i.error from images i join runs r on r.id = i.run_id where r.name = 'wrong-s3'"))]
    assert errors and all(e and "cannot write object" in e for e in errors), (errors, texts["wrong s3 secret"])

    cluster.stop_workers()
    texts["worker log"] = (tmp_path / "workers.log").read_text(errors="replace")
    dump = _as_postgres(["pg_dump", "-h", str(postgres.base), "-p", str(postgres.port), "-U", "postgres",
                         "--data-only", "readar"])
    assert dump.returncode == 0 and "secure" in dump.stdout, dump.stderr
    texts["database dump"] = dump.stdout
    with cluster.repo.db.engine.connect() as connection:
        texts["runs.config"] = "\n".join(str(c) for (c,) in connection.execute(text("select config from runs")))
    assert "***" in texts["runs.config"]  # the stored settings carry redacted URLs, not no URLs
    leaks = [(where, secret) for where, body in texts.items() for secret in secrets if secret in body]
    assert not leaks, f"credentials leaked: {leaks}"
