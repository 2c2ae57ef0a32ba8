"""The PixelLM model: CLIP ViT-L/14 resized to 448 px, two MLP projectors, LLaMA, and a SAM-style prompt encoder
and multi-scale mask decoder reading a neck over the CLIP features. There is no SAM image encoder.

Released tensor names (PixelLMForCausalLM): the LLaMA under ``model.*`` / ``lm_head``, and beside it
``model.mm_projector`` (LLM input), ``model.out_mm_projector`` (mask features), ``model.image_feature_neck``,
``model.prompt_encoder``, ``model.mask_decoder`` and ``model.text_hidden_fcs``. :class:`PixelLMHeads` holds the
latter six under exactly those names, so ``"model." + name`` is the released name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM

from workers.pixellm.config import (
    CLIP_GRID,
    CLIP_SIDE,
    EXTRA_CLIP_LAYER,
    LLM_GRID,
    MASK_SIZE,
    SCALE_NUM,
)
from workers.pixellm.modules import PROMPT_DIM, LayerNorm2d, MaskDecoderMultiScale, PromptEncoder
from workers.read.errors import ReadError
from workers.read.model import LlamaDecoding


def _vision_body(vision_tower: nn.Module) -> nn.Module:
    """The module holding embeddings / pre_layrnorm / encoder (transformers 5 flattened ``vision_model``)."""
    return getattr(vision_tower, "vision_model", vision_tower)


def resize_clip_to_448(vision_tower: CLIPVisionModel) -> None:
    """Resize the 336 px CLIP to 448 px in place, as PixelLM's clip_encoder.load_model does.

    Its rule, kept on purpose: the table's rows [:-1] are read as the 24×24 grid and its LAST row as the CLS
    embedding, although transformers' CLIP stores CLS FIRST. The grid is bilinearly resized (align_corners=False)
    to 32×32 and the last row appended, giving 1025 rows; position id 0 (the CLS token) thus gets resized cell
    (0, 0), patch k gets cell k+1, and the last patch the old last patch's row. The trained model saw this."""
    embeddings = _vision_body(vision_tower).embeddings
    old = embeddings.position_embedding.weight.detach()
    side = int(round((old.shape[0] - 1) ** 0.5))
    if side * side + 1 != old.shape[0]:
        raise ReadError(f"the CLIP position table has {old.shape[0]} rows, not a square grid plus CLS")
    dim = old.shape[1]
    grid = old[:-1].permute(1, 0).reshape(1, dim, side, side)
    resized = F.interpolate(grid, (CLIP_GRID, CLIP_GRID), mode="bilinear", align_corners=False)[0]
    table = torch.cat((resized.flatten(-2).permute(1, 0), old[-1:]), dim=0)
    embeddings.image_size = CLIP_SIDE
    embeddings.num_patches = CLIP_GRID * CLIP_GRID
    embeddings.num_positions = embeddings.num_patches + 1
    embeddings.position_embedding = nn.Embedding(embeddings.num_positions, dim, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)
    embeddings.register_buffer(
        "position_ids", torch.arange(embeddings.num_positions, device=old.device).expand((1, -1)), persistent=False
    )
    vision_tower.config.image_size = CLIP_SIDE


def mlp_projector(in_width: int, hidden: int) -> nn.Sequential:
    """LLaVA's Sequential(Linear(in, 2H), GELU, Linear(2H, H)) (mm_projector_hidden_dim 2, out_dim 1)."""
    return nn.Sequential(nn.Linear(in_width, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))


class PixelLMHeads(nn.Module):
    """Everything under ``model.`` that is not LLaMA (names as released)."""

    def __init__(self, mm_hidden_size: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mm_projector = mlp_projector(mm_hidden_size, hidden)
        self.out_mm_projector = mlp_projector(mm_hidden_size, hidden)
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(hidden, PROMPT_DIM, kernel_size=1, bias=False),
            LayerNorm2d(PROMPT_DIM),
            nn.Conv2d(PROMPT_DIM, PROMPT_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(PROMPT_DIM),
        )
        self.prompt_encoder = PromptEncoder(PROMPT_DIM, (CLIP_GRID, CLIP_GRID), (CLIP_SIDE, CLIP_SIDE), 16)
        self.mask_decoder = MaskDecoderMultiScale(PROMPT_DIM, SCALE_NUM)
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim), nn.Dropout(0.0))]
        )


def valid_patch_mask(input_sizes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(B, 32, 32) 1 where a patch covers image pixels: the 448² pixel mask sampled nearest (pixel 14·i)."""
    pixels = torch.zeros((len(input_sizes), CLIP_SIDE, CLIP_SIDE), device=device)
    for index, (h, w) in enumerate(input_sizes):
        pixels[index, :h, :w] = 1
    return F.interpolate(pixels[:, None], size=(CLIP_GRID, CLIP_GRID), mode="nearest")[:, 0]


class PixelLMModel(LlamaDecoding, nn.Module):
    def __init__(self, vision_tower: CLIPVisionModel, language_model: LlamaForCausalLM, heads: PixelLMHeads,
                 *, vision_select_layer: int = -2) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.language_model = language_model
        self.heads = heads
        self.vision_select_layer = vision_select_layer
        self._find_cache_argument()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def clip_hidden_states(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All CLIP hidden states (embeddings after pre_layrnorm, then each layer), with padded patches masked as
        keys in every layer (custom_clip's additive mask; the CLS key always valid)."""
        vision = _vision_body(self.vision_tower)
        dtype = next(vision.parameters()).dtype
        hidden = vision.pre_layrnorm(vision.embeddings(pixels.to(self.device, dtype)))
        keys = torch.cat([torch.ones_like(patch_mask.flatten(1)[:, :1]), patch_mask.flatten(1)], dim=1)
        length = keys.shape[1]
        additive = (1.0 - keys[:, None, None, :].expand(-1, 1, length, length).to(dtype))
        additive = additive.masked_fill(additive.bool(), torch.finfo(dtype).min)
        states = [hidden]
        for layer in vision.encoder.layers:
            hidden = layer(hidden, additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            states.append(hidden)
        return tuple(states)

    def image_inputs(self, pixels: torch.Tensor, input_sizes: list[tuple[int, int]]):
        """(B, 3, 448, 448) → LLM image tokens (B, 256, H), their key mask (B, 256), and the mask features
        (B, 2, H, 32, 32): out_mm_projector of layer −2 (scale 0) and layer −11 (scale 1)."""
        patch_mask = valid_patch_mask(input_sizes, self.device)
        states = self.clip_hidden_states(pixels, patch_mask)
        if len(states) < -EXTRA_CLIP_LAYER:
            raise ReadError(f"PixelLM reads CLIP layer {EXTRA_CLIP_LAYER}; this CLIP has {len(states) - 1} layers")
        main = states[self.vision_select_layer][:, 1:].to(self.dtype)
        extra = states[EXTRA_CLIP_LAYER][:, 1:].to(self.dtype)
        batch, count, width = main.shape
        grid = main.permute(0, 2, 1).reshape(batch, width, CLIP_GRID, CLIP_GRID).float()
        pooled = F.interpolate(grid, size=(LLM_GRID, LLM_GRID), mode="bilinear", align_corners=False).to(main.dtype)
        tokens = self.heads.mm_projector(pooled.flatten(-2).permute(0, 2, 1))
        llm_mask = F.interpolate(patch_mask[:, None], size=(LLM_GRID, LLM_GRID), mode="nearest")[:, 0].flatten(1)
        projected = torch.stack([self.heads.out_mm_projector(main), self.heads.out_mm_projector(extra)], dim=1)
        hidden = projected.shape[-1]
        features = projected.permute(0, 1, 3, 2).reshape(batch, SCALE_NUM, hidden, CLIP_GRID, CLIP_GRID)
        return tokens, llm_mask.long(), features

    def seg_projection(self, states: torch.Tensor) -> torch.Tensor:
        return self.heads.text_hidden_fcs[0](states.to(self.dtype))

    def low_res_masks(self, features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """One image's mask logits, (N, 128, 128). features: (2, H, 32, 32); embeddings: (N, 2, 256), one fused
        embedding per scale per object. Levels are mixed 1/2 each at 128² (PixelLM's fixed scalars)."""
        heads = self.heads
        sparse, dense = heads.prompt_encoder(embeddings)
        sparse = sparse.to(embeddings.dtype)
        neck = heads.image_feature_neck(features.to(self.dtype))
        total = torch.zeros((sparse.shape[0], 1, MASK_SIZE, MASK_SIZE), device=neck.device, dtype=neck.dtype)
        previous = None
        for level in range(SCALE_NUM):
            masks = heads.mask_decoder(neck[level : level + 1], heads.prompt_encoder.get_dense_pe(),
                                       sparse[:, level : level + 1], dense, level, previous)
            resized = F.interpolate(masks.float(), (MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)
            total = total + (1.0 / SCALE_NUM) * resized.to(masks)
            previous = masks
        return total[:, 0]
