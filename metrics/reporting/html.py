"""Lay out a :class:`~metrics.reporting.content.ReportContent` as one static HTML page.

The page links its pictures by relative paths (``plots/``, ``panels/``), so the folder opens from disk or any
static file server. Every metric cell carries its exact value in ``data-value``; the text shows percent.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from metrics.output import write_output
from metrics.reporting.content import PanelRef, ReportContent
from metrics.reporting.failures import FAILURE_CLASSES
from storage.models import ImageStatus

METRIC_COLUMNS = ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max")
TABLE_COLUMNS = ("scope", "category", *METRIC_COLUMNS, "num_images", "num_anom_images", "defect_type",
                 "num_skipped", "num_failed")

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 16px 24px; color: #1b1f23;
       background: #ffffff; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 8px 0; } h2 { font-size: 18px; border-bottom: 2px solid #0074d9;
padding-bottom: 3px; margin-top: 28px; } h3 { font-size: 15px; margin: 18px 0 6px 0; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border: 1px solid #c8ccd0; padding: 3px 8px; text-align: right; }
th { background: #24466b; color: #ffffff; } td.text, th.text { text-align: left; }
tr.mean td, tr.overall td { background: #dcebfa; font-weight: 600; } tr.category td { background: #f3f8fd; }
td.low { background: #ffd6d1 !important; } td.high { background: #d5f5dc !important; }
.top { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.config td { text-align: left; } .config td:first-child { font-weight: 600; background: #f0f2f4; }
.warn { background: #fff3cd; border: 1px solid #e0a800; padding: 6px 10px; margin: 8px 0; }
.note { color: #57606a; font-size: 12px; } img.wide { max-width: 100%; border: 1px solid #d0d7de; }
figure { margin: 6px 0 12px 0; } .gallery { display: flex; flex-wrap: wrap; gap: 0 1%; }
.gallery figure { width: 49%; margin: 4px 0 10px 0; } figcaption { font-size: 12px; color: #333; }
nav a { margin-right: 12px; }
"""


def _number(value: Any) -> str:
    """A table cell for a metric (percent text, exact value kept) or a count."""
    if isinstance(value, float):
        if math.isnan(value):
            return '<td data-value="nan">—</td>'
        return f'<td data-value="{value!r}">{100 * value:.2f}</td>'
    return f'<td data-value="{escape(str(value))}">{escape(str(value))}</td>'


def _cell(value: Any, *, text: bool = False) -> str:
    return f'<td class="text">{escape(str(value))}</td>' if text else _number(value)


def _header(columns: tuple[str, ...] | list[str], text_columns: int = 2) -> str:
    cells = "".join(f'<th class="{"text" if i < text_columns else ""}">{escape(c)}</th>'
                    for i, c in enumerate(columns))
    return f"<thead><tr>{cells}</tr></thead>"


def metrics_table(rows: list[dict[str, Any]]) -> str:
    """The metric rows with the CSV's columns, in the given order (mean, overall, categories, defects)."""
    body = []
    for row in rows:
        cells = []
        for column in TABLE_COLUMNS:
            is_text = column in ("scope", "category", "defect_type")
            cells.append(_cell(row.get(column, ""), text=is_text))
        body.append(f'<tr class="{escape(row["scope"])}">{"".join(cells)}</tr>')
    return (f'<table id="metrics">{_header(TABLE_COLUMNS)}<tbody>{"".join(body)}</tbody></table>'
            '<p class="note">Metrics in percent (exact values in each cell\'s data-value attribute); '
            "columns and row order as in the run's CSV.</p>")


def _config_table(content: ReportContent) -> str:
    run = content.run
    prompt = escape(run.prompt_mode)
    if run.oracle:
        prompt += " <b>(oracle: ground-truth defect names in the prompt)</b>"
    totals = ", ".join(f"{n} {escape(s)}" for s, n in sorted(run.status_totals.items())) or "none"
    entries = [
        ("run", escape(f"{run.name} ({run.status}, created {run.created})")), ("detector", escape(run.detector)),
        ("model fingerprint", escape(run.model_fingerprint)), ("prompt mode", prompt),
        ("decoding mode", escape(run.decode_mode)), ("conversation", escape(run.conversation)),
        ("checkpoint", escape(run.checkpoint)), ("dataset root", escape(run.dataset_root)),
        ("code version", escape(run.code_version)), ("images", totals),
        *([("setting", escape(run.setting_note))] if run.setting_note else []),
    ]
    rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in entries)
    return f'<table class="config" id="config">{rows}</table>'


def _problems(content: ReportContent) -> str:
    counts = content.problem_counts
    head = (f"<h2 id=\"problems\">Skipped and failed images</h2><p>{counts.get(ImageStatus.FAILED, 0)} failed, "
            f"{counts.get(ImageStatus.SKIPPED, 0)} skipped (not in the metrics).</p>")
    if not content.problems:
        return head
    rows = "".join(f'<tr><td class="text">{escape(p)}</td><td class="text">{escape(s)}</td>'
                   f'<td class="text">{escape(r)}</td></tr>' for p, s, r in content.problems)
    shown = len(content.problems)
    more = sum(counts.values()) - shown
    tail = f"<p class=\"note\">… and {more} more (`readar results RUN --status failed`).</p>" if more > 0 else ""
    return (f'{head}<table id="problem-list">{_header(["image", "status", "reason"], 3)}<tbody>{rows}'
            f"</tbody></table>{tail}")


def _figure(panel: PanelRef) -> str:
    outcome = panel.outcome
    caption = (f"{escape(outcome.image_path)} — {escape(outcome.defect)}, IoU {outcome.iou:.3f}, "
               f"{escape(outcome.failure)}")
    return (f'<figure><img class="wide" src="{escape(panel.file)}" alt="{escape(outcome.image_path)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _gallery(panels: list[PanelRef]) -> str:
    return f'<div class="gallery">{"".join(_figure(p) for p in panels)}</div>'


def _categories(content: ReportContent) -> str:
    parts = ['<h2 id="categories">Categories</h2>',
             '<p class="note">Overlap of an image = IoU of its ground-truth mask with its score map thresholded at '
             "the category's F1-max threshold (probability 0.5 when the category has none). Panels: image with "
             "ground truth (cyan), probability with the thresholded region (dashed), [SEG] similarity on the CLIP "
             "crop with its peak cell, SasP points (green + positive, red × negative, yellow ● neutral).</p>"]
    for section in content.categories:
        parts.append(f'<h3 id="cat-{escape(section.name)}">{escape(section.name)}</h3>')
        if section.note:
            parts.append(f'<p class="note">{escape(section.note)}</p>')
        if section.curves_file:
            parts.append(f'<img class="wide" src="{escape(section.curves_file)}" alt="curves of '
                         f'{escape(section.name)}">')
        if section.threshold_logit is not None:
            probability = 1.0 / (1.0 + math.exp(-section.threshold_logit))
            parts.append(f'<p class="note">F1-max threshold: logit {section.threshold_logit:.4g} '
                         f"(probability {probability:.4f}); {section.num_analysed} anomalous image(s) analysed.</p>")
        for label, panels in (("best overlap", section.best), ("worst overlap", section.worst)):
            if panels:
                parts.append(f"<p><b>{label}</b></p>{_gallery(panels)}")
    return "".join(parts)


def _defect_table(content: ReportContent) -> str:
    columns = ["category", "defect_type", "PRO", "pAUROC", "iAUROC", "F1_max", "num_images", "num_anom_images",
               "analysed", "success", "mean IoU"]
    body = []
    for row in content.defect_rows:
        pro = row["PRO"]
        flag = "" if math.isnan(pro) else (' class="low"' if pro < 0.5 else (' class="high"' if pro >= 0.9 else ""))
        cells = [_cell(row["category"], text=True), _cell(row["defect_type"], text=True),
                 _number(pro).replace("<td", f"<td{flag}", 1), *(_number(row[c]) for c in
                                                               ("pAUROC", "iAUROC", "F1_max", "num_images",
                                                                "num_anom_images", "analysed", "success")),
                 _number(row["mean_iou"])]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return ('<h2 id="defects">Defect types (worst PRO first)</h2>'
            f'<table id="defect-types">{_header(columns)}<tbody>{"".join(body)}</tbody></table>'
            f'<p class="note">Each defect type is scored with its category\'s good images as negatives. '
            f"success = overlap IoU ≥ {content.success_iou:g}; mean IoU in percent.</p>")


def _count_table(table_id: str, keys: list[tuple[str, ...]], counts: list[dict[str, int]],
                 key_names: list[str], classes: list[str]) -> str:
    body = []
    for key, per_class in zip(keys, counts, strict=True):
        total = sum(per_class.values())
        cells = "".join(_cell(k, text=True) for k in key) + "".join(_number(per_class.get(c, 0)) for c in classes)
        body.append(f"<tr>{cells}{_number(total)}</tr>")
    header = _header([*key_names, *classes, "total"], len(key_names))
    return f'<table id="{table_id}">{header}<tbody>{"".join(body)}</tbody></table>'


def _failures(content: ReportContent) -> str:
    parts = ['<h2 id="failures">Failure breakdown (anomalous images)</h2>']
    if not content.has_similarity:
        parts.append("<p><b>This detector stores no similarity map, so images are classified only as success "
                     "or miss (plus no_seg when the detector reports it).</b></p>")
    legend = "".join(f"<li><b>{escape(c)}</b>: {escape(FAILURE_CLASSES[c])}</li>" for c in content.classes)
    parts.append(f"<ul>{legend}</ul><p class=\"note\">Checked in the order listed; success level: overlap IoU ≥ "
                 f"{content.success_iou:g}. The similarity grid covers the centre crop CLIP sees (DESIGN 5.5); "
                 "the mask is cropped the same way and max-pooled to the grid.</p>")
    categories = sorted(content.failure_counts)
    parts.append("<h3>per category</h3>" + _count_table(
        "failures-by-category", [(c,) for c in categories], [content.failure_counts[c] for c in categories],
        ["category"], content.classes))
    defects = sorted(content.defect_failure_counts)
    parts.append("<h3>per defect type</h3>" + _count_table(
        "failures-by-defect", defects, [content.defect_failure_counts[k] for k in defects],
        ["category", "defect_type"], content.classes))
    for failure in content.classes:
        examples = content.examples.get(failure) or []
        if examples:
            parts.append(f"<h3>examples: {escape(failure)}</h3>{_gallery(examples)}")
    if content.analysis_notes:
        notes = "".join(f"<li>{escape(n)}</li>" for n in content.analysis_notes)
        parts.append(f"<h3>left out of the per-image analysis</h3><ul>{notes}</ul>")
    return "".join(parts)


def render_page(content: ReportContent) -> str:
    """The whole HTML document."""
    run = content.run
    oracle = ""
    if run.oracle:
        oracle = f'<div class="warn">{escape(run.oracle_note)}.</div>'
    nav = ('<nav><a href="#metrics">metrics</a><a href="#problems">skipped/failed</a>'
           '<a href="#categories">categories</a><a href="#defects">defect types</a>'
           '<a href="#failures">failure breakdown</a></nav>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>READAR report: {escape(run.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>READAR report — {escape(run.name)}</h1>{oracle}"
        f'<div class="top"><div>{metrics_table(content.metric_rows)}</div><div>{_config_table(content)}</div></div>'
        f"{nav}{_problems(content)}{_categories(content)}{_defect_table(content)}{_failures(content)}"
        "</body></html>\n"
    )


def write_page(content: ReportContent, path: str | Path) -> Path:
    """Write :func:`render_page` to ``path`` (UTF-8); returns the path (:class:`~metrics.output.OutputError` when it
    cannot be written)."""
    return write_output(path, render_page(content))
