"""A scope's curve figure as a PNG: ROC (pixel and image), PRO up to FPR 0.3, score histograms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from metrics.curves import FPR_LIMIT
from metrics.reporting.curves import Curve
from metrics.reporting.panels import literal_title, save_figure


@dataclass(frozen=True)
class ScopeCurves:
    """The curves of one scope (see :mod:`metrics.reporting.curves`) and its metric values for the legends.

    histogram: (edges (b+1,), normal (b,), defect (b,)) fractions of each class's pixels per probability bin.
    """

    title: str
    pixel_roc: Curve
    image_roc: Curve
    pro: Curve
    histogram: tuple[np.ndarray, np.ndarray, np.ndarray]
    pauroc: float
    iauroc: float
    pro_value: float


def _percent(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _undefined(axes: object, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="#666666", transform=axes.transAxes)


def render_curves(curves: ScopeCurves, path: str | Path, *, dpi: int = 72) -> Path:
    """Draw the three views of ``curves`` into a PNG at ``path``; returns the path."""
    figure = Figure(figsize=(13.0, 3.6), dpi=dpi)
    roc_axes, pro_axes, histogram_axes = figure.subplots(1, 3)

    roc_axes.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8, linestyle=":")
    if not curves.pixel_roc.empty:
        roc_axes.plot(curves.pixel_roc.x, curves.pixel_roc.y, color="#0074d9",
                      label=f"pixel (pAUROC {_percent(curves.pauroc)})")
    if not curves.image_roc.empty:
        roc_axes.step(curves.image_roc.x, curves.image_roc.y, where="post", color="#ff851b",
                      label=f"image (iAUROC {_percent(curves.iauroc)})")
    if curves.pixel_roc.empty and curves.image_roc.empty:
        _undefined(roc_axes, "undefined: only one class in scope")
    else:
        roc_axes.legend(loc="lower right", fontsize=8)
    roc_axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    roc_axes.set_title("ROC", fontsize=9)

    if curves.pro.empty:
        _undefined(pro_axes, "undefined: no defect regions or no normal pixels")
    else:
        pro_axes.plot(curves.pro.x, curves.pro.y, color="#2ecc40", marker=".", markersize=3,
                      label=f"PRO {_percent(curves.pro_value)} (area / 0.3)")
        pro_axes.fill_between(curves.pro.x, curves.pro.y, color="#2ecc40", alpha=0.15)
        pro_axes.legend(loc="lower right", fontsize=8)
    pro_axes.set(xlim=(0, FPR_LIMIT), ylim=(0, 1.02), xlabel="false positive rate", ylabel="per-region overlap")
    pro_axes.set_title("PRO (200 thresholds, FPR ≤ 0.3)", fontsize=9)

    edges, normal, defect = curves.histogram
    centres = 0.5 * (edges[1:] + edges[:-1])
    width = float(edges[1] - edges[0])
    histogram_axes.bar(centres, normal, width=width, color="#0074d9", alpha=0.55, label="normal pixels")
    histogram_axes.bar(centres, defect, width=width, color="#ff4136", alpha=0.55, label="defect pixels")
    if normal.any() or defect.any():
        histogram_axes.set_yscale("log")
    histogram_axes.set(xlim=(0, 1), xlabel="probability", ylabel="fraction of the class's pixels")
    histogram_axes.legend(loc="upper center", fontsize=8)
    histogram_axes.set_title("score histograms", fontsize=9)

    for axes in (roc_axes, pro_axes, histogram_axes):
        axes.tick_params(labelsize=7)
        axes.xaxis.label.set_size(8)
        axes.yaxis.label.set_size(8)
    literal_title(figure, curves.title)
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.86, wspace=0.22)
    return save_figure(figure, path, dpi=dpi)
