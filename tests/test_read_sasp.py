"""SasP (similarity as points), DESIGN.md 5.5: constructed maps and hand-worked small cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.read.errors import SimilarityError
from workers.read.sasp import (
    cells_to_pixels,
    coarse_map,
    full_resolution_map,
    refine_points,
    select_cells,
    similarity_to_points,
)


def _peak(row: int, col: int, side: int = 24) -> torch.Tensor:
    """A 576-vector with one high cell on a low background."""
    grid = torch.zeros(side, side)
    grid[row, col] = 10.0
    return grid.flatten()


def _blocks() -> torch.Tensor:
    """4×4 grid of constant 2×2 blocks [[0, 1], [2, 3]]: downsampling by 2 gives exactly the block values."""
    return torch.tensor(
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32
    ).flatten()


def test_hand_worked_square_case_steps_2_to_4() -> None:
    coarse = coarse_map(_blocks(), (4, 4), down_sample=2)
    torch.testing.assert_close(coarse, torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    cells, labels = select_cells(coarse)
    assert cells.tolist() == [[1, 1], [0, 0], [0, 1], [1, 0]]  # positive, negative, neutrals row-major
    assert labels.tolist() == [1, 0, -1, -1]
    assert cells_to_pixels(cells, (2, 2), (4, 4)).tolist() == [[3, 3], [1, 1], [3, 1], [1, 3]]


def test_hand_worked_wide_case_pads_with_minus_one() -> None:
    # H=4, W=8: scale = 2/4, columns pad (8·2//4 − 2)//2 = 1 each side.
    coarse = coarse_map(_blocks(), (4, 8), down_sample=2)
    assert coarse.tolist() == [
        [-1.0, 0.0, pytest.approx(1 / 3), -1.0],
        [-1.0, pytest.approx(2 / 3), 1.0, -1.0],
    ]
    cells, labels = select_cells(coarse)
    assert cells.tolist() == [[1, 2], [0, 1], [0, 2], [1, 1]]
    assert labels.tolist() == [1, 0, -1, -1]
    # x = (c + 0.5)·8/4, y = (r + 0.5)·4/2, truncated
    assert cells_to_pixels(cells, (2, 4), (4, 8)).tolist() == [[5, 3], [3, 1], [5, 1], [3, 3]]


def test_hand_worked_step_1_pads_zero_rows_for_tall_images() -> None:
    similarity = _peak(5, 7)
    square = full_resolution_map(similarity, (336, 336))
    tall = full_resolution_map(
        similarity, (672, 336)
    )  # scale 1: (672 − 336)//2 = 168 zero rows top and bottom
    assert tall.shape == (672, 336)
    torch.testing.assert_close(tall[168:504], square)
    assert tall[:168].abs().max() == 0 and tall[504:].abs().max() == 0
    assert float(square.max()) <= 1.0 and float(square.min()) >= 0.0


def test_step_4_clamps_to_the_last_pixel() -> None:
    assert cells_to_pixels(torch.tensor([[0, 0]]), (1, 1), (1, 1)).tolist() == [[0, 0]]


@pytest.mark.parametrize("image_hw", [(240, 240), (200, 320), (320, 200)])
def test_single_peak_gives_positive_points_at_the_peak(image_hw: tuple[int, int]) -> None:
    height, width = image_hw
    points, labels = similarity_to_points(_peak(11, 16), image_hw)
    positives = points[labels == 1]
    assert len(positives) >= 1 and labels[0] == 1
    # The peak cell (11, 16) of the 24×24 grid on the centre crop (side s = min(H, W)).
    side = min(height, width)
    peak_x = (width - side) / 2 + (16 + 0.5) * side / 24
    peak_y = (height - side) / 2 + (11 + 0.5) * side / 24
    distance = ((positives[0, 0] - peak_x) ** 2 + (positives[0, 1] - peak_y) ** 2).sqrt()
    assert distance < side / 12 + 1  # within one coarse cell


@given(
    seed=st.integers(0, 2**31 - 1),
    smooth=st.booleans(),
    height=st.integers(8, 400),
    width=st.integers(8, 400),
)
@settings(max_examples=25, deadline=None)
def test_order_count_and_padding_never_chosen(seed: int, smooth: bool, height: int, width: int) -> None:
    similarity = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    if smooth:  # a few broad blobs instead of noise
        similarity = torch.nn.functional.avg_pool2d(similarity.reshape(1, 1, 24, 24), 7, 1, 3).flatten()
    coarse = coarse_map(similarity, (height, width))
    cells, labels = select_cells(coarse)
    assert len(cells) <= 30 and len(cells) == len(labels)
    assert all(coarse[r, c] >= 0 for r, c in cells.tolist())  # −1 padding cells never selected
    order = {1: 0, 0: 1, -1: 2}
    ranks = [order[int(v)] for v in labels]
    assert ranks == sorted(ranks)  # positives, then negatives, then neutrals
    points, point_labels = similarity_to_points(similarity, (height, width))
    assert points.shape == (len(labels), 2) and torch.equal(point_labels, labels)
    assert points.dtype == torch.float32 and point_labels.dtype == torch.long
    assert (points[:, 0] >= 0).all() and (points[:, 0] <= width - 1).all()
    assert (points[:, 1] >= 0).all() and (points[:, 1] <= height - 1).all()


def test_non_square_images_have_padding_cells_of_minus_one() -> None:
    coarse = coarse_map(torch.randn(576), (200, 400))
    assert coarse.shape == (12, 24)  # (400·12//200 − 12)//2 = 6 columns each side
    assert (coarse[:, :6] == -1).all() and (coarse[:, -6:] == -1).all()
    assert (coarse[:, 6:18] >= 0).all()


def test_refinement_moves_toward_mass_and_stays_on_flat_map() -> None:
    flat = torch.full((50, 60), 0.5)
    still = refine_points(torch.tensor([[30, 25]]), flat)
    torch.testing.assert_close(still, torch.tensor([[30.0, 25.0]]), atol=1e-5, rtol=0)
    slope = torch.zeros(50, 60)
    slope[:, 31:] = 1.0  # more probability to the right of x = 30
    moved = refine_points(torch.tensor([[30, 25]]), slope)
    assert moved[0, 0] > 30.05 and abs(float(moved[0, 1]) - 25.0) < 1e-5


def test_refinement_window_equals_the_global_formula() -> None:
    torch.manual_seed(0)
    full = torch.rand(40, 30)
    point = torch.tensor([[12, 20]])
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(30.0), indexing="ij")
    probability = torch.softmax(full.double().flatten(), 0).reshape(40, 30)
    weights = torch.exp(-((xs - 12) ** 2 + (ys - 20) ** 2)).double() * probability
    weights = weights / weights.sum()
    expected = torch.tensor([[(weights * xs).sum(), (weights * ys).sum()]], dtype=torch.float32)
    torch.testing.assert_close(refine_points(point, full), expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise_typed_errors() -> None:
    with pytest.raises(SimilarityError, match="square"):
        similarity_to_points(torch.randn(575), (10, 10))
    with pytest.raises(SimilarityError, match="down_sample"):
        similarity_to_points(torch.randn(576), (10, 10), down_sample=5)
    with pytest.raises(SimilarityError, match="positive"):
        similarity_to_points(torch.randn(576), (0, 10))


def test_constant_similarity_gives_negatives_not_nan() -> None:
    points, labels = similarity_to_points(torch.ones(576), (64, 64))
    assert torch.isfinite(points).all() and set(labels.tolist()) == {0}
