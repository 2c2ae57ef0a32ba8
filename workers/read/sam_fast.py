"""SAM image encoder levers: fused relative-position attention (``fused_sam``) and ``torch.compile`` (``compile_sam``).

Why: transformers' SAM vision attention adds the decomposed relative positions (mvitv2) as a dense
(B·heads, HW, HW) bias: ``attn = (q·scale)·kᵀ + rel_h + rel_w``, with ``rel_h[q, kh] = q·Rh[qh, kh]`` and
``rel_w[q, kw] = q·Rw[qw, kw]`` computed from the *unscaled* query. A dense float mask rules out the fused SDPA
kernels (flash) and costs 512 MiB per image in ViT-H's 64×64 global blocks.

The bias is a sum of two low-rank terms, so it folds into the queries and keys::

    q' = [q·scale, rel_h(q) (H values), rel_w(q) (W values)]
    k' = [k,       onehot(kh) (H),      onehot(kw) (W)]
    q'·k'ᵀ = scale·q·kᵀ + rel_h[kh] + rel_w[kw]          (exactly the transformers logits)

and ``scaled_dot_product_attention(q', k', v', scale=1)`` runs without a mask. ``v`` is padded with zeros to the
head dim of ``q'`` (flash needs equal head dims; the padded output columns are zero and sliced off), and all
three are padded to a multiple of 8 (the alignment the fused kernels want; zero columns add nothing).

The levers act in place on the modules and are undone exactly, so A/B benchmark rows can toggle them on one model:
the fused attention swaps each attention module's class for a subclass whose only change is ``forward`` (the
original class is kept on the module), and the compile lever sets an instance ``forward`` on the encoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention

from workers.read.levers import Levers

HEAD_DIM_ALIGNMENT = 8
# Attributes kept on the modules (so that the state travels with the model, not with a global registry).
_EAGER_CLASS = "_readar_eager_class"  # on an attention module: its class before the fused swap
_STATE = "_readar_sam_levers"  # on the vision encoder: (fused, compiled) as last applied
_COMPILED = "_readar_compiled_forward"  # on the vision encoder: its compiled forward, reused


class FusedSamVisionAttention(SamVisionAttention):
    """SAM vision attention with the relative positions folded into q and k: one maskless SDPA call.

    Used only by swapping ``__class__`` of an existing (eager or SDPA) SAM vision attention module; parameters,
    ``scale``, ``use_rel_pos`` and ``training`` come from that module, so the results equal its own.
    """

    def forward(self, hidden_states: torch.Tensor, output_attentions: Any = None) -> tuple[torch.Tensor, Any]:
        batch, height, width, _ = hidden_states.shape
        heads = self.num_attention_heads
        # (3, B, heads, HW, d), the layout transformers uses before flattening B·heads.
        qkv = self.qkv(hidden_states).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        scale = self.scale
        if self.use_rel_pos:
            rel_h_table = self.get_rel_pos(height, height, self.rel_pos_h)
            rel_w_table = self.get_rel_pos(width, width, self.rel_pos_w)
            query, key = fold_rel_pos(query, key, rel_h_table, rel_w_table, (height, width), scale)
            scale = 1.0
        dropout = self.dropout if self.training else 0.0
        output = padded_sdpa(query, key, value, scale=scale, dropout_p=dropout)
        # (B, HW, heads, d) → (B, H, W, heads·d): heads outer, d inner, as transformers recombines them.
        output = output.permute(0, 2, 1, 3).reshape(batch, height, width, -1)
        return self.proj(output), None


def fold_rel_pos(
    query: torch.Tensor,
    key: torch.Tensor,
    rel_h_table: torch.Tensor,
    rel_w_table: torch.Tensor,
    size: tuple[int, int],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') with ``q'·k'ᵀ = (q·scale)·kᵀ + rel_h + rel_w`` (module docstring).

    query, key: (…, H·W, d), row-major over (h, w); rel_h_table: (H, H, d) indexed [q_h, k_h]; rel_w_table:
    (W, W, d) indexed [q_w, k_w] (transformers' ``get_rel_pos`` output). Returns (…, H·W, d + H + W) each.
    """
    height, width = size
    grid = query.unflatten(-2, (height, width))  # (…, H, W, d)
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid, rel_h_table).flatten(-3, -2)  # (…, HW, H)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid, rel_w_table).flatten(-3, -2)  # (…, HW, W)
    folded_query = torch.cat([query * scale, rel_h, rel_w], dim=-1)
    key_rows, key_cols = _key_one_hots(height, width, key)
    shape = (*key.shape[:-1], -1)
    folded_key = torch.cat([key, key_rows.expand(shape), key_cols.expand(shape)], dim=-1)
    return folded_query, folded_key


def _key_one_hots(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(HW, H) one-hot of each key's row and (HW, W) one-hot of its column, for key index ``kh·W + kw``.

    Exact 0/1 values in any dtype, so the products with rel_h / rel_w pick single terms without rounding.
    """
    rows = torch.eye(height, dtype=like.dtype, device=like.device).repeat_interleave(width, dim=0)
    cols = torch.eye(width, dtype=like.dtype, device=like.device).repeat(height, 1)
    return rows, cols


def padded_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """``scaled_dot_product_attention`` without a mask after zero-padding q/k/v to one aligned head dim.

    Why: the fused kernels want equal head dims for q, k and v, a multiple of 8. Zero columns in q and k add
    nothing to the logits; zero columns in v give zero output columns, sliced off here.
    """
    value_dim = value.shape[-1]
    dim = max(query.shape[-1], value_dim)
    dim += -dim % HEAD_DIM_ALIGNMENT
    output = F.scaled_dot_product_attention(
        _pad_last(query, dim), _pad_last(key, dim), _pad_last(value, dim), dropout_p=dropout_p, scale=scale
    )
    return output[..., :value_dim]


def _pad_last(tensor: torch.Tensor, size: int) -> torch.Tensor:
    extra = size - tensor.shape[-1]
    return F.pad(tensor, (0, extra)) if extra else tensor


def apply_sam_levers(sam: SamModel, levers: Levers) -> None:
    """Put SAM's vision encoder in the state ``levers`` asks for (``fused_sam``, ``compile_sam``); idempotent.

    Each call first restores the eager encoder, then installs what is on, so any sequence of calls ends in the
    same state as a single one (benchmark rows toggle levers on one loaded model).
    """
    encoder = sam.vision_encoder
    # torch.compile pays only on a GPU (and needs a C++ toolchain on the CPU); the CPU ignores compile_sam.
    compiled = levers.compile_sam and _on_cuda(encoder)
    state = (levers.fused_sam, compiled)
    if getattr(encoder, _STATE, (False, False)) == state:
        return
    _restore_eager(encoder)
    if levers.fused_sam:
        _install_fused_attention(encoder)
    if compiled:
        _install_compiled_forward(encoder)
    setattr(encoder, _STATE, state)


def _on_cuda(module: nn.Module) -> bool:
    parameter = next(module.parameters(), None)
    return parameter is not None and parameter.device.type == "cuda"


def _restore_eager(encoder: nn.Module) -> None:
    """Undo both levers: original attention classes, the class's own ``forward`` on the encoder."""
    encoder.__dict__.pop("forward", None)
    for module in encoder.modules():
        eager_class = module.__dict__.pop(_EAGER_CLASS, None)
        if eager_class is not None:
            module.__class__ = eager_class


def _install_fused_attention(encoder: nn.Module) -> None:
    """Swap every SAM vision attention module (windowed and global blocks) to :class:`FusedSamVisionAttention`."""
    for module in encoder.modules():
        if isinstance(module, SamVisionAttention) and not isinstance(module, FusedSamVisionAttention):
            module.__dict__[_EAGER_CLASS] = type(module)
            module.__class__ = FusedSamVisionAttention


def _install_compiled_forward(encoder: nn.Module, **compile_options: Any) -> None:
    """Route the encoder's calls through ``torch.compile`` of its eager forward (built once, then reused).

    The compiled callable wraps the class's bound forward; dynamo guards on the attention modules' classes, so
    toggling ``fused_sam`` under it recompiles rather than reusing a stale graph.
    """
    compiled = encoder.__dict__.get(_COMPILED)
    if compiled is None:
        compiled = torch.compile(type(encoder).forward.__get__(encoder), **compile_options)
        encoder.__dict__[_COMPILED] = compiled
    encoder.__dict__["forward"] = compiled
