"""The settings of a released READ checkpoint, read once from its ``config.json`` and checked when built.

A released folder (e.g. READ-LLaVA-v1.5-7B-for-ReasonSeg-valset) carries a LLaVA-LLaMA ``config.json``: the
LLaMA fields plus the multimodal ones (``mm_vision_select_layer``, ``mm_use_im_start_end``, ``mm_hidden_size``,
``out_dim`` ...). Only what inference needs is kept; unknown fields are ignored like transformers does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from workers.read.errors import CheckpointError

# LLaMA fields copied into transformers' LlamaConfig when present in the READ config.
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)

# The extra tokens LISA/READ add to the LLaMA vocabulary (ids 32000-32002 in the released 7B model).
SEG_TOKEN = "[SEG]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"


@dataclass(frozen=True)
class ReadConfig:
    """What inference needs from a READ ``config.json``.

    llama: the language model's configuration (transformers LlamaConfig).
    mm_hidden_size: width of the CLIP features fed to the projector (1024 for ViT-L/14).
    vision_select_layer: index into CLIP's hidden states (-2: the second-to-last layer, as LLaVA-1.5).
    use_im_start_end: whether ``<im_start>``/``<im_end>`` surround the image features (True for READ).
    out_dim: width of the [SEG] projection = SAM's prompt width (256).
    vision_tower: the CLIP model the checkpoint was trained with (a hub name or path, used in messages only).
    """

    llama: LlamaConfig
    mm_hidden_size: int
    vision_select_layer: int
    use_im_start_end: bool
    out_dim: int
    vision_tower: str

    @classmethod
    def from_folder(cls, folder: Path) -> ReadConfig:
        """Read ``folder/config.json``; raises CheckpointError naming the file and field when it is unusable."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a READ checkpoint folder: it has no config.json")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ReadConfig:
        required = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "intermediate_size",
        )
        missing = [name for name in (*required, "mm_hidden_size") if name not in raw]
        if missing:
            raise CheckpointError(
                f"{source} lacks the fields {missing}; is it a READ/LISA (LLaVA-LLaMA) config?"
            )
        llama_kwargs = {name: raw[name] for name in _LLAMA_FIELDS if name in raw and raw[name] is not None}
        llama = LlamaConfig(**llama_kwargs)
        select_layer = int(raw.get("mm_vision_select_layer", -2))
        if select_layer >= 0:
            raise CheckpointError(
                f"{source}: mm_vision_select_layer must be negative (READ uses -2); got {select_layer}"
            )
        projector = raw.get("mm_projector_type", "mlp2x_gelu")
        if projector != "mlp2x_gelu":
            raise CheckpointError(
                f"{source}: mm_projector_type {projector!r} is not supported; READ uses 'mlp2x_gelu'"
            )
        select_feature = raw.get("mm_vision_select_feature", "patch")
        if select_feature != "patch":
            raise CheckpointError(
                f"{source}: mm_vision_select_feature {select_feature!r} is not supported; READ uses 'patch'"
            )
        return cls(
            llama=llama,
            mm_hidden_size=int(raw["mm_hidden_size"]),
            vision_select_layer=select_layer,
            use_im_start_end=bool(raw.get("mm_use_im_start_end", True)),
            out_dim=int(raw.get("out_dim", 256)),
            vision_tower=str(
                raw.get("mm_vision_tower") or raw.get("vision_tower") or "openai/clip-vit-large-patch14-336"
            ),
        )
