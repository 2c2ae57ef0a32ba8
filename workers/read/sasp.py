"""SasP, "similarity as points" (READ, CVPR 2025): the [SEG]–image similarity map turned into SAM point prompts.

Steps 1–5 of DESIGN.md 5.5, each a pure function so each can be checked on its own:
1. :func:`full_resolution_map` — normalised similarity at image resolution (M);
2. :func:`coarse_map` — downsampled similarity padded with −1 to the image's aspect ratio (C);
3. :func:`select_cells` — positive, negative and neutral cells, at most ``num_points``;
4. :func:`cells_to_pixels` — cell centres in pixel coordinates;
5. :func:`refine_points` — discrete → continuous: Gaussian-weighted centre of the softmax of M.
:func:`similarity_to_points` runs all five. Grids other than 24×24 work when the length is a square whose
side is divisible by ``down_sample``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from metrics.geometry import CLIP_SIDE, aspect_padding
from workers.read.errors import SimilarityError

# Step 5 weights are exp(M_p − d²) with M in [0, 1] (the softmax's normaliser cancels), so beyond 10 px a
# pixel's weight is below e·exp(−100) ≈ 1e-43 of the centre's: a 21×21 window is exact in float32 and float64.
REFINE_RADIUS = 10


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant input (no contrast) becomes all zeros instead of NaN."""
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def _grid_side(similarity: torch.Tensor, down_sample: int) -> int:
    if similarity.ndim != 1:
        raise SimilarityError(
            f"similarity must be a 1-D vector of image-token scores; got shape {tuple(similarity.shape)}"
        )
    side = math.isqrt(similarity.numel())
    if side * side != similarity.numel() or side == 0:
        raise SimilarityError(
            f"similarity has {similarity.numel()} values, not a square grid (READ: 576 = 24×24)"
        )
    if down_sample < 1 or side % down_sample:
        raise SimilarityError(f"down_sample {down_sample} does not divide the {side}×{side} similarity grid")
    return side


def full_resolution_map(similarity: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Step 1, M: (N,) similarity → float32 (H, W) in [0, 1].

    Min-max normalise, reshape to the grid, bilinear resize to 336², zero-pad to the image aspect ratio,
    bilinear resize to (H, W) (align_corners=False throughout).
    """
    side = _grid_side(similarity, 1)
    grid = _min_max(similarity.float()).reshape(1, 1, side, side)
    crop = F.interpolate(grid, size=(CLIP_SIDE, CLIP_SIDE), mode="bilinear", align_corners=False)
    pad_rows, pad_cols = aspect_padding(CLIP_SIDE, image_hw)
    padded = F.pad(crop, (pad_cols, pad_cols, pad_rows, pad_rows), value=0.0)
    return F.interpolate(padded, size=tuple(image_hw), mode="bilinear", align_corners=False)[0, 0]


def coarse_map(similarity: torch.Tensor, image_hw: tuple[int, int], down_sample: int = 2) -> torch.Tensor:
    """Step 2, C: (N,) similarity → float32 (h′, w′); cells in [0, 1], aspect padding = −1."""
    side = _grid_side(similarity, down_sample)
    small = side // down_sample
    grid = similarity.float().reshape(1, 1, side, side)
    resized = F.interpolate(grid, size=(small, small), mode="bilinear", align_corners=False)
    normalised = _min_max(resized)
    pad_rows, pad_cols = aspect_padding(small, image_hw)
    return F.pad(normalised, (pad_cols, pad_cols, pad_rows, pad_rows), value=-1.0)[0, 0]


def select_cells(
    coarse: torch.Tensor, *, num_points: int = 30, t_pos: float = 0.8, t_neg: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: (h′, w′) map → cells (n, 2) as (row, col) long, labels (n,) long in {1, 0, −1}; n ≤ num_points.

    Positives (C ≥ t_pos) highest first, then negatives (0 ≤ C ≤ t_neg) lowest first, then neutrals
    (t_neg < C < t_pos) in row-major order. Padding cells (−1) are never chosen. Ties keep row-major order.
    """
    values = coarse.flatten()
    order = torch.arange(values.numel())
    positive = order[values >= t_pos]
    positive = positive[torch.sort(values[positive], descending=True, stable=True).indices]
    negative = order[(values >= 0) & (values <= t_neg)]
    negative = negative[torch.sort(values[negative], stable=True).indices]
    neutral = order[(values > t_neg) & (values < t_pos)]
    chosen = torch.cat([positive, negative, neutral])[:num_points]
    labels = torch.cat(
        [
            torch.ones(len(positive), dtype=torch.long),
            torch.zeros(len(negative), dtype=torch.long),
            -torch.ones(len(neutral), dtype=torch.long),
        ]
    )[:num_points]
    width = coarse.shape[1]
    cells = torch.stack([chosen // width, chosen % width], dim=1)
    return cells, labels


def cells_to_pixels(
    cells: torch.Tensor, coarse_hw: tuple[int, int], image_hw: tuple[int, int]
) -> torch.Tensor:
    """Step 4: (n, 2) (row, col) cells → (n, 2) long (x, y) pixels: cell centre, clamped, truncated."""
    height, width = image_hw
    coarse_h, coarse_w = coarse_hw
    rows, cols = cells[:, 0].double(), cells[:, 1].double()
    x = torch.clamp((cols + 0.5) * width / coarse_w, max=width - 1)
    y = torch.clamp((rows + 0.5) * height / coarse_h, max=height - 1)
    return torch.stack([x, y], dim=1).long()


def refine_points(points: torch.Tensor, full_map: torch.Tensor, radius: int = REFINE_RADIUS) -> torch.Tensor:
    """Step 5: (n, 2) (x, y) pixels → (n, 2) float32 (x, y), the Gaussian-weighted mean under softmax(M).

    w_p ∝ exp(−|p − p₀|²)·softmax(M)_p = exp(M_p − |p − p₀|²)/Z, evaluated on a (2·radius+1)² window clipped
    to the image (see REFINE_RADIUS for why that is exact).
    """
    height, width = full_map.shape
    values = full_map.double()
    refined = torch.empty(points.shape[0], 2, dtype=torch.float64)
    for index, (x0, y0) in enumerate(points.tolist()):
        top, bottom = max(0, y0 - radius), min(height, y0 + radius + 1)
        left, right = max(0, x0 - radius), min(width, x0 + radius + 1)
        ys = torch.arange(top, bottom, dtype=torch.float64)[:, None]
        xs = torch.arange(left, right, dtype=torch.float64)[None, :]
        log_weights = values[top:bottom, left:right] - ((xs - x0) ** 2 + (ys - y0) ** 2)
        weights = torch.softmax(log_weights.flatten(), dim=0).reshape(log_weights.shape)
        refined[index, 0] = (weights * xs).sum()
        refined[index, 1] = (weights * ys).sum()
    return refined.float()


def similarity_to_points(
    similarity: torch.Tensor,
    image_hw: tuple[int, int],
    *,
    down_sample: int = 2,
    num_points: int = 30,
    t_pos: float = 0.8,
    t_neg: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SasP steps 1–5: (576,) [SEG]·image-token dot products → points (n, 2) float (x, y) in original-image
    pixels and labels (n,) long in {1 positive, 0 negative, −1 neutral}, n ≤ num_points, positives first.

    image_hw: (H, W) of the original image. Defaults are those of the released 7B model (13B: down_sample=1).
    """
    height, width = (int(v) for v in image_hw)
    if height <= 0 or width <= 0:
        raise SimilarityError(f"image size must be positive; got {image_hw}")
    similarity = similarity.detach().float().cpu()
    coarse = coarse_map(similarity, (height, width), down_sample)
    cells, labels = select_cells(coarse, num_points=num_points, t_pos=t_pos, t_neg=t_neg)
    pixels = cells_to_pixels(cells, (coarse.shape[0], coarse.shape[1]), (height, width))
    points = refine_points(pixels, full_resolution_map(similarity, (height, width)))
    return points, labels
