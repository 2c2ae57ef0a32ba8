"""Batched language-model passes that yield the image-token states and the [SEG] states. DESIGN.md 5.4.

Every query row is ``shared prefix`` + ``suffix``. The shared prefix — BOS, system prompt, "USER: <im_start>",
the image features and <im_end> — has the same length for every row, so it is run once per *image* (no
padding) and its key/value cache is copied to each of that image's rows (``all_types`` asks several questions
about one image). Suffixes of different lengths are left-padded *between* prefix and suffix: padded slots are
masked out of attention and real tokens keep their true positions, so a row's states do not depend on what
else is in the batch. Every padded query still sees the prefix, so no attention row is fully masked.

Generate mode (the original): greedy, ≤ ``max_new_tokens``. The state that predicts a token is the last-layer
(after final norm) state of the position before it, so when greedy decoding emits [SEG], the state that
produced it *is* the [SEG] state — no second forward (LISA/READ read the same state from a second pass).
Teacher-forced mode: the suffix already contains the answer; one forward, states read before each [SEG].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from workers.read import MAX_NEW_TOKENS
from workers.read.errors import ReadError
from workers.read.model import ReadModel


@dataclass(frozen=True)
class QueryRow:
    """One question about one image.

    image_index: which image of the batch (index into the image features).
    after_image: token ids after the image features (starts with <im_end>; ends with "ASSISTANT:" in generate
        mode, or with the forced answer in teacher-forced mode).
    answer_start: in teacher-forced mode, the index in ``after_image`` where the answer begins.
    """

    image_index: int
    after_image: tuple[int, ...]
    answer_start: int | None = None


@dataclass
class RowStates:
    """What one query row produced.

    answer_ids: generated token ids (without </s>) or the forced answer's ids.
    seg_states: (K, hidden) last-layer states that predict each [SEG] (K = number of [SEG] in the answer).
    seg_positions: sequence positions (0 = BOS) of those states, i.e. one before each [SEG] token.
    """

    answer_ids: list[int] = field(default_factory=list)
    seg_states: torch.Tensor | None = None
    seg_positions: list[int] = field(default_factory=list)


@dataclass
class BatchStates:
    """image_states: (B, N, hidden) last-layer states at the image positions; rows: one RowStates per query."""

    image_states: torch.Tensor
    rows: list[RowStates]
    prefix_length: int


def _new_cache(model: ReadModel) -> DynamicCache:
    try:
        return DynamicCache(config=model.language_model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _split_lead(rows: Sequence[QueryRow]) -> int:
    """How many leading suffix tokens all rows share (1 for <im_end>, 0 otherwise); they join the prefix."""
    firsts = {row.after_image[0] for row in rows if row.after_image}
    return 1 if len(firsts) == 1 and all(len(row.after_image) > 1 for row in rows) else 0


@torch.no_grad()
def run_queries(
    model: ReadModel,
    before_image: Sequence[int],
    image_features: torch.Tensor,
    rows: Sequence[QueryRow],
    *,
    seg_id: int,
    eos_id: int,
    pad_id: int,
    teacher_forced: bool = False,
    max_new_tokens: int = MAX_NEW_TOKENS,
    stop_at_eos: bool = True,
) -> BatchStates:
    """States of a batch of queries (see the module docstring).

    before_image: ids before the image (BOS … <im_start>), identical for all rows (same template).
    image_features: (B, N, hidden) projected CLIP features.
    stop_at_eos: False keeps every row decoding for exactly ``max_new_tokens`` (benchmarks).
    """
    if not rows:
        raise ReadError("run_queries needs at least one query row")
    if teacher_forced and any(row.answer_start is None for row in rows):
        raise ReadError("teacher-forced rows need answer_start (where the forced answer begins)")
    device = model.device
    batch, num_image_tokens, _ = image_features.shape
    lead = _split_lead(rows)
    lead_ids = torch.tensor([rows[0].after_image[:lead]] * batch, dtype=torch.long, device=device)
    before = torch.tensor([list(before_image)] * batch, dtype=torch.long, device=device)
    prefix_embeds = torch.cat(
        [model.embed_tokens(before), image_features.to(model.dtype), model.embed_tokens(lead_ids)], dim=1
    )
    prefix_length = prefix_embeds.shape[1]
    cache = _new_cache(model)
    positions = torch.arange(prefix_length, device=device).expand(batch, -1)
    prefix_states = model.decoder_states(
        prefix_embeds, torch.ones(batch, prefix_length, dtype=torch.long, device=device), positions, cache
    )
    image_start = len(before_image)
    image_states = prefix_states[:, image_start : image_start + num_image_tokens]

    # One cache row per query (an image asked several questions shares its prefix).
    cache.batch_select_indices(torch.tensor([row.image_index for row in rows], device=device))
    suffixes = [list(row.after_image[lead:]) for row in rows]
    width = max(len(ids) for ids in suffixes)
    padded = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), prefix_length + width, dtype=torch.long, device=device)
    mask[:, :prefix_length] = 1
    suffix_positions = torch.full((len(rows), width), prefix_length, dtype=torch.long, device=device)
    for index, ids in enumerate(suffixes):
        offset = width - len(ids)
        padded[index, offset:] = torch.tensor(ids, dtype=torch.long, device=device)
        mask[index, prefix_length + offset :] = 1
        suffix_positions[index, offset:] = torch.arange(
            prefix_length, prefix_length + len(ids), device=device
        )
    suffix_states = model.decoder_states(model.embed_tokens(padded), mask, suffix_positions, cache)

    if teacher_forced:
        results = [
            _forced_row(row, suffixes[i], suffix_states[i], width, prefix_length, seg_id, prefix_states)
            for i, row in enumerate(rows)
        ]
        return BatchStates(image_states, results, prefix_length)
    results = _greedy(
        model,
        cache,
        mask,
        suffix_states[:, -1],
        [prefix_length + len(s) for s in suffixes],
        seg_id=seg_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        stop_at_eos=stop_at_eos,
    )
    return BatchStates(image_states, results, prefix_length)


def _forced_row(
    row: QueryRow,
    suffix: list[int],
    states: torch.Tensor,
    width: int,
    prefix_length: int,
    seg_id: int,
    prefix_states: torch.Tensor,
) -> RowStates:
    """[SEG] states of a teacher-forced row: the state one position before each [SEG] token."""
    offset = width - len(suffix)
    picked, positions = [], []
    for index, token in enumerate(suffix):
        if token != seg_id:
            continue
        if index == 0:  # [SEG] right after the shared prefix: the prefix's last state predicts it
            picked.append(prefix_states[row.image_index, -1])
        else:
            picked.append(states[offset + index - 1])
        positions.append(prefix_length + index - 1)
    answer = list(row.after_image[row.answer_start :]) if row.answer_start is not None else []
    return RowStates(answer, torch.stack(picked) if picked else None, positions)


def _greedy(
    model: ReadModel,
    cache: DynamicCache,
    mask: torch.Tensor,
    last_states: torch.Tensor,
    next_positions: list[int],
    *,
    seg_id: int,
    eos_id: int,
    max_new_tokens: int,
    stop_at_eos: bool,
) -> list[RowStates]:
    """Greedy decoding from the suffix's last states; records the state that emits each [SEG]."""
    device = mask.device
    count = last_states.shape[0]
    results = [RowStates() for _ in range(count)]
    picked: list[list[torch.Tensor]] = [[] for _ in range(count)]
    finished = [False] * count
    positions = torch.tensor(next_positions, dtype=torch.long, device=device)
    states = last_states
    for step in range(max_new_tokens):
        tokens = model.next_token_logits(states).argmax(dim=-1)
        for index, token in enumerate(tokens.tolist()):
            if finished[index]:
                continue
            if token == eos_id and stop_at_eos:
                finished[index] = True
                continue
            if token == seg_id:
                picked[index].append(states[index])
                results[index].seg_positions.append(int(positions[index]) - 1)
            results[index].answer_ids.append(token)
        if all(finished) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(count, 1, dtype=mask.dtype, device=device)], dim=1)
        states = model.decoder_states(model.embed_tokens(tokens[:, None]), mask, positions[:, None], cache)[
            :, -1
        ]
        positions = positions + 1
    for index, row_states in enumerate(picked):
        results[index].seg_states = torch.stack(row_states) if row_states else None
    return results
