"""SAM after segment-anything → transformers key conversion equals the official segment-anything modules."""

from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import torch
from read_fixtures import official_sam_modeling
from transformers import SamModel

from workers.read.prompting import decode_low_res, sparse_prompt
from workers.read.sam_keys import hf_to_official, official_to_hf, sam_config_from_weights

if (
    importlib.util.find_spec("segment_anything") is None
):  # dev extra; its __init__ needs torchvision, so find only
    pytest.skip("segment-anything==1.0 is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def sam_pair() -> tuple[torch.nn.Module, SamModel]:
    """An official SAM with a small custom ViT and random weights, and transformers' SamModel loaded from it."""
    modeling = official_sam_modeling()
    torch.manual_seed(0)
    official = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=3,
            embed_dim=32,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=64, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random and O(1)-scaled (the official init leaves some at zero)
        for name, parameter in official.named_parameters():
            scale = 1.0 if parameter.ndim == 1 or "gaussian" in name else parameter[0].numel() ** -0.5
            parameter.copy_(
                scale * torch.randn(parameter.shape, generator=generator)
                + (1.0 if name.endswith("norm1.weight") else 0.0)
            )
    state = official.state_dict()
    converted = SamModel(sam_config_from_weights(state)).eval()
    converted.load_state_dict(official_to_hf(state), strict=True)
    return official, converted


def test_round_trip_of_names(sam_pair) -> None:
    official, converted = sam_pair
    back = hf_to_official(converted.state_dict())
    assert set(back) == set(official.state_dict())
    for name, tensor in official.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_inferred_architecture(sam_pair) -> None:
    _, converted = sam_pair
    vision = converted.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (32, 3, 2)
    assert list(vision.global_attn_indexes) == [1] and vision.window_size == 14


@torch.no_grad()
def test_image_embeddings_match(sam_pair) -> None:
    official, converted = sam_pair
    pixels = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    expected = official.image_encoder(pixels)
    actual = converted.vision_encoder(pixel_values=pixels).last_hidden_state
    assert actual.shape == expected.shape == (2, 256, 64, 64)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_prompt_embeddings_match_with_all_labels_and_extra_token(sam_pair) -> None:
    official, converted = sam_pair
    points = torch.tensor([[100.0, 200.5], [512.0, 3.25], [1000.0, 1000.0], [0.0, 700.0]])
    labels = torch.tensor([1, 0, -1, 1])
    seg = torch.randn(256, generator=torch.Generator().manual_seed(3))
    # LISA's PromptEncoder: segment-anything's sparse tokens (points + padding point) then the text token.
    sparse, dense = official.prompt_encoder(points=(points[None], labels[None]), boxes=None, masks=None)
    expected = torch.cat([sparse[0], seg[None]], dim=0)
    actual = sparse_prompt(converted, seg, points, labels)
    assert actual.shape == (len(points) + 2, 256)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    dense_hf = converted.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 64, 64)
    torch.testing.assert_close(dense_hf, dense, atol=0, rtol=0)
    torch.testing.assert_close(
        converted.get_image_wide_positional_embeddings(),
        official.prompt_encoder.get_dense_pe(),
        atol=1e-5,
        rtol=1e-5,
    )


@torch.no_grad()
def test_mask_decoder_logits_match(sam_pair) -> None:
    official, converted = sam_pair
    embeddings = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(4))
    points = torch.tensor([[300.0, 400.0], [20.0, 900.0], [640.0, 128.0]])
    labels = torch.tensor([1, 0, -1])
    seg = torch.randn(256, generator=torch.Generator().manual_seed(5))
    sparse, dense = official.prompt_encoder(points=(points[None], labels[None]), boxes=None, masks=None)
    sparse = torch.cat([sparse, seg[None, None]], dim=1)
    expected, _ = official.mask_decoder(
        image_embeddings=embeddings,
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    actual = decode_low_res(converted, embeddings, sparse_prompt(converted, seg, points, labels)[None])
    assert actual.shape == (1, 256, 256)
    torch.testing.assert_close(actual, expected[:, 0], atol=1e-5, rtol=1e-5)
    # LISA variant: the [SEG] token alone.
    only_seg, dense = official.prompt_encoder(points=None, boxes=None, masks=None)
    expected_lisa, _ = official.mask_decoder(
        image_embeddings=embeddings,
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat([only_seg, seg[None, None]], dim=1),
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    actual_lisa = decode_low_res(converted, embeddings, sparse_prompt(converted, seg)[None])
    torch.testing.assert_close(actual_lisa, expected_lisa[:, 0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_published_prompt_is_the_padding_point_then_seg(sam_pair) -> None:
    """read_as_published: segment-anything's sparse prompt for no points (its padding point alone), then [SEG]."""
    official, converted = sam_pair
    seg = torch.randn(256, generator=torch.Generator().manual_seed(6))
    no_points = (torch.zeros(1, 0, 2), torch.zeros(1, 0, dtype=torch.long))
    sparse, dense = official.prompt_encoder(points=no_points, boxes=None, masks=None)
    assert sparse.shape == (1, 1, 256)  # segment-anything pads with one not-a-point point
    expected = torch.cat([sparse[0], seg[None]], dim=0)
    actual = sparse_prompt(converted, seg, None, None, padding_point=True)
    assert actual.shape == (2, 256)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(actual[0], official.prompt_encoder.not_a_point_embed.weight[0], atol=0, rtol=0)
    embeddings = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(7))
    masks, _ = official.mask_decoder(
        image_embeddings=embeddings,
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=expected[None],
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    torch.testing.assert_close(decode_low_res(converted, embeddings, actual[None]), masks[:, 0], atol=1e-5, rtol=1e-5)
    # without padding_point the prompt is LISA's [SEG] alone
    assert sparse_prompt(converted, seg, None, None).shape == (1, 256)
