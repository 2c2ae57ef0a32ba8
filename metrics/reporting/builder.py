"""Build a run's HTML report (and single-image panels) from SQL, the object store and the dataset files.

Images are streamed one at a time: per category, each anomalous image's logits and mask are loaded, reduced to
an :class:`~metrics.reporting.content.ImageOutcome` (a few numbers) and dropped; only the few images chosen for
galleries and failure examples are loaded again to draw their panels. Memory depends on the largest category's
row count, not on the run's size.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from metrics.errors import GroundTruthError, MetricInputError, StateFormatError
from metrics.output import make_folder
from metrics.reporting import curves as curve_points
from metrics.reporting.content import CategorySection, ImageOutcome, PanelRef, ReportContent
from metrics.reporting.failures import FailureEvidence, class_order, classify_failure, mask_iou
from metrics.reporting.html import write_page
from metrics.reporting.panels import PanelData, read_rgb, render_panel
from metrics.reporting.plots import ScopeCurves, render_curves
from metrics.reporting.summary import problem_rows, run_summary
from metrics.results import ImageResult, load_result
from metrics.scopes import ScopedAccumulator
from metrics.state import MetricState
from storage.logits import LogitFormatError
from storage.models import Image, ImageStatus, Run
from storage.objects import ObjectStore, ObjectStoreError
from storage.paths import PathEscapeError, resolve_inside
from storage.repository import Repository

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LARGEST_ID = 2**63 - 1  # SQL BIGINT; a larger number is no image's id


class ReportError(LookupError):
    """The report cannot be made as asked (unknown image, image without results); the message says why."""


@dataclass(frozen=True)
class ReportOptions:
    """Gallery sizes and the success level of the overlap IoU."""

    best: int = 3
    worst: int = 3
    examples: int = 3
    success_iou: float = 0.3


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_") or "x"


def _array(diagnostics: dict[str, Any], key: str) -> np.ndarray | None:
    """A diagnostics list as a float array; None when absent (the baseline stores no similarity/points)."""
    value = diagnostics.get(key)
    if value is None or (key == "similarity" and not value):
        return None
    return np.asarray(value, dtype=float)


def _predicted(logits: np.ndarray, threshold_logit: float) -> np.ndarray:
    return logits.astype(np.float32) >= np.float32(threshold_logit)


def _outcome(row: Image, loaded: ImageResult, threshold_logit: float, success_iou: float) -> ImageOutcome:
    diagnostics = row.diagnostics or {}
    iou = mask_iou(loaded.mask, _predicted(loaded.logits, threshold_logit))
    seg_found = diagnostics.get("seg_found")
    evidence = FailureEvidence(
        mask=loaded.mask, iou=iou, seg_found=None if seg_found is None else bool(seg_found),
        similarity=_array(diagnostics, "similarity"), points=_array(diagnostics, "points"),
        labels=_array(diagnostics, "labels"),
    )
    return ImageOutcome(row.id, row.image_path, row.category, row.defect, iou,
                        classify_failure(evidence, success_iou=success_iou), row.image_score)


def category_state(repo: Repository, store: ObjectStore, run: Run, category: str) -> MetricState | None:
    """The category's aggregated metric state, or None when the category has not been aggregated."""
    record = next((c for c in repo.categories(run.id) if c.category == category), None)
    if record is None or not record.state_key:
        return None
    accumulator = ScopedAccumulator.from_bytes(store.get(record.state_key), source=record.state_key)
    return accumulator.category_state(category)


def f1_threshold_logit(state: MetricState | None) -> float | None:
    """The category's F1-max threshold as a logit (None without a state or a finite threshold)."""
    if state is None:
        return None
    value = float(state.finalize(pro_hard=False)["f1_threshold_logit"])
    return value if math.isfinite(value) else None


def _scope_curves(state: MetricState, title: str) -> ScopeCurves:
    counts = curve_points.histograms(state)
    values = state.finalize(pro_hard=False)
    return ScopeCurves(
        title=title, pixel_roc=curve_points.pixel_roc(counts),
        image_roc=curve_points.image_roc(state.image_scores, state.image_labels),
        pro=curve_points.pro_curve(counts), histogram=curve_points.score_histograms(counts),
        pauroc=values["pAUROC"], iauroc=values["iAUROC"], pro_value=values["PRO"],
    )


def panel_data(run: Run, row: Image, loaded: ImageResult, threshold_logit: float | None, title: str) -> PanelData:
    diagnostics = row.diagnostics or {}
    image = read_rgb(resolve_inside(run.dataset_root, row.image_path))
    return PanelData(
        image=image, probability=expit(loaded.logits.astype(np.float32)), mask=loaded.mask, title=title,
        predicted=None if threshold_logit is None else _predicted(loaded.logits, threshold_logit),
        similarity=_array(diagnostics, "similarity"), points=_array(diagnostics, "points"),
        labels=_array(diagnostics, "labels"),
    )


def panel_title(run: Run, row: Image, outcome: ImageOutcome | None, threshold_logit: float | None) -> str:
    parts = [f"{run.name}: {row.image_path} (id {row.id})"]
    if row.image_score is not None:
        parts.append(f"image score {row.image_score:.3f}")
    if outcome is not None:
        parts.append(f"IoU {outcome.iou:.2f} → {outcome.failure}")
    if threshold_logit is not None:
        parts.append(f"threshold p={float(expit(threshold_logit)):.3f}")
    prompt = (row.diagnostics or {}).get("prompt")
    if prompt:
        parts.append(f"prompt “{prompt}”")
    return " · ".join(parts)


def _pick_examples(outcomes: list[ImageOutcome], classes: Iterable[str], per_class: int) -> dict[str, list]:
    """Up to ``per_class`` outcomes per class, taken round-robin over categories (worst IoU first)."""
    examples: dict[str, list[ImageOutcome]] = {}
    for failure in classes:
        by_category: dict[str, list[ImageOutcome]] = {}
        for outcome in sorted(outcomes, key=lambda o: (o.iou, o.image_path)):
            if outcome.failure == failure:
                by_category.setdefault(outcome.category, []).append(outcome)
        chosen: list[ImageOutcome] = []
        while len(chosen) < per_class and any(by_category.values()):
            for category in sorted(by_category):
                if by_category[category] and len(chosen) < per_class:
                    chosen.append(by_category[category].pop(0))
        examples[failure] = chosen
    return examples


def _defect_rows(metric_rows: list[dict[str, Any]], outcomes: list[ImageOutcome]) -> list[dict[str, Any]]:
    rows = []
    for row in metric_rows:
        if row["scope"] != "defect":
            continue
        mine = [o for o in outcomes if o.category == row["category"] and o.defect == row["defect_type"]]
        rows.append({**row, "analysed": len(mine), "success": sum(o.failure == "success" for o in mine),
                     "mean_iou": float(np.mean([o.iou for o in mine])) if mine else math.nan})
    return sorted(rows, key=lambda r: (math.isnan(r["PRO"]), r["PRO"], r["category"], r["defect_type"]))


def build_report(
    repo: Repository, store: ObjectStore, run: Run, metric_rows: list[dict[str, Any]], out_dir: str | Path,
    *, options: ReportOptions | None = None, progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` with its ``plots/`` and ``panels/`` folders; returns the page's path.

    metric_rows: the run's metric rows as CSV-column dicts, mean and overall first (``scheduler.tables``).
    progress: called with each category's name once it is analysed.
    """
    options = options or ReportOptions()
    out = Path(out_dir)
    make_folder(out / "plots")
    make_folder(out / "panels")
    names = sorted({c.category for c in repo.categories(run.id)} | set(repo.status_counts(run.id)))
    sections: list[CategorySection] = []
    outcomes: list[ImageOutcome] = []
    notes: list[str] = []
    has_similarity = has_points = False
    for index, category in enumerate(names):
        try:
            state = category_state(repo, store, run, category)
        except (ObjectStoreError, StateFormatError) as exc:
            state, note = None, f"metric state unreadable ({exc})"
        else:
            note = "" if state is not None else "not aggregated yet: run `readar aggregate RUN` first"
        threshold = f1_threshold_logit(state)
        curves_file = None
        if state is not None and state.num_images:
            curves_file = f"plots/{index:03d}-{_slug(category)}.png"
            render_curves(_scope_curves(state, f"{category}: curves from the exact score histograms"),
                          out / curves_file)
        section = CategorySection(category, curves_file, threshold, note)
        for row in repo.images(run.id, category=category, status=ImageStatus.DONE):
            if row.label != 1:
                continue
            has_similarity = has_similarity or bool((row.diagnostics or {}).get("similarity"))
            has_points = has_points or (row.diagnostics or {}).get("points") is not None
            try:
                loaded = load_result(store, run.dataset_root, row)
                if loaded.mask is None:
                    raise GroundTruthError("the anomalous image has no mask")
            except (GroundTruthError, MetricInputError, LogitFormatError, ObjectStoreError, PathEscapeError) as exc:
                notes.append(f"{row.image_path}: {exc}")
                continue
            outcome = _outcome(row, loaded, 0.0 if threshold is None else threshold, options.success_iou)
            outcomes.append(outcome)
            section.num_analysed += 1
        sections.append(section)
        if progress is not None:
            progress(category)

    classes = list(class_order(has_similarity, has_points))
    panels: dict[int, str] = {}
    selected: list[ImageOutcome] = []
    for section in sections:
        mine = sorted((o for o in outcomes if o.category == section.name), key=lambda o: (-o.iou, o.image_path))
        best = mine[: options.best]
        worst = [o for o in reversed(mine) if o not in best][: options.worst]
        section.best = [PanelRef(o, "") for o in best]
        section.worst = [PanelRef(o, "") for o in worst]
        selected.extend(best + worst)
    example_outcomes = _pick_examples(outcomes, classes, options.examples)
    for chosen in example_outcomes.values():
        selected.extend(chosen)
    thresholds = {s.name: s.threshold_logit for s in sections}
    for outcome in selected:
        if outcome.image_id in panels:
            continue
        row = repo.image(outcome.image_id)
        threshold = thresholds.get(outcome.category)
        loaded = load_result(store, run.dataset_root, row)
        data = panel_data(run, row, loaded, 0.0 if threshold is None else threshold,
                           panel_title(run, row, outcome, threshold))
        panels[outcome.image_id] = f"panels/{outcome.image_id}.png"
        render_panel(data, out / panels[outcome.image_id])
    for section in sections:
        section.best = [PanelRef(p.outcome, panels[p.outcome.image_id]) for p in section.best]
        section.worst = [PanelRef(p.outcome, panels[p.outcome.image_id]) for p in section.worst]
    examples = {k: [PanelRef(o, panels[o.image_id]) for o in v] for k, v in example_outcomes.items()}

    failure_counts: dict[str, dict[str, int]] = {}
    defect_counts: dict[tuple[str, str], dict[str, int]] = {}
    for outcome in outcomes:
        per_category = failure_counts.setdefault(outcome.category, dict.fromkeys(classes, 0))
        per_category[outcome.failure] += 1
        per_defect = defect_counts.setdefault((outcome.category, outcome.defect), dict.fromkeys(classes, 0))
        per_defect[outcome.failure] += 1
    problems, problem_counts = problem_rows(repo, run.id)
    content = ReportContent(
        run=run_summary(repo, run), metric_rows=metric_rows, problems=problems, problem_counts=problem_counts,
        categories=sections, has_similarity=has_similarity, classes=classes, failure_counts=failure_counts,
        defect_failure_counts=defect_counts, defect_rows=_defect_rows(metric_rows, outcomes),
        examples=examples, success_iou=options.success_iou, analysis_notes=notes,
    )
    return write_page(content, out / "index.html")


def find_image(repo: Repository, run: Run, reference: str) -> Image:
    """The run's image row named by its numeric id or its relative path (e.g. ``brick/test/scratch/003.png``)."""
    text = reference.strip()
    if text.isascii() and text.isdigit():
        row = None
        if int(text) <= _LARGEST_ID:
            with contextlib.suppress(LookupError):
                row = repo.image(int(text))
        if row is not None and row.run_id == run.id:
            return row
        shown_id = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
        raise ReportError(f"run {run.name!r} has no image with id {shown_id}; "
                          f"`readar results {run.name}` lists its images with their ids and paths")
    category = text.split("/", 1)[0]
    rows = repo.images(run.id, category=category)
    for row in rows:
        if row.image_path == text:
            return row
    close = difflib.get_close_matches(text, [r.image_path for r in rows], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ReportError(f"run {run.name!r} has no image {text!r} (give the path relative to the dataset root, "
                      f"e.g. brick/test/scratch/003.png, or the numeric id).{hint} "
                      f"`readar results {run.name} --category {category}` lists the images.")


def render_image(repo: Repository, store: ObjectStore, run: Run, reference: str, out_file: str | Path) -> Path:
    """Draw the single-image panel of one image of a run into ``out_file`` (PNG); returns the path."""
    row = find_image(repo, run, reference)
    if row.status != ImageStatus.DONE or not row.object_key:
        reason = f": {row.error}" if row.error else ""
        raise ReportError(f"image {row.image_path} of run {run.name!r} is {row.status}{reason}; only finished "
                          "images have a score map to show")
    threshold = f1_threshold_logit(category_state(repo, store, run, row.category))
    loaded = load_result(store, run.dataset_root, row)
    outcome = None
    if loaded.mask is not None and row.label == 1:
        outcome = _outcome(row, loaded, 0.0 if threshold is None else threshold, ReportOptions().success_iou)
    data = panel_data(run, row, loaded, 0.0 if threshold is None else threshold,
                       panel_title(run, row, outcome, threshold))
    return render_panel(data, out_file)
