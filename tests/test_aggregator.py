"""The pieces every reader of a run shares: reading an image's result back (metrics.results) and the one
decision "every category done → summary → run done" (metrics.aggregator.finish_run_if_complete)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from metrics.aggregator import finish_run_if_complete
from metrics.errors import GroundTruthError
from metrics.results import load_logits, load_result
from storage.database import Database
from storage.logits import LogitFormatError, StoredLogits, encode_logits
from storage.models import ImageStatus, RunStatus
from storage.objects import ObjectMissingError, ObjectStore
from storage.repository import PlannedImage, Repository
from tests.dataset_fixtures import square_mask, write_image


def _row(key: str, mask_path: str | None = None) -> SimpleNamespace:
    """The columns of an image row that reading a result uses."""
    return SimpleNamespace(object_key=key, image_path="cat/test/crack/000.png", mask_path=mask_path)


def test_a_result_is_its_full_resolution_logits_then_its_mask(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "objects"))
    maps = np.arange(12, dtype=np.float16).reshape(1, 3, 4)
    store.put("runs/1/images/1.npz", encode_logits(StoredLogits(maps, (3, 4))))
    write_image(tmp_path / "data" / "cat" / "ground_truth" / "crack" / "000_mask.png", square_mask(3, 4))
    row = _row("runs/1/images/1.npz", "cat/ground_truth/crack/000_mask.png")

    result = load_result(store, tmp_path / "data", row)
    assert result.logits.dtype == np.float16 and np.array_equal(result.logits, maps[0])
    assert result.mask is not None and result.mask.shape == (3, 4) and result.mask.dtype == bool
    assert np.array_equal(load_logits(store, row), result.logits)  # what `readar export` writes
    assert load_result(store, tmp_path / "data", _row("runs/1/images/1.npz")).mask is None  # a good image


def test_reading_a_result_tells_a_lost_object_from_a_bad_mask(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "objects"))
    with pytest.raises(ObjectMissingError):
        load_result(store, tmp_path, _row("runs/1/images/9.npz"))
    store.put("runs/1/images/2.npz", b"not an archive")
    with pytest.raises(LogitFormatError, match="logits of cat/test/crack/000.png"):
        load_result(store, tmp_path, _row("runs/1/images/2.npz"))
    store.put("runs/1/images/3.npz", encode_logits(StoredLogits(np.zeros((1, 3, 4), np.float16), (3, 4))))
    with pytest.raises(GroundTruthError, match="does not exist"):
        load_result(store, tmp_path, _row("runs/1/images/3.npz", "cat/ground_truth/crack/000_mask.png"))


def _repo_with_run(tmp_path: Path, categories: tuple[str, ...]) -> tuple[Repository, int]:
    """A running run with one skipped image per category: nothing left to compute, every category due."""
    database = Database(f"sqlite:///{tmp_path / 'readar.sqlite'}")
    database.migrate()
    repo = Repository(database)
    run_id = repo.create_run(name="r", detector="baseline", dataset_root=str(tmp_path), config={},
                             code_version="test", model_fingerprint=None, identity_keys=()).id
    repo.add_images(run_id, [_planned(category, "000", ImageStatus.SKIPPED) for category in categories])
    repo.set_run_status(run_id, RunStatus.RUNNING)
    return repo, run_id


def _planned(category: str, stem: str, status: ImageStatus) -> PlannedImage:
    return PlannedImage(category, "good", 0, f"{category}/test/good/{stem}.png", None, 8, 8, status)


def _aggregated(repo: Repository, run_id: int, category: str) -> None:
    """What the aggregator records for a category (its compare-and-set first, as every caller does)."""
    assert repo.try_start_aggregation(run_id, category, stale_after_s=0)
    repo.finish_aggregation(run_id, category, rows=[], state_key="", num_used=0, num_skipped=1, num_failed=0)


def test_the_run_is_done_once_its_last_category_is(tmp_path: Path) -> None:
    repo, run_id = _repo_with_run(tmp_path, ("a", "b"))
    store = ObjectStore(str(tmp_path / "objects"))
    _aggregated(repo, run_id, "a")
    assert not finish_run_if_complete(repo, store, run_id)
    assert repo.get_run_by_id(run_id).status == RunStatus.RUNNING
    assert not repo.metric_rows(run_id)
    _aggregated(repo, run_id, "b")
    assert finish_run_if_complete(repo, store, run_id)
    assert repo.get_run_by_id(run_id).status == RunStatus.DONE
    assert {row.scope for row in repo.metric_rows(run_id)} >= {"overall", "mean"}


def test_active_images_and_a_cancellation_keep_the_run_from_done(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "objects"))
    repo, run_id = _repo_with_run(tmp_path, ("a",))
    _aggregated(repo, run_id, "a")
    repo.add_images(run_id, [_planned("a", "001", ImageStatus.QUEUED)])  # a rerun planned one more image
    assert not finish_run_if_complete(repo, store, run_id)
    assert repo.get_run_by_id(run_id).status == RunStatus.RUNNING

    (tmp_path / "other").mkdir()
    repo, run_id = _repo_with_run(tmp_path / "other", ("a",))
    repo.set_run_status(run_id, RunStatus.CANCELLED)
    _aggregated(repo, run_id, "a")
    assert not finish_run_if_complete(repo, store, run_id)
    assert repo.get_run_by_id(run_id).status == RunStatus.CANCELLED
