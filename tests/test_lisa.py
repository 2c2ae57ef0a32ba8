"""LISA checkpoints (issue #17, part 1): the tiny LISA-7B-v1-layout folder (and the LISA-13B-llama2-v1 one)
through the same loader and detector code as a released one, its key layout, the 16×16 geometry, and clear errors
between the READ and LISA families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from read_fixtures import random_image, tiny_checkpoint, tiny_lisa_13b_checkpoint, tiny_lisa_checkpoint
from torch import nn

from workers.detectors.base import DetectorConfig, ImageSample, build_detector
from workers.read.config import (
    KIND_LISA,
    KIND_READ,
    ReadConfig,
    checkpoint_kind,
    expected_clip_image_size,
    projector_weight_names,
)
from workers.read.errors import CheckpointError, ClipFolderError, WrongDetectorError
from workers.read.loader import load_read_model, read_state_dict
from workers.read.tiny import make_tiny_checkpoint
from workers.read.tokenizer import load_tokenizer

INDEX = "pytorch_model.bin.index.json"


def _lisa_config(**changes) -> DetectorConfig:
    lisa_dir, clip_dir = tiny_lisa_checkpoint()
    return DetectorConfig(checkpoint=lisa_dir, clip=clip_dir, **changes)


def _sample(height: int = 200, width: int = 256, seed: int = 0) -> ImageSample:
    return ImageSample(
        image=random_image(height, width, seed),
        category="bottle",
        defect="crack",
        category_defects=("crack", "scratch"),
        key=f"bottle/test/crack/{seed:03d}.png",
    )


@pytest.fixture(scope="module")
def lisa():
    return build_detector("lisa", _lisa_config())


# -- the released layout, written out from the original module structure -----------------------------------


def _linear(prefix: str, bias: bool = True) -> list[str]:
    return [f"{prefix}.weight", *([f"{prefix}.bias"] if bias else [])]


def _expected_llama(layers: int) -> set[str]:
    """LISAForCausalLM's language model: transformers 4.31 LlamaForCausalLM names (model.*, lm_head) plus the
    rotary inv_freq buffer 4.31 saved per layer."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(layers):
        layer = f"model.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{layer}.self_attn.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{layer}.mlp.{proj}.weight")
        names |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"}
        names.add(f"{layer}.self_attn.rotary_emb.inv_freq")
    return names


def _expected_sam(blocks: int, decoder_layers: int = 2, mask_tokens: int = 4) -> set[str]:
    """segment-anything's Sam module tree (image_encoder / prompt_encoder / mask_decoder) under LisaMetaModel's
    ``visual_model``; pixel_mean/std are non-persistent buffers and absent."""
    sam = "model.visual_model"
    names = [f"{sam}.image_encoder.pos_embed", *_linear(f"{sam}.image_encoder.patch_embed.proj")]
    for n in range(blocks):
        block = f"{sam}.image_encoder.blocks.{n}"
        names += _linear(f"{block}.norm1") + _linear(f"{block}.norm2")
        names += _linear(f"{block}.attn.qkv") + _linear(f"{block}.attn.proj")
        names += [f"{block}.attn.rel_pos_h", f"{block}.attn.rel_pos_w"]
        names += _linear(f"{block}.mlp.lin1") + _linear(f"{block}.mlp.lin2")
    # neck: Conv2d (no bias), LayerNorm2d, Conv2d (no bias), LayerNorm2d
    names += [f"{sam}.image_encoder.neck.0.weight", f"{sam}.image_encoder.neck.2.weight"]
    names += _linear(f"{sam}.image_encoder.neck.1") + _linear(f"{sam}.image_encoder.neck.3")
    prompt = f"{sam}.prompt_encoder"
    names += [f"{prompt}.pe_layer.positional_encoding_gaussian_matrix"]
    names += [f"{prompt}.point_embeddings.{i}.weight" for i in range(4)]
    names += [f"{prompt}.not_a_point_embed.weight", f"{prompt}.no_mask_embed.weight"]
    for i in (0, 1, 3, 4, 6):  # Conv, LayerNorm2d, (GELU), Conv, LayerNorm2d, (GELU), Conv
        names += _linear(f"{prompt}.mask_downscaling.{i}")
    decoder = f"{sam}.mask_decoder"

    def attention(prefix: str) -> list[str]:
        return [
            name
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
            for name in _linear(f"{prefix}.{proj}")
        ]

    for n in range(decoder_layers):
        layer = f"{decoder}.transformer.layers.{n}"
        names += attention(f"{layer}.self_attn") + attention(f"{layer}.cross_attn_token_to_image")
        names += attention(f"{layer}.cross_attn_image_to_token")
        names += _linear(f"{layer}.mlp.lin1") + _linear(f"{layer}.mlp.lin2")
        for norm in range(1, 5):
            names += _linear(f"{layer}.norm{norm}")
    names += attention(f"{decoder}.transformer.final_attn_token_to_image")
    names += _linear(f"{decoder}.transformer.norm_final_attn")
    names += [f"{decoder}.iou_token.weight", f"{decoder}.mask_tokens.weight"]
    for i in (0, 1, 3):  # ConvTranspose2d, LayerNorm2d, (GELU), ConvTranspose2d, (GELU)
        names += _linear(f"{decoder}.output_upscaling.{i}")
    for head in [f"output_hypernetworks_mlps.{i}" for i in range(mask_tokens)] + ["iou_prediction_head"]:
        for i in range(3):
            names += _linear(f"{decoder}.{head}.layers.{i}")
    return set(names)


def test_tiny_lisa_has_the_released_key_layout() -> None:
    lisa_dir, _ = tiny_lisa_checkpoint()
    config = json.loads((lisa_dir / "config.json").read_text())
    weight_map = json.loads((lisa_dir / INDEX).read_text())["weight_map"]
    expected = _expected_llama(config["num_hidden_layers"]) | _expected_sam(blocks=2)
    expected |= {
        "model.mm_projector.weight",
        "model.mm_projector.bias",
    }  # one nn.Linear (llava_arch, LLaVA v1)
    # ModuleList[Sequential(Linear, ReLU, Linear, Dropout)]: weights at .0.0 and .0.2
    expected |= {f"model.text_hidden_fcs.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert set(weight_map) == expected
    assert set(weight_map.values()) == {
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    }
    state = read_state_dict(lisa_dir)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert state["model.mm_projector.weight"].dtype == torch.bfloat16
    assert state["model.visual_model.mask_decoder.iou_token.weight"].dtype == torch.float32
    assert state["model.text_hidden_fcs.0.2.weight"].shape == (256, config["hidden_size"])


def test_tiny_lisa_config_and_tokenizer_files() -> None:
    lisa_dir, clip_dir = tiny_lisa_checkpoint()
    config = json.loads((lisa_dir / "config.json").read_text())
    assert "mm_projector_type" not in config and config["architectures"] == ["LISAForCausalLM"]
    assert config["mm_vision_tower"] == config["vision_tower"] == "openai/clip-vit-large-patch14"
    assert config["out_dim"] == 256 and config["mm_use_im_start_end"] and config["use_cache"] is False
    added = json.loads((lisa_dir / "added_tokens.json").read_text())
    order = sorted(added, key=added.get)
    assert order == ["<im_patch>", "<im_start>", "<im_end>", "[SEG]"]  # LISA-7B-v1: [SEG] last
    tokenizer_config = json.loads((lisa_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 512 and tokenizer_config["padding_side"] == "right"
    assert len((lisa_dir / "tokenizer_config.json").read_bytes()) == 744  # LISA-7B-v1's file size
    assert not (lisa_dir / "tokenizer.json").exists() and (lisa_dir / "generation_config.json").is_file()
    tokenizer, ids = load_tokenizer(lisa_dir, config["vocab_size"])
    assert ids.seg == added["[SEG]"] == config["vocab_size"] - 1 and ids.im_start == added["<im_start>"]
    assert json.loads((clip_dir / "config.json").read_text())["vision_config"]["image_size"] == 224


def test_family_rule() -> None:
    lisa_dir, _ = tiny_lisa_checkpoint()
    read_dir, _ = tiny_checkpoint()
    lisa = ReadConfig.from_folder(lisa_dir)
    read = ReadConfig.from_folder(read_dir)
    assert (lisa.kind, lisa.projector_type, lisa.family) == (KIND_LISA, "linear", "LISA")
    assert (read.kind, read.projector_type, read.family) == (KIND_READ, "mlp2x_gelu", "READ")
    assert checkpoint_kind({"mm_projector_type": "linear"}) == KIND_LISA
    assert projector_weight_names("linear") == ("weight", "bias")
    assert projector_weight_names("mlp2x_gelu") == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert expected_clip_image_size("openai/clip-vit-large-patch14") == 224
    assert expected_clip_image_size("openai/clip-vit-large-patch14-336") == 336
    assert expected_clip_image_size("/models/my-clip") is None


def test_loader_builds_a_linear_projector_and_a_16x16_grid() -> None:
    lisa_dir, clip_dir = tiny_lisa_checkpoint()
    model = load_read_model(lisa_dir, clip_dir)
    state = read_state_dict(lisa_dir)
    assert isinstance(model.projector, nn.Linear)
    torch.testing.assert_close(
        model.projector.weight, state["model.mm_projector.weight"].float(), atol=0, rtol=0
    )
    assert model.grid_side == 16 and model.num_image_tokens == 256
    features = model.image_features(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 256, model.language_model.config.hidden_size)


def test_detection_end_to_end_on_a_16x16_grid(lisa) -> None:
    item = lisa.prepare(_sample(256, 200))
    assert item.clip.shape == (3, 224, 224)
    detection = lisa.detect([item])[0]
    assert detection.logits.maps.shape == (1, 256, 256) and detection.logits.input_size == (1024, 800)
    diagnostics = json.loads(json.dumps(detection.diagnostics))
    assert diagnostics["text"] == "[SEG] ." and diagnostics["num_seg"] == 1 and diagnostics["points"] is None
    similarity = np.asarray(diagnostics["similarity"])
    assert similarity.shape == (16, 16) and np.isfinite(similarity).all()
    assert diagnostics["checkpoint_family"] == "LISA"
    assert diagnostics["detector_case"] == "LISA checkpoint, LISA's own inference"
    assert lisa.fingerprint().startswith("lisa (LISA checkpoint, LISA's own inference):")


def test_batch_of_two_equals_single_images(lisa) -> None:
    items = [lisa.prepare(_sample(200, 256, seed=1)), lisa.prepare(_sample(256, 200, seed=2))]
    batched = lisa.detect(items)
    for item, detection in zip(items, batched, strict=True):
        single = lisa.detect([item])[0]
        np.testing.assert_allclose(
            detection.logits.maps.astype(np.float32),
            single.logits.maps.astype(np.float32),
            atol=2e-3,
            rtol=1e-3,
        )
        np.testing.assert_allclose(
            detection.diagnostics["similarity"], single.diagnostics["similarity"], atol=1e-3, rtol=1e-3
        )


def test_generate_equals_teacher_forced_seg_answer(lisa) -> None:
    forced = build_detector("lisa", _lisa_config(decode_mode="teacher_forced"))
    assert forced.forced_answer == "[SEG]."  # LISA's validation answer
    sample = _sample(seed=3)
    generated = lisa.detect([lisa.prepare(sample)])[0]
    teacher = forced.detect([forced.prepare(sample)])[0]
    assert teacher.diagnostics["text"] == generated.diagnostics["text"] == "[SEG] ."
    np.testing.assert_allclose(
        teacher.logits.maps.astype(np.float32), generated.logits.maps.astype(np.float32), atol=2e-3, rtol=1e-3
    )
    np.testing.assert_allclose(
        teacher.diagnostics["similarity"], generated.diagnostics["similarity"], atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("detector", ["read", "read_as_published"])
def test_a_lisa_folder_given_to_a_read_detector_names_lisa(detector: str) -> None:
    with pytest.raises(WrongDetectorError, match="is a LISA checkpoint .* use --detector lisa"):
        build_detector(detector, _lisa_config())


def test_a_read_folder_given_to_lisa_is_reads_checkpoint_without_points() -> None:
    read_dir, clip_dir = tiny_checkpoint()
    on_read = build_detector("lisa", DetectorConfig(checkpoint=read_dir, clip=clip_dir))
    assert on_read.case == "READ checkpoint, [SEG] without SasP points"
    assert on_read.forced_answer == "Sure, [SEG]."  # READAR's forced answer, as before
    assert on_read.fingerprint().startswith("lisa (READ checkpoint, [SEG] without SasP points):")
    detection = on_read.detect([on_read.prepare(_sample(seed=4))])[0]
    assert detection.diagnostics["points"] is None and np.asarray(
        detection.diagnostics["similarity"]
    ).shape == (24, 24)
    assert detection.diagnostics["checkpoint_family"] == "READ"


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_projector_in_config_and_weights_must_agree(tmp_path: Path) -> None:
    lisa_dir, clip_dir = tiny_lisa_checkpoint()
    folder = _copy(lisa_dir, tmp_path / "lisa")
    _edit_config(folder, lambda c: c.update(mm_projector_type="mlp2x_gelu"))
    with pytest.raises(
        CheckpointError, match=rf"{INDEX} holds model\.mm_projector\.bias.*different checkpoints"
    ):
        load_read_model(folder, clip_dir)


def test_a_config_without_projector_type_is_read_from_the_weight_index(tmp_path: Path) -> None:
    """LLaVA's rule (no mm_projector_type: one Linear) applies only when the weights cannot say: a READ folder
    whose config omits the field is still READ, because its index lists .0./.2. projector tensors."""
    read_dir, read_clip = tiny_checkpoint()
    folder = _copy(read_dir, tmp_path / "read")
    _edit_config(folder, lambda c: c.pop("mm_projector_type"))
    config = ReadConfig.from_folder(folder)
    assert (config.kind, config.projector_type) == (KIND_READ, "mlp2x_gelu")
    load_read_model(folder, read_clip)  # loads as READ
    lisa_dir, _ = tiny_lisa_checkpoint()
    assert ReadConfig.from_folder(lisa_dir).kind == KIND_LISA
    unindexed = _copy(read_dir, tmp_path / "unindexed")
    _edit_config(unindexed, lambda c: c.pop("mm_projector_type"))
    for index in unindexed.glob("*.index.json"):
        index.unlink()
    assert ReadConfig.from_folder(unindexed).kind == KIND_LISA  # nothing else to go by: LLaVA's rule


def test_clip_of_the_wrong_size_is_refused() -> None:
    lisa_dir, _ = tiny_lisa_checkpoint()
    _, clip_336 = tiny_checkpoint()
    with pytest.raises(
        ClipFolderError, match="336 px CLIP .* openai/clip-vit-large-patch14 .224 px, 256 image"
    ):
        build_detector("lisa", DetectorConfig(checkpoint=lisa_dir, clip=clip_336))


def test_pixellm_config_is_named_and_refused(tmp_path: Path) -> None:
    lisa_dir, clip_dir = tiny_lisa_checkpoint()
    folder = _copy(lisa_dir, tmp_path / "pixellm")
    _edit_config(folder, lambda c: c.update(architectures=["PixelLMForCausalLM"], separate_mm_projector=True))
    with pytest.raises(CheckpointError, match="is a PixelLM checkpoint"):
        build_detector("lisa", DetectorConfig(checkpoint=folder, clip=clip_dir))


def test_make_tiny_checkpoint_command_writes_a_lisa_folder(tmp_path: Path) -> None:
    from scheduler.cli import cli

    result = CliRunner().invoke(
        cli, ["make-tiny-checkpoint", str(tmp_path / "out"), "--kind", "lisa"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "--detector lisa" in result.output
    folder = tmp_path / "out" / "lisa-tiny"
    assert ReadConfig.from_folder(folder).kind == KIND_LISA
    assert (tmp_path / "out" / "clip-tiny-224" / "preprocessor_config.json").is_file()


# -- LISA-13B-llama2-v1's layout: LLaMA-2 base, [SEG] first, three shards ------------------------------------

SHARDS_13B = {f"pytorch_model-0000{n}-of-00003.bin" for n in (1, 2, 3)}


def test_tiny_lisa_13b_config_tokens_and_shards() -> None:
    lisa_dir, clip_dir = tiny_lisa_13b_checkpoint()
    assert lisa_dir.name == "lisa-13b-tiny"
    config = json.loads((lisa_dir / "config.json").read_text())
    assert "mm_projector_type" not in config and config["architectures"] == ["LISAForCausalLM"]
    assert config["mm_vision_tower"] == config["vision_tower"] == "openai/clip-vit-large-patch14"
    assert config["mm_use_im_start_end"] and config["out_dim"] == 256 and config["use_cache"] is False
    assert (config["rms_norm_eps"], config["max_position_embeddings"]) == (1e-5, 4096)  # LLaMA-2
    assert config["_name_or_path"] == "liuhaotian/llava-llama-2-13b-chat-lightning-preview"
    added = json.loads((lisa_dir / "added_tokens.json").read_text())
    base = min(added.values())
    # LISA-13B-llama2-v1: [SEG]=32000, <im_start>=32001, <im_end>=32002, no <im_patch> (here from the tiny base)
    assert added == {"[SEG]": base, "<im_start>": base + 1, "<im_end>": base + 2}
    assert config["vocab_size"] == base + 3
    assert list(added) == sorted(added)  # 4.31's writer: sorted keys
    tokenizer, ids = load_tokenizer(lisa_dir, config["vocab_size"])
    assert (ids.seg, ids.im_start, ids.im_end) == (base, base + 1, base + 2)
    assert len(tokenizer) == config["vocab_size"]
    tokenizer_config = json.loads((lisa_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 512 and tokenizer_config["padding_side"] == "right"
    assert not (lisa_dir / "tokenizer.json").exists() and (lisa_dir / "generation_config.json").is_file()
    weight_map = json.loads((lisa_dir / INDEX).read_text())["weight_map"]
    assert set(weight_map.values()) == SHARDS_13B
    assert {p.name for p in lisa_dir.glob("pytorch_model-*.bin")} == SHARDS_13B
    lisa_7b, _ = tiny_lisa_checkpoint()
    assert set(weight_map) == set(json.loads((lisa_7b / INDEX).read_text())["weight_map"])  # same key names
    assert weight_map["model.visual_model.mask_decoder.iou_token.weight"] == "pytorch_model-00003-of-00003.bin"
    state = read_state_dict(lisa_dir)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert state["model.mm_projector.weight"].dtype == torch.bfloat16
    assert state["model.text_hidden_fcs.0.2.weight"].dtype == torch.float32
    assert json.loads((clip_dir / "config.json").read_text())["vision_config"]["image_size"] == 224


def test_tiny_lisa_13b_loads_as_lisa_on_a_16x16_grid() -> None:
    lisa_dir, clip_dir = tiny_lisa_13b_checkpoint()
    config = ReadConfig.from_folder(lisa_dir)
    assert (config.kind, config.projector_type, config.family) == (KIND_LISA, "linear", "LISA")
    assert config.use_im_start_end
    model = load_read_model(lisa_dir, clip_dir)
    assert isinstance(model.projector, nn.Linear)
    assert model.grid_side == 16 and model.num_image_tokens == 256


def test_tiny_lisa_13b_detection_end_to_end() -> None:
    lisa_dir, clip_dir = tiny_lisa_13b_checkpoint()
    detector = build_detector("lisa", DetectorConfig(checkpoint=lisa_dir, clip=clip_dir))
    item = detector.prepare(_sample(64, 48, seed=5))
    assert item.clip.shape == (3, 224, 224)
    detection = detector.detect([item])[0]
    assert detection.logits.maps.shape == (1, 256, 256)
    diagnostics = json.loads(json.dumps(detection.diagnostics))
    assert diagnostics["text"] == "[SEG] ." and diagnostics["num_seg"] == 1
    assert np.asarray(diagnostics["similarity"]).shape == (16, 16)
    assert diagnostics["checkpoint_family"] == "LISA"
    assert np.isfinite(detection.logits.maps.astype(np.float32)).all()


def test_lisa_layout_arguments(tmp_path: Path) -> None:
    from workers.read.errors import ReadError

    with pytest.raises(ReadError, match="unknown LISA layout '30b'"):
        make_tiny_checkpoint(tmp_path, kind="lisa", layout="30b")
    with pytest.raises(ReadError, match="layout '13b' is a LISA layout"):
        make_tiny_checkpoint(tmp_path, kind="read", layout="13b")
    with pytest.raises(ReadError, match="pickle shards"):
        make_tiny_checkpoint(tmp_path, kind="lisa-13b", safetensors=True)


def test_make_tiny_checkpoint_command_writes_a_lisa_13b_folder(tmp_path: Path) -> None:
    from scheduler.cli import cli

    result = CliRunner().invoke(
        cli, ["make-tiny-checkpoint", str(tmp_path / "out"), "--kind", "lisa-13b"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "tiny LISA checkpoint" in result.output and "--detector lisa " in " ".join(result.output.split())
    folder = tmp_path / "out" / "lisa-13b-tiny"
    assert ReadConfig.from_folder(folder).kind == KIND_LISA
    added = json.loads((folder / "added_tokens.json").read_text())
    assert sorted(added, key=added.get) == ["[SEG]", "<im_start>", "<im_end>"]
    assert {p.name for p in folder.glob("pytorch_model-*.bin")} == SHARDS_13B
    assert (tmp_path / "out" / "clip-tiny-224" / "preprocessor_config.json").is_file()
