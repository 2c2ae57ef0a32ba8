"""The READ (and LISA) model: transformers' CLIP vision tower, LLaMA and SAM, joined by two small heads.

Parts (DESIGN.md 5.1): CLIPVisionModel → ``mm_projector`` (READ: Linear–GELU–Linear, LLaVA-1.5 ``mlp2x_gelu``;
LISA v1: one Linear, LLaVA v1's projector) →
LlamaForCausalLM; the [SEG] state → ``text_hidden_fcs`` (Linear–ReLU–Linear → 256) → SAM's prompt; SamModel
for the image embeddings, prompt encoder and mask decoder. Module names mirror the released state dict so the
shards load without renaming (except SAM, see :mod:`workers.read.sam_keys`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig, SamModel

from workers.read.config import LINEAR_PROJECTOR, projector_depth
from workers.read.errors import ReadError
from workers.read.levers import Levers
from workers.read.sam_fast import apply_sam_levers


def build_projector(vision_width: int, text_width: int, projector_type: str = "mlp2x_gelu") -> nn.Module:
    """LLaVA's ``mm_projector`` of the given type, named as LLaVA names it.

    ``linear`` (LISA v1, and any config without mm_projector_type): one Linear(vision→text), tensors ``weight``
    and ``bias``. ``mlpNx_gelu`` (READ: ``mlp2x_gelu``): Linear(vision→text) followed by N−1 × (GELU,
    Linear(text→text)) in a Sequential, tensors ``0.*``, ``2.*`` ….
    """
    if projector_type == LINEAR_PROJECTOR:
        return nn.Linear(vision_width, text_width)
    layers: list[nn.Module] = [nn.Linear(vision_width, text_width)]
    for _ in range(projector_depth(projector_type) - 1):
        layers += [nn.GELU(), nn.Linear(text_width, text_width)]
    return nn.Sequential(*layers)


def build_text_hidden_fcs(text_width: int, out_dim: int) -> nn.ModuleList:
    """LISA's ``text_hidden_fcs``: a list holding Linear – ReLU – Linear(→out_dim); names ``0.0`` and ``0.2``."""
    return nn.ModuleList(
        [nn.Sequential(nn.Linear(text_width, text_width), nn.ReLU(), nn.Linear(text_width, out_dim))]
    )


@contextlib.contextmanager
def fast_init(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Build modules directly on ``device`` in ``dtype`` without transformers' random initialisation.

    Used when every weight is about to be overwritten (loading) or is irrelevant (benchmarks).
    """
    try:  # transformers 5 keeps it here
        from transformers.initialization import no_init_weights
    except ImportError:  # other layouts: fall back to the (slower) random initialisation
        no_init_weights = contextlib.nullcontext
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


class LlamaDecoding:
    """The language-model side that :mod:`workers.read.decode` drives, shared by :class:`ReadModel` and PixelLM's
    model: token embeddings, decoder passes that extend a key/value cache, and the lm_head. A subclass sets
    ``language_model`` and calls :meth:`_find_cache_argument` once it is there, and has a ``device``."""

    language_model: LlamaForCausalLM
    device: torch.device

    def _find_cache_argument(self) -> None:
        # transformers renamed the cache argument of the decoder's forward (past_key_values → cache). Found once
        # here, not per call: decoder_states runs inside torch.compile under the compile levers.
        parameters = inspect.signature(self.language_model.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(…, L) token ids → (…, L, hidden) input embeddings."""
        return self.language_model.model.embed_tokens(token_ids.to(self.device))

    def decoder_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> torch.Tensor:
        """Run the LLaMA decoder on new positions, extending ``cache`` in place.

        inputs_embeds: (B, L, hidden); attention_mask: (B, past + L) 1 = attend; position_ids: (B, L).
        Returns the last-layer hidden states after the final norm, (B, L, hidden).
        """
        if attention_mask.shape[1] < inputs_embeds.shape[1]:
            raise ReadError(
                "attention mask is shorter than the new tokens; it must cover cached + new positions"
            )
        outputs = self.language_model.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            **{self._cache_argument: cache},
        )
        return outputs.last_hidden_state

    def next_token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """lm_head: (…, hidden) → (…, vocab) logits in float32."""
        return self.language_model.lm_head(states).float()


class ReadModel(LlamaDecoding, nn.Module):
    """CLIP + projector + LLaMA + text_hidden_fcs + SAM.

    vision_select_layer: CLIP hidden-state index whose patch tokens are the image features (-2 in LLaVA-1.5).
    """

    def __init__(
        self,
        vision_tower: CLIPVisionModel,
        projector: nn.Module,
        language_model: LlamaForCausalLM,
        text_hidden_fcs: nn.ModuleList,
        sam: SamModel,
        *,
        vision_select_layer: int = -2,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.text_hidden_fcs = text_hidden_fcs
        self.sam = sam
        self.vision_select_layer = vision_select_layer
        self._find_cache_argument()

    @classmethod
    def from_configs(
        cls,
        llama: LlamaConfig,
        vision: Any,
        sam: SamConfig,
        *,
        mm_hidden_size: int,
        out_dim: int,
        vision_select_layer: int = -2,
        projector_type: str = "mlp2x_gelu",
    ) -> ReadModel:
        """Build the architecture (weights uninitialised under :func:`fast_init`, random otherwise)."""
        return cls(
            CLIPVisionModel(vision),
            build_projector(mm_hidden_size, llama.hidden_size, projector_type),
            LlamaForCausalLM(llama),
            build_text_hidden_fcs(llama.hidden_size, out_dim),
            SamModel(sam),
            vision_select_layer=vision_select_layer,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @property
    def grid_side(self) -> int:
        """Side of the image-token grid, from the CLIP config: image_size / patch_size (336/14 = 24 for READ,
        224/14 = 16 for LISA v1)."""
        config = self.vision_tower.config
        return int(config.image_size) // int(config.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens the language model sees: grid_side² (576 for READ, 256 for LISA v1)."""
        return self.grid_side**2

    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """Projected CLIP patch features: (B, 3, S, S) → (B, N, hidden), S = the CLIP's image_size, N =
        :attr:`num_image_tokens`.

        LLaVA's CLIPVisionTower.feature_select: hidden state ``vision_select_layer``, CLS token dropped.
        """
        outputs = self.vision_tower(
            pixel_values=clip_pixels.to(self.device, self.dtype), output_hidden_states=True
        )
        patches = outputs.hidden_states[self.vision_select_layer][:, 1:]
        return self.projector(patches)

    def sam_image_embeddings(self, sam_pixels: torch.Tensor, levers: Levers | None = None) -> torch.Tensor:
        """SAM image encoder: (B, 3, 1024, 1024) normalised, padded pixels → (B, 256, 64, 64).

        ``levers`` sets the encoder's speed levers (fused attention, compile) before the call; None is the eager
        encoder, so a model left with levers on by an earlier call returns to the reference path.
        """
        apply_sam_levers(self.sam, levers or Levers())
        return self.sam.vision_encoder(pixel_values=sam_pixels.to(self.device, self.dtype)).last_hidden_state

    def seg_projection(self, seg_states: torch.Tensor) -> torch.Tensor:
        """text_hidden_fcs: (K, hidden) [SEG] states → (K, out_dim) SAM prompt tokens."""
        return self.text_hidden_fcs[0](seg_states.to(self.dtype))

