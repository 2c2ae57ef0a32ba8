"""Decode levers (prefix_cache, static_cache, compile_*) give the eager path's answers and states.

Tiny READ model (float32, CPU): its greedy answer follows the chain "Sure , [SEG] . </s>" from whatever chain
token a row's suffix ends with, so rows that end further along the chain stop earlier, and rows of different
suffix lengths are left-padded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from read_fixtures import random_image, tiny_checkpoint
from transformers.cache_utils import Cache

from workers.read.config import ReadConfig
from workers.read.conversation import conversation_text, tokenize_query
from workers.read.decode import QueryRow, run_queries
from workers.read.levers import Levers
from workers.read.loader import load_read_model
from workers.read.preprocess import ClipPreprocessing, clip_pixels
from workers.read.tokenizer import load_tokenizer

QUESTION = "Segment the crack on the bottle."
LEVERS = {
    "prefix_cache": Levers(prefix_cache=True),
    "static_cache": Levers(static_cache=True),
    "all": Levers(prefix_cache=True, static_cache=True, compile_decode=True, compile_prefill=True),
}
# (mode, max_new_tokens, stop_at_eos). The longest answer is 5 tokens + </s>: 4 cuts every row short, 6 ends
# with the last </s>, 12 stops early (eager after step 6, the static cache at its next check).
GENERATE = [("generate", 4, True), ("generate", 6, True), ("generate", 12, True), ("generate", 6, False)]
MODES = [*GENERATE, ("teacher_forced", 0, True)]


@pytest.fixture(scope="module")
def tiny():
    read_dir, clip_dir = tiny_checkpoint()
    config = ReadConfig.from_folder(read_dir)
    tokenizer, ids = load_tokenizer(read_dir, config.llama.vocab_size)
    model = load_read_model(read_dir, clip_dir)
    prompt = tokenize_query(tokenizer, conversation_text(QUESTION))
    full = tokenize_query(tokenizer, conversation_text(QUESTION, answer="Sure, [SEG]."))
    answer = full.after_image[len(prompt.after_image) :]
    pixels = torch.stack(
        [clip_pixels(random_image(180, 240, seed), ClipPreprocessing()) for seed in (7, 8, 9)]
    )
    with torch.no_grad():
        features = model.image_features(pixels)
    return model, ids, prompt, answer, features


def _rows(tiny, layout: str, teacher_forced: bool) -> list[QueryRow]:
    """One question per image in image order, or several per image out of order ("all_types"-like).

    Suffixes are the prompt plus 0–2 answer tokens (different lengths and stop steps). Teacher-forced rows force
    the rest of the answer; one multi-question row is only <im_end> + answer, so its [SEG] is predicted by the
    prefix's last state.
    """
    _, ids, prompt, answer, _ = tiny
    prompt_rows = {
        "one_question": [(0, 0), (1, 2), (2, 1)],
        "multi_question": [(2, 1), (0, 0), (0, 2), (1, 0), (2, 0), (0, 1)],
    }[layout]
    rows = []
    for image, given in prompt_rows:
        suffix = prompt.after_image + answer[:given]
        if teacher_forced:
            rows.append(QueryRow(image, prompt.after_image + answer, answer_start=len(prompt.after_image)))
        else:
            rows.append(QueryRow(image, suffix))
    if layout == "multi_question" and teacher_forced:
        seg_first = answer[answer.index(ids.seg) :]
        rows.append(QueryRow(1, (prompt.after_image[0], *seg_first), answer_start=1))
    return rows


def _run(tiny, rows, mode: str, max_new_tokens: int, stop_at_eos: bool, levers: Levers | None):
    model, ids, prompt, _, features = tiny
    kwargs = {"max_new_tokens": max_new_tokens} if mode == "generate" else {}
    return run_queries(
        model,
        prompt.before_image,
        features,
        rows,
        seg_id=ids.seg,
        eos_id=ids.eos,
        pad_id=ids.pad,
        teacher_forced=mode == "teacher_forced",
        stop_at_eos=stop_at_eos,
        levers=levers,
        **kwargs,
    )


@pytest.fixture(scope="module")
def eager(tiny):
    """The eager result of a case (layout, mode, max_new_tokens, stop_at_eos), computed once per module."""
    results = {}

    def get(layout: str, mode: str, max_new_tokens: int, stop_at_eos: bool):
        key = (layout, mode, max_new_tokens, stop_at_eos)
        if key not in results:
            rows = _rows(tiny, layout, mode == "teacher_forced")
            results[key] = _run(tiny, rows, mode, max_new_tokens, stop_at_eos, None)
        return results[key]

    return get


def _assert_same(result, reference) -> None:
    assert result.prefix_length == reference.prefix_length
    torch.testing.assert_close(result.image_states, reference.image_states, atol=1e-5, rtol=1e-5)
    assert len(result.rows) == len(reference.rows)
    for got, want in zip(result.rows, reference.rows, strict=True):
        assert got.answer_ids == want.answer_ids
        assert got.seg_positions == want.seg_positions
        if want.seg_states is None:
            assert got.seg_states is None
        else:
            torch.testing.assert_close(got.seg_states, want.seg_states, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lever", sorted(LEVERS))
@pytest.mark.parametrize("mode,max_new_tokens,stop_at_eos", MODES)
@pytest.mark.parametrize("layout", ["one_question", "multi_question"])
def test_levers_equal_the_eager_path(tiny, eager, layout, mode, max_new_tokens, stop_at_eos, lever) -> None:
    reference = eager(layout, mode, max_new_tokens, stop_at_eos)
    rows = _rows(tiny, layout, mode == "teacher_forced")
    result = _run(tiny, rows, mode, max_new_tokens, stop_at_eos, LEVERS[lever])
    _assert_same(result, reference)


def test_the_cases_exercise_early_stops_and_seg(tiny, eager) -> None:
    """Guards the equality tests above against trivial cases: rows stop at different steps, [SEG] is found."""
    _, ids, _, answer, _ = tiny
    stopped = eager("multi_question", "generate", 12, True)
    assert sorted({len(row.answer_ids) for row in stopped.rows}) == [3, 4, 5]
    assert all(row.seg_states is not None for row in stopped.rows)
    assert {len(row.answer_ids) for row in eager("one_question", "generate", 4, True).rows} == {3, 4}
    fixed = eager("one_question", "generate", 6, False)
    assert all(len(row.answer_ids) == 6 and row.answer_ids[-1] == ids.eos for row in fixed.rows)
    forced = eager("multi_question", "teacher_forced", 0, True)
    assert forced.rows[-1].seg_positions == [forced.prefix_length - 1]  # read from the prefix's last state
    assert forced.rows[0].answer_ids == list(answer)


def _count_decoder_lengths(model, monkeypatch) -> list[int]:
    """Wrap ``model.decoder_states``; returns the list that collects each call's number of new positions."""
    lengths: list[int] = []
    original = model.decoder_states

    def counting(inputs_embeds, *arguments):
        lengths.append(inputs_embeds.shape[1])
        return original(inputs_embeds, *arguments)

    monkeypatch.setattr(model, "decoder_states", counting)
    return lengths


def test_prefix_cache_runs_the_before_image_part_once(tiny, monkeypatch) -> None:
    model, ids, prompt, _, features = tiny
    fresh = copy.deepcopy(model)  # a model the per-process prefix cache has not seen
    lengths = _count_decoder_lengths(fresh, monkeypatch)
    rows = _rows(tiny, "one_question", teacher_forced=False)
    results = [
        run_queries(
            fresh,
            prompt.before_image,
            features[: len(rows)],
            rows,
            seg_id=ids.seg,
            eos_id=ids.eos,
            pad_id=ids.pad,
            max_new_tokens=4,
            levers=Levers(prefix_cache=True),
        )
        for _ in range(2)
    ]
    before, image_and_lead = len(prompt.before_image), features.shape[1] + 1
    assert lengths.count(before) == 1
    assert lengths.count(image_and_lead) == 2  # each batch starts at the image features
    assert before + image_and_lead not in lengths  # the eager prefix never runs
    _assert_same(results[1], results[0])


def test_static_cache_copies_no_cache_for_one_question_per_image(tiny, monkeypatch) -> None:
    selections: list[torch.Tensor] = []
    original = Cache.batch_select_indices

    def recording(self, indices):
        selections.append(indices)
        return original(self, indices)

    monkeypatch.setattr(Cache, "batch_select_indices", recording)
    rows = _rows(tiny, "one_question", teacher_forced=False)
    _run(tiny, rows, "generate", 6, True, Levers(static_cache=True))
    assert selections == []
    _run(tiny, rows, "generate", 6, True, None)
    assert len(selections) == 1  # the eager path does copy (so the check above can fail)


def test_compile_levers_do_nothing_on_the_cpu(tiny, eager, monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("torch.compile must not be called on the CPU")

    monkeypatch.setattr(torch, "compile", refuse)
    levers = Levers(static_cache=True, compile_decode=True, compile_prefill=True)
    rows = _rows(tiny, "multi_question", teacher_forced=False)
    _assert_same(_run(tiny, rows, "generate", 6, True, levers), eager("multi_question", "generate", 6, True))
