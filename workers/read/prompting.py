"""SAM prompting with READ's point prompts and the [SEG] token; low-resolution mask logits. DESIGN.md 5.5 step 6.

The sparse prompt of one mask is (as READ/LISA's modified segment-anything PromptEncoder builds it): the SasP
points in the 1024 frame with their labels, one padding point (0, 0) with label −1 (segment-anything pads when
no box is given), then the 256-d [SEG] projection as one more token. LISA uses the [SEG] token alone. The dense
prompt is SAM's "no mask" embedding.

The setting behind the published READAR numbers (``read_as_published``) lost its SasP points to a swallowed
exception, so its prompt was segment-anything's padding point alone (label −1) and then [SEG]: two tokens. transformers' SamPromptEncoder gives label −1 the "not a point" embedding
exactly as segment-anything does (it reserves −10 for its own batch padding, which :func:`point_tokens` uses
to encode point sets of different sizes in one call).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import SamModel

# transformers' SamPromptEncoder label for batch padding: its point token becomes zeros (segment-anything has none).
PAD_LABEL = -10


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
    return sparse_prompts(sam, seg_embedding[None], [points], [labels], padding_point=padding_point)[0]


def sparse_prompts(
    sam: SamModel,
    seg_embeddings: torch.Tensor,
    points: Sequence[torch.Tensor | None],
    labels: Sequence[torch.Tensor | None],
    *,
    padding_point: bool = False,
) -> list[torch.Tensor]:
    """:func:`sparse_prompt` of K masks, with one prompt-encoder call for all their point sets (the ``overlap``
    lever batches a whole batch's [SEG]s this way).

    seg_embeddings: (K, D); points / labels: K entries as in :func:`sparse_prompt` (None or empty: no points).
    """
    parameter = sam.prompt_encoder.no_mask_embed.weight
    segs = seg_embeddings.to(parameter.device, parameter.dtype)
    pointed = [k for k, set_points in enumerate(points) if set_points is not None and set_points.shape[0] > 0]
    tokens = dict(
        zip(
            pointed,
            point_tokens(sam, [points[k] for k in pointed], [labels[k] for k in pointed]),
            strict=True,
        )
    )
    prompts = []
    for k, seg in enumerate(segs):
        if k in tokens:
            prompts.append(torch.cat([tokens[k].to(parameter.dtype), seg[None]], dim=0))
        elif padding_point:
            prompts.append(torch.cat([padding_point_token(sam).to(parameter.dtype), seg[None]], dim=0))
        else:
            prompts.append(seg[None])
    return prompts


def point_tokens(
    sam: SamModel, points: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """SAM's prompt-encoder tokens of several point sets in one call: set i, (n_i, 2) frame coordinates and
    (n_i,) labels, → (n_i + 1, D), its points then segment-anything's padding point.

    Shorter sets are padded to the longest with transformers' own padding label, whose tokens the encoder
    zeroes and which are dropped here. Each kept token is a function of its own point and label alone
    (positional projection, sin/cos, label embedding), so padding changes no kept bit; against a call per set
    a token can differ in the last float32 bits, where the BLAS multiplies a few rows by the (2, 128)
    positional matrix on another code path than many (tests/test_detector_levers.py).
    """
    if not points:
        return []
    device = sam.prompt_encoder.no_mask_embed.weight.device
    counts = [int(set_points.shape[0]) for set_points in points]
    coordinates = torch.zeros((len(points), 1, max(counts), 2), dtype=torch.float32)
    point_labels = torch.full((len(points), 1, max(counts)), PAD_LABEL, dtype=torch.long)
    for index, (set_points, set_labels) in enumerate(zip(points, labels, strict=True)):
        coordinates[index, 0, : counts[index]] = set_points.to(torch.float32)
        point_labels[index, 0, : counts[index]] = set_labels.to(torch.long)
    tokens, _ = sam.prompt_encoder(
        input_points=coordinates.to(device),
        input_labels=point_labels.to(device),
        input_boxes=None,
        input_masks=None,
    )
    return [
        torch.cat([tokens[index, 0, :count], tokens[index, 0, -1:]], dim=0)
        for index, count in enumerate(counts)
    ]


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
