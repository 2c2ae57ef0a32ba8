"""What a run report says, as plain data: the builder fills it in, :mod:`metrics.reporting.html` lays it out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageOutcome:
    """One analysed anomalous image: its overlap IoU (see :mod:`metrics.reporting.failures`) and class."""

    image_id: int
    image_path: str
    category: str
    defect: str
    iou: float
    failure: str
    image_score: float | None


@dataclass(frozen=True)
class PanelRef:
    """A rendered single-image panel: the outcome it shows and its file, relative to the report folder."""

    outcome: ImageOutcome
    file: str


@dataclass(frozen=True)
class RunSummary:
    """The run configuration shown at the top of the report."""

    name: str
    status: str
    created: str
    detector: str
    model_fingerprint: str
    prompt_mode: str
    oracle: bool
    decode_mode: str
    conversation: str
    checkpoint: str
    dataset_root: str
    code_version: str
    status_totals: dict[str, int]
    setting_note: str = ""  # how a read_as_published run compares with the published setting
    oracle_note: str = ""  # why image-level numbers are an oracle setting (the setting named), when they are


@dataclass
class CategorySection:
    """One category: its curve figure, overlap threshold and galleries."""

    name: str
    curves_file: str | None
    threshold_logit: float | None
    note: str = ""
    num_analysed: int = 0
    best: list[PanelRef] = field(default_factory=list)
    worst: list[PanelRef] = field(default_factory=list)


@dataclass
class ReportContent:
    """Everything on the page.

    metric_rows: the run's metric rows as CSV-column dicts (mean, overall, categories, defect types).
    problems: (image path, status, reason) of failed and skipped images; problem_counts: their totals.
    failure_counts: {category: {class: count}}; defect_failure_counts: {(category, defect): {class: count}}.
    defect_rows: the defect-scope metric rows with "analysed", "success" and "mean_iou" added, worst PRO first.
    examples: {class: panels} of example images per failure class.
    analysis_notes: images left out of the per-image analysis, with why.
    """

    run: RunSummary
    metric_rows: list[dict[str, Any]]
    problems: list[tuple[str, str, str]]
    problem_counts: dict[str, int]
    categories: list[CategorySection]
    has_similarity: bool
    classes: list[str]
    failure_counts: dict[str, dict[str, int]]
    defect_failure_counts: dict[tuple[str, str], dict[str, int]]
    defect_rows: list[dict[str, Any]]
    examples: dict[str, list[PanelRef]]
    success_iou: float
    analysis_notes: list[str] = field(default_factory=list)
