"""Greedy decoding for PixelLM with a key/value cache, yielding the state that predicts each [SEGk].

PixelLM's ``evaluate`` generates without a cache and then gathers, from the final step's post-norm last-layer
states, the positions marked by ``seg_token_mask``: ``output_ids[:, 1:] ∈ {[SEG0]…[SEG5]}`` shifted right by
255 (= 256 image tokens − the one ``<image>`` id they replace). Position 255 + j of the expanded sequence holds
token j, so the mask selects the state *before* each [SEGk], i.e. the one that predicted it. Greedy decoding with
a cache reaches the same states at the step that emits each [SEGk]; tests/test_pixellm.py checks the two against
each other on a tiny model. The order of the gathered states is the order of generation.

The batching and the greedy loop are :mod:`workers.read.decode`'s (a shared per-image prefix, suffixes
left-padded between prefix and suffix with real tokens keeping their true positions, so a row does not depend on
its batch). What differs: a set of [SEG] ids instead of one, and the image tokens over CLIP padding are masked out
as keys (PixelLM concatenates its 16×16 validity mask into the attention mask; those tokens keep their positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workers.pixellm.model import PixelLMModel
from workers.read.decode import greedy_decode, new_cache, suffix_inputs


@dataclass
class PixelRow:
    """One question about one image: after_image starts with <im_end> and ends with "ASSISTANT:"."""

    image_index: int
    after_image: tuple[int, ...]
    answer_ids: list[int] = field(default_factory=list)
    seg_states: list[torch.Tensor] = field(default_factory=list)


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
    cache = new_cache(model)
    model.decoder_states(prefix, prefix_mask, torch.arange(length, device=device).expand(batch, -1), cache)
    indices = torch.tensor([row.image_index for row in rows], device=device)
    cache.batch_select_indices(indices)
    suffixes = [list(row.after_image) for row in rows]
    ids, mask, positions = suffix_inputs(suffixes, max(map(len, suffixes)), length, 0, pad_id, device)
    mask[:, :length] = prefix_mask[indices]  # padded image tokens stay masked out as keys
    states = model.decoder_states(model.embed_tokens(ids), mask, positions, cache)[:, -1]
    decoded = greedy_decode(model, cache, mask, states, [length + len(s) for s in suffixes],
                            seg_ids=frozenset(int(i) for i in seg_ids), eos_id=eos_id,
                            max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos)
    for row, result in zip(rows, decoded, strict=True):
        row.answer_ids.extend(result.answer_ids)
        if result.seg_states is not None:
            row.seg_states.extend(result.seg_states.unbind(0))
