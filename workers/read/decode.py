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

Speed levers (:class:`~workers.read.levers.Levers`; all off is the eager path above, unchanged):

* ``prefix_cache``: the part before the image (BOS … <im_start>) is the same for every image and every batch, so
  its key/value cache is computed once per process and model and copied into each batch's cache; the decoder
  then starts at the image features.
* ``static_cache``: one preallocated key/value cache sized prefix + suffix + new tokens. Greedy decoding keeps
  tokens, states and finished flags on the device (no host sync per step; "all rows finished?" is asked every
  ``_SYNC_EVERY`` steps) and turns them into Python lists once. When every image has exactly one question, in
  image order, the prefix cache already is the rows' cache and is not copied.
* ``compile_prefill`` / ``compile_decode`` (CUDA only): ``torch.compile`` the prefill calls and, with the static
  cache, the one-token step (CUDA graphs).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache

from workers.read import MAX_NEW_TOKENS
from workers.read.errors import ReadError
from workers.read.levers import Levers
from workers.read.model import LlamaDecoding, ReadModel


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


# Greedy decoding on the static cache asks "all rows finished?" (a device→host sync) only every this many steps;
# up to this many − 1 extra steps run after the last </s>, their tokens are dropped.
_SYNC_EVERY = 4

# prefix_cache lever: per model (weakly held, so a freed model drops its entry) the key of the one before-image
# prefix computed so far — (ids, dtype, device) — and its per-layer (keys, values), each (1, heads, L, head_dim).
# A detector uses one template, so one entry per model is enough; weights are fixed once loaded.
_BEFORE_IMAGE: weakref.WeakKeyDictionary[ReadModel, tuple[tuple, list[tuple[torch.Tensor, torch.Tensor]]]] = (
    weakref.WeakKeyDictionary()
)

Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def new_cache(model: LlamaDecoding) -> DynamicCache:
    """An empty dynamic key/value cache for ``model``'s language model."""
    try:
        return DynamicCache(config=model.language_model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _static_cache(model: ReadModel, batch: int, length: int) -> StaticCache:
    """A static cache of ``length`` slots, allocated now rather than lazily inside the first (maybe compiled)
    prefill, so its tensors keep one address that CUDA graphs of the decode step can rely on."""
    config = model.language_model.config
    cache = StaticCache(config=config, max_cache_len=length)
    cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, model.dtype, model.device)
    return cache


def _split_lead(rows: Sequence[QueryRow]) -> int:
    """How many leading suffix tokens all rows share (1 for <im_end>, 0 otherwise); they join the prefix."""
    firsts = {row.after_image[0] for row in rows if row.after_image}
    return 1 if len(firsts) == 1 and all(len(row.after_image) > 1 for row in rows) else 0


def _one_row_per_image(rows: Sequence[QueryRow], batch: int) -> bool:
    """Whether row i asks about image i and nothing else: the per-image prefix cache is then the rows' cache."""
    return len(rows) == batch and all(row.image_index == index for index, row in enumerate(rows))


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
    levers: Levers | None = None,
) -> BatchStates:
    """States of a batch of queries (see the module docstring).

    before_image: ids before the image (BOS … <im_start>), identical for all rows (same template).
    image_features: (B, N, hidden) projected CLIP features.
    stop_at_eos: False keeps every row decoding for exactly ``max_new_tokens`` (benchmarks).
    levers: the speed levers to use (``prefix_cache``, ``static_cache``, ``compile_*``); None is the eager path.
    """
    if not rows:
        raise ReadError("run_queries needs at least one query row")
    if teacher_forced and any(row.answer_start is None for row in rows):
        raise ReadError("teacher-forced rows need answer_start (where the forced answer begins)")
    levers = levers or Levers()
    device = model.device
    batch, num_image_tokens, _ = image_features.shape
    lead = _split_lead(rows)
    suffixes = [list(row.after_image[lead:]) for row in rows]
    width = max(len(ids) for ids in suffixes)
    prefix_length = len(before_image) + num_image_tokens + lead
    # Static cache: every slot the batch will ever use — prefix, padded suffix and the greedy tokens.
    new_slots = 0 if teacher_forced or not levers.static_cache else max_new_tokens
    static_length = prefix_length + width + new_slots
    in_place = levers.static_cache and _one_row_per_image(rows, batch)
    prefill = _prefill_function(model, levers)

    cache = _static_cache(model, batch, static_length) if in_place else new_cache(model)
    lead_ids = torch.tensor([rows[0].after_image[:lead]] * batch, dtype=torch.long, device=device)
    image_states, prefix_last = _prefix_states(
        model, before_image, image_features, lead_ids, cache, prefill, reuse=levers.prefix_cache
    )
    # One cache row per query (an image asked several questions shares its prefix).
    image_of_row = torch.tensor([row.image_index for row in rows], device=device)
    if levers.static_cache and not in_place:
        cache = _selected_static_cache(model, cache, image_of_row, static_length)
    elif not levers.static_cache:
        cache.batch_select_indices(image_of_row)
    padded, mask, suffix_positions = suffix_inputs(suffixes, width, prefix_length, new_slots, pad_id, device)
    suffix_states = prefill(model.embed_tokens(padded), mask, suffix_positions, cache)

    if teacher_forced:
        results = [
            _forced_row(row, suffixes[i], suffix_states[i], width, prefix_length, seg_id, prefix_last)
            for i, row in enumerate(rows)
        ]
        return BatchStates(image_states, results, prefix_length)
    greedy_options = {
        "seg_ids": frozenset({seg_id}),
        "eos_id": eos_id,
        "max_new_tokens": max_new_tokens,
        "stop_at_eos": stop_at_eos,
    }
    next_positions = [prefix_length + len(s) for s in suffixes]
    if levers.static_cache:
        step = _decode_function(model, levers)
        results = _greedy_on_device(
            model, step, cache, mask, suffix_states[:, -1], next_positions, **greedy_options
        )
    else:
        results = greedy_decode(model, cache, mask, suffix_states[:, -1], next_positions, **greedy_options)
    return BatchStates(image_states, results, prefix_length)


def _prefix_states(
    model: ReadModel,
    before_image: Sequence[int],
    image_features: torch.Tensor,
    lead_ids: torch.Tensor,
    cache: DynamicCache | StaticCache,
    prefill: Decoder,
    *,
    reuse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the shared prefix (one row per image) into ``cache``.

    Returns the image states (B, N, hidden) and the prefix's last state (B, hidden), which predicts the first
    suffix token. ``reuse`` (prefix_cache lever) copies the before-image keys/values in from the per-process
    cache, so the decoder starts at the image features.
    """
    device = model.device
    batch, num_image_tokens, _ = image_features.shape
    tail = [image_features.to(model.dtype), model.embed_tokens(lead_ids)]
    if reuse:
        start = len(before_image)
        for layer_index, (keys, values) in enumerate(_before_image_cache(model, before_image)):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer_index)
    else:
        start = 0
        before = torch.tensor([list(before_image)] * batch, dtype=torch.long, device=device)
        tail.insert(0, model.embed_tokens(before))
    embeds = torch.cat(tail, dim=1)
    end = start + embeds.shape[1]
    positions = torch.arange(start, end, device=device).expand(batch, -1)
    states = prefill(embeds, torch.ones(batch, end, dtype=torch.long, device=device), positions, cache)
    image_start = len(before_image) - start
    return states[:, image_start : image_start + num_image_tokens], states[:, -1]


def _before_image_cache(
    model: ReadModel, before_image: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of the before-image ids, computed once per model, ids, dtype and device."""
    key = (tuple(before_image), model.dtype, model.device)
    entry = _BEFORE_IMAGE.get(model)
    if entry is None or entry[0] != key:
        cache = new_cache(model)
        ids = torch.tensor([list(before_image)], dtype=torch.long, device=model.device)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        model.decoder_states(model.embed_tokens(ids), torch.ones_like(ids), positions, cache)
        entry = (key, [(layer.keys, layer.values) for layer in cache.layers])
        _BEFORE_IMAGE[model] = entry
    return entry[1]


def _selected_static_cache(
    model: ReadModel, cache: DynamicCache, image_of_row: torch.Tensor, length: int
) -> StaticCache:
    """The rows' static cache: each row's image prefix copied in once (several questions per image)."""
    selected = _static_cache(model, len(image_of_row), length)
    for layer_index, layer in enumerate(cache.layers):
        keys, values = layer.keys.index_select(0, image_of_row), layer.values.index_select(0, image_of_row)
        selected.update(keys, values, layer_index)
    return selected


def suffix_inputs(
    suffixes: list[list[int]],
    width: int,
    prefix_length: int,
    new_slots: int,
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded suffix ids (R, width), attention mask (R, prefix + width + new_slots) and positions (R, width).

    Padding sits between prefix and suffix and is masked; real tokens keep their true positions. The
    ``new_slots`` of a static cache are marked 1 already: the causal mask hides each slot until it is written.
    """
    padded = torch.full((len(suffixes), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(suffixes), prefix_length + width + new_slots, dtype=torch.long, device=device)
    mask[:, :prefix_length] = 1
    suffix_positions = torch.full((len(suffixes), width), prefix_length, dtype=torch.long, device=device)
    for index, ids in enumerate(suffixes):
        offset = width - len(ids)
        padded[index, offset:] = torch.tensor(ids, dtype=torch.long, device=device)
        mask[index, prefix_length + offset :] = 1
        suffix_positions[index, offset:] = torch.arange(
            prefix_length, prefix_length + len(ids), device=device
        )
    return padded, mask, suffix_positions


def _forced_row(
    row: QueryRow,
    suffix: list[int],
    states: torch.Tensor,
    width: int,
    prefix_length: int,
    seg_id: int,
    prefix_last: torch.Tensor,
) -> RowStates:
    """[SEG] states of a teacher-forced row: the state one position before each [SEG] token."""
    offset = width - len(suffix)
    picked, positions = [], []
    for index, token in enumerate(suffix):
        if token != seg_id:
            continue
        if index == 0:  # [SEG] right after the shared prefix: the prefix's last state predicts it
            picked.append(prefix_last[row.image_index])
        else:
            picked.append(states[offset + index - 1])
        positions.append(prefix_length + index - 1)
    answer = list(row.after_image[row.answer_start :]) if row.answer_start is not None else []
    return RowStates(answer, torch.stack(picked) if picked else None, positions)


def greedy_decode(
    model: LlamaDecoding,
    cache: DynamicCache,
    mask: torch.Tensor,
    last_states: torch.Tensor,
    next_positions: list[int],
    *,
    seg_ids: Collection[int],
    eos_id: int,
    max_new_tokens: int,
    stop_at_eos: bool,
) -> list[RowStates]:
    """Greedy decoding from the suffix's last states; records the state that emits each [SEG] token (any of
    ``seg_ids``: READ and LISA have one, PixelLM a codebook of six), in generation order."""
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
            if token in seg_ids:
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


def _greedy_on_device(
    model: ReadModel,
    step_function: Decoder,
    cache: StaticCache,
    mask: torch.Tensor,
    last_states: torch.Tensor,
    next_positions: list[int],
    *,
    seg_ids: Collection[int],
    eos_id: int,
    max_new_tokens: int,
    stop_at_eos: bool,
) -> list[RowStates]:
    """:func:`greedy_decode` on a static cache without a host sync per step.

    Each step's tokens and the states that predicted them go into preallocated device tensors; ``mask`` already
    covers every slot, so it is passed unchanged. The rows are read back once at the end.
    """
    count, hidden = last_states.shape
    device = last_states.device
    tokens = torch.zeros(count, max_new_tokens, dtype=torch.long, device=device)
    step_states = last_states.new_empty(count, max_new_tokens, hidden)
    finished = torch.zeros(count, dtype=torch.bool, device=device)
    positions = torch.tensor(next_positions, dtype=torch.long, device=device)[:, None]
    states, steps = last_states, 0
    while steps < max_new_tokens:
        emitted = model.next_token_logits(states).argmax(dim=-1)
        tokens[:, steps] = emitted
        step_states[:, steps] = states
        finished |= emitted == eos_id
        steps += 1
        if steps == max_new_tokens or (stop_at_eos and steps % _SYNC_EVERY == 0 and bool(finished.all())):
            break
        states = step_function(model.embed_tokens(emitted[:, None]), mask, positions, cache)[:, -1]
        positions = positions + 1
    return _rows_from_steps(
        tokens[:, :steps].tolist(), step_states, next_positions, seg_ids, eos_id, stop_at_eos
    )


def _rows_from_steps(
    tokens: list[list[int]],
    step_states: torch.Tensor,
    next_positions: list[int],
    seg_ids: Collection[int],
    eos_id: int,
    stop_at_eos: bool,
) -> list[RowStates]:
    """RowStates from the per-step tokens (R lists) and states (R, steps, hidden), as :func:`greedy_decode` builds
    them: a row's answer ends before its first </s> (when ``stop_at_eos``); step s's state sits at position
    next_position + s − 1."""
    results = []
    for row, ids in enumerate(tokens):
        if stop_at_eos and eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        seg_steps = [step for step, token in enumerate(ids) if token in seg_ids]
        seg_states = step_states[row, seg_steps] if seg_steps else None
        results.append(RowStates(ids, seg_states, [next_positions[row] + step - 1 for step in seg_steps]))
    return results


def _prefill_function(model: ReadModel, levers: Levers) -> Decoder:
    """The decoder for the prefill calls: compiled with static shapes under ``compile_prefill`` on CUDA.

    On the CPU the compile levers are ignored: they target CUDA kernels and graphs, and would only add compile
    time there.
    """
    if not levers.compile_prefill or model.device.type != "cuda":
        return model.decoder_states
    compiled = _compiled("prefill")
    return functools.partial(compiled, model)


def _decode_function(model: ReadModel, levers: Levers) -> Decoder:
    """The one-token step: compiled with CUDA graphs under ``compile_decode`` on CUDA (static cache only — a
    growing cache would recompile every step; the CPU ignores it, see :func:`_prefill_function`)."""
    if not levers.compile_decode or model.device.type != "cuda":
        return model.decoder_states
    compiled = _compiled("decode")

    def step(*arguments: object) -> torch.Tensor:
        # A new CUDA-graph step: the previous output may be overwritten, so what is kept is cloned first.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, *arguments).clone()

    return step


def _call_decoder(model: ReadModel, *arguments: object) -> torch.Tensor:
    """model.decoder_states as a plain function, so the compiled form holds no model (models can be freed)."""
    return model.decoder_states(*arguments)


@functools.cache
def _compiled(kind: str) -> Callable[..., torch.Tensor]:
    """One compiled decoder per kind and process (torch.compile guards on the model and the shapes)."""
    if kind == "decode":
        return torch.compile(_call_decoder, mode="reduce-overhead")
    return torch.compile(_call_decoder, dynamic=False)
