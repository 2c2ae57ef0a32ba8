"""Load a released PixelLM folder (``hf_model/``) plus the 336 px CLIP folder into a :class:`PixelLMModel`.

Local files only. The same shard reading and checks as READ/LISA (:mod:`workers.read.loader`: index, every shard
present and readable, pickle only through ``weights_only``), then PixelLM's own split: LLaMA tensors, the six
``model.*`` head modules, ``rotary_emb.inv_freq`` and any ``model.vision_tower.*`` skipped. Anything else — a SAM
image encoder (``model.visual_model.*``: a READ/LISA folder), a missing or misshapen tensor — is refused by name.
The CLIP folder must hold the 336 px ViT the config names; it is resized to 448 px at load as PixelLM does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from workers.pixellm.config import (
    CLIP_PATCH,
    EXTRA_CLIP_LAYER,
    SOURCE_CLIP_SIDE,
    PixelLMConfig,
    seg_token_ids,
)
from workers.pixellm.model import PixelLMHeads, PixelLMModel, resize_clip_to_448
from workers.read.config import IM_END_TOKEN, IM_START_TOKEN
from workers.read.errors import (
    CheckpointError,
    ClipFolderError,
    MissingWeightsError,
    UnexpectedWeightsError,
    WeightShapeError,
)
from workers.read.loader import clip_vision_config, quiet_transformers, read_state_dict
from workers.read.model import fast_init
from workers.read.tokenizer import ReadTokenizer, load_read_tokenizer

LANGUAGE_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
HEAD_NAMES = ("mm_projector", "out_mm_projector", "image_feature_neck", "prompt_encoder", "mask_decoder",
              "text_hidden_fcs")
IGNORED_PREFIXES = ("model.vision_tower.",)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class PixelTokens:
    seg: tuple[int, ...]
    im_start: int
    im_end: int
    eos: int
    pad: int


def load_pixellm_tokenizer(folder: Path, vocab_size: int) -> tuple[ReadTokenizer, PixelTokens]:
    tokenizer = load_read_tokenizer(folder)
    seg = seg_token_ids(tokenizer.added, str(folder))
    ids = {}
    for token in (IM_START_TOKEN, IM_END_TOKEN):
        token_id = tokenizer.added.get(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer in {folder} lacks {token}; PixelLM's folders add it")
        ids[token] = token_id
    if max((*seg, *ids.values())) >= vocab_size:
        raise CheckpointError(f"the tokenizer in {folder} has ids beyond the model's {vocab_size}-token vocabulary")
    return tokenizer, PixelTokens(seg, ids[IM_START_TOKEN], ids[IM_END_TOKEN], tokenizer.eos_token_id,
                                  tokenizer.pad_token_id)


def load_pixellm_clip_config(clip_dir: Path | None, config: PixelLMConfig) -> CLIPVisionConfig:
    expected = (f"expected a local folder with {config.vision_tower} (336 px, patch 14, width "
                f"{config.mm_hidden_size}) in transformers' CLIP format; PixelLM resizes it to 448 px itself")
    vision = clip_vision_config(clip_dir, expected)
    if vision.hidden_size != config.mm_hidden_size:
        raise ClipFolderError(f"{clip_dir} has width {vision.hidden_size}, the projectors take "
                              f"{config.mm_hidden_size}; {expected}")
    if (vision.image_size, vision.patch_size) != (SOURCE_CLIP_SIDE, CLIP_PATCH):
        raise ClipFolderError(f"{clip_dir} is a {vision.image_size} px / patch {vision.patch_size} CLIP; {expected}")
    if vision.num_hidden_layers + 1 < -EXTRA_CLIP_LAYER:
        raise ClipFolderError(f"{clip_dir} has {vision.num_hidden_layers} layers; PixelLM reads layer "
                              f"{EXTRA_CLIP_LAYER}; {expected}")
    return vision


def split_state(state: dict[str, torch.Tensor], source: Path) -> tuple[dict, dict]:
    language, heads, unexpected = {}, {}, []
    for name, tensor in state.items():
        if name.startswith(IGNORED_PREFIXES) or name.endswith(IGNORED_SUFFIXES):
            continue
        if name.startswith(LANGUAGE_PREFIXES):
            language[name] = tensor
        elif name.startswith("model.") and name.split(".")[1] in HEAD_NAMES:
            heads[name[len("model."):]] = tensor
        else:
            unexpected.append(name)
    if unexpected:
        hint = (" — a SAM image encoder: this is a READ or LISA folder (use --detector read or lisa)"
                if any(n.startswith("model.visual_model.") for n in unexpected) else "")
        raise UnexpectedWeightsError(f"{source} holds tensors PixelLM does not use: {sorted(unexpected)[:8]}{hint}")
    return language, heads


def _load(module: torch.nn.Module, state: dict, prefix: str, source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise MissingWeightsError(f"{source} lacks tensors: {[prefix + n for n in missing[:8]]}")
    extra = sorted(state.keys() - expected.keys())
    if extra:
        raise UnexpectedWeightsError(f"{source} holds tensors PixelLM does not use: {[prefix + n for n in extra[:8]]}")
    wrong = [f"{prefix}{n} {tuple(state[n].shape)} (model expects {tuple(t.shape)})"
             for n, t in expected.items() if state[n].shape != t.shape]
    if wrong:
        raise WeightShapeError(f"{source} has tensors of the wrong shape: {wrong[:8]}")
    module.load_state_dict(state, strict=True)


def load_pixellm_model(checkpoint: Path, clip_dir: Path | None, *, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> PixelLMModel:
    checkpoint = Path(checkpoint)
    config = PixelLMConfig.from_folder(checkpoint)
    vision_config = load_pixellm_clip_config(clip_dir, config)
    language, heads = split_state(read_state_dict(checkpoint), checkpoint)
    try:
        with quiet_transformers():
            # float32 first: PixelLM resizes the position table in the dtype the CLIP loaded in (fp32), then casts.
            vision_tower = CLIPVisionModel.from_pretrained(str(clip_dir), config=vision_config,
                                                           local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ClipFolderError(f"cannot load the CLIP vision tower from {clip_dir}: {exc}") from exc
    resize_clip_to_448(vision_tower)
    vision_tower.to(device=device, dtype=dtype)
    with fast_init(dtype, device):
        language_model = LlamaForCausalLM(config.llama)
        head_modules = PixelLMHeads(config.mm_hidden_size, config.llama.hidden_size, config.out_dim)
    _load(language_model, language, "", checkpoint)
    _load(head_modules, heads, "model.", checkpoint)
    model = PixelLMModel(vision_tower, language_model, head_modules, vision_select_layer=config.vision_select_layer)
    return model.eval()


_LOADED: dict[tuple[str, str, str, str], PixelLMModel] = {}
_LOCK = threading.Lock()


def cached_pixellm_model(checkpoint: Path, clip_dir: Path | None, *, device: str, dtype: torch.dtype) -> PixelLMModel:
    key = (str(Path(checkpoint).resolve()), str(Path(clip_dir).resolve()) if clip_dir else "", device, str(dtype))
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_pixellm_model(checkpoint, clip_dir, device=device, dtype=dtype)
        return _LOADED[key]
