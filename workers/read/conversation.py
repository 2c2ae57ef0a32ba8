"""Prompt text and token ids: the LLaVA conversation templates READ was trained with. DESIGN.md 5.3 and 5.7.

The image enters the token sequence as a placeholder that the model replaces by the projected CLIP features.
As LLaVA's ``tokenizer_image_token``, the text on each side of ``<image>`` is tokenised on its own (each with
the tokenizer's BOS), and the BOS of the second piece is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.read.config import IM_END_TOKEN, IM_START_TOKEN
from workers.read.errors import ReadError
from workers.read.tokenizer import ReadTokenizer

IMAGE_PLACEHOLDER = "<image>"

# llava/conversation.py: conv_llava_v1 (READ's training/evaluation template) and conv_vicuna_v1 (the wording the
# original READAR scripts used). Both join turns as "ROLE: message" with " " after user turns and "</s>" after
# assistant turns (SeparatorStyle.TWO).
SYSTEM_PROMPTS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
}

DEFAULT_FORCED_ANSWER = "Sure, [SEG]."

PROMPT_TEXTS = {
    "anomaly": "Segment the {anomaly_type} on the {class_name}.",
    "binary": "Is there any anomaly in the image?",
    "generic": "Segment any anomaly on the {class_name}.",
}


def question_text(mode: str, *, class_name: str, anomaly_type: str, template: str | None = None) -> str:
    """The user question of one query (DESIGN.md 5.7); ``all_types`` queries use the ``anomaly`` wording."""
    if mode == "template":
        if not template:
            raise ReadError("prompt mode 'template' needs a template with {class_name} and/or {anomaly_type}")
        try:
            return template.format(class_name=class_name, anomaly_type=anomaly_type)
        except (KeyError, IndexError) as exc:
            raise ReadError(
                f"prompt template {template!r} uses an unknown field {exc}; only {{class_name}} and {{anomaly_type}} exist"
            ) from None
    wording = PROMPT_TEXTS["anomaly" if mode == "all_types" else mode]
    return wording.format(class_name=class_name, anomaly_type=anomaly_type)


def conversation_text(
    question: str, *, template: str = "llava_v1", use_im_start_end: bool = True, answer: str | None = None
) -> str:
    """The full prompt string with the ``<image>`` placeholder, ending with "ASSISTANT:" (or the forced answer)."""
    if template not in SYSTEM_PROMPTS:
        raise ReadError(
            f"unknown conversation template {template!r}; choose one of {', '.join(SYSTEM_PROMPTS)}"
        )
    image = f"{IM_START_TOKEN}{IMAGE_PLACEHOLDER}{IM_END_TOKEN}" if use_im_start_end else IMAGE_PLACEHOLDER
    text = f"{SYSTEM_PROMPTS[template]} USER: {image}\n{question} ASSISTANT:"
    return f"{text} {answer}" if answer else text


@dataclass(frozen=True)
class TokenizedQuery:
    """Token ids of one query around the image features.

    before_image: ids up to the image (starts with BOS; ends with ``<im_start>`` for READ).
    after_image: ids after the image (starts with ``<im_end>`` for READ; ends with "ASSISTANT:" or the answer).
    """

    before_image: tuple[int, ...]
    after_image: tuple[int, ...]


def tokenize_query(tokenizer: ReadTokenizer, text: str) -> TokenizedQuery:
    """Split ``text`` at its single ``<image>`` and tokenise both sides as LLaVA's tokenizer_image_token does."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) != 2:
        raise ReadError(
            f"a READ prompt needs exactly one {IMAGE_PLACEHOLDER}; got {len(pieces) - 1} in {text!r}"
        )
    before = tokenizer.encode(pieces[0])
    after = tokenizer.encode(pieces[1])
    # tokenizer_image_token keeps the second side's BOS only when the first side did not start with one.
    if before and before[0] == tokenizer.bos_token_id:
        after = after[1:]
    return TokenizedQuery(tuple(before), tuple(after))
