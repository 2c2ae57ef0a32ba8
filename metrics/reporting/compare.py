"""Compare two or more finished runs of the same dataset on one static HTML page (``readar compare``).

The page holds, side by side per category, the five metrics of every run with the best value of each row marked;
per defect type the PRO of every run and its change against the first run; and the images where the runs
disagree: an image's decision is "anomalous" when its full-resolution score map reaches the run's own F1-max
threshold of that image's category (``max logit >= threshold``, the rule by which the F1-max threshold flags
pixels), and it is right when that matches the image's label. Images whose decisions differ between runs (so one
run is right and another wrong) are ranked by how far apart the runs' margins are (image probability minus the
threshold's probability, per run) and the top ones get one panel per run.

Images are streamed one at a time: per image only a few numbers are kept; the chosen images are loaded again to
draw their panels. Every name (runs, categories, defect types, file paths) is escaped in the page.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from metrics.errors import GroundTruthError, MetricInputError, StateFormatError
from metrics.output import make_folder, visible, write_output
from metrics.reporting.builder import category_state, f1_threshold_logit, panel_data, panel_title
from metrics.reporting.content import RunSummary
from metrics.reporting.html import STYLE
from metrics.reporting.panels import render_panel
from metrics.reporting.summary import run_summary
from metrics.results import load_logits, load_result
from metrics.scopes import METRIC_COLUMNS
from storage.logits import LogitFormatError
from storage.models import Image, ImageStatus, MetricRow, Run
from storage.objects import ObjectStore, ObjectStoreError
from storage.paths import PathEscapeError
from storage.repository import Repository

_FIELDS = {"iAUROC": "iauroc", "pAUROC": "pauroc", "PRO": "pro", "PRO_hard": "pro_hard", "F1_max": "f1_max"}
_SCOPE_ORDER = {"mean": 0, "overall": 1, "category": 2}
_TIE = 1e-12  # values this close are a tie: every one of them is marked best


class CompareError(ValueError):
    """The runs cannot be compared as asked (too few, repeated, unfinished, different datasets); one line."""


@dataclass(frozen=True)
class MetricCell:
    """One run's value of one metric (NaN when the run has none) and whether it is the row's best."""

    value: float
    best: bool


@dataclass(frozen=True)
class MetricLine:
    """One row of the side-by-side table: a scope (mean, overall or a category), a metric, a cell per run."""

    scope: str
    category: str
    metric: str
    cells: tuple[MetricCell, ...]


@dataclass(frozen=True)
class DefectLine:
    """One defect type: each run's PRO (NaN when missing) and its change against the first run (None for the
    first run, NaN when either value is missing)."""

    category: str
    defect: str
    pros: tuple[float, ...]
    deltas: tuple[float | None, ...]


@dataclass(frozen=True)
class Decision:
    """One run's image-level decision on one image."""

    score_logit: float  # max of the full-resolution logits
    threshold_logit: float  # the run's F1-max threshold of the image's category
    flagged: bool
    correct: bool

    @property
    def margin(self) -> float:
        """Image probability minus the threshold's probability: > 0 flagged far above, < 0 far below."""
        return _sigmoid(self.score_logit) - _sigmoid(self.threshold_logit)


@dataclass
class Disagreement:
    """An image on which the runs decide differently; panels: one file per run, relative to the page."""

    image_path: str
    category: str
    defect: str
    label: int
    decisions: tuple[Decision, ...]
    panels: list[str] = field(default_factory=list)

    @property
    def spread(self) -> float:
        margins = [d.margin for d in self.decisions]
        return max(margins) - min(margins)


@dataclass
class Comparison:
    """Everything the page shows."""

    runs: list[RunSummary]
    metric_lines: list[MetricLine]
    defect_lines: list[DefectLine]
    disagreements: list[Disagreement]
    shared_images: int = 0  # images finished in every run and decided by every run
    disagreeing_images: int = 0
    top: int = 20
    notes: list[str] = field(default_factory=list)


def _sigmoid(logit: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * logit))


def _value(row: MetricRow | None, metric: str) -> float:
    value = None if row is None else getattr(row, _FIELDS[metric])
    return math.nan if value is None or not math.isfinite(value) else float(value)


def best_flags(values: Sequence[float]) -> tuple[bool, ...]:
    """Which values are the best (highest) of a row: ties are all best; NaN is never best."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return tuple(False for _ in values)
    top = max(finite)
    return tuple(not math.isnan(v) and top - v <= _TIE for v in values)


def _same_root(runs: Sequence[Run]) -> None:
    first = runs[0]
    for other in runs[1:]:
        if os.path.normpath(other.dataset_root) != os.path.normpath(first.dataset_root):
            raise CompareError(
                f"runs {visible(first.name)!r} and {visible(other.name)!r} are on different datasets "
                f"({visible(first.dataset_root)!r} and {visible(other.dataset_root)!r}); compare runs of the "
                "same dataset root")


def check_runs(repo: Repository, runs: Sequence[Run]) -> dict[int, list[MetricRow]]:
    """Each run's metric rows, after checking that the runs can be compared (:class:`CompareError` if not)."""
    if len(runs) < 2:
        raise CompareError("compare needs at least two runs (`readar compare RUN RUN [RUN...] --out DIR`)")
    seen: set[str] = set()
    for run in runs:
        if run.name in seen:
            raise CompareError(f"run {visible(run.name)!r} is named twice; name each run once")
        seen.add(run.name)
    _same_root(runs)
    rows: dict[int, list[MetricRow]] = {}
    for run in runs:
        rows[run.id] = list(repo.metric_rows(run.id))
        if not rows[run.id]:
            raise CompareError(f"run {visible(run.name)!r} has no metrics yet; wait for it to finish or run "
                               f"`readar aggregate {visible(run.name)}`")
    return rows


def metric_lines(runs: Sequence[Run], rows: dict[int, list[MetricRow]]) -> list[MetricLine]:
    """mean, overall, then every category (of any run): one line per metric, a cell per run."""
    keyed = [{(r.scope, r.category): r for r in rows[run.id] if r.scope in _SCOPE_ORDER} for run in runs]
    scopes = sorted({key for per_run in keyed for key in per_run}, key=lambda k: (_SCOPE_ORDER[k[0]], k[1]))
    lines = []
    for scope, category in scopes:
        for metric in METRIC_COLUMNS:
            values = [_value(per_run.get((scope, category)), metric) for per_run in keyed]
            cells = tuple(MetricCell(v, b) for v, b in zip(values, best_flags(values), strict=True))
            lines.append(MetricLine(scope, category, metric, cells))
    return lines


def defect_lines(runs: Sequence[Run], rows: dict[int, list[MetricRow]]) -> list[DefectLine]:
    """Every defect type of any run: PRO per run and its change against the first run."""
    keyed = [{(r.category, r.defect_type): r for r in rows[run.id] if r.scope == "defect"} for run in runs]
    lines = []
    for key in sorted({k for per_run in keyed for k in per_run}):
        pros = tuple(_value(per_run.get(key), "PRO") for per_run in keyed)
        deltas = (None, *(p - pros[0] for p in pros[1:]))
        lines.append(DefectLine(key[0], key[1], pros, deltas))
    return lines


def _thresholds(repo: Repository, store: ObjectStore, run: Run, categories: set[str],
                notes: list[str]) -> dict[str, float]:
    found = {}
    for category in sorted(categories):
        try:
            threshold = f1_threshold_logit(category_state(repo, store, run, category))
        except (ObjectStoreError, StateFormatError) as exc:
            notes.append(f"{run.name}: metric state of {category} unreadable ({exc})")
            continue
        if threshold is None:
            notes.append(f"{run.name}: {category} has no F1-max threshold (not aggregated, or no defect pixels); "
                         "its images are left out of the disagreements")
        else:
            found[category] = threshold
    return found


def _decide(store: ObjectStore, row: Image, threshold: float) -> Decision:
    top = float(load_logits(store, row).max())
    flagged = bool(np.float32(top) >= np.float32(threshold))
    return Decision(top, threshold, flagged, flagged == (row.label == 1))


def find_disagreements(repo: Repository, store: ObjectStore, runs: Sequence[Run],
                       notes: list[str]) -> tuple[list[Disagreement], int]:
    """Images finished in every run on which the runs' decisions differ, most apart first; and how many images
    every run decided."""
    done = [{r.image_path: r for r in repo.images(run.id, status=ImageStatus.DONE)} for run in runs]
    shared = sorted(set.intersection(*(set(d) for d in done)))
    categories = {done[0][path].category for path in shared}
    thresholds = [_thresholds(repo, store, run, categories, notes) for run in runs]
    found: list[Disagreement] = []
    decided = 0
    for path in shared:
        rows = [d[path] for d in done]
        if any(rows[0].category not in t for t in thresholds):
            continue
        try:
            decisions = tuple(_decide(store, row, t[row.category]) for row, t in zip(rows, thresholds, strict=True))
        except (LogitFormatError, ObjectStoreError) as exc:
            notes.append(f"{path}: {exc}")
            continue
        decided += 1
        if len({d.flagged for d in decisions}) > 1:
            found.append(Disagreement(path, rows[0].category, rows[0].defect, rows[0].label, decisions))
    found.sort(key=lambda d: (-d.spread, d.image_path))
    return found, decided


def _draw_panels(repo: Repository, store: ObjectStore, runs: Sequence[Run], chosen: list[Disagreement],
                 out: Path, notes: list[str]) -> None:
    rows = [{r.image_path: r for r in repo.images(run.id, status=ImageStatus.DONE)} for run in runs]
    for rank, item in enumerate(chosen):
        for index, (run, decision) in enumerate(zip(runs, item.decisions, strict=True)):
            row = rows[index].get(item.image_path)
            if row is None:
                continue
            try:
                loaded = load_result(store, run.dataset_root, row)
                data = panel_data(run, row, loaded, decision.threshold_logit,
                                   panel_title(run, row, None, decision.threshold_logit))
            except (GroundTruthError, MetricInputError, LogitFormatError, ObjectStoreError, PathEscapeError,
                    OSError) as exc:
                notes.append(f"{run.name}: no panel for {item.image_path} ({exc})")
                continue
            name = f"panels/{rank:03d}-{index}.png"
            render_panel(data, out / name)
            item.panels.append(name)


def build_comparison(repo: Repository, store: ObjectStore, runs: Sequence[Run], out_dir: str | Path, *,
                     top: int = 20, panels: bool = True,
                     progress: Callable[[str], None] | None = None) -> Comparison:
    """Check the runs, gather what the page shows and draw the panels of the ``top`` disagreements into
    ``out_dir/panels``."""
    rows = check_runs(repo, runs)
    notes: list[str] = []
    if progress is not None:
        progress("metrics")
    disagreements, decided = find_disagreements(repo, store, runs, notes)
    if progress is not None:
        progress("decisions")
    chosen = disagreements[:top]
    if panels and chosen:
        make_folder(Path(out_dir) / "panels")
        _draw_panels(repo, store, runs, chosen, Path(out_dir), notes)
    return Comparison(
        runs=[run_summary(repo, run) for run in runs], metric_lines=metric_lines(runs, rows),
        defect_lines=defect_lines(runs, rows), disagreements=chosen, shared_images=decided,
        disagreeing_images=len(disagreements), top=top, notes=notes,
    )


# --- the page ------------------------------------------------------------------------------------------------

_COMPARE_STYLE = """
td.best { background: #d5f5dc !important; font-weight: 700; } td.best::after { content: " ★"; color: #1a7f37; }
td.up { color: #1a7f37; font-weight: 600; } td.down { color: #cf222e; font-weight: 600; }
td.right { background: #d5f5dc; } td.wrong { background: #ffd6d1; }
tr.first td { border-top: 2px solid #24466b; }
.panels { display: flex; flex-direction: column; gap: 4px; }
"""


def _percent(value: float, *, css: str = "") -> str:
    klass = f' class="{css}"' if css else ""
    if math.isnan(value):
        return f'<td data-value="nan"{klass}>—</td>'
    return f'<td data-value="{value!r}"{klass}>{100 * value:.2f}</td>'


def _text(value: object) -> str:
    return f'<td class="text">{escape(str(value))}</td>'


def _head(columns: Sequence[str], text_columns: int) -> str:
    cells = "".join(f'<th class="{"text" if i < text_columns else ""}">{escape(c)}</th>'
                    for i, c in enumerate(columns))
    return f"<thead><tr>{cells}</tr></thead>"


def _runs_table(comparison: Comparison) -> str:
    runs = comparison.runs
    entries: list[tuple[str, list[str]]] = [
        ("detector", [r.detector for r in runs]), ("status", [r.status for r in runs]),
        ("created", [r.created for r in runs]), ("model fingerprint", [r.model_fingerprint for r in runs]),
        ("prompt mode", [r.prompt_mode + (" (oracle)" if r.oracle else "") for r in runs]),
        ("decoding mode", [r.decode_mode for r in runs]), ("conversation", [r.conversation for r in runs]),
        ("checkpoint", [r.checkpoint for r in runs]), ("code version", [r.code_version for r in runs]),
        ("images", [", ".join(f"{n} {s}" for s, n in sorted(r.status_totals.items())) or "none" for r in runs]),
    ]
    body = "".join(f"<tr><td>{escape(k)}</td>{''.join(_text(v) for v in values)}</tr>" for k, values in entries)
    return (f'<table class="config" id="runs">{_head(["", *(r.name for r in runs)], 1 + len(runs))}'
            f"<tbody>{body}</tbody></table>"
            f'<p class="note">dataset root: {escape(runs[0].dataset_root)}</p>')


def _metrics_table(comparison: Comparison) -> str:
    body = []
    for line in comparison.metric_lines:
        name = line.scope if line.scope in ("mean", "overall") else line.category
        first = ' first' if line.metric == METRIC_COLUMNS[0] else ""
        cells = "".join(_percent(c.value, css="best" if c.best else "") for c in line.cells)
        body.append(f'<tr class="{escape(line.scope)}{first}" data-category="{escape(line.category)}">'
                    f"{_text(name)}{_text(line.metric)}{cells}</tr>")
    columns = ["category", "metric", *(r.name for r in comparison.runs)]
    return ('<h2 id="metrics-side-by-side">Metrics side by side</h2>'
            f'<table id="metrics">{_head(columns, 2)}<tbody>{"".join(body)}</tbody></table>'
            '<p class="note">Percent (exact values in data-value). ★ and green: the best run of the row (higher is '
            "better; ties are all marked; — is a missing value and never best).</p>")


def _delta(value: float | None) -> str:
    if value is None:
        return '<td class="text">(reference)</td>'
    if math.isnan(value):
        return '<td data-value="nan">—</td>'
    css = "up" if value > _TIE else ("down" if value < -_TIE else "")
    klass = f' class="{css}"' if css else ""
    return f'<td data-value="{value!r}"{klass}>{100 * value:+.2f}</td>'


def _defect_table(comparison: Comparison) -> str:
    runs = comparison.runs
    columns = ["category", "defect_type", *(f"PRO {r.name}" for r in runs),
               *(f"Δ {r.name}" for r in runs[1:])]
    body = []
    for line in comparison.defect_lines:
        cells = "".join(_percent(p, css="best" if b else "") for p, b in zip(line.pros, best_flags(line.pros),
                                                                           strict=True))
        deltas = "".join(_delta(d) for d in line.deltas[1:])
        body.append(f"<tr>{_text(line.category)}{_text(line.defect)}{cells}{deltas}</tr>")
    return ('<h2 id="defects">PRO per defect type</h2>'
            f'<table id="defect-pro">{_head(columns, 2)}<tbody>{"".join(body)}</tbody></table>'
            f'<p class="note">Δ: PRO of the run minus PRO of {escape(runs[0].name)}, in percentage points '
            "(green: higher, red: lower).</p>")


def _decision_cells(item: Disagreement) -> str:
    cells = []
    for decision in item.decisions:
        verdict = "anomalous" if decision.flagged else "normal"
        cells.append(f'<td class="text {"right" if decision.correct else "wrong"}" '
                     f'data-correct="{int(decision.correct)}" data-score="{decision.score_logit!r}" '
                     f'data-threshold="{decision.threshold_logit!r}">{verdict} '
                     f"({'right' if decision.correct else 'wrong'}; p={_sigmoid(decision.score_logit):.3f} vs "
                     f"{_sigmoid(decision.threshold_logit):.3f})</td>")
    return "".join(cells)


def _disagreements(comparison: Comparison) -> str:
    runs = comparison.runs
    shown = len(comparison.disagreements)
    listed = f"; the {shown} most apart are listed (--top {comparison.top})" if shown else ""
    parts = ['<h2 id="disagreements">Images where the runs disagree</h2>',
             f"<p>{comparison.disagreeing_images} of {comparison.shared_images} images finished in every run are "
             "decided differently (one run right, another wrong)"
             f"{listed}."
             '</p><p class="note">Decision: anomalous when the image\'s largest logit reaches the run\'s F1-max '
             "threshold of its category (the pixels that threshold flags), right when that matches the label. "
             "Ranked by how far apart the runs' margins are (image probability minus threshold probability).</p>"]
    if not comparison.disagreements:
        return "".join(parts)
    columns = ["image", "defect", "label", *(r.name for r in runs), "spread"]
    body = []
    for item in comparison.disagreements:
        label = "anomalous" if item.label == 1 else "good"
        body.append(f"<tr>{_text(item.image_path)}{_text(item.defect)}{_text(label)}{_decision_cells(item)}"
                    f'<td data-value="{item.spread!r}">{item.spread:.3f}</td></tr>')
    parts.append(f'<table id="disagreement-list">{_head(columns, 3 + len(runs))}<tbody>{"".join(body)}'
                 "</tbody></table>")
    for item in comparison.disagreements:
        if not item.panels:
            continue
        figures = "".join(f'<img class="wide" src="{escape(p)}" alt="{escape(item.image_path)}">'
                          for p in item.panels)
        parts.append(f'<figure><figcaption>{escape(item.image_path)} — {escape(item.defect)}</figcaption>'
                     f'<div class="panels">{figures}</div></figure>')
    return "".join(parts)


def render_comparison(comparison: Comparison) -> str:
    """The whole HTML document: inline CSS, pictures by relative path, no script, nothing fetched."""
    names = " vs ".join(r.name for r in comparison.runs)
    oracle = [r.name for r in comparison.runs if r.oracle]
    warn = ""
    if oracle:
        warn = (f'<div class="warn">Oracle setting (the prompt names the ground-truth defect) in: '
                f"{escape(', '.join(oracle))}; its image-level metrics are not comparable with label-free runs.</div>")
    notes = ""
    if comparison.notes:
        notes = ("<h2 id=\"notes\">Left out</h2><ul>"
                 + "".join(f"<li>{escape(n)}</li>" for n in comparison.notes) + "</ul>")
    nav = ('<nav><a href="#metrics-side-by-side">metrics</a><a href="#defects">defect types</a>'
           '<a href="#disagreements">disagreements</a></nav>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>READAR comparison: {escape(names)}</title><style>{STYLE}{_COMPARE_STYLE}</style></head><body>"
        f"<h1>READAR comparison — {escape(names)}</h1>{warn}{_runs_table(comparison)}{nav}"
        f"{_metrics_table(comparison)}{_defect_table(comparison)}{_disagreements(comparison)}{notes}"
        "</body></html>\n"
    )


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """Write ``out_dir/index.html``; returns its path (:class:`~metrics.output.OutputError` when it cannot)."""
    return write_output(Path(out_dir) / "index.html", render_comparison(comparison))


def compare_runs(repo: Repository, store: ObjectStore, runs: Sequence[Run], out_dir: str | Path, *,
                 top: int = 20, progress: Callable[[str], None] | None = None) -> Path:
    """Build the comparison of ``runs`` and write it to ``out_dir/index.html``; returns the page's path.

    Nothing is written when the runs cannot be compared (:class:`CompareError`)."""
    comparison = build_comparison(repo, store, runs, out_dir, top=top, progress=progress)
    return write_comparison(comparison, out_dir)


__all__ = [
    "CompareError", "Comparison", "Decision", "DefectLine", "Disagreement", "MetricCell", "MetricLine",
    "best_flags", "build_comparison", "check_runs", "compare_runs", "defect_lines", "find_disagreements",
    "metric_lines", "render_comparison", "write_comparison",
]
