"""SAM prompting with READ's point prompts and the [SEG] token; low-resolution mask logits. DESIGN.md 5.5 step 6.

The sparse prompt of one mask is (as READ/LISA's modified segment-anything PromptEncoder builds it): the SasP
points in the 1024 frame with their labels, one padding point (0, 0) with label −1 (segment-anything pads when
no box is given), then the 256-d [SEG] projection as one more token. LISA uses the [SEG] token alone. The dense
prompt is SAM's "no mask" embedding.

The setting behind the published READAR numbers (``read_as_published``) lost its SasP points to a swallowed
exception, so its prompt was segment-anything's padding point alone (label −1) and then [SEG]: two tokens. transformers' SamPromptEncoder gives label −1 the "not a point" embedding
exactly as segment-anything does (it reserves −10 for its own batch padding, which is not used here).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import SamModel


def frame_points(
    points: torch.Tensor, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> torch.Tensor:
    """(n, 2) (x, y) original-image pixels → (n, 2) float32 coordinates in SAM's 1024 frame.

    segment-anything ResizeLongestSide.apply_coords: x·w_in/W, y·h_in/H with the rounded resized sizes.
    """
    height, width = original_hw
    in_h, in_w = input_hw
    scale = torch.tensor([in_w / width, in_h / height], dtype=torch.float64)
    return (points.double() * scale).float()


def padding_point_token(sam: SamModel) -> torch.Tensor:
    """(1, D): SAM's embedding of a point labelled −1 ("not a point"), as its padding point gets it.

    segment-anything zeroes the positional part of such a point and adds ``not_a_point_embed``; transformers'
    SamPromptEncoder selects ``not_a_point_embed`` for it. Either way the token is that weight alone.
    """
    return sam.prompt_encoder.not_a_point_embed.weight


def sparse_prompt(
    sam: SamModel,
    seg_embedding: torch.Tensor,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    padding_point: bool = False,
) -> torch.Tensor:
    """Sparse prompt tokens of one mask: (T, D) with T = n + 2 (points, padding point, [SEG]), 2 (padding point,
    [SEG]: ``padding_point`` without points, the published READAR setting) or 1 ([SEG] alone, LISA).

    seg_embedding: (D,) text_hidden_fcs output. points: (n, 2) frame coordinates; labels: (n,) in {1, 0, −1}.
    """
    parameter = sam.prompt_encoder.no_mask_embed.weight
    seg = seg_embedding.to(parameter.device, parameter.dtype)[None]
    if points is None or points.shape[0] == 0:
        if padding_point:
            return torch.cat([padding_point_token(sam).to(parameter.dtype), seg], dim=0)
        return seg
    coordinates = points.to(parameter.device, torch.float32)[None, None]
    point_labels = labels.to(parameter.device, torch.long)[None, None]
    point_tokens, _ = sam.prompt_encoder(
        input_points=coordinates, input_labels=point_labels, input_boxes=None, input_masks=None
    )
    return torch.cat([point_tokens[0, 0].to(parameter.dtype), seg], dim=0)


@torch.no_grad()
def decode_low_res(sam: SamModel, image_embeddings: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """SAM mask decoder, one mask per row, multimask_output=False.

    image_embeddings: (G, 256, 64, 64); sparse: (G, T, 256) (same T in a call). Returns (G, 256, 256) logits.
    """
    count = image_embeddings.shape[0]
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        count, -1, image_embeddings.shape[-2], image_embeddings.shape[-1]
    )
    positional = sam.get_image_wide_positional_embeddings().repeat(count, 1, 1, 1)
    masks, _ = sam.mask_decoder(
        image_embeddings=image_embeddings,
        image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse[:, None],
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return masks[:, 0, 0]


@torch.no_grad()
def decode_many(
    sam: SamModel, image_embeddings: torch.Tensor, jobs: Sequence[tuple[int, torch.Tensor]]
) -> list[torch.Tensor]:
    """Masks for many (image index, sparse (T, D)) jobs; jobs with the same T share one decoder call.

    Returns one (256, 256) logit map per job, in job order. (Prompts of different lengths are not padded
    together: a padded token would change the decoder's attention, unlike the original's one call per image.)
    """
    groups: dict[int, list[int]] = defaultdict(list)
    for job_index, (_, tokens) in enumerate(jobs):
        groups[int(tokens.shape[0])].append(job_index)
    results: list[torch.Tensor | None] = [None] * len(jobs)
    for members in groups.values():
        embeddings = image_embeddings[[jobs[i][0] for i in members]]
        sparse = torch.stack([jobs[i][1] for i in members])
        for job_index, logits in zip(members, decode_low_res(sam, embeddings, sparse), strict=True):
            results[job_index] = logits
    return [logits for logits in results if logits is not None]
