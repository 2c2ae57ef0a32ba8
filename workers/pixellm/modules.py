"""PixelLM's mask-side modules, with the attribute names its released state dict uses.

The names follow segment-anything (``PromptEncoder``, ``TwoWayTransformer``, ``LayerNorm2d``, ``MLPBlock``) and
PixelLM's ``MaskDecoderMultiScale`` (model/segment_anything/modeling/mask_decoder_multi_scale.py): two transformer
levels (32×32 then 64×64), shared IoU / mask tokens, a 2× ``output_upscaling``, an ``upsample_2x`` between levels,
a level-1 positional encoding ``pe1`` and a ``level_embed`` added to every token. Written here from the structure
those files describe; the arithmetic order follows them so float results agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PROMPT_DIM = 256  # PixelLM: prompt_embed_dim; also the channel count its decoder gate hard-codes
DECODER_MLP_DIM = 2048
NUM_MASK_TOKENS = 4  # num_multimask_outputs 3 + 1


class LayerNorm2d(nn.Module):
    """Channel LayerNorm over (N, C, H, W) with eps 1e-6 (segment-anything's common.py)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; its (2, F) Gaussian matrix is a persistent buffer."""

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        matrix = self.positional_encoding_gaussian_matrix
        coords = (2 * coords - 1).to(matrix.dtype) @ matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """(2F, h, w) encoding of the cell centres of an h×w grid."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ones = torch.ones((h, w), device=matrix.device, dtype=matrix.dtype)
        y = (ones.cumsum(dim=0) - 0.5) / h
        x = (ones.cumsum(dim=1) - 0.5) / w
        return self._encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder as PixelLM builds it (embed 256, 32×32 embedding, 448 input, mask_in_chans 16).

    Only the text-embedding path is used at inference: sparse = the given embeddings, dense = ``no_mask_embed``
    broadcast over the embedding grid. The point/box/mask modules exist so the released tensors load.
    """

    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int],
                 mask_in_chans: int = 16) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        quarter = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2),
            LayerNorm2d(quarter),
            nn.GELU(),
            nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def forward(self, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_embeds (N, T, C) → sparse (N, T, C), dense (N, C, h, w)."""
        count = text_embeds.shape[0]
        empty = torch.empty((count, 0, self.embed_dim), device=text_embeds.device)
        sparse = torch.cat([empty, text_embeds], dim=1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(count, -1, *self.image_embedding_size)
        return sparse, dense


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        weights = (q @ k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
        out = torch.softmax(weights, dim=-1) @ v
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys)
        queries = self.norm2(queries)
        queries = self.norm3(queries + self.mlp(queries))
        keys = keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries)
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, embedding_dim: int = PROMPT_DIM, num_heads: int = 8,
                 mlp_dim: int = DECODER_MLP_DIM) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)]
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attended = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attended), keys


class MLP(nn.Module):
    """MaskFormer-style MLP: ``layers`` Linears with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == last else F.relu(layer(x))
        return x


class MaskDecoderMultiScale(nn.Module):
    """PixelLM's multi-scale mask decoder (see the module docstring)."""

    def __init__(self, transformer_dim: int = PROMPT_DIM, scale_num: int = 2, mlp_dim: int = DECODER_MLP_DIM) -> None:
        super().__init__()
        self.transformer = nn.ModuleList([TwoWayTransformer(2, transformer_dim, 8, mlp_dim) for _ in range(scale_num)])
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 8, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 8),
            nn.GELU(),
        )
        self.upsample_2x = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim),
            nn.GELU(),
        )
        self.pe1 = PositionEmbeddingRandom(transformer_dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList(
            [MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(NUM_MASK_TOKENS)]
        )
        self.iou_prediction_head = MLP(transformer_dim, 256, NUM_MASK_TOKENS, 3)
        self.level_embed = nn.Embedding(scale_num, transformer_dim)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor, level_num: int, previous_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits of mask token 0 (multimask_output=False): (N, 1, 2h, 2w) at level 0 (h = 32), doubled at
        level 1. image_embeddings: (1, C, h, w); sparse (N, 1, C); dense (N, C, h, w)."""
        count = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(count, -1, -1), sparse), dim=1)
        level = torch.full((count, 1), level_num, dtype=torch.long, device=tokens.device)
        tokens = tokens + self.level_embed(level)
        src = torch.repeat_interleave(image_embeddings, count, dim=0)
        if level_num > 0:
            src = self.upsample_2x(src)
            _, channels, h, w = src.shape
            gate = torch.mean(previous_masks, dim=1)[:, None].expand(-1, channels, -1, -1).sigmoid() + 1
            src = gate * src
            image_pe = self.pe1((h, w)).unsqueeze(0)
            dense = F.interpolate(dense.float(), size=(h, w), mode="bilinear", align_corners=False).to(dense)
        src = src + dense
        pos = torch.repeat_interleave(image_pe, count, dim=0)
        b, c, h, w = src.shape
        hs, src = self.transformer[level_num](src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + NUM_MASK_TOKENS]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, NUM_MASK_TOKENS, h, w)
        return masks[:, :1]
