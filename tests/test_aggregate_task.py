"""A second delivery of a finished aggregation task does nothing (it used to recompute the category)."""

from __future__ import annotations

from pathlib import Path

from storage.repository import PlannedImage
from storage.settings import Settings
from workers.celery_app import _still_aggregating
from workers.runtime import WorkerRuntime


def test_only_a_category_in_aggregation_is_aggregated_by_a_task(tmp_path: Path) -> None:
    runtime = WorkerRuntime(Settings(work_dir=tmp_path))
    repo = runtime.repo
    run_id = repo.create_run(name="r", detector="noop", dataset_root="/d", config={}, code_version="t",
                             model_fingerprint=None, identity_keys=()).id
    repo.add_images(run_id, [PlannedImage("c", "good", 0, "c/test/good/0.png", None, 8, 8)])
    claim = repo.claim(repo.pending_image_ids(run_id)[0], "w", lease_seconds=60)
    repo.complete(claim, object_key="k", image_score=0.0, diagnostics={}, timings={}, device="cpu")
    assert not _still_aggregating(runtime, run_id, "c")  # open: no task was sent for it
    assert repo.try_start_aggregation(run_id, "c")
    assert _still_aggregating(runtime, run_id, "c")  # the task the compare-and-set winner sent
    repo.finish_aggregation(run_id, "c", rows=[], state_key="s", num_used=1, num_skipped=0, num_failed=0)
    assert not _still_aggregating(runtime, run_id, "c")  # done: a redelivered copy is skipped
    runtime.close()


def test_a_worker_reads_the_masks_where_its_path_map_mounts_the_dataset(tmp_path: Path) -> None:
    """The image tasks applied READAR_PATH_MAP to the dataset root, the aggregation did not: a worker mounting the
    data elsewhere skipped every mask and stored NaN metrics."""
    import math
    import shutil

    from click.testing import CliRunner

    from metrics.aggregator import aggregate_category
    from scheduler.cli import cli
    from scheduler.context import AppContext
    from scheduler.sample_data import make_sample_data
    from storage.paths import PathMap

    submitted = tmp_path / "submitted" / "data"
    make_sample_data(submitted, categories=("brick",), size=32, per_class=4, train_per_class=2)
    work = tmp_path / "work"
    result = CliRunner().invoke(cli, ["--work-dir", str(work), "run", "--mvtec-root", str(submitted),
                                      "--run-name", "m"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("m")
    mounted = tmp_path / "mounted" / "data"
    shutil.copytree(submitted, mounted)
    shutil.rmtree(submitted)  # this "machine" has the dataset only where its path map says
    rows = aggregate_category(app.repo, app.store, run.id, "brick",
                              path_map=PathMap(f"{run.dataset_root}={mounted}"))
    category = next(row for row in rows if row["scope"] == "category")
    assert not math.isnan(category["pAUROC"]) and category["num_skipped"] == 0, category
