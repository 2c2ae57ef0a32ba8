"""Where READ's similarity grid lies on the original image.

The grid covers CLIP's 336² centre crop. SasP (workers/read/sasp.py) pads the grid back to the image's aspect
ratio before resizing it to the image; the report (metrics/reporting) draws the same window. One copy of the
arithmetic serves both, so the overlay cannot drift from what the points were chosen on.
"""

from __future__ import annotations

CLIP_SIDE = 336  # CLIP ViT-L/14-336 input side


def aspect_padding(side: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns to pad on each side of a ``side``² map to reach the image's aspect ratio.

    scale = side / min(H, W); pad (⌊H·scale⌋ − side) // 2 rows and likewise columns (integer arithmetic, so the
    short side gets exactly 0).
    """
    height, width = image_hw
    short = min(height, width)
    return (height * side // short - side) // 2, (width * side // short - side) // 2
