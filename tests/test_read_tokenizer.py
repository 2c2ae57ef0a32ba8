"""READ's tokenizer from the released files: ids pinned to transformers 4.31 (tests/fixtures/tokenizer)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from read_fixtures import tiny_checkpoint

from workers.read.config import IM_END_TOKEN, IM_START_TOKEN, SEG_TOKEN
from workers.read.conversation import conversation_text, tokenize_query
from workers.read.errors import CheckpointError
from workers.read.tiny import released_tokenizer_json
from workers.read.tokenizer import (
    ADDED_TOKENS_FILE,
    RELEASED_TOKENIZER_FILES,
    SENTENCEPIECE_FILE,
    TOKENIZER_CONFIG_FILE,
    ReadTokenizer,
    load_read_tokenizer,
    load_tokenizer,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer"
PROMPTS = json.loads((FIXTURE / "prompts.json").read_text(encoding="utf-8"))
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
IMAGE = EXPECTED["image_token_index"]


def readar_ids(tokenizer: ReadTokenizer, text: str) -> list[int]:
    """READAR's ids of one fixture text, the image as LLaVA's placeholder id."""
    if text.count("<image>") == 1:
        query = tokenize_query(tokenizer, text)
        return [*query.before_image, IMAGE, *query.after_image]
    return tokenizer.encode(text)


def first_difference(tokenizer: ReadTokenizer, actual: list[int], expected: dict) -> str:
    """Where two id sequences part, with the tokens around it."""
    at = next(
        (i for i, (a, b) in enumerate(zip(actual, expected["ids"], strict=False)) if a != b),
        min(len(actual), len(expected["ids"])),
    )
    pieces = {token_id: piece for piece, token_id in tokenizer.added.items()}

    def name(token_id: int) -> str:
        if token_id == IMAGE:
            return "<image>"
        return pieces.get(token_id) or tokenizer._processor.id_to_piece(token_id)

    window = slice(max(0, at - 3), at + 4)
    return (
        f"{expected['name']}: first difference at position {at}: READAR "
        f"{[name(i) for i in actual[window]]} vs transformers 4.31 {expected['tokens'][window]}"
    )


def mismatches(tokenizer: ReadTokenizer) -> list[str]:
    problems = []
    for prompt, expected in zip(PROMPTS, EXPECTED["prompts"], strict=True):
        actual = readar_ids(tokenizer, prompt["text"])
        if actual != expected["ids"]:
            problems.append(first_difference(tokenizer, actual, expected))
    return problems


@pytest.fixture(scope="module")
def released() -> ReadTokenizer:
    return load_read_tokenizer(FIXTURE / "released")


def test_fixture_was_made_by_transformers_431_slow_tokenizer() -> None:
    assert EXPECTED["transformers"] == "4.31.0"
    assert EXPECTED["tokenizer_class"] == "LlamaTokenizer" and EXPECTED["legacy"] is True
    assert sorted(path.name for path in (FIXTURE / "released").iterdir()) == sorted(RELEASED_TOKENIZER_FILES)
    assert len(PROMPTS) == len(EXPECTED["prompts"]) > 100


def test_fixture_texts_are_the_prompts_readar_builds() -> None:
    """The fixture's texts are what conversation_text builds today, so the pinned ids are READAR's prompts'."""
    prompts = [p for p in PROMPTS if p["kind"] == "prompt"]
    assert {p["template"] for p in prompts} == {"llava_v1", "vicuna_v1"}
    assert any(p["answer"] for p in prompts) and any(p["answer"] is None for p in prompts)
    for prompt in prompts:
        rebuilt = conversation_text(
            prompt["question"],
            template=prompt["template"],
            use_im_start_end=prompt["use_im_start_end"],
            answer=prompt["answer"],
        )
        assert rebuilt == prompt["text"], prompt["name"]


def test_ids_equal_transformers_431_for_every_fixture_prompt(released) -> None:
    problems = mismatches(released)
    assert not problems, f"{len(problems)} of {len(PROMPTS)} sequences differ:\n" + "\n".join(problems[:10])


def test_the_fixture_fails_without_the_whitespace_rule(released, monkeypatch) -> None:
    """Keeping the whitespace beside [SEG], <im_start> and <im_end> (transformers 5's behaviour) is caught."""
    for token in (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
        monkeypatch.setitem(released._stripping, token, (False, False))
    problems = mismatches(released)
    assert len(problems) > len(PROMPTS) // 2
    assert "READAR ['E', 'R', ':', '▁', '<im_start>'" in problems[0]  # the space before the image survives


def test_readme_examples_of_the_rule(released) -> None:
    """DESIGN 5.3's examples: no ▁ before <im_start>, no newline after <im_end>, no ▁ before [SEG]."""
    ids = released.encode("USER: <im_start>")
    assert [released._processor.id_to_piece(i) for i in ids[1:-1]][-1] == ":" and ids[-1] == released.added[
        IM_START_TOKEN
    ]
    after = released.encode("<im_end>\nSegment the crack", add_bos=False)
    assert after[0] == released.added[IM_END_TOKEN]
    assert released._processor.id_to_piece(after[1]).startswith("▁S")
    answer = released.encode("ASSISTANT: Sure, [SEG].", add_bos=False)
    seg = answer.index(released.added[SEG_TOKEN])
    assert released._processor.id_to_piece(answer[seg - 1]) == ","
    assert [released._processor.id_to_piece(i) for i in answer[seg + 1 :]] == ["▁", "."]


def test_decode_equals_reads_batch_decode(released) -> None:
    for case in EXPECTED["decodes"]:
        assert released.decode(case["ids"]) == case["text"], case


def test_added_and_special_token_ids(released) -> None:
    assert released.added == {
        token: EXPECTED["token_ids"][token] for token in (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
    }
    assert (released.unk_token_id, released.bos_token_id, released.eos_token_id) == (0, 1, 2)
    assert released.pad_token_id == released.unk_token_id
    assert len(released) == EXPECTED["vocab_size"]


def test_a_folder_with_a_tokenizer_json_gives_the_same_ids(tmp_path) -> None:
    """A released folder re-saved by transformers 5 gains tokenizer.json (and a rewritten config): same ids."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="protobuf (dev extra) converts the slow tokenizer")
    folder = tmp_path / "resaved"
    shutil.copytree(FIXTURE / "released", folder)
    fast = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    fast.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    problems = mismatches(load_read_tokenizer(folder))
    assert not problems, "\n".join(problems[:10])


def test_tiny_checkpoint_ships_the_released_tokenizer_layout() -> None:
    read_dir, _ = tiny_checkpoint()
    assert {path.name for path in read_dir.iterdir() if "token" in path.name} == set(RELEASED_TOKENIZER_FILES)
    assert not (read_dir / "tokenizer.json").exists()
    config = json.loads((read_dir / "config.json").read_text(encoding="utf-8"))
    assert {"vision_tower", "mm_vision_tower", "mm_use_im_start_end", "mm_vision_select_layer", "out_dim"} <= set(
        config
    )
    tokenizer, ids = load_tokenizer(read_dir, config["vocab_size"])
    assert (ids.seg, ids.im_start, ids.im_end) == tuple(
        len(tokenizer) - 3 + i for i in range(3)
    )  # right after the base vocabulary
    added = json.loads((read_dir / ADDED_TOKENS_FILE).read_text(encoding="utf-8"))
    for name, payload in released_tokenizer_json(added).items():
        on_disk = json.loads((read_dir / name).read_text(encoding="utf-8"))
        assert on_disk == payload


def test_tiny_writer_matches_what_transformers_431_saved() -> None:
    """The JSON files make-tiny-checkpoint writes are field for field the ones 4.31 wrote for the fixture."""
    added = json.loads((FIXTURE / "released" / ADDED_TOKENS_FILE).read_text(encoding="utf-8"))
    for name, payload in released_tokenizer_json(added).items():
        assert json.loads((FIXTURE / "released" / name).read_text(encoding="utf-8")) == payload, name


def test_tiny_sentencepiece_has_llamas_settings() -> None:
    """BPE with byte fallback, dummy prefix, split digits, whitespace kept, <unk>/<s>/</s> = 0/1/2."""
    tokenizer = load_read_tokenizer(tiny_checkpoint()[0])
    processor = tokenizer._processor
    assert [processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert processor.encode("é", out_type=str)[-2:] == ["<0xC3>", "<0xA9>"]  # byte fallback
    assert processor.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]  # dummy prefix, split digits
    assert processor.encode("a  b", out_type=str).count("▁") >= 1  # a second space is kept, not collapsed
    assert processor.decode(processor.encode("a  b\nc")) == "a  b\nc"


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "tokenizer"
    shutil.copytree(FIXTURE / "released", folder)
    return folder


def test_missing_tokenizer_model_names_the_file_and_folder(tmp_path) -> None:
    folder = _copy(tmp_path)
    (folder / SENTENCEPIECE_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{folder}.*has no {SENTENCEPIECE_FILE}.*released folder"):
        load_read_tokenizer(folder)


def test_missing_added_tokens_is_an_error(tmp_path) -> None:
    folder = _copy(tmp_path)
    (folder / ADDED_TOKENS_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"has no {ADDED_TOKENS_FILE}.*\[SEG\]"):
        load_read_tokenizer(folder)


def test_corrupt_tokenizer_model_is_an_error(tmp_path) -> None:
    folder = _copy(tmp_path)
    (folder / SENTENCEPIECE_FILE).write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=rf"{SENTENCEPIECE_FILE} is not a SentencePiece model"):
        load_read_tokenizer(folder)


def test_non_legacy_config_is_refused(tmp_path) -> None:
    folder = _copy(tmp_path)
    config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps({**config, "legacy": False}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="legacy=false"):
        load_read_tokenizer(folder)


def test_added_ids_that_do_not_follow_the_vocabulary_are_refused(tmp_path) -> None:
    folder = _copy(tmp_path)
    (folder / ADDED_TOKENS_FILE).write_text(json.dumps({"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}))
    with pytest.raises(CheckpointError, match="different checkpoints"):
        load_read_tokenizer(folder)


def test_missing_sentencepiece_package_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match="needs the 'sentencepiece' package"):
        load_read_tokenizer(FIXTURE / "released")


def test_vocabulary_smaller_than_the_added_ids_is_an_error() -> None:
    with pytest.raises(CheckpointError, match=r"lacks \[SEG\].*outside the model's 300-token vocabulary"):
        load_tokenizer(FIXTURE / "released", 300)
