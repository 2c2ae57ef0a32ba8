"""Evaluate a folder in the original READAR output layout, streaming, category by category.

Each category is accumulated on its own (float32 bins, one image in memory at a time), turned into its rows,
and folded into the ``overall`` state; categories can run in parallel worker processes. Unusable images are
skipped with a reason (:class:`~metrics.legacy.Skip`), never silently: an unreadable or hostile folder (see
:mod:`metrics.legacy`), several folders claiming one image, or a category missing from the MVTec root is a
skip, and the other images are still evaluated.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
from collections import defaultdict
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics.errors import LegacyInputError, MetricInputError
from metrics.legacy import LegacyImage, RootSurvey, Skip, discover, load_prediction
from metrics.scopes import ALL, ScopedAccumulator, mean_row, scope_row
from metrics.state import MetricState

BINNING = "float32"
ImageCallback = Callable[[str], None]
_worker_queue: Any = None  # set in worker processes only: where per-image progress ticks go


@dataclass
class LegacyResult:
    """rows: category and defect rows (categories sorted), then overall and mean; skips: every skipped image;
    survey: where the predictions' images were against the MVTec root (None before discovery)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    num_evaluated: int = 0
    survey: RootSurvey | None = None


@dataclass
class _CategoryResult:
    category: str
    rows: list[dict[str, Any]]
    state_bytes: bytes
    skips: list[Skip]
    num_evaluated: int


def evaluate_category(
    category: str, images: list[LegacyImage], *, pro_hard: bool = True, on_image: ImageCallback | None = None,
) -> _CategoryResult:
    """Accumulate one category's images; returns its rows, its merged state (bytes) and its skips."""
    accumulator = ScopedAccumulator(BINNING)
    skips: list[Skip] = []
    for image in images:
        try:
            logits, mask = load_prediction(image)
        except LegacyInputError as exc:
            skips.append(Skip(str(image.folder), category, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one unreadable folder must not end the whole evaluation
            skips.append(Skip(str(image.folder), category,
                              f"{image.folder} could not be read ({type(exc).__name__}: {exc})"))
        else:
            try:
                accumulator.add(image.category, image.defect, logits, mask)
            except MetricInputError as exc:
                skips.append(Skip(str(image.folder), category, str(exc)))
        if on_image is not None:
            on_image(category)
    rows = accumulator.category_rows(category, pro_hard=pro_hard) if accumulator.categories() else []
    state = accumulator.category_state(category)
    return _CategoryResult(category, rows, state.to_bytes(), skips, state.num_images)


def _init_worker(progress_queue: Any) -> None:
    global _worker_queue
    _worker_queue = progress_queue


def _tick(category: str) -> None:
    if _worker_queue is not None:
        _worker_queue.put(category)


def _evaluate_in_worker(category: str, images: list[LegacyImage], pro_hard: bool) -> _CategoryResult:
    return evaluate_category(category, images, pro_hard=pro_hard, on_image=_tick)


def _run_parallel(
    groups: dict[str, list[LegacyImage]], workers: int, pro_hard: bool, on_image: ImageCallback | None,
) -> list[_CategoryResult]:
    context = multiprocessing.get_context("spawn")  # no fork: the progress bar runs a thread
    progress_queue = context.Queue()
    results: list[_CategoryResult] = []
    # Largest categories first, so that the two workers finish at about the same time.
    order = sorted(groups, key=lambda c: -sum(1 for _ in groups[c]))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        pending = {pool.submit(_evaluate_in_worker, c, groups[c], pro_hard) for c in order}
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            _drain(progress_queue, on_image)
            results.extend(future.result() for future in done)
        _drain(progress_queue, on_image)
    return results


def _drain(progress_queue: Any, on_image: ImageCallback | None) -> None:
    while True:
        try:
            category = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        if on_image is not None:
            on_image(category)


def evaluate_legacy(
    pred_root: Path, mvtec_root: Path, *, classes: Collection[str] | None = None, pro_hard: bool = True,
    workers: int = 1, on_image: ImageCallback | None = None, on_start: Callable[[int], None] | None = None,
    require_match: bool = False,
) -> LegacyResult:
    """Metrics of every prediction folder under ``pred_root``.

    classes: categories to evaluate (None: all found). workers: processes (1 = in this process).
    on_start(total images) is called after discovery, on_image(category) after each image.
    require_match: raise :class:`LegacyInputError` right after discovery, before any array is read, when there
    are anomalous predictions and not one has its mask under ``mvtec_root`` (:meth:`RootSurvey.no_match_error`).
    """
    images, skips, survey = discover(Path(pred_root), Path(mvtec_root), classes=classes)
    if require_match and survey.no_match_error():
        raise LegacyInputError(survey.no_match_error())
    groups: dict[str, list[LegacyImage]] = defaultdict(list)
    for image in images:
        groups[image.category].append(image)
    if on_start is not None:
        on_start(len(images))
    if workers > 1 and len(groups) > 1:
        results = _run_parallel(groups, min(workers, len(groups)), pro_hard, on_image)
    else:
        results = [evaluate_category(c, groups[c], pro_hard=pro_hard, on_image=on_image) for c in sorted(groups)]
    skipped_per_category: dict[str, int] = defaultdict(int)
    for skip in skips:
        skipped_per_category[skip.category or "?"] += 1
    overall = MetricState(BINNING)
    result = LegacyResult(skips=list(skips), survey=survey)
    for category_result in sorted(results, key=lambda r: r.category):
        result.skips.extend(category_result.skips)
        skipped_per_category[category_result.category] += len(category_result.skips)
        overall.merge(MetricState.from_bytes(category_result.state_bytes))
        result.num_evaluated += category_result.num_evaluated
        for row in category_result.rows:
            if row["scope"] == "category":
                row["num_skipped"] = skipped_per_category[category_result.category]
            result.rows.append(row)
    category_rows = [row for row in result.rows if row["scope"] == "category"]
    if category_rows:
        result.rows.append(scope_row("overall", ALL, overall, pro_hard=pro_hard, num_skipped=len(result.skips)))
        result.rows.append(mean_row(category_rows))
    return result
