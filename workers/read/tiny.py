"""Random-weight READ and LISA checkpoints in exactly the released layouts, for tests and demos (seconds on a CPU).

``make_tiny_checkpoint(dir, kind="read")`` writes a READ folder (config.json with the released fields, LLaVA-1.5's
``mm_projector_type: mlp2x_gelu``, ≥2 ``pytorch_model-*.bin`` shards + index, SAM in segment-anything naming, and
the released tokenizer files: a small real SentencePiece ``tokenizer.model`` trained with LLaMA's settings,
``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json`` with [SEG] / <im_start> /
<im_end> right after the base vocabulary, no tokenizer.json) and a CLIP folder (transformers' CLIP format, 336 px
/ patch 14 → the same 24×24 grid as the real model).

``kind="lisa"`` writes a folder laid out as LISA-7B-v1 is: config.json without ``mm_projector_type`` (one Linear
projector, ``model.mm_projector.weight``/``.bias``), the vision tower named ``openai/clip-vit-large-patch14``
(224 px / patch 14 → 16×16 = 256 image tokens) and a tiny CLIP folder of that geometry; added tokens
``<im_patch>``, ``<im_start>``, ``<im_end>``, ``[SEG]`` in that order (the first three come from the LLaVA v1 base
tokenizer, so [SEG] is last); ``tokenizer_config.json`` as LISA's merge script saved it (model_max_length 512,
padding_side "right"); ``generation_config.json``; pickle shards holding the LLaMA and projector tensors in
bfloat16, SAM and ``text_hidden_fcs`` in float32, and the ``rotary_emb.inv_freq`` buffers transformers 4.31 saved;
no ``model.vision_tower.*``. The loaders treat both like released checkpoints.

``kind="lisa", layout="13b"`` (or ``kind="lisa-13b"``) writes LISA-13B-llama2-v1's layout instead: the LLaMA-2
chat base (``liuhaotian/llava-llama-2-13b-chat-lightning-preview``: rms_norm_eps 1e-5, 4096 positions), added
tokens ``[SEG]``, ``<im_start>``, ``<im_end>`` in that order (the llama-2 base tokenizer has no added tokens, and
LISA's training adds [SEG] before the image tokens; no ``<im_patch>``), three pickle shards, and otherwise the
same fields, projector, 224 px CLIP (16×16 grid) and dtypes as the 7B. Its config.json was not seen: the fields
beyond the base model's are inferred from LISA's code (see ``_lisa_config``).

Deterministic answer: random weights would almost never emit [SEG]. The tiny language model is therefore built
so that its greedy answer is ``answer`` (default "Sure, [SEG].") followed by </s> for every prompt: token
embeddings are large (std 1) and the transformer layers' random weights small, so the last-layer state at a
position is dominated by the current token's embedding, and ``lm_head`` maps the embedding of each answer token
(made orthogonal to each other) to the next one. Attention still contributes (~3 % of the state), so batching,
padding and position errors remain visible in tests. Pass an ``answer`` without [SEG] for the not-found case.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    SamConfig,
    SamModel,
)

from workers.read.config import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    KIND_LISA,
    KIND_READ,
    LINEAR_PROJECTOR,
    SEG_TOKEN,
)
from workers.read.conversation import SYSTEM_PROMPTS, conversation_text, tokenize_query
from workers.read.errors import ReadError
from workers.read.loader import quiet_transformers
from workers.read.model import build_projector, build_text_hidden_fcs
from workers.read.preprocess import CLIP_MEAN, CLIP_STD
from workers.read.sam_keys import hf_to_official
from workers.read.tokenizer import (
    ADDED_TOKENS_FILE,
    SENTENCEPIECE_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    load_read_tokenizer,
)

TINY_HIDDEN = 64
TINY_CLIP_WIDTH = 32
LISA_13B = "lisa-13b"  # shorthand for kind="lisa", layout="13b" (the CLI's --kind lisa-13b)
TINY_KINDS = (KIND_READ, KIND_LISA, LISA_13B)
LISA_LAYOUTS = ("7b", "13b")

IM_PATCH_TOKEN = "<im_patch>"
# Added tokens in id order, as each family's released added_tokens.json has them (LISA: LISA-7B-v1;
# LISA_13B: LISA-13B-llama2-v1, whose added_tokens.json is {"<im_end>": 32002, "<im_start>": 32001, "[SEG]": 32000}).
_ADDED_TOKENS = {
    KIND_READ: (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN),
    KIND_LISA: (IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN, SEG_TOKEN),
    LISA_13B: (SEG_TOKEN, IM_START_TOKEN, IM_END_TOKEN),
}
# The CLIP input side each family's vision tower has (image tokens = (side / 14)²).
CLIP_SIDES = {KIND_READ: 336, KIND_LISA: 224}

_CORPUS_WORDS = (
    "Segment the on the. Segment any anomaly on the. Is there any anomaly in the image? Sure, it is. Yes. No. "
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper "
    "good crack broken_large broken_small contamination scratch hole cut poke color glue squeeze print fold "
    "Find this if there is one. Sure, Sure, Sure. USER: ASSISTANT: 0123456789"
)

# LLaMA's SentencePiece trainer settings (as its tokenizer.model records them), at a tiny vocabulary.
_LLAMA_SENTENCEPIECE = {
    "model_type": "bpe",
    "byte_fallback": True,
    "add_dummy_prefix": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True,
    "max_sentencepiece_length": 16,
    "character_coverage": 1.0,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
}
TINY_SENTENCEPIECE_VOCAB = 400  # 259 byte/control pieces + characters + merges


def train_tiny_sentencepiece() -> bytes:
    """A small real SentencePiece model (tokenizer.model bytes) trained with LLaMA's settings."""
    try:
        import sentencepiece
    except ImportError:
        raise ReadError(
            "make-tiny-checkpoint needs the 'sentencepiece' package: pip install sentencepiece"
        ) from None
    lines = [*SYSTEM_PROMPTS.values(), *_CORPUS_WORDS.split(". ")] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=TINY_SENTENCEPIECE_VOCAB,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **_LLAMA_SENTENCEPIECE,
    )
    return model.getvalue()


def _token_entry(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def released_tokenizer_json(added: dict[str, int], kind: str = KIND_READ) -> dict[str, dict[str, object]]:
    """The JSON tokenizer files of a released READ (or LISA) folder, field for field as transformers 4.31 saves a
    LlamaTokenizer (tests/fixtures/tokenizer/released holds files 4.31 itself wrote).

    LISA's merge script loaded the tokenizer with ``model_max_length=512, padding_side="right"`` before saving, so
    its tokenizer_config.json records those two (which is also what makes LISA-7B-v1's file 744 bytes against
    READ's 745). Neither changes how text is tokenised.
    """
    specials = {
        name: _token_entry(content) for name, content in (("bos_token", "<s>"), ("eos_token", "</s>"))
    }
    unk = _token_entry("<unk>")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        **{name: {"__type": "AddedToken", **entry} for name, entry in specials.items()},
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": int(1e30),  # transformers' VERY_LARGE_INTEGER: no limit recorded
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **unk},
    }
    if kind == KIND_LISA:
        config["model_max_length"] = 512
        config["padding_side"] = "right"
        config = dict(sorted(config.items()))
    return {
        TOKENIZER_CONFIG_FILE: config,
        SPECIAL_TOKENS_FILE: {**specials, "pad_token": "<unk>", "unk_token": unk},
        ADDED_TOKENS_FILE: dict(sorted(added.items())),
    }


def write_tiny_tokenizer(folder: Path, kind: str = KIND_READ) -> None:
    """The four tokenizer files of a released READ folder, as transformers 4.31 saved them after READ added
    [SEG] (a plain added token) and <im_start>/<im_end> right after the base vocabulary; no tokenizer.json.
    ``kind="lisa"``: LISA-7B-v1's files (<im_patch>, <im_start>, <im_end>, then [SEG]); ``kind="lisa-13b"``:
    LISA-13B-llama2-v1's ([SEG], <im_start>, <im_end>).

    For the 13B, only added_tokens.json was seen; its tokenizer_config.json is written as the 7B's (LISA's merge
    script loads and saves both the same way; legacy=true is inferred — READAR refuses legacy=false).
    """
    import sentencepiece

    model = train_tiny_sentencepiece()
    (folder / SENTENCEPIECE_FILE).write_bytes(model)
    base_size = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = {token: base_size + i for i, token in enumerate(_ADDED_TOKENS[kind])}
    family = KIND_LISA if kind == LISA_13B else kind
    for name, payload in released_tokenizer_json(added, family).items():
        (folder / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _answer_chain(folder: Path, answer: str) -> list[int]:
    """Token ids [last prompt token, answer tokens…, </s>] as the checkpoint's tokenizer produces them."""
    tokenizer = load_read_tokenizer(folder)
    prompt = tokenize_query(tokenizer, conversation_text("Segment the crack on the bottle."))
    full = tokenize_query(tokenizer, conversation_text("Segment the crack on the bottle.", answer=answer))
    if full.after_image[: len(prompt.after_image)] != prompt.after_image:
        raise ReadError(
            f"the tiny tokenizer splits the answer {answer!r} into the prompt; choose another answer"
        )
    chain = [prompt.after_image[-1], *full.after_image[len(prompt.after_image) :], tokenizer.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ReadError(
            f"answer {answer!r} repeats a token; the tiny model can only emit answers without repeats"
        )
    return chain


def _steer_language_model(model: LlamaForCausalLM, chain: list[int], generator: torch.Generator) -> None:
    """Make greedy decoding follow ``chain`` (see the module docstring)."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.randn(embeddings.shape, generator=generator))
        sources = chain[:-1]
        basis, _ = torch.linalg.qr(torch.randn(hidden, len(sources), generator=generator))
        embeddings[sources] = basis.T * math.sqrt(hidden)
        head = model.lm_head.weight
        head.copy_(0.02 * torch.randn(head.shape, generator=generator))
        for source, target in zip(sources, chain[1:], strict=True):
            head[target] += 3.0 * basis[:, sources.index(source)]


def _randomise_sam(sam: SamModel, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random SAM weights on an O(1) activation scale; returns them in transformers naming."""
    state = {}
    for name, tensor in sam.state_dict().items():
        if "positional_embedding" in name:
            value = torch.randn(tensor.shape, generator=generator)  # segment-anything: scale 1.0
        elif "pos_embed" in name or "rel_pos" in name or tensor.ndim == 1 and not name.endswith("weight"):
            value = 0.02 * torch.randn(tensor.shape, generator=generator)
        elif tensor.ndim == 1:  # norm weights
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        state[name] = value
    # the tied copy must equal its source
    state["prompt_encoder.shared_embedding.positional_embedding"] = state[
        "shared_image_embedding.positional_embedding"
    ]
    return state


def tiny_sam_config() -> SamConfig:
    """A small SAM: ViT with width 32 and 2 blocks (one global), full 1024 frame → 64×64 embeddings, 256 prompts."""
    return SamConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "global_attn_indexes": [1],
            "window_size": 14,
            "output_channels": 256,
        },
        mask_decoder_config={"mlp_dim": 64, "iou_head_hidden_dim": 32, "layer_norm_eps": 1e-5},
    )


def tiny_clip_config(image_size: int = 336) -> CLIPConfig:
    """A small CLIP with a real input geometry (336 px, patch 14 → 24×24 patches; 224 px → 16×16)."""
    return CLIPConfig(
        text_config={
            "vocab_size": 99,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": TINY_CLIP_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
        },
        projection_dim=16,
    )


def _write_clip(folder: Path, image_size: int = 336) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        CLIPModel(tiny_clip_config(image_size)).save_pretrained(str(folder))
    if image_size != 336:
        # openai/clip-vit-large-patch14's preprocessor_config.json: the older flat layout (ints, no dicts).
        processor = {
            "crop_size": image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "resample": 3,
            "size": image_size,
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
        return
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")


def make_tiny_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    answer: str | None = None,
    safetensors: bool = False,
    kind: str = KIND_READ,
    layout: str = "7b",
) -> tuple[Path, Path]:
    """Write a random-weight checkpoint folder and its CLIP folder under ``out_dir``; returns (model_dir, clip_dir).

    kind: ``read`` (READ's released layout; folders ``read-tiny`` and ``clip-tiny``) or ``lisa`` (LISA-7B-v1's
    layout; ``lisa-tiny`` and ``clip-tiny-224``); see the module docstring. layout (LISA only): ``7b``
    (LISA-7B-v1) or ``13b`` (LISA-13B-llama2-v1; folders ``lisa-13b-tiny`` and ``clip-tiny-224``);
    ``kind="lisa-13b"`` is the same as ``kind="lisa", layout="13b"``. answer: what greedy decoding will
    answer to every prompt (default: "Sure, [SEG]." for READ, "[SEG]." — LISA's validation answer — for LISA).
    safetensors: write ``model-*.safetensors`` shards instead of pickle
    ``pytorch_model-*.bin`` (READ only: LISA released pickle shards).
    """
    if kind not in TINY_KINDS:
        raise ReadError(f"unknown tiny checkpoint kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    if layout not in LISA_LAYOUTS:
        raise ReadError(f"unknown LISA layout {layout!r}; choose one of {', '.join(LISA_LAYOUTS)}")
    if kind == LISA_13B:
        kind, layout = KIND_LISA, "13b"
    if layout != "7b" and kind != KIND_LISA:
        raise ReadError(f"layout {layout!r} is a LISA layout; READ has one released layout")
    if safetensors and kind == KIND_LISA:
        raise ReadError(
            "LISA's released checkpoints are pickle shards; a safetensors tiny LISA is not written"
        )
    out_dir = Path(out_dir)
    lisa = kind == KIND_LISA
    lisa_13b = lisa and layout == "13b"
    if answer is None:
        answer = "[SEG]." if lisa else "Sure, [SEG]."
    model_dir = out_dir / ("lisa-13b-tiny" if lisa_13b else "lisa-tiny" if lisa else "read-tiny")
    clip_dir = out_dir / ("clip-tiny-224" if lisa else "clip-tiny")
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _write_clip(clip_dir, CLIP_SIDES[kind])
    write_tiny_tokenizer(model_dir, LISA_13B if lisa_13b else kind)
    chain = _answer_chain(model_dir, answer)
    vocab_size = len(load_read_tokenizer(model_dir))
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        # LISA-7B-v1 (LLaMA-1 / Vicuna base): 2048 positions, eps 1e-6; READ and LISA-13B (LLaMA-2): 4096, 1e-5.
        max_position_embeddings=2048 if lisa and not lisa_13b else 4096,
        rms_norm_eps=1e-6 if lisa and not lisa_13b else 1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    language_model = LlamaForCausalLM(llama)
    _steer_language_model(language_model, chain, generator)
    projector_type = LINEAR_PROJECTOR if lisa else "mlp2x_gelu"
    projector = build_projector(TINY_CLIP_WIDTH, TINY_HIDDEN, projector_type)
    text_fcs = build_text_hidden_fcs(TINY_HIDDEN, 256)
    with torch.no_grad():
        for parameter in projector.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    sam_state = hf_to_official(_randomise_sam(SamModel(tiny_sam_config()), generator))

    first_shard = {name: t.detach().clone() for name, t in language_model.state_dict().items()}
    first_shard.update(
        {f"model.mm_projector.{n}": t.detach().clone() for n, t in projector.state_dict().items()}
    )
    if lisa:
        # As LISA's merge script saved them: the LLaMA and projector tensors in bfloat16 (built under
        # torch_dtype=bf16), plus transformers 4.31's float32 rotary buffers, one per layer.
        first_shard = {name: t.to(torch.bfloat16) for name, t in first_shard.items()}
        head_dim = TINY_HIDDEN // llama.num_attention_heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        for layer in range(llama.num_hidden_layers):
            first_shard[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    second_shard = {
        f"model.text_hidden_fcs.{n}": t.detach().clone() for n, t in text_fcs.state_dict().items()
    }
    second_shard.update({f"model.visual_model.{n}": t.clone() for n, t in sam_state.items()})
    shards = [first_shard, second_shard]
    if lisa_13b:
        # LISA-13B-llama2-v1 ships three shards (…-0000{1,2,3}-of-00003.bin). Where save_pretrained's 10 GB
        # limit cut the real state dict is not known (inferred: it follows the module order); the tiny one puts
        # the embeddings and the first LLaMA layer in shard 1, the other LLaMA tensors and the projector in
        # shard 2, and text_hidden_fcs and SAM in shard 3.
        early = ("model.embed_tokens.", "model.layers.0.")
        shards = [
            {n: t for n, t in first_shard.items() if n.startswith(early)},
            {n: t for n, t in first_shard.items() if not n.startswith(early)},
            second_shard,
        ]
    _write_shards(model_dir, shards, safetensors=safetensors)

    config = _lisa_config(llama, vocab_size, layout) if lisa else _read_config(llama, vocab_size)
    config["transformers_version"] = "4.31.0"  # what the released folders record
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    if lisa:
        generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        generation["transformers_version"] = "4.31.0"
        (model_dir / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return model_dir, clip_dir


def _read_config(llama: LlamaConfig, vocab_size: int) -> dict[str, object]:
    """config.json fields of a released READ folder (LLaVA-1.5 based)."""
    return {
        **llama.to_diff_dict(),
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
        "mm_hidden_size": TINY_CLIP_WIDTH,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "tiny-random-clip (written by workers.read.tiny)",
        "vision_tower": "tiny-random-clip (written by workers.read.tiny)",
        "out_dim": 256,
        "use_mm_proj": True,
        "train_mask_decoder": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "max_sequence_length": 2048,
        "pretraining_tp": 1,
        "use_cache": False,
        "tie_word_embeddings": False,
    }


def _lisa_config(llama: LlamaConfig, vocab_size: int, layout: str = "7b") -> dict[str, object]:
    """config.json fields of LISA-7B-v1 (LLaVA-Lightning-7B-v1-1 based): no mm_projector_type, the 224 px CLIP.

    layout "13b": LISA-13B-llama2-v1, whose config.json was not seen. Inferred as its base model's config
    (liuhaotian/llava-llama-2-13b-chat-lightning-preview: openai/clip-vit-large-patch14, select layer -2, no
    mm_projector_type; LLaMA-2's eps 1e-5 and 4096 positions, set in ``llama``) plus what LISA's code sets
    before saving, as for the 7B: mm_use_im_start_end true (false in the base; LISA forces it), out_dim 256,
    train_mask_decoder true, use_cache false, the adapter flags. ``_name_or_path`` is assumed to be the base's
    hub name, and LLaMA-2 configs carry no ``max_sequence_length`` (a LLaMA-1 conversion field), so it is left out.
    """
    clip = "openai/clip-vit-large-patch14"
    config: dict[str, object] = {
        **llama.to_diff_dict(),
        "_name_or_path": "./LLaVA/LLaVA-Lightning-7B-v1-1",
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab_size,
        "mm_hidden_size": TINY_CLIP_WIDTH,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": clip,
        "vision_tower": clip,
        "out_dim": 256,
        "use_mm_proj": True,
        "train_mask_decoder": True,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": True,
        "pretrain_mm_mlp_adapter": None,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "max_sequence_length": 2048,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "use_cache": False,
        "tie_word_embeddings": False,
    }
    if layout == "13b":
        config["_name_or_path"] = "liuhaotian/llava-llama-2-13b-chat-lightning-preview"  # inferred
        del config["max_sequence_length"]  # inferred (see above)
    return config


def _write_shards(folder: Path, shards: list[dict[str, torch.Tensor]], *, safetensors: bool) -> None:
    """Shards + index as transformers' save_pretrained names them."""
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, start=1):
        if safetensors:
            from safetensors.torch import save_file

            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(
                {k: v.contiguous() for k, v in shard.items()}, str(folder / name), metadata={"format": "pt"}
            )
        else:
            name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, folder / name)
        for tensor_name, tensor in shard.items():
            weight_map[tensor_name] = name
            total += tensor.numel() * tensor.element_size()
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    payload = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / index).write_text(json.dumps(payload, indent=2), encoding="utf-8")
