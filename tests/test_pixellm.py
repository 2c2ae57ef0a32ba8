"""PixelLM (issue #17, part 2): tiny folders in the released PixelLM-7B / -13B layouts through the same loader and
detector code as a real one, the key layout, the [SEG] codebook rules, the 448/128 geometry, clear errors between
families, the CLI, and the ratio of CPU time against READ."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from read_fixtures import random_image, tiny_checkpoint, tiny_lisa_checkpoint

from storage.logits import StoredLogits, full_resolution_logits
from workers.detectors.base import DetectorConfig, ImageSample, build_detector
from workers.pixellm.config import seg_token_ids
from workers.pixellm.decode import PixelRow, generate_rows
from workers.pixellm.detector import fuse_codebook
from workers.pixellm.loader import load_pixellm_model
from workers.pixellm.tiny import make_tiny_pixellm
from workers.read.errors import CheckpointError, UnexpectedWeightsError, WrongDetectorError
from workers.read.loader import read_state_dict


@functools.cache
def tiny_pixellm(answer: str | None = None, layout: str = "7b") -> tuple[Path, Path]:
    folder = Path(tempfile.mkdtemp(prefix="pixellm-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    kwargs = {} if answer is None else {"answer": answer}
    return make_tiny_pixellm(folder, seed=0, layout=layout, **kwargs)


def _config(answer: str | None = None, layout: str = "7b", **changes) -> DetectorConfig:
    model_dir, clip_dir = tiny_pixellm(answer, layout)
    return DetectorConfig(checkpoint=model_dir, clip=clip_dir, **changes)


def _sample(height: int = 200, width: int = 256, seed: int = 0) -> ImageSample:
    return ImageSample(image=random_image(height, width, seed), category="bottle", defect="crack",
                       category_defects=("crack", "scratch"), key=f"bottle/test/crack/{seed:03d}.png")


@pytest.fixture(scope="module")
def pixellm():
    return build_detector("pixellm", _config())


# -- the released layout, written out from the original module structure --------------------------------------


def _linear(prefix: str, bias: bool = True) -> list[str]:
    return [f"{prefix}.weight", *([f"{prefix}.bias"] if bias else [])]


def _expected_names(layers: int) -> set[str]:
    """PixelLMForCausalLM's state dict: transformers 4.31 LLaMA (+ inv_freq buffers), LlavaMetaModel's two
    Sequential(Linear, GELU, Linear) projectors, PixelLMMetaModel's neck (Conv no bias, LayerNorm2d, Conv no bias,
    LayerNorm2d), segment-anything's PromptEncoder, MaskDecoderMultiScale (two TwoWayTransformers in a ModuleList,
    shared tokens, one 2× output_upscaling, upsample_2x, pe1, 4 hypernetwork MLPs, IoU head, level_embed) and
    text_hidden_fcs (Linear, ReLU, Linear, Dropout)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(layers):
        layer = f"model.layers.{n}"
        names |= {f"{layer}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {f"{layer}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        names |= {f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight",
                  f"{layer}.self_attn.rotary_emb.inv_freq"}
    for projector in ("mm_projector", "out_mm_projector"):
        names |= set(_linear(f"model.{projector}.0") + _linear(f"model.{projector}.2"))
    names |= {"model.image_feature_neck.0.weight", "model.image_feature_neck.2.weight"}
    names |= set(_linear("model.image_feature_neck.1") + _linear("model.image_feature_neck.3"))
    prompt = "model.prompt_encoder"
    names |= {f"{prompt}.pe_layer.positional_encoding_gaussian_matrix", f"{prompt}.not_a_point_embed.weight",
              f"{prompt}.no_mask_embed.weight", *(f"{prompt}.point_embeddings.{i}.weight" for i in range(4))}
    for i in (0, 1, 3, 4, 6):
        names |= set(_linear(f"{prompt}.mask_downscaling.{i}"))
    decoder = "model.mask_decoder"

    def attention(prefix: str) -> list[str]:
        return [n for p in ("q_proj", "k_proj", "v_proj", "out_proj") for n in _linear(f"{prefix}.{p}")]

    for level in range(2):
        transformer = f"{decoder}.transformer.{level}"
        for n in range(2):
            layer = f"{transformer}.layers.{n}"
            for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
                names |= set(attention(f"{layer}.{attn}"))
            names |= set(_linear(f"{layer}.mlp.lin1") + _linear(f"{layer}.mlp.lin2"))
            for norm in range(1, 5):
                names |= set(_linear(f"{layer}.norm{norm}"))
        names |= set(attention(f"{transformer}.final_attn_token_to_image") + _linear(f"{transformer}.norm_final_attn"))
    names |= {f"{decoder}.iou_token.weight", f"{decoder}.mask_tokens.weight", f"{decoder}.level_embed.weight",
              f"{decoder}.pe1.positional_encoding_gaussian_matrix"}
    for i in (0, 1):
        names |= set(_linear(f"{decoder}.output_upscaling.{i}") + _linear(f"{decoder}.upsample_2x.{i}"))
    for head in [f"output_hypernetworks_mlps.{i}" for i in range(4)] + ["iou_prediction_head"]:
        for i in range(3):
            names |= set(_linear(f"{decoder}.{head}.layers.{i}"))
    names |= set(_linear("model.text_hidden_fcs.0.0") + _linear("model.text_hidden_fcs.0.2"))
    return names


@pytest.mark.parametrize("layout", ["7b", "13b"])
def test_tiny_pixellm_has_the_released_key_layout(layout: str) -> None:
    model_dir, _ = tiny_pixellm(None, layout)
    state = read_state_dict(model_dir)
    assert set(state) == _expected_names(2)
    decoder = [n for n in state if n.startswith("model.mask_decoder.")]
    assert len(decoder) == 206  # the released index's count (facts §11)
    assert not any(n.startswith(("model.visual_model.", "model.vision_tower.")) for n in state)
    assert state["model.mm_projector.0.weight"].dtype == torch.bfloat16
    assert state["model.mask_decoder.level_embed.weight"].dtype == torch.float32
    assert state["model.mask_decoder.output_upscaling.0.weight"].shape == (256, 32, 2, 2)  # 2× only, 256 → 32
    assert state["model.image_feature_neck.0.weight"].shape == (256, 64, 1, 1)  # LLM hidden → 256


@pytest.mark.parametrize(("layout", "order"), [
    ("7b", ["<im_patch>", "<im_start>", "<im_end>", *(f"[SEG{i}]" for i in range(6))]),
    ("13b", [*(f"[SEG{i}]" for i in range(6)), "<im_start>", "<im_end>"]),
])
def test_tokenizer_files_as_released(layout: str, order: list[str]) -> None:
    model_dir, _ = tiny_pixellm(None, layout)
    added = json.loads((model_dir / "added_tokens.json").read_text())
    assert sorted(added, key=added.get) == order
    assert list(added) == sorted(added)  # 4.31 writes sorted keys
    assert not (model_dir / "tokenizer.json").exists()
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (config["model_max_length"], config["padding_side"]) == (512, "right")
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw["architectures"] == ["PixelLMForCausalLM"] and raw["vocab_size"] == max(added.values()) + 1
    assert seg_token_ids(added, "x") == tuple(added[f"[SEG{i}]"] for i in range(6))


def test_seg_tokens_must_form_a_codebook() -> None:
    with pytest.raises(CheckpointError, match=r"plain \[SEG\]"):
        seg_token_ids({"[SEG]": 5, "<im_start>": 6}, "folder")
    with pytest.raises(CheckpointError, match=r"\[SEG0\]…\[SEG5\]"):
        seg_token_ids({"[SEG0]": 5, "[SEG1]": 6, "[SEG2]": 7}, "folder")


def test_clip_is_resized_to_448_with_pixellms_row_rule() -> None:
    model_dir, clip_dir = tiny_pixellm()
    from safetensors.torch import load_file

    old = next(t for n, t in load_file(str(clip_dir / "model.safetensors")).items()
               if n.endswith("vision_model.embeddings.position_embedding.weight"))
    assert old.shape[0] == 577
    model = load_pixellm_model(model_dir, clip_dir)
    table = model.vision_tower.state_dict()
    new = next(t for n, t in table.items() if n.endswith("position_embedding.weight"))
    assert new.shape == (1025, old.shape[1])
    assert torch.equal(new[-1], old[-1])  # the table's LAST row is kept last (read as "CLS")
    grid = old[:-1].T.reshape(1, -1, 24, 24)  # rows 0..575, i.e. starting with the real CLS row
    expected = F.interpolate(grid, (32, 32), mode="bilinear", align_corners=False)[0].flatten(1).T
    torch.testing.assert_close(new[:-1], expected)
    # patch 0 gets resized cell (0, 1), a blend of the CLS row and patch 0's row: the off-by-one is kept
    torch.testing.assert_close(new[1], 0.375 * old[0] + 0.625 * old[1])


def test_detection_end_to_end_on_the_448_frame(pixellm) -> None:
    detection = pixellm.detect([pixellm.prepare(_sample(200, 256))])[0]
    logits = detection.logits
    assert (logits.frame_size, logits.maps.shape, logits.input_size) == (448, (1, 128, 128), (350, 448))
    assert detection.diagnostics["num_seg_tokens"] == 6 and detection.diagnostics["num_seg"] == 1
    assert detection.diagnostics["text"].startswith("[SEG0]")
    full = full_resolution_logits(logits)
    assert full.shape == (200, 256) and np.isfinite(full.astype(np.float32)).all()


def test_batch_equals_single_images(pixellm) -> None:
    samples = [_sample(200, 256, 0), _sample(256, 160, 1), _sample(96, 96, 2)]
    prepared = [pixellm.prepare(s) for s in samples]
    batched = pixellm.detect(prepared)
    for item, together in zip(prepared, batched, strict=True):
        alone = pixellm.detect([item])[0]
        np.testing.assert_allclose(together.logits.maps.astype(np.float32), alone.logits.maps.astype(np.float32),
                                   atol=2e-3, rtol=1e-3)
    assert not np.allclose(batched[0].logits.maps, batched[1].logits.maps)


def test_all_types_questions_give_one_mask_each() -> None:
    detector = build_detector("pixellm", _config(prompt_mode="all_types"))
    detection = detector.detect([detector.prepare(_sample())])[0]
    assert detection.logits.num_maps == 2 and len(detection.diagnostics["queries"]) == 2


def test_a_count_not_a_multiple_of_six_drops_every_seg_state() -> None:
    detector = build_detector("pixellm", _config(answer="[SEG0] [SEG1] [SEG2]."))
    detection = detector.detect([detector.prepare(_sample())])[0]
    assert detection.diagnostics["num_seg_tokens"] == 3
    assert detection.diagnostics["dropped_rows"] == 1 and detection.logits.num_maps == 0
    assert (full_resolution_logits(detection.logits) == np.finfo(np.float16).min).all()


def test_codebook_fusion_is_per_scale_mean() -> None:
    states = torch.randn(12, 4)  # two objects × (2 scales × 3 tokens)
    fused = fuse_codebook(states, 3)
    expected = states.reshape(2, 2, 3, 4).mean(dim=2)
    assert fused.shape == (2, 2, 4)
    torch.testing.assert_close(fused, expected)


def test_cached_decoding_equals_pixellms_uncached_gather_with_the_255_shift(pixellm) -> None:
    """PixelLM's evaluate: one full forward over [prompt with 256 image tokens + generated ids] (no cache), the
    final-norm states masked by output_ids[:, 1:] ∈ SEG ids shifted right by 255. Rebuilt here literally."""
    model = pixellm._model()
    item = pixellm.prepare(_sample(200, 256))  # non-square: padded image tokens are masked
    tokens, llm_mask, _ = model.image_inputs(item.pixels[None], [item.input_size])
    row = PixelRow(0, item.afters[0])
    seg = pixellm.tokens.seg
    generate_rows(model, item.before, tokens, llm_mask, [row], seg_ids=seg, eos_id=2, pad_id=0, max_new_tokens=16)
    assert len(row.seg_states) == 6
    # input_ids as LLaVA has them: before, the single -200 image id, after, then the generated ids
    ids = [*item.before, -200, *item.afters[0], *row.answer_ids]
    output_ids = torch.tensor([ids])
    with torch.no_grad():
        embeds = torch.cat([
            model.embed_tokens(torch.tensor([list(item.before)])), tokens,
            model.embed_tokens(torch.tensor([list(item.afters[0]) + row.answer_ids])),
        ], dim=1)
        mask = torch.cat([torch.ones(1, len(item.before), dtype=torch.long), llm_mask,
                          torch.ones(1, len(item.afters[0]) + len(row.answer_ids), dtype=torch.long)], dim=1)
        states = model.language_model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    # evaluate's hidden_states cover every token but the last generated one
    states = states[:, :-1]
    seg_mask = torch.zeros_like(output_ids[:, 1:], dtype=torch.bool)
    for token in seg:
        seg_mask |= output_ids[:, 1:] == token
    seg_mask = torch.cat([torch.zeros((1, 255), dtype=torch.bool), seg_mask], dim=1)
    gathered = states[seg_mask[:, : states.shape[1]]]
    torch.testing.assert_close(torch.stack(row.seg_states), gathered, atol=1e-4, rtol=1e-4)


def test_storage_maps_448_frame_and_128_maps_as_pixellm_postprocess() -> None:
    rng = np.random.default_rng(0)
    low = rng.normal(size=(2, 128, 128)).astype(np.float16)
    for original, input_size in (((200, 256), (350, 448)), ((900, 900), (448, 448)), ((300, 120), (448, 179))):
        stored = StoredLogits(maps=low, original_size=original, input_size=input_size, frame_size=448)
        masks = torch.from_numpy(low.astype(np.float32))[:, None]
        target = max(input_size)  # postprocess_masks: max(clip_resize) = 448
        framed = F.interpolate(masks, (target, target), mode="bilinear", align_corners=False)
        cropped = framed[..., : input_size[0], : input_size[1]]
        expected = F.interpolate(cropped, original, mode="bilinear", align_corners=False)[:, 0].amax(0)
        np.testing.assert_array_equal(full_resolution_logits(stored), expected.numpy().astype(np.float16))


@pytest.mark.parametrize("detector", ["read", "lisa", "read_as_published"])
def test_a_pixellm_folder_given_to_read_or_lisa_names_pixellm(detector: str) -> None:
    with pytest.raises(WrongDetectorError, match="is a PixelLM checkpoint.*use --detector pixellm"):
        build_detector(detector, _config())


def test_read_and_lisa_folders_given_to_pixellm_name_their_detector() -> None:
    _, clip_dir = tiny_pixellm()
    for folder, kind in ((tiny_checkpoint()[0], "read"), (tiny_lisa_checkpoint()[0], "lisa")):
        with pytest.raises(WrongDetectorError, match=f"is a {kind.upper()} checkpoint.*use --detector {kind}"):
            build_detector("pixellm", DetectorConfig(checkpoint=folder, clip=clip_dir))


def test_sam_image_encoder_weights_are_refused_by_the_pixellm_loader(tmp_path: Path) -> None:
    model_dir, clip_dir = tiny_pixellm()
    folder = tmp_path / "mixed"
    shutil.copytree(model_dir, folder)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.visual_model.image_encoder.pos_embed"] = torch.zeros(1)
    torch.save(state, shard)
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.visual_model.image_encoder.pos_embed"] = shard.name
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(UnexpectedWeightsError, match="READ or LISA folder"):
        load_pixellm_model(folder, clip_dir)


@pytest.mark.parametrize(("folder", "text"), [
    ("model", '{"architectures": ["PixelLMForCausalLM"], "hidden_size": '),
    ("model", '{"architectures": ["PixelLMForCausalLM"], "hidden_size": "wide"}'),
    ("clip", "[1, 2]"),
    ("clip", '{"model_type": "clip", "vision_config": {"hidden_size": "wide"}}'),
])
def test_a_hostile_config_json_stops_the_cli_with_one_line_naming_it(tmp_path: Path, folder: str, text: str) -> None:
    from scheduler.cli import cli
    from scheduler.sample_data import make_sample_data

    model_dir, clip_dir = tiny_pixellm()
    copies = {"model": tmp_path / "model", "clip": tmp_path / "clip"}
    shutil.copytree(model_dir, copies["model"])
    shutil.copytree(clip_dir, copies["clip"])
    (copies[folder] / "config.json").write_text(text)
    data = tmp_path / "data"
    make_sample_data(data, categories=("brick",), size=64, per_class=4, train_per_class=1)
    result = CliRunner().invoke(cli, [
        "--work-dir", str(tmp_path / "work"), "run", "--mvtec-root", str(data), "--max-per-class", "2",
        "--detector", "pixellm", "--checkpoint", str(copies["model"]), "--clip", str(copies["clip"]),
    ])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if str(copies[folder] / "config.json") in line]
    assert len(lines) == 1, result.output


def test_cli_writes_a_pixellm_folder_and_runs_it(tmp_path: Path) -> None:
    from scheduler.cli import cli
    from scheduler.sample_data import make_sample_data

    runner = CliRunner()
    result = runner.invoke(cli, ["make-tiny-checkpoint", str(tmp_path / "out"), "--kind", "pixellm"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "--detector pixellm" in result.output
    model_dir, clip_dir = tmp_path / "out" / "pixellm-tiny", tmp_path / "out" / "clip-tiny-pixellm"
    assert (model_dir / "pytorch_model.bin.index.json").is_file()
    data = tmp_path / "data"
    make_sample_data(data, categories=("brick",), size=64, per_class=4, train_per_class=2)
    result = runner.invoke(cli, [
        "--work-dir", str(tmp_path / "work"), "run", "--mvtec-root", str(data), "--max-per-class", "4",
        "--run-name", "pixellm", "--detector", "pixellm", "--checkpoint", str(model_dir), "--clip", str(clip_dir),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
