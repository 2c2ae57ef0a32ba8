"""The settings of a released PixelLM folder (``PixelLM-7B/hf_model``, ``PixelLM-13B/hf_model``).

PixelLM's config.json is a LLaVA-LLaMA config plus its own fields (``separate_mm_projector``,
``image_feature_scale_num``, ``resize_vision_tower_size`` …). ``PixelLMForCausalLM.__init__`` overwrites several of
them whatever the file says (two feature scales, a 448 px vision tower, padded CLIP input, masks from the vision
tower, separate projectors), so those are constants here and a config that contradicts them is refused rather
than silently followed. The [SEG] codebook is not in config.json: its size comes from the ``[SEGk]`` tokens of
added_tokens.json (six in the releases: three per scale).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from workers.read.config import (
    KIND_NAMES,
    KIND_PIXELLM,
    checkpoint_kind,
    json_object,
    llava_fields,
    refuse_clip_config,
)
from workers.read.errors import CheckpointError, WrongDetectorError

# Forced by PixelLMForCausalLM.__init__ (model/PixelLM.py).
SCALE_NUM = 2
CLIP_SIDE = 448  # resize_vision_tower_size
CLIP_PATCH = 14
CLIP_GRID = CLIP_SIDE // CLIP_PATCH  # 32
LLM_GRID = 16  # the 32×32 layer −2 grid pooled for the language model: 256 image tokens
MASK_SIZE = 128  # low-resolution mask side
EXTRA_CLIP_LAYER = -11  # clip_encoder.feature_select's second scale (hard-coded)
SOURCE_CLIP_SIDE = 336  # openai/clip-vit-large-patch14-336, resized to 448 at load
SEG_PATTERN = re.compile(r"^\[SEG(\d+)\]$")


@dataclass(frozen=True)
class PixelLMConfig:
    llama: LlamaConfig
    mm_hidden_size: int
    vision_select_layer: int
    use_im_start_end: bool
    out_dim: int
    vision_tower: str
    source: str = "config.json"

    @property
    def family(self) -> str:
        return KIND_NAMES[KIND_PIXELLM]

    @classmethod
    def from_folder(cls, folder: Path) -> PixelLMConfig:
        path = Path(folder) / "config.json"
        raw = json_object(path, hint="it is not a PixelLM checkpoint folder (point at its hf_model/)")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> PixelLMConfig:
        refuse_clip_config(raw, source=source, family="PixelLM")
        kind = checkpoint_kind(raw)
        if kind != KIND_PIXELLM:
            raise WrongDetectorError(
                f"{source} is a {KIND_NAMES[kind]} checkpoint, not PixelLM (no PixelLMForCausalLM architecture, "
                f"separate_mm_projector or image_feature_scale_num): use --detector {kind}"
            )
        for name, forced in (("image_feature_scale_num", SCALE_NUM), ("resize_vision_tower_size", CLIP_SIDE)):
            if name in raw and raw[name] != forced:
                raise CheckpointError(
                    f"{source}: {name} is {raw[name]!r}, but PixelLM's released model class forces {forced}; "
                    "READAR reproduces only the released setting"
                )
        if raw.get("separate_mm_projector") is False:
            raise CheckpointError(f"{source}: separate_mm_projector false is not PixelLM's released setting")
        default_tower = f"openai/clip-vit-large-patch14-{SOURCE_CLIP_SIDE}"
        return cls(**llava_fields(raw, source=source, family="PixelLM", vision_tower=default_tower), source=source)


def seg_token_ids(added: dict[str, int], source: str) -> tuple[int, ...]:
    """Ids of [SEG0] … [SEG{n-1}] in index order; n must be a positive multiple of the two scales."""
    found = {int(m.group(1)): token_id for token, token_id in added.items() if (m := SEG_PATTERN.match(token))}
    if not found or sorted(found) != list(range(len(found))) or len(found) % SCALE_NUM:
        hint = " (it has a plain [SEG]: a READ or LISA tokenizer)" if "[SEG]" in added else ""
        raise CheckpointError(
            f"the tokenizer in {source} has [SEGk] tokens {sorted(found)}{hint}; PixelLM's released folders add "
            f"[SEG0]…[SEG5] (three per scale, {SCALE_NUM} scales) in added_tokens.json"
        )
    return tuple(found[i] for i in range(len(found)))
