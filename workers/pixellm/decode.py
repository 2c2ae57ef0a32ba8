"""Greedy decoding for PixelLM with a key/value cache, yielding the state that predicts each [SEGk].

PixelLM's ``evaluate`` generates without a cache and then gathers, from the final step's post-norm last-layer
states, the positions marked by ``seg_token_mask``: ``output_ids[:, 1:] ∈ {[SEG0]…[SEG5]}`` shifted right by
255 (= 256 image tokens − the one ``<image>`` id they replace). Position 255 + j of the expanded sequence holds
token j, so the mask selects the state *before* each [SEGk], i.e. the one that predicted it. Greedy decoding with
a cache reaches the same states at the step that emits each [SEGk]; tests/test_pixellm.py checks the two against
each other on a tiny model. The order of the gathered states is the order of generation.

Differences from :mod:`workers.read.decode`: a set of [SEG] ids instead of one, and the image tokens over CLIP
padding are masked out as keys (PixelLM concatenates its 16×16 validity mask into the attention mask; those
tokens keep their positions). Rows are batched as there: a shared per-image prefix, suffixes left-padded between
prefix and suffix with real tokens keeping their true positions, so a row does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from workers.pixellm.model import PixelLMModel


@dataclass
class PixelRow:
    """One question about one image: after_image starts with <im_end> and ends with "ASSISTANT:"."""

    image_index: int
    after_image: tuple[int, ...]
    answer_ids: list[int] = field(default_factory=list)
    seg_states: list[torch.Tensor] = field(default_factory=list)


def _cache(model: PixelLMModel) -> DynamicCache:
    try:
        return DynamicCache(config=model.language_model.config)
    except TypeError:
        return DynamicCache()


@torch.no_grad()
def generate_rows(model: PixelLMModel, before_image: Sequence[int], image_tokens: torch.Tensor,
                  image_mask: torch.Tensor, rows: Sequence[PixelRow], *, seg_ids: Sequence[int], eos_id: int,
                  pad_id: int, max_new_tokens: int, stop_at_eos: bool = True) -> None:
    """Fill each row's ``answer_ids`` and ``seg_states`` (states that predicted each [SEGk], generation order)."""
    device = model.device
    batch = image_tokens.shape[0]
    before = torch.tensor([list(before_image)] * batch, dtype=torch.long, device=device)
    prefix = torch.cat([model.embed_tokens(before), image_tokens.to(model.dtype)], dim=1)
    prefix_mask = torch.cat([torch.ones_like(before), image_mask.to(device, torch.long)], dim=1)
    length = prefix.shape[1]
    cache = _cache(model)
    model.decoder_states(prefix, prefix_mask, torch.arange(length, device=device).expand(batch, -1), cache)
    indices = torch.tensor([row.image_index for row in rows], device=device)
    cache.batch_select_indices(indices)
    suffixes = [list(row.after_image) for row in rows]
    width = max(len(ids) for ids in suffixes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.cat([prefix_mask[indices], torch.zeros((len(rows), width), dtype=torch.long, device=device)], 1)
    positions = torch.full((len(rows), width), length, dtype=torch.long, device=device)
    for index, suffix in enumerate(suffixes):
        offset = width - len(suffix)
        ids[index, offset:] = torch.tensor(suffix, dtype=torch.long, device=device)
        mask[index, length + offset :] = 1
        positions[index, offset:] = torch.arange(length, length + len(suffix), device=device)
    states = model.decoder_states(model.embed_tokens(ids), mask, positions, cache)[:, -1]
    next_positions = torch.tensor([length + len(s) for s in suffixes], dtype=torch.long, device=device)
    seg_set = set(int(i) for i in seg_ids)
    finished = [False] * len(rows)
    for step in range(max_new_tokens):
        tokens = model.next_token_logits(states).argmax(dim=-1)
        for index, token in enumerate(tokens.tolist()):
            if finished[index]:
                continue
            if token == eos_id and stop_at_eos:
                finished[index] = True
                continue
            if token in seg_set:
                rows[index].seg_states.append(states[index])
            rows[index].answer_ids.append(token)
        if all(finished) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=device)], dim=1)
        states = model.decoder_states(model.embed_tokens(tokens[:, None]), mask, next_positions[:, None], cache)[:, -1]
        next_positions = next_positions + 1
