"""READ's tokenizer from the released files, giving the ids READ itself computed. DESIGN.md 5.3.

Released READ folders ship LLaMA's *slow* SentencePiece tokenizer: ``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` ([SEG], <im_start>, <im_end>
right after the base vocabulary), and no ``tokenizer.json``. READ ran it under transformers 4.31
(``use_fast=False``, ``legacy=True``). transformers 5 converts such a folder into a fast tokenizer that keeps the
whitespace next to the added tokens, so a prompt gets extra ``▁`` / ``<0x0A>`` tokens the model never saw.

The rule 4.31 applied is short, so it is written out here on top of SentencePiece itself — the engine that
tokenised every piece of READ's text — instead of re-tuning a converted tokenizer until it agrees:

1. split the text at every added or special token (longest token first at each position);
2. strip all whitespace (Python's ``str.strip``, newlines included) from the text on both sides of a token
   that was added as a plain string ([SEG], <im_start>, <im_end>); the special tokens <s>, </s>, <unk> are
   AddedTokens whose lstrip/rstrip are false and strip nothing;
3. hand each remaining non-empty piece to SentencePiece on its own, so each gets the dummy prefix ``▁``
   (4.31's legacy behaviour); a token piece becomes its id;
4. put BOS in front (add_bos_token), no EOS.

A ``tokenizer.json`` beside ``tokenizer.model`` is ignored: the SentencePiece model is what READ used.
tests/fixtures/tokenizer pins the ids against transformers 4.31 itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.read.config import IM_END_TOKEN, IM_START_TOKEN, SEG_TOKEN, json_object
from workers.read.errors import CheckpointError

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
RELEASED_TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, ADDED_TOKENS_FILE)

# LlamaTokenizer's defaults when the folder names no special tokens.
_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# transformers' clean_up_tokenization: spaces removed before punctuation and English contractions.
_CLEAN_UPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


@dataclass(frozen=True)
class TokenIds:
    """Ids of the tokens READ treats specially (pad is unk, as READ sets it)."""

    seg: int
    im_start: int
    im_end: int
    eos: int
    pad: int


@dataclass(frozen=True)
class _Special:
    """A special token as 4.31 held it: an AddedToken that strips nothing unless the folder says so."""

    content: str
    lstrip: bool = False
    rstrip: bool = False


class ReadTokenizer:
    """Encode and decode exactly as READ's transformers 4.31 slow LlamaTokenizer (see the module docstring).

    processor: a loaded ``sentencepiece.SentencePieceProcessor``. added: token → id of the tokens added after
    the base vocabulary. specials: bos/eos/unk(/pad) as loaded. clean_up_spaces: the folder's
    ``clean_up_tokenization_spaces`` (LlamaTokenizer's default is false).
    """

    def __init__(
        self,
        processor: Any,
        added: dict[str, int],
        specials: dict[str, _Special],
        *,
        clean_up_spaces: bool = False,
        source: str = "",
    ) -> None:
        self._processor = processor
        self.added = dict(added)
        self.source = source
        self.clean_up_spaces = clean_up_spaces
        self._added_by_id = {token_id: token for token, token_id in self.added.items()}
        self._specials = specials
        self.bos_token_id = self._special_id("bos_token")
        self.eos_token_id = self._special_id("eos_token")
        self.unk_token_id = self._special_id("unk_token")
        self.pad_token_id = self.unk_token_id  # READ: tokenizer.pad_token = tokenizer.unk_token
        self._special_ids = {self.bos_token_id, self.eos_token_id, self.unk_token_id}
        # No-split tokens: every added token and every special token; a special token strips what it says.
        self._stripping: dict[str, tuple[bool, bool]] = {token: (True, True) for token in self.added}
        for special in specials.values():
            self._stripping[special.content] = (special.lstrip, special.rstrip)
        alternatives = sorted(self._stripping, key=len, reverse=True)
        self._splitter = re.compile("|".join(re.escape(token) for token in alternatives))

    def _special_id(self, name: str) -> int:
        content = self._specials[name].content
        token_id = self.token_id(content)
        if token_id is None:
            raise CheckpointError(f"the tokenizer in {self.source} has no id for its {name} {content!r}")
        return token_id

    def __len__(self) -> int:
        return int(self._processor.get_piece_size()) + len(self.added)

    def token_id(self, token: str) -> int | None:
        """The id of one token (added or base piece); None when the vocabulary lacks it."""
        if token in self.added:
            return self.added[token]
        token_id = int(self._processor.piece_to_id(token))
        if token_id == self._processor.unk_id() and token != self._processor.id_to_piece(token_id):
            return None
        return token_id

    def split(self, text: str) -> list[tuple[str, bool]]:
        """``text`` → (piece, is_token) after 4.31's split and strip (steps 1-2); empty pieces dropped."""
        pieces: list[list[Any]] = []
        position = 0
        for match in self._splitter.finditer(text):
            if match.start() > position:
                pieces.append([text[position : match.start()], False])
            pieces.append([match.group(), True])
            position = match.end()
        if position < len(text):
            pieces.append([text[position:], False])
        for index, (piece, is_token) in enumerate(pieces):
            if not is_token:
                continue
            strip_left, strip_right = self._stripping[piece]
            if strip_right and index + 1 < len(pieces):
                pieces[index + 1][0] = pieces[index + 1][0].lstrip()
            if strip_left and index > 0:
                pieces[index - 1][0] = pieces[index - 1][0].rstrip()
        return [(piece, is_token) for piece, is_token in pieces if piece]

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` as READ's ``tokenizer(text).input_ids`` (BOS first, no EOS)."""
        ids = [self.bos_token_id] if add_bos else []
        for piece, is_token in self.split(text):
            if is_token:
                ids.append(self._token_piece_id(piece))
            else:
                ids.extend(int(i) for i in self._processor.encode(piece))
        return ids

    def _token_piece_id(self, token: str) -> int:
        token_id = self.token_id(token)
        return self.unk_token_id if token_id is None else token_id

    def decode(self, ids: Iterable[int]) -> str:
        """Text of generated ids as READ printed it (``batch_decode(..., skip_special_tokens=True)``).

        Special ids (BOS, EOS, UNK = PAD) are dropped; runs of base pieces are decoded by SentencePiece; added
        tokens stand on their own, joined to their neighbours by single spaces (spaces_between_special_tokens).
        """
        parts: list[str] = []
        run: list[int] = []
        for token_id in (int(i) for i in ids):
            if token_id in self._special_ids:
                continue
            if token_id in self._added_by_id:
                if run:
                    parts.append(self._processor.decode(run))
                    run = []
                parts.append(self._added_by_id[token_id])
            else:
                run.append(token_id)
        if run:
            parts.append(self._processor.decode(run))
        text = " ".join(parts)
        if self.clean_up_spaces:
            for before, after in _CLEAN_UPS:
                text = text.replace(before, after)
        return text

    def read_token_ids(self, vocab_size: int) -> TokenIds:
        """[SEG], <im_start>, <im_end>, </s> and pad ids, checked against the model's vocabulary size."""
        ids = {}
        for token in (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
            token_id = self.added.get(token)
            if token_id is None or not 0 <= token_id < vocab_size:
                raise CheckpointError(
                    f"the tokenizer in {self.source} lacks {token} (or its id {token_id} is outside the model's "
                    f"{vocab_size}-token vocabulary); READ checkpoints add [SEG], <im_start> and <im_end> in "
                    f"{ADDED_TOKENS_FILE}"
                )
            ids[token] = token_id
        return TokenIds(
            ids[SEG_TOKEN], ids[IM_START_TOKEN], ids[IM_END_TOKEN], self.eos_token_id, self.pad_token_id
        )


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent} has no {path.name}; {_LAYOUT_HINT}")
        return {}
    return json_object(path, hint="copy the tokenizer files again from the released folder")


_LAYOUT_HINT = (
    "a READ checkpoint ships LLaMA's SentencePiece tokenizer as "
    + ", ".join(RELEASED_TOKENIZER_FILES)
    + " — copy them from the released folder"
)


def _special(value: Any, source: Path) -> _Special:
    """A special-token entry: a plain string or an AddedToken dict (4.31 writes {"content": ..., "lstrip": ...})."""
    if isinstance(value, str):
        return _Special(value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return _Special(value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False)))
    raise CheckpointError(
        f"{source} has a special token {value!r} that is neither a string nor a token entry"
    )


def _added_tokens(folder: Path, config: dict[str, Any], base_size: int) -> dict[str, int]:
    """Added tokens → ids from added_tokens.json (or tokenizer_config.json's added_tokens_decoder)."""
    path = folder / ADDED_TOKENS_FILE
    if path.is_file():
        raw = _read_json(path, required=True)
    else:
        decoder = config.get("added_tokens_decoder") or {}
        raw = {
            entry["content"]: int(token_id)
            for token_id, entry in decoder.items()
            if isinstance(entry, dict) and int(token_id) >= base_size
        }
    if not raw:
        raise CheckpointError(
            f"{folder} has no {ADDED_TOKENS_FILE}; READ's checkpoints add [SEG], <im_start> and <im_end> there "
            f"after the {base_size}-piece SentencePiece vocabulary — copy it from the released folder"
        )
    if not all(isinstance(token_id, int) for token_id in raw.values()):
        raise CheckpointError(f"{path} must map each added token to an integer id")
    # 4.31 refuses added tokens that do not follow the base vocabulary one after another.
    expected = list(range(base_size, base_size + len(raw)))
    if sorted(raw.values()) != expected:
        raise CheckpointError(
            f"{path}: added token ids {sorted(raw.values())} do not follow the {base_size}-piece SentencePiece "
            f"vocabulary ({expected}); the tokenizer files come from different checkpoints"
        )
    return dict(raw)


def load_read_tokenizer(folder: Path) -> ReadTokenizer:
    """The tokenizer of a READ checkpoint folder (released layout); CheckpointError names what is missing."""
    folder = Path(folder)
    model_path = folder / SENTENCEPIECE_FILE
    if not model_path.is_file():
        raise CheckpointError(f"{folder} has no {SENTENCEPIECE_FILE}; {_LAYOUT_HINT}")
    try:
        import sentencepiece
    except ImportError:
        raise CheckpointError(
            f"reading {model_path} needs the 'sentencepiece' package, which READAR depends on: "
            "reinstall READAR (pip install -e .) or pip install sentencepiece"
        ) from None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"{model_path} is not a SentencePiece model ({exc}); copy the tokenizer files again"
        ) from exc
    config = _read_json(folder / TOKENIZER_CONFIG_FILE, required=False)
    if config.get("legacy") is False:
        raise CheckpointError(
            f"{folder / TOKENIZER_CONFIG_FILE} sets legacy=false; READ's checkpoints tokenise with legacy=true "
            "and READAR reproduces only that"
        )
    special_map = _read_json(folder / SPECIAL_TOKENS_FILE, required=False)
    specials = {}
    for name, default in _DEFAULT_SPECIALS.items():
        value = special_map.get(name, config.get(name, default))
        specials[name] = _special(value if value is not None else default, folder / SPECIAL_TOKENS_FILE)
    added = _added_tokens(folder, config, int(processor.get_piece_size()))
    return ReadTokenizer(
        processor,
        added,
        specials,
        clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        source=str(folder),
    )


def load_tokenizer(checkpoint: Path, vocab_size: int) -> tuple[ReadTokenizer, TokenIds]:
    """The checkpoint's tokenizer and the ids of [SEG], <im_start>, <im_end>, </s> and pad."""
    tokenizer = load_read_tokenizer(checkpoint)
    return tokenizer, tokenizer.read_token_ids(vocab_size)
