"""segment-anything ↔ transformers SAM: weight names and the architecture implied by the weights.

Released READ shards store SAM under ``model.visual_model.*`` with segment-anything's module names
(``image_encoder.blocks.N.norm1`` ...). transformers' :class:`SamModel` names the same tensors differently
(``vision_encoder.layers.N.layer_norm1`` ...). The renaming is a fixed table of patterns, applied in either
direction; the SAM size (ViT-B/L/H or a tiny test size) is read from the tensor shapes, so no SAM config file is
needed (the original builds ViT-H by name: segment_anything/build_sam.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import SamConfig

from workers.read.errors import CheckpointError, MissingWeightsError, UnexpectedWeightsError

# (segment-anything prefix, transformers prefix); ``{n}`` stands for a layer index.
_RENAMES: tuple[tuple[str, str], ...] = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{n}.norm1.", "vision_encoder.layers.{n}.layer_norm1."),
    ("image_encoder.blocks.{n}.norm2.", "vision_encoder.layers.{n}.layer_norm2."),
    ("image_encoder.blocks.{n}.attn.", "vision_encoder.layers.{n}.attn."),
    ("image_encoder.blocks.{n}.mlp.", "vision_encoder.layers.{n}.mlp."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.point_embeddings.{n}.", "prompt_encoder.point_embed.{n}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{n}.norm1.", "mask_decoder.transformer.layers.{n}.layer_norm1."),
    ("mask_decoder.transformer.layers.{n}.norm2.", "mask_decoder.transformer.layers.{n}.layer_norm2."),
    ("mask_decoder.transformer.layers.{n}.norm3.", "mask_decoder.transformer.layers.{n}.layer_norm3."),
    ("mask_decoder.transformer.layers.{n}.norm4.", "mask_decoder.transformer.layers.{n}.layer_norm4."),
    ("mask_decoder.transformer.layers.{n}.", "mask_decoder.transformer.layers.{n}."),
    (
        "mask_decoder.transformer.final_attn_token_to_image.",
        "mask_decoder.transformer.final_attn_token_to_image.",
    ),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
)

# The random Fourier matrix: one tensor in segment-anything, tied into two places in transformers.
_OFFICIAL_PE = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_HF_PE = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)

# segment-anything's MLP(...).layers.{i} of a depth-d head ↔ transformers' SamFeedForward proj_in/layers/proj_out.
_MLP_HEAD = re.compile(r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.")


def _compiled(source_side: int) -> list[tuple[re.Pattern[str], str]]:
    """Prefix rules from one side of ``_RENAMES`` (0: segment-anything, 1: transformers) to the other."""
    rules = []
    for pair in _RENAMES:
        source, target = pair[source_side], pair[1 - source_side]
        pattern = re.compile("^" + re.escape(source).replace(re.escape("{n}"), r"(\d+)"))
        rules.append((pattern, target.replace("{n}", r"\1")))
    return rules


_TO_HF = _compiled(0)
_TO_OFFICIAL = _compiled(1)


def _mlp_depths(names: list[str], pattern: str) -> dict[str, int]:
    """Depth of each MLP head, from its highest layer index (segment-anything naming)."""
    depths: dict[str, int] = {}
    for name in names:
        match = re.match(pattern, name)
        if match:
            depths[match.group(1)] = max(depths.get(match.group(1), 0), int(match.group(2)) + 1)
    return depths


def official_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a segment-anything SAM state dict (no ``model.visual_model.`` prefix) to SamModel names.

    Raises UnexpectedWeightsError listing the names no rule covers.
    """
    names = list(state)
    depths = _mlp_depths(
        names, r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\."
    )
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, tensor in state.items():
        if name == _OFFICIAL_PE:
            for target in _HF_PE:
                converted[target] = tensor
            continue
        head = re.match(
            r"^mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(.*)$", name
        )
        if head:
            index, depth = int(head.group(2)), depths[head.group(1)]
            part = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
            converted[f"mask_decoder.{head.group(1)}.{part}.{head.group(3)}"] = tensor
            continue
        for pattern, target in _TO_HF:
            if pattern.match(name):
                converted[pattern.sub(target, name, count=1)] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise UnexpectedWeightsError(
            f"{len(unknown)} SAM tensors have names segment-anything does not use: {sorted(unknown)[:10]}"
        )
    return converted


def hf_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_hf` (used to write checkpoints in the released layout)."""
    middle_layers: dict[str, set[int]] = {}
    for name in state:
        head = _MLP_HEAD.match(name)
        if head:
            middle = re.match(r"layers\.(\d+)\.", name[head.end() :])
            middle_layers.setdefault(head.group(1), set()).update({int(middle.group(1))} if middle else set())
    # depth = proj_in + middle layers + proj_out
    depths = {head: 2 + len(layers) for head, layers in middle_layers.items()}
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in _HF_PE:
            converted[_OFFICIAL_PE] = tensor
            continue
        head = _MLP_HEAD.match(name)
        if head:
            rest = name[head.end() :]
            part, _, leaf = rest.partition(".")
            if part == "proj_in":
                index = 0
            elif part == "proj_out":
                index = depths[head.group(1)] - 1
            else:  # layers.{i}.weight
                inner, _, leaf = leaf.partition(".")
                index = int(inner) + 1
            converted[f"mask_decoder.{head.group(1)}.layers.{index}.{leaf}"] = tensor
            continue
        for pattern, target in _TO_OFFICIAL:
            if pattern.match(name):
                converted[pattern.sub(target, name, count=1)] = tensor
                break
        else:
            raise CheckpointError(f"no segment-anything name for transformers SAM weight {name!r}")
    return converted


def sam_config_from_weights(state: Mapping[str, torch.Tensor]) -> SamConfig:
    """The SamConfig whose SamModel has exactly these segment-anything tensors' shapes.

    Head counts come from the relative-position tables (their width is the head dimension); global-attention
    blocks are those whose table spans the whole token grid. The two-way transformer keeps SAM's 8 heads.
    """
    try:
        return _sam_config(state)
    except KeyError as exc:
        raise MissingWeightsError(f"the SAM weights lack model.visual_model.{exc.args[0]}") from None


def _sam_config(state: Mapping[str, torch.Tensor]) -> SamConfig:
    patch = state["image_encoder.patch_embed.proj.weight"]
    pos = state["image_encoder.pos_embed"]
    hidden, _, patch_size, _ = patch.shape
    grid = int(pos.shape[1])
    blocks = sorted(
        {int(m.group(1)) for n in state if (m := re.match(r"^image_encoder\.blocks\.(\d+)\.", n))}
    )
    rel_h = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in blocks]
    head_dim = int(rel_h[0].shape[1])
    global_blocks = [i for i, table in zip(blocks, rel_h, strict=True) if table.shape[0] == 2 * grid - 1]
    windowed = [table for table in rel_h if table.shape[0] != 2 * grid - 1]
    window = (int(windowed[0].shape[0]) + 1) // 2 if windowed else 14
    decoder_layers = {
        int(m.group(1)) for n in state if (m := re.match(r"^mask_decoder\.transformer\.layers\.(\d+)\.", n))
    }
    iou_layers = [
        n for n in state if n.startswith("mask_decoder.iou_prediction_head.layers.") and n.endswith(".weight")
    ]
    prompt_width = int(state["prompt_encoder.no_mask_embed.weight"].shape[1])
    vision = {
        "hidden_size": int(hidden),
        "output_channels": int(state["image_encoder.neck.0.weight"].shape[0]),
        "num_hidden_layers": len(blocks),
        "num_attention_heads": int(hidden) // head_dim,
        "image_size": grid * int(patch_size),
        "patch_size": int(patch_size),
        "mlp_dim": int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]),
        "window_size": window,
        "global_attn_indexes": global_blocks,
        "num_pos_feats": prompt_width // 2,
        "layer_norm_eps": 1e-6,  # build_sam.py: LayerNorm(eps=1e-6) in the ViT blocks
    }
    decoder = {
        "hidden_size": prompt_width,
        "mlp_dim": int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        "num_hidden_layers": len(decoder_layers),
        "num_attention_heads": 8,
        "num_multimask_outputs": int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        "iou_head_depth": len(iou_layers),
        "iou_head_hidden_dim": int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
        # segment-anything's TwoWayTransformer uses nn.LayerNorm's default eps (1e-5); transformers' default
        # (1e-6) would differ from the original in the 6th digit.
        "layer_norm_eps": 1e-5,
    }
    prompt = {
        "hidden_size": prompt_width,
        "image_size": grid * int(patch_size),
        "patch_size": int(patch_size),
        "mask_input_channels": int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
    }
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
