"""One image's diagnostic panel as a PNG (matplotlib, Agg; no pyplot state).

Four views side by side, all in original-image pixel coordinates: the image with its ground-truth contour; the
probability heat map (sigmoid of the logits) with the ground truth and the thresholded prediction; the
``[SEG]`` similarity map (24×24, bilinear, on the CLIP centre crop it covers) with its peak cell; the SasP
points (positive, negative, neutral) on the image.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image as PILImage

from metrics.output import visible, write_output
from metrics.reporting.failures import crop_window, similarity_peak

DISPLAY_SIDE = 320  # longest displayed side; bigger images are subsampled for drawing only
GT_COLOUR = "#00e5ff"
PREDICTION_COLOUR = "#ffffff"
POINT_STYLES = {  # label: (name, marker, colour)
    1: ("positive", "P", "#2ecc40"),
    0: ("negative", "X", "#ff4136"),
    -1: ("neutral", "o", "#ffdc00"),
}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class PanelData:
    """Everything one panel shows.

    image: uint8 (H, W, 3). probability: float (H, W) in [0, 1]. mask: bool (H, W) or None (good images).
    predicted: bool (H, W), the score map thresholded as the overlap measure does (drawn dashed), or None.
    similarity: (g, g) raw similarity or None. points: (n, 2) (x, y) pixels or None. labels: (n,) or None.
    title: one line above the views.
    """

    image: np.ndarray
    probability: np.ndarray
    mask: np.ndarray | None
    title: str
    predicted: np.ndarray | None = None
    similarity: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 (H, W, 3) for display (16-bit greyscale scaled to 8 bits)."""
    with PILImage.open(path) as opened:
        if opened.mode in _WIDE_MODES:
            wide = np.asarray(opened, dtype=np.float64)
            grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(opened.convert("RGB"))


def _contour(axes: object, mask: np.ndarray, step: int, colour: str, style: str = "solid") -> None:
    """Outline of a bool mask (subsampled by ``step``) in pixel coordinates of the full image."""
    small = mask[::step, ::step]
    if not small.any() or small.all():
        return
    xs = np.arange(small.shape[1]) * step + step / 2
    ys = np.arange(small.shape[0]) * step + step / 2
    axes.contour(xs, ys, small.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.0,
                 linestyles=style)


def _similarity_view(axes: object, data: PanelData, height: int, width: int, step: int) -> None:
    axes.set_facecolor("black")
    axes.imshow(data.image[::step, ::step], extent=(0, width, height, 0), alpha=0.35)
    similarity = np.asarray(data.similarity, dtype=np.float64)
    low, high = float(similarity.min()), float(similarity.max())
    normalised = (similarity - low) / (high - low) if high > low else np.zeros_like(similarity)
    top, bottom, left, right = crop_window(height, width)
    axes.imshow(normalised, extent=(left, right, bottom, top), cmap="viridis", vmin=0, vmax=1,
                interpolation="bilinear", alpha=0.8)
    grid = similarity.shape[0]
    row, col = similarity_peak(similarity)
    cell_h, cell_w = (bottom - top) / grid, (right - left) / grid
    axes.add_patch(Rectangle((left + col * cell_w, top + row * cell_h), cell_w, cell_h, fill=False,
                             edgecolor="#ff851b", linewidth=1.5))
    axes.set_title(f"[SEG] similarity {grid}×{grid} (peak □)", fontsize=9)


def _points_view(axes: object, data: PanelData) -> None:
    if data.points is None or data.labels is None or len(data.points) == 0:
        axes.text(0.5, 0.06, "no SasP points", ha="center", va="bottom", color="white", fontsize=9,
                  transform=axes.transAxes, bbox={"facecolor": "black", "alpha": 0.6, "linewidth": 0})
        axes.set_title("SasP points", fontsize=9)
        return
    points = np.asarray(data.points, dtype=float).reshape(-1, 2)
    labels = np.asarray(data.labels).ravel()
    for label, (name, marker, colour) in POINT_STYLES.items():
        chosen = points[labels == label]
        if chosen.size:
            axes.scatter(chosen[:, 0], chosen[:, 1], marker=marker, s=36 if label != -1 else 14, c=colour,
                         edgecolors="black", linewidths=0.5, label=f"{name} ({len(chosen)})")
    axes.legend(loc="lower center", fontsize=7, ncol=3, framealpha=0.7, handletextpad=0.2, columnspacing=0.6,
                borderpad=0.3)
    axes.set_title("SasP points", fontsize=9)


def render_panel(data: PanelData, path: str | Path, *, dpi: int = 72) -> Path:
    """Draw the views of ``data`` into a PNG at ``path``; returns the path. Image and score map always; the
    [SEG] similarity and the SasP points only when the detector has them (``similarity`` / ``points`` not None:
    the baseline has neither, LISA no points)."""
    height, width = data.probability.shape
    step = max(1, int(np.ceil(max(height, width) / DISPLAY_SIDE)))
    views = 2 + (data.similarity is not None) + (data.points is not None)
    figure = Figure(figsize=(3.25 * views, 3.7), dpi=dpi)
    axes = list(figure.subplots(1, views))
    extent = (0, width, height, 0)
    shown = data.image[::step, ::step]

    axes[0].imshow(shown, extent=extent)
    axes[0].set_title("image + ground truth", fontsize=9)

    axes[1].imshow(data.probability[::step, ::step], extent=extent, cmap="inferno", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    title = "probability (0–1)"
    if data.predicted is not None:
        _contour(axes[1], data.predicted, step, PREDICTION_COLOUR, "dashed")
        title += " + thresholded (dashed)"
    axes[1].set_title(title, fontsize=9)

    extra = iter(axes[2:])
    if data.similarity is not None:
        _similarity_view(next(extra), data, height, width, step)
    if data.points is not None:
        points_axes = next(extra)
        points_axes.imshow(shown, extent=extent)
        _points_view(points_axes, data)

    for view in axes:
        if data.mask is not None:
            _contour(view, data.mask, step, GT_COLOUR)
        view.set_xlim(0, width)
        view.set_ylim(height, 0)
        view.set_xticks([])
        view.set_yticks([])
    lines = literal_title(figure, data.title)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84 if lines == 1 else 0.78, wspace=0.04)
    return save_figure(figure, path, dpi=dpi)


def literal_title(figure: Figure, title: str) -> int:
    """The figure's title, drawn as written: names with ``$`` are not math, and no LaTeX runs. It wraps to the
    figure's width (a two-view panel is half as wide as a four-view one) in at most two lines, the second cut
    with an ellipsis. Returns the number of lines, for the caller's top margin."""
    per_line = max(30, int(figure.get_figwidth() * 12))  # characters of 10 pt DejaVu Sans per inch, about
    lines = textwrap.wrap(visible(title), per_line) or [""]
    if len(lines) > 2:
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), per_line, placeholder=" …")]
    figure.suptitle("\n".join(lines), fontsize=10, x=0.01, ha="left", usetex=False, parse_math=False)
    return len(lines)


def save_figure(figure: Figure, path: str | Path, *, dpi: int) -> Path:
    """Render ``figure`` (PNG, or the format its suffix names) and write it to ``path``; a file that cannot be
    written (full disk, unusable path) raises :class:`~metrics.output.OutputError`."""
    target = Path(path)
    suffix = target.suffix.lstrip(".").lower()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix if suffix in figure.canvas.get_supported_filetypes() else "png", dpi=dpi)
    return write_output(target, buffer.getvalue())
