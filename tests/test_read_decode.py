"""[SEG] states: generate vs teacher-forced, batching, and the position the state is read at (DESIGN.md 5.4)."""

from __future__ import annotations

import pytest
import torch
from read_fixtures import random_image, tiny_checkpoint

from workers.read.config import ReadConfig
from workers.read.conversation import conversation_text, tokenize_query
from workers.read.decode import QueryRow, run_queries
from workers.read.loader import load_read_model
from workers.read.preprocess import ClipPreprocessing, clip_pixels
from workers.read.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    read_dir, clip_dir = tiny_checkpoint()
    config = ReadConfig.from_folder(read_dir)
    tokenizer, ids = load_tokenizer(read_dir, config.llama.vocab_size)
    model = load_read_model(read_dir, clip_dir)
    return model, tokenizer, ids


def _features(model, seeds: list[int]) -> torch.Tensor:
    pixels = torch.stack([clip_pixels(random_image(180, 240, seed), ClipPreprocessing()) for seed in seeds])
    with torch.no_grad():
        return model.image_features(pixels)


def _run(model, ids, before, features, rows, **kwargs):
    return run_queries(
        model, before, features, rows, seg_id=ids.seg, eos_id=ids.eos, pad_id=ids.pad, **kwargs
    )


QUESTIONS = [
    "Segment the crack on the bottle.",
    "Is there any anomaly in the image?",
    "Segment any anomaly on the metal_nut.",
]


def test_tiny_model_answers_with_seg(tiny) -> None:
    model, tokenizer, ids = tiny
    query = tokenize_query(tokenizer, conversation_text(QUESTIONS[0]))
    result = _run(model, ids, query.before_image, _features(model, [0]), [QueryRow(0, query.after_image)])
    # READ printed batch_decode(skip_special_tokens=True): added tokens stand between single spaces.
    assert tokenizer.decode(result.rows[0].answer_ids) == "Sure, [SEG] ."
    assert result.rows[0].seg_states.shape == (1, model.language_model.config.hidden_size)
    assert result.image_states.shape == (1, 576, model.language_model.config.hidden_size)


def test_generate_equals_teacher_forced_with_the_same_answer(tiny) -> None:
    model, tokenizer, ids = tiny
    query = tokenize_query(tokenizer, conversation_text(QUESTIONS[1]))
    features = _features(model, [1])
    generated = _run(model, ids, query.before_image, features, [QueryRow(0, query.after_image)]).rows[0]
    forced_row = QueryRow(
        0, query.after_image + tuple(generated.answer_ids), answer_start=len(query.after_image)
    )
    forced = _run(model, ids, query.before_image, features, [forced_row], teacher_forced=True).rows[0]
    assert forced.answer_ids == generated.answer_ids
    assert forced.seg_positions == generated.seg_positions
    torch.testing.assert_close(forced.seg_states, generated.seg_states, atol=1e-5, rtol=1e-5)


def test_seg_state_is_the_state_one_position_before_the_token(tiny) -> None:
    model, tokenizer, ids = tiny
    query = tokenize_query(tokenizer, conversation_text(QUESTIONS[0], answer="Sure, [SEG]."))
    prompt = tokenize_query(tokenizer, conversation_text(QUESTIONS[0]))
    features = _features(model, [2])
    row = QueryRow(0, query.after_image, answer_start=len(prompt.after_image))
    forced = _run(model, ids, query.before_image, features, [row], teacher_forced=True)
    # An independent plain forward over the whole sequence, no cache, no padding.
    embeds = torch.cat(
        [
            model.embed_tokens(torch.tensor([query.before_image])),
            features,
            model.embed_tokens(torch.tensor([query.after_image])),
        ],
        dim=1,
    )
    with torch.no_grad():
        states = model.language_model.model(inputs_embeds=embeds).last_hidden_state[0]
    full_ids = list(query.before_image) + [-1] * 576 + list(query.after_image)
    seg_index = full_ids.index(ids.seg)
    assert forced.rows[0].seg_positions == [seg_index - 1]
    torch.testing.assert_close(forced.rows[0].seg_states[0], states[seg_index - 1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(forced.rows[0].seg_states[0], states[seg_index], atol=1e-3)
    start = len(query.before_image)
    torch.testing.assert_close(forced.image_states[0], states[start : start + 576], atol=1e-5, rtol=1e-5)
    # and the predicted next token at that state is [SEG]
    assert int(model.next_token_logits(states[seg_index - 1]).argmax()) == ids.seg


@pytest.mark.parametrize("teacher_forced", [False, True])
def test_batch_equals_single_runs(tiny, teacher_forced: bool) -> None:
    model, tokenizer, ids = tiny
    answer = "Sure, [SEG]." if teacher_forced else None
    queries = [tokenize_query(tokenizer, conversation_text(q, answer=answer)) for q in QUESTIONS]
    starts = [
        len(tokenize_query(tokenizer, conversation_text(q)).after_image) if answer else None
        for q in QUESTIONS
    ]
    before = queries[0].before_image
    features = _features(model, [3, 4, 5])
    # image 0 is asked two questions (shared prefix), images 1 and 2 one each; suffix lengths differ
    layout = [(0, 0), (1, 1), (2, 2), (0, 2)]
    rows = [QueryRow(image, queries[q].after_image, starts[q]) for image, q in layout]
    batched = _run(model, ids, before, features, rows, teacher_forced=teacher_forced)
    for row_index, (image, _) in enumerate(layout):
        single = _run(
            model,
            ids,
            before,
            features[image : image + 1],
            [QueryRow(0, rows[row_index].after_image, rows[row_index].answer_start)],
            teacher_forced=teacher_forced,
        )
        assert batched.rows[row_index].answer_ids == single.rows[0].answer_ids
        assert batched.rows[row_index].seg_positions == single.rows[0].seg_positions
        torch.testing.assert_close(
            batched.rows[row_index].seg_states, single.rows[0].seg_states, atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(batched.image_states[image], single.image_states[0], atol=1e-5, rtol=1e-4)


def test_no_seg_when_the_answer_stops_early(tiny) -> None:
    model, tokenizer, ids = tiny
    query = tokenize_query(tokenizer, conversation_text(QUESTIONS[0]))
    result = _run(
        model,
        ids,
        query.before_image,
        _features(model, [6]),
        [QueryRow(0, query.after_image)],
        max_new_tokens=2,
    )
    assert result.rows[0].seg_states is None and len(result.rows[0].answer_ids) == 2
    fixed = _run(
        model,
        ids,
        query.before_image,
        _features(model, [6]),
        [QueryRow(0, query.after_image)],
        max_new_tokens=9,
        stop_at_eos=False,
    )
    assert len(fixed.rows[0].answer_ids) == 9  # benchmark mode: fixed length past </s>
