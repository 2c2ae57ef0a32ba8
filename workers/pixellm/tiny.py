"""Random-weight PixelLM folders in the released layouts, for tests and demos (seconds on a CPU).

``layout="7b"`` is laid out as ``maverickrzw/PixelLM-7B/hf_model``: added tokens ``<im_patch>``, ``<im_start>``,
``<im_end>`` (from the LLaVA-7B-v1-1 base) then ``[SEG0]``…``[SEG5]``; ``layout="13b"`` as PixelLM-13B's:
``[SEG0]``…``[SEG5]`` first (training adds them before the image tokens on a llama-2 base without added tokens),
then ``<im_start>``, ``<im_end>``. Both: config.json with ``PixelLMForCausalLM`` and PixelLM's fields, the vision
tower named ``openai/clip-vit-large-patch14-336``; the slow-tokenizer files as transformers 4.31 wrote them
(``tokenizer_config.json`` with model_max_length 512 and padding_side "right", as PixelLM's merge script loaded
the tokenizer); ``generation_config.json``; two pickle shards + ``pytorch_model.bin.index.json``, the LLaMA and
both projectors in bfloat16 with transformers 4.31's float32 ``rotary_emb.inv_freq`` buffers, the neck, prompt
encoder, multi-scale mask decoder and ``text_hidden_fcs`` in float32; no vision tower, no SAM image encoder.
The mask modules keep their full released shapes (256 channels); the LLaMA is 64 wide.

The CLIP folder (``clip-tiny-pixellm``) is a 336 px / patch 14 CLIP of width 32 with 12 layers, so layer −11
exists. The greedy answer is steered as in :mod:`workers.read.tiny` (default: PixelLM's validation answer
"[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5].").
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece
import torch
from transformers import CLIPModel, LlamaConfig, LlamaForCausalLM

from workers.pixellm.config import SOURCE_CLIP_SIDE
from workers.pixellm.model import PixelLMHeads
from workers.read.config import IM_END_TOKEN, IM_START_TOKEN, KIND_LISA
from workers.read.errors import ReadError
from workers.read.loader import quiet_transformers
from workers.read.preprocess import CLIP_MEAN, CLIP_STD
from workers.read.tiny import (
    IM_PATCH_TOKEN,
    _answer_chain,
    _steer_language_model,
    _write_shards,
    released_tokenizer_json,
    tiny_clip_config,
    train_tiny_sentencepiece,
)
from workers.read.tokenizer import SENTENCEPIECE_FILE, load_read_tokenizer

TINY_HIDDEN = 64
TINY_CLIP_WIDTH = 32
TINY_CLIP_LAYERS = 12
SEG_TOKENS = tuple(f"[SEG{i}]" for i in range(6))
PIXELLM_ANSWER = " ".join(SEG_TOKENS) + "."
LAYOUTS = {
    "7b": (IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN, *SEG_TOKENS),
    "13b": (*SEG_TOKENS, IM_START_TOKEN, IM_END_TOKEN),
}
CLIP_TOWER = "openai/clip-vit-large-patch14-336"


def _write_clip(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(SOURCE_CLIP_SIDE)
    config.vision_config.num_hidden_layers = TINY_CLIP_LAYERS
    with quiet_transformers():
        CLIPModel(config).save_pretrained(str(folder))
    processor = {
        "crop_size": SOURCE_CLIP_SIDE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": SOURCE_CLIP_SIDE,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")


def write_pixellm_tokenizer(folder: Path, layout: str) -> None:
    model = train_tiny_sentencepiece()
    (folder / SENTENCEPIECE_FILE).write_bytes(model)
    base = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = {token: base + i for i, token in enumerate(LAYOUTS[layout])}
    for name, payload in released_tokenizer_json(added, KIND_LISA).items():
        (folder / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def pixellm_config_json(llama: LlamaConfig, vocab_size: int, layout: str) -> dict[str, object]:
    """config.json as PixelLM-7B's (fields seen on its model page) at tiny sizes."""
    base = "./ckpt/Llava-7B-V1-1/" if layout == "7b" else "liuhaotian/llava-llama-2-13b-chat-lightning-preview"
    return {
        **llama.to_diff_dict(),
        "_name_or_path": base,
        "architectures": ["PixelLMForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "vocab_size": vocab_size,
        "mm_hidden_size": TINY_CLIP_WIDTH,
        "mm_vision_tower": CLIP_TOWER,
        "vision_tower": CLIP_TOWER,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "mm_projector_hidden_dim": 2,
        "mm_projector_out_dim": 1,
        "separate_mm_projector": True,
        "image_feature_scale_num": 2,
        "pad_train_clip_images": True,
        "resize_vision_tower": True,
        "resize_vision_tower_size": 448,
        "vision_tower_for_mask": True,
        "out_dim": 256,
        "train_mask_decoder": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": True,
        "pretrain_mm_mlp_adapter": None,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "use_mm_proj": True,
        "use_cache": False,
        "tie_word_embeddings": False,
    }


def make_tiny_pixellm(out_dir: Path, *, seed: int = 0, answer: str = PIXELLM_ANSWER,
                      layout: str = "7b") -> tuple[Path, Path]:
    """Write ``pixellm-tiny`` (``pixellm-13b-tiny`` for layout 13b) and ``clip-tiny-pixellm`` under ``out_dir``."""
    if layout not in LAYOUTS:
        raise ReadError(f"unknown PixelLM layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out_dir = Path(out_dir)
    model_dir = out_dir / ("pixellm-tiny" if layout == "7b" else "pixellm-13b-tiny")
    clip_dir = out_dir / "clip-tiny-pixellm"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _write_clip(clip_dir)
    write_pixellm_tokenizer(model_dir, layout)
    chain = _answer_chain(model_dir, answer)
    vocab_size = len(load_read_tokenizer(model_dir))
    llama = LlamaConfig(
        vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048 if layout == "7b" else 4096,
        rms_norm_eps=1e-6 if layout == "7b" else 1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    language_model = LlamaForCausalLM(llama)
    _steer_language_model(language_model, chain, generator)
    heads = PixelLMHeads(TINY_CLIP_WIDTH, TINY_HIDDEN, 256)
    with torch.no_grad():
        for projector in (heads.mm_projector, heads.out_mm_projector):
            for parameter in projector.parameters():
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        for buffer in heads.buffers():
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    first = {name: t.detach().clone().to(torch.bfloat16) for name, t in language_model.state_dict().items()}
    second = {}
    for name, tensor in heads.state_dict().items():
        released = f"model.{name}"
        if name.startswith(("mm_projector.", "out_mm_projector.")):
            first[released] = tensor.detach().clone().to(torch.bfloat16)
        else:
            second[released] = tensor.detach().clone()
    head_dim = TINY_HIDDEN // llama.num_attention_heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for layer in range(llama.num_hidden_layers):
        first[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    _write_shards(model_dir, [first, second], safetensors=False)
    (model_dir / "config.json").write_text(
        json.dumps(pixellm_config_json(llama, vocab_size, layout), indent=2, sort_keys=True), encoding="utf-8"
    )
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                  "transformers_version": "4.31.0"}
    (model_dir / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return model_dir, clip_dir
