"""End to end on generated data: plan → tasks → objects + SQL → per-category metrics, and resume."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from scheduler.cli import cli

CSV_HEAD = ["scope", "category", "iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max", "num_images", "num_anom_images"]


def _invoke(args: list[str], env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames[: len(CSV_HEAD)] == CSV_HEAD
        return list(reader)


def _metrics(rows: list[dict[str, str]]) -> dict[tuple[str, str, str], tuple[str, ...]]:
    return {(r["scope"], r["category"], r["defect_type"]): tuple(r[c] for c in CSV_HEAD[2:]) for r in rows}


def test_embedded_run_end_to_end(tmp_path: Path, sample_root: Path) -> None:
    work = tmp_path / "work"
    output = _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(sample_root), "--run-name", "e2e"])
    assert "metrics CSV" in output and "e2e" in output
    rows = _csv(work / "results" / "e2e.csv")
    scopes = [r["scope"] for r in rows]
    assert scopes[:2] == ["mean", "overall"] and scopes.count("category") == 3 and "defect" in scopes
    database = sqlite3.connect(work / "readar.sqlite")
    statuses = database.execute("select status, count(*) from images group by status").fetchall()
    assert statuses == [("done", 36)]
    keys = [k for (k,) in database.execute("select object_key from images")]
    assert len(set(keys)) == 36 and all((work / "objects" / k).is_file() for k in keys)
    # The plumbing check: the weight-free baseline is informative on the sample data.
    for row in rows:
        if row["scope"] == "category":
            assert float(row["pAUROC"]) >= 0.9, row

    # Per-image queries.
    as_json = _invoke(["--work-dir", str(work), "results", "e2e", "--category", "brick", "--format", "json"])
    assert as_json.count('"category": "brick"') == 12
    assert "e2e" in _invoke(["--work-dir", str(work), "runs"])

    # Export to the original layout, evaluate with `readar eval`: the same numbers as the pipeline, and the
    # pipeline's pAUROC equals sklearn's over the exported maps.
    export = tmp_path / "export"
    _invoke(["--work-dir", str(work), "export", "e2e", str(export)])
    assert len(list(export.glob("*/pred_logits_0.npy"))) == 36
    out_csv = tmp_path / "eval.csv"
    _invoke(["eval", "--pred-root", str(export), "--mvtec-root", str(sample_root), "--out-csv", str(out_csv)])
    evaluated = {k: v for k, v in _metrics(_csv(out_csv)).items()}
    pipeline = _metrics(rows)
    for key in pipeline:
        np.testing.assert_allclose(
            [float(v) for v in evaluated[key][:5]], [float(v) for v in pipeline[key][:5]], atol=1e-6, err_msg=str(key)
        )
    scores, labels = [], []
    for folder in sorted(export.iterdir()):
        import json

        meta = json.loads((folder / "metadata.json").read_text())
        if not meta["image_path"].split("/test/")[0].endswith("brick"):
            continue
        logits = np.load(folder / "pred_logits_0.npy")
        mask_path = Path(meta["image_path"].replace("/test/", "/ground_truth/").replace(".png", "_mask.png"))
        if meta["anomaly_type"] == "good":
            mask = np.zeros(logits.shape, bool)
        else:
            from PIL import Image

            mask = np.asarray(Image.open(mask_path)) > 0
        scores.append(logits.ravel())
        labels.append(mask.ravel())
    brick = next(r for r in rows if r["scope"] == "category" and r["category"] == "brick")
    assert float(brick["pAUROC"]) == pytest.approx(roc_auc_score(np.concatenate(labels), np.concatenate(scores)),
                                                   abs=1e-6)


def test_bad_images_are_recorded_and_the_run_goes_on(tmp_path: Path, sample_root: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    images = sorted((root / "brick" / "test" / "scratch").glob("*.png"))
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated: passes the header check, fails decoding
    mask = root / "brick" / "ground_truth" / "scratch" / f"{images[1].stem}_mask.png"
    mask.unlink()  # anomalous without mask → skipped
    work = tmp_path / "work"
    _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "bad"])
    database = sqlite3.connect(work / "readar.sqlite")
    rows = dict(database.execute("select image_path, status || ':' || coalesce(error, '') from images").fetchall())
    truncated = rows[f"brick/test/scratch/{images[0].name}"]
    assert truncated.startswith("failed:") and images[0].name in truncated
    assert rows[f"brick/test/scratch/{images[1].name}"].startswith("skipped:")
    assert sum(v.startswith("done") for v in rows.values()) == 34
    metrics = _csv(work / "results" / "bad.csv")
    brick = next(r for r in metrics if r["scope"] == "category" and r["category"] == "brick")
    assert brick["num_images"] == "10" and brick["num_skipped"] == "1" and brick["num_failed"] == "1"


def _spawn_run(work: Path, root: Path, name: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "scheduler", "--work-dir", str(work), "run", "--mvtec-root", str(root),
               "--run-name", name, "--batch-size", "2"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_images(tmp_path: Path) -> None:
    from scheduler.sample_data import make_sample_data

    root = tmp_path / "data"
    make_sample_data(root, per_class=40)
    total = 120
    work = tmp_path / "work"
    process = _spawn_run(work, root, "resumable")
    database_path = work / "readar.sqlite"
    done_before: dict[int, tuple] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not database_path.exists():
            continue
        try:
            done = sqlite3.connect(database_path).execute("select count(*) from images where status='done'").fetchone()
        except sqlite3.OperationalError:
            continue
        if done[0] >= 10:
            break
    else:
        process.kill()
        pytest.fail("the run never got going: " + process.communicate()[0].decode())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    connection = sqlite3.connect(database_path)
    done_before = {
        image_id: (fence, finished)
        for image_id, fence, finished in connection.execute(
            "select id, fence, finished_at from images where status='done'"
        )
    }
    assert 10 <= len(done_before) < total, "the kill must land mid-run"
    connection.close()

    # The killed run shows as interrupted, without an ETA, with the command that resumes it from anywhere.
    status = " ".join(_invoke(["--work-dir", str(work), "status", "resumable"]).split())
    assert "(interrupted)" in status and "ETA" not in status
    assert f"Resume with: readar --work-dir {work.resolve()} resume resumable" in status
    assert "interrupted" in _invoke(["--work-dir", str(work), "runs"])

    _invoke(["--work-dir", str(work), "resume", "resumable"])
    connection = sqlite3.connect(database_path)
    rows = connection.execute("select id, status, fence, finished_at from images").fetchall()
    assert len(rows) == total and {status for _, status, _, _ in rows} == {"done"}
    for image_id, _, fence, finished in rows:
        if image_id in done_before:
            assert (fence, finished) == done_before[image_id], "a finished image was redone"
    assert len(list((work / "objects" / "runs").rglob("*.npz"))) == total + 3  # logits + 3 category states

    # Same metrics as an uninterrupted run.
    clean = tmp_path / "clean"
    _invoke(["--work-dir", str(clean), "run", "--mvtec-root", str(root), "--run-name", "resumable"])
    assert _metrics(_csv(work / "results" / "resumable.csv")) == _metrics(_csv(clean / "results" / "resumable.csv"))


@pytest.mark.services
def test_embedded_run_on_postgresql_and_s3(tmp_path: Path, sample_root: Path, postgres_url: str,
                                           s3_settings_env: str, seaweed) -> None:  # noqa: ANN001
    env = {"READAR_DATABASE_URL": postgres_url, "READAR_OBJECT_STORE_URL": s3_settings_env}
    work = tmp_path / "work"
    output = _invoke(["--work-dir", str(work), "run", "--mvtec-root", str(sample_root), "--classes", "brick",
                      "--run-name", "pg-s3"], env=env)
    assert seaweed.secret_key not in output
    bucket, prefix = s3_settings_env.removeprefix("s3://").split("/", 1)
    listed = seaweed.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/")
    assert len(listed.get("Contents", [])) == 12 + 1
    sqlite_work = tmp_path / "sqlite"
    _invoke(["--work-dir", str(sqlite_work), "run", "--mvtec-root", str(sample_root), "--classes", "brick",
             "--run-name", "pg-s3"])
    assert _metrics(_csv(work / "results" / "pg-s3.csv")) == _metrics(_csv(sqlite_work / "results" / "pg-s3.csv"))
