"""The SAM encoder levers (workers.read.sam_fast) equal transformers' SAM vision encoder and undo exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention

from workers.read import sam_fast
from workers.read.levers import Levers
from workers.read.model import ReadModel
from workers.read.sam_fast import FusedSamVisionAttention, apply_sam_levers, fold_rel_pos
from workers.read.tiny import tiny_sam_config

FUSED = Levers(fused_sam=True)
EAGER = Levers()


def _small_config(*, use_rel_pos: bool = True) -> SamConfig:
    """8×8 tokens, window 3 (so windows are padded 8 → 9), global blocks 0 and 2, 3 heads of 16."""
    return SamConfig(
        vision_config={
            "hidden_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 3,
            "mlp_dim": 64,
            "image_size": 128,
            "patch_size": 16,
            "global_attn_indexes": [0, 2],
            "window_size": 3,
            "output_channels": 32,
            "use_rel_pos": use_rel_pos,
        },
        mask_decoder_config={"mlp_dim": 64, "iou_head_hidden_dim": 32, "layer_norm_eps": 1e-5},
    )


CONFIGS = {
    "tiny-64x64": tiny_sam_config,  # the tests' READ geometry: 64×64 global block, 14-windows padded to 70
    "small-rel-pos": _small_config,
    "small-no-rel-pos": lambda: _small_config(use_rel_pos=False),
}


def _random_sam(config: SamConfig, attn_implementation: str, seed: int = 0) -> SamModel:
    """A SamModel whose vision tensors are all random and O(1)-scaled (the init leaves rel-pos tables at zero)."""
    config._attn_implementation = attn_implementation
    sam = SamModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sam.vision_encoder.named_parameters():
            scale = 1.0 if parameter.ndim == 1 else parameter[0].numel() ** -0.5
            offset = 1.0 if "layer_norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator) + offset)
    return sam


def _pixels(sam: SamModel, batch: int, seed: int) -> torch.Tensor:
    size = sam.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _encode(sam: SamModel, pixels: torch.Tensor) -> torch.Tensor:
    return sam.vision_encoder(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_fused_encoder_equals_transformers(config_name: str, attn_implementation: str) -> None:
    sam = _random_sam(CONFIGS[config_name](), attn_implementation)
    batches = (1,) if config_name == "tiny-64x64" and attn_implementation == "eager" else (1, 2)
    for seed, batch in enumerate(batches):
        pixels = _pixels(sam, batch, seed)
        apply_sam_levers(sam, EAGER)
        expected = _encode(sam, pixels)
        apply_sam_levers(sam, FUSED)
        actual = _encode(sam, pixels)
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(5, 7), (7, 5)])
@torch.no_grad()
def test_fused_attention_non_square_input(size: tuple[int, int]) -> None:
    """H ≠ W keeps the row / column terms apart (a square grid would hide a swapped H and W)."""
    sam = _random_sam(_small_config(), "eager", seed=3)
    attention = sam.vision_encoder.layers[0].attn  # global block: rel-pos tables of 2·8−1 rows, interpolated
    hidden = torch.randn(2, *size, 48, generator=torch.Generator().manual_seed(4))
    expected, _ = attention(hidden)
    apply_sam_levers(sam, FUSED)
    actual, _ = attention(hidden)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fold_reproduces_dense_logits() -> None:
    """q'·k'ᵀ equals transformers' (q·scale)·kᵀ + decomposed rel-pos bias, for every query/key pair."""
    sam = _random_sam(_small_config(), "eager", seed=5)
    attention = sam.vision_encoder.layers[0].attn
    generator = torch.Generator().manual_seed(6)
    height, width, dim = 4, 6, 16
    query = torch.randn(6, height * width, dim, generator=generator)
    key = torch.randn(6, height * width, dim, generator=generator)
    with torch.no_grad():
        dense = (query * attention.scale) @ key.transpose(-2, -1)
        bias = attention.get_decomposed_rel_pos(
            query, attention.rel_pos_h, attention.rel_pos_w, (height, width), (height, width)
        )
        expected = dense + bias.reshape_as(dense)
        folded_query, folded_key = fold_rel_pos(
            query,
            key,
            attention.get_rel_pos(height, height, attention.rel_pos_h),
            attention.get_rel_pos(width, width, attention.rel_pos_w),
            (height, width),
            attention.scale,
        )
    assert folded_query.shape == folded_key.shape == (6, height * width, dim + height + width)
    torch.testing.assert_close(folded_query @ folded_key.transpose(-2, -1), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_toggling_restores_the_original_exactly() -> None:
    sam = _random_sam(_small_config(), "sdpa", seed=7)
    pixels = _pixels(sam, 2, 8)
    original = _encode(sam, pixels)
    classes = [type(module) for module in sam.vision_encoder.modules()]
    apply_sam_levers(sam, FUSED)
    apply_sam_levers(sam, FUSED)  # idempotent
    fused = _encode(sam, pixels)
    assert all(isinstance(layer.attn, FusedSamVisionAttention) for layer in sam.vision_encoder.layers)
    apply_sam_levers(sam, EAGER)
    assert [type(module) for module in sam.vision_encoder.modules()] == classes
    assert torch.equal(_encode(sam, pixels), original)
    apply_sam_levers(sam, FUSED)
    assert torch.equal(_encode(sam, pixels), fused)
    apply_sam_levers(sam, EAGER)
    assert torch.equal(_encode(sam, pixels), original)
    assert not any(hasattr(module, sam_fast._EAGER_CLASS) for module in sam.vision_encoder.modules())


@pytest.mark.parametrize("use_rel_pos", [True, False])
@torch.no_grad()
def test_fused_path_builds_no_dense_bias(monkeypatch, use_rel_pos: bool) -> None:
    """Every SDPA call of the fused encoder is maskless and the dense rel-pos bias is never built."""
    sam = _random_sam(_small_config(use_rel_pos=use_rel_pos), "sdpa", seed=9)
    calls: list[tuple[torch.Size, object]] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((query.shape, attn_mask))
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    def no_dense_bias(*args, **kwargs):
        raise AssertionError("the dense relative-position bias was built")

    apply_sam_levers(sam, FUSED)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(SamVisionAttention, "get_decomposed_rel_pos", no_dense_bias)
    _encode(sam, _pixels(sam, 2, 10))
    assert len(calls) == 3  # one per block: two global, one windowed
    assert all(mask is None for _, mask in calls)
    # folded head dim: 16 + H + W (8 + 8 global, 3 + 3 windowed) rounded up to a multiple of 8
    expected_dims = [32, 24, 32] if use_rel_pos else [16, 16, 16]
    assert [shape[-1] for shape, _ in calls] == expected_dims


def test_compile_sam_is_ignored_on_the_cpu(monkeypatch) -> None:
    sam = _random_sam(_small_config(), "sdpa", seed=11)
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: pytest.fail("torch.compile on the CPU"))
    apply_sam_levers(sam, Levers(compile_sam=True))
    assert "forward" not in vars(sam.vision_encoder)
    assert isinstance(sam.vision_encoder.layers[0].attn, SamVisionAttention)
    assert not isinstance(sam.vision_encoder.layers[0].attn, FusedSamVisionAttention)
    apply_sam_levers(sam, Levers(compile_sam=True, fused_sam=True))
    assert "forward" not in vars(sam.vision_encoder)
    assert isinstance(sam.vision_encoder.layers[0].attn, FusedSamVisionAttention)


@torch.no_grad()
def test_compiled_forward_toggles_and_restores() -> None:
    """The compile wrapper (dynamo on the CPU with a counting eager backend) recompiles when fused_sam changes,
    reuses both graphs on later toggles, matches the eager encoder, and is removed on restore."""
    torch._dynamo.reset()
    counter = CompileCounter()
    sam = _random_sam(_small_config(), "sdpa", seed=12)
    encoder = sam.vision_encoder
    pixels = _pixels(sam, 2, 13)
    original = _encode(sam, pixels)
    frames = []
    for fused in (False, True, False, True):
        sam_fast._restore_eager(encoder)
        if fused:
            sam_fast._install_fused_attention(encoder)
        sam_fast._install_compiled_forward(encoder, backend=counter)
        assert "forward" in vars(encoder)
        torch.testing.assert_close(_encode(sam, pixels), original, atol=1e-5, rtol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] > frames[0]  # fused_sam is guarded: a new graph, not a stale one
    assert frames[3] == frames[2] == frames[1]  # toggling back and forth reuses the two graphs
    sam_fast._restore_eager(encoder)
    assert "forward" not in vars(encoder)
    assert torch.equal(_encode(sam, pixels), original)
    torch._dynamo.reset()


class _SamOnly(ReadModel):
    """ReadModel's SAM path without building the language and CLIP parts."""

    def __init__(self, sam: SamModel) -> None:
        torch.nn.Module.__init__(self)
        self.sam = sam
        self.projector = torch.nn.Linear(1, 1)  # dtype / device come from the projector


@torch.no_grad()
def test_read_model_sam_image_embeddings_levers() -> None:
    sam = _random_sam(_small_config(), "sdpa", seed=14)
    model = _SamOnly(sam)
    pixels = _pixels(sam, 2, 15)
    original = _encode(sam, pixels)
    fused = model.sam_image_embeddings(pixels, FUSED)
    assert isinstance(sam.vision_encoder.layers[0].attn, FusedSamVisionAttention)
    torch.testing.assert_close(fused, original, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.sam_image_embeddings(pixels), original)  # None → the eager encoder again
    assert not isinstance(sam.vision_encoder.layers[0].attn, FusedSamVisionAttention)
