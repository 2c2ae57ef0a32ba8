"""The read / lisa detectors end to end on the tiny checkpoint, plus preprocessing and prompt wording."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from read_fixtures import random_image, tiny_checkpoint

from storage.logits import decode_logits, encode_logits, full_resolution_logits
from workers.detectors.base import (
    DetectorConfig,
    DetectorError,
    ImageSample,
    available_detectors,
    build_detector,
)
from workers.read.conversation import conversation_text, question_text
from workers.read.preprocess import ClipPreprocessing, clip_pixels, sam_input_size, sam_pixels

DEFECTS = ("broken_large", "contamination", "crack")


def _config(**changes) -> DetectorConfig:
    read_dir, clip_dir = tiny_checkpoint()
    return DetectorConfig(checkpoint=read_dir, clip=clip_dir, **changes)


def _sample(height: int = 200, width: int = 256, seed: int = 0, defect: str = "crack") -> ImageSample:
    return ImageSample(
        image=random_image(height, width, seed),
        category="bottle",
        defect=defect,
        category_defects=DEFECTS,
        key=f"bottle/test/{defect}/{seed:03d}.png",
    )


@pytest.fixture(scope="module")
def read_detector():
    return build_detector("read", _config())


def test_registered_names() -> None:
    assert {"read", "lisa"} <= set(available_detectors())


def test_end_to_end_geometry_and_diagnostics(read_detector) -> None:
    sample = _sample(256, 200)
    detection = read_detector.detect([read_detector.prepare(sample)])[0]
    logits = detection.logits
    assert logits.maps.shape == (1, 256, 256) and logits.maps.dtype == np.float16
    assert (
        logits.original_size == (256, 200) and logits.input_size == (1024, 800) and logits.frame_size == 1024
    )
    assert full_resolution_logits(decode_logits(encode_logits(logits))).shape == (256, 200)
    diagnostics = json.loads(json.dumps(detection.diagnostics))  # JSON-serialisable
    assert diagnostics["seg_found"] and diagnostics["num_seg"] == 1
    assert (
        diagnostics["text"] == "Sure, [SEG] ." and diagnostics["prompt"] == "Segment any anomaly on the bottle."
    )
    similarity = np.asarray(diagnostics["similarity"])
    assert similarity.shape == (24, 24) and np.isfinite(similarity).all() and similarity.std() > 0
    assert 1 <= len(diagnostics["points"]) <= 30 and len(diagnostics["labels"]) == len(diagnostics["points"])
    assert diagnostics["labels"][0] == 1
    assert {"prepare", "vision", "language", "sam_encoder", "sasp", "mask_decoder"} <= set(
        diagnostics["timings_ms"]
    )
    assert not read_detector.uses_ground_truth_names  # the default prompt (generic) names no defect folder
    assert build_detector("read", _config(prompt_mode="anomaly")).uses_ground_truth_names


def test_batch_equals_single_images(read_detector) -> None:
    samples = [_sample(200, 256, seed=1), _sample(256, 200, seed=2, defect="good")]
    prepared = [read_detector.prepare(s) for s in samples]
    batched = read_detector.detect(prepared)
    for item, detection in zip(prepared, batched, strict=True):
        single = read_detector.detect([item])[0]
        np.testing.assert_allclose(
            detection.logits.maps.astype(np.float32),
            single.logits.maps.astype(np.float32),
            atol=2e-3,
            rtol=1e-3,
        )
        np.testing.assert_allclose(detection.diagnostics["points"], single.diagnostics["points"], atol=1e-3)
        assert detection.diagnostics["labels"] == single.diagnostics["labels"]


def test_teacher_forced_matches_generate_when_answers_agree(read_detector) -> None:
    forced = build_detector("read", _config(decode_mode="teacher_forced"))
    sample = _sample(seed=3)
    expected = read_detector.detect([read_detector.prepare(sample)])[0]
    actual = forced.detect([forced.prepare(sample)])[0]
    assert actual.diagnostics["text"] == "Sure, [SEG] ."
    np.testing.assert_allclose(
        actual.logits.maps.astype(np.float32), expected.logits.maps.astype(np.float32), atol=2e-3, rtol=1e-3
    )


def test_lisa_uses_no_points(read_detector) -> None:
    lisa = build_detector("lisa", _config())
    sample = _sample(seed=4)
    detection = lisa.detect([lisa.prepare(sample)])[0]
    assert detection.diagnostics["points"] is None and detection.logits.num_maps == 1
    with_points = read_detector.detect([read_detector.prepare(sample)])[0]
    assert not np.allclose(detection.logits.maps, with_points.logits.maps)
    assert lisa.fingerprint() != read_detector.fingerprint()


def test_all_types_asks_every_defect_and_keeps_every_mask() -> None:
    detector = build_detector("read", _config(prompt_mode="all_types"))
    assert not detector.uses_ground_truth_names
    detection = detector.detect([detector.prepare(_sample(seed=5, defect="good"))])[0]
    assert detection.logits.num_maps == len(DEFECTS)
    assert [q["prompt"] for q in detection.diagnostics["queries"]] == [
        f"Segment the {d} on the bottle." for d in DEFECTS
    ]


def test_no_seg_gives_no_mask_and_records_the_text() -> None:
    detector = build_detector("read", _config(extra={"max_new_tokens": 2}))
    detection = detector.detect([detector.prepare(_sample(seed=6))])[0]
    assert detection.logits.num_maps == 0 and detection.logits.input_size == (800, 1024)
    diagnostics = json.loads(json.dumps(detection.diagnostics))
    assert not diagnostics["seg_found"] and diagnostics["num_seg"] == 0
    assert diagnostics["text"] == "Sure," and diagnostics["similarity"] is None


def test_build_errors() -> None:
    with pytest.raises(DetectorError, match="--checkpoint"):
        build_detector("read", DetectorConfig())
    with pytest.raises(DetectorError, match="needs the category's defect types"):
        detector = build_detector("read", _config(prompt_mode="all_types"))
        detector.prepare(ImageSample(image=random_image(32, 32), category="bottle", defect="good"))


def test_prompt_wording_and_templates() -> None:
    assert (
        question_text("anomaly", class_name="bottle", anomaly_type="crack")
        == "Segment the crack on the bottle."
    )
    assert (
        question_text("binary", class_name="bottle", anomaly_type="crack")
        == "Is there any anomaly in the image?"
    )
    assert (
        question_text("generic", class_name="bottle", anomaly_type="crack")
        == "Segment any anomaly on the bottle."
    )
    assert (
        question_text("template", class_name="a", anomaly_type="b", template="{anomaly_type}@{class_name}")
        == "b@a"
    )
    text = conversation_text("Q?")
    assert text == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>\n"
        "Q? ASSISTANT:"
    )
    assert "curious user" in conversation_text("Q?", template="vicuna_v1")
    assert conversation_text("Q?", answer="Sure, [SEG].").endswith("ASSISTANT: Sure, [SEG].")
    generic = build_detector("read", _config(prompt_mode="generic"))
    assert not generic.uses_ground_truth_names


def test_clip_preprocessing_matches_transformers_pil_processor() -> None:
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None)
    if processor_class is None:
        pytest.skip("this transformers has no PIL CLIP processor class")
    _, clip_dir = tiny_checkpoint()
    processor = processor_class.from_pretrained(str(clip_dir), local_files_only=True)
    image = random_image(190, 301, seed=7)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(
        clip_pixels(image, ClipPreprocessing.from_folder(clip_dir)), expected, atol=1e-5, rtol=0
    )


def test_sam_preprocessing_geometry() -> None:
    assert sam_input_size((200, 256)) == (800, 1024)
    assert sam_input_size((333, 1000)) == (341, 1024)  # 333·1.024 = 340.99 rounds half up
    pixels, input_size = sam_pixels(random_image(200, 256, seed=8))
    assert pixels.shape == (3, 1024, 1024) and input_size == (800, 1024)
    assert pixels[:, 800:].abs().max() == 0  # zero padding at the bottom
    black = sam_pixels(np.zeros((10, 10, 3), dtype=np.uint8))[0]
    torch.testing.assert_close(
        black[:, 0, 0], torch.tensor([-123.675 / 58.395, -116.28 / 57.12, -103.53 / 57.375])
    )


def test_read_as_published_prompts_sam_with_padding_point_and_seg(monkeypatch) -> None:
    """The published READAR setting: no SasP points; SAM sees [not-a-point, SEG], so its map is not lisa's."""
    from metrics.published import PUBLISHED_SETTING
    from workers.detectors.base import DETECTOR_DEFAULTS
    from workers.read import MAX_NEW_TOKENS_CAP
    from workers.read import detector as detector_module
    from workers.read.prompting import decode_low_res, padding_point_token

    assert DETECTOR_DEFAULTS["read_as_published"] == PUBLISHED_SETTING
    assert PUBLISHED_SETTING["max_new_tokens"] == MAX_NEW_TOKENS_CAP == 2048
    config = _config(prompt_mode="anomaly", conversation="vicuna_v1", extra={"max_new_tokens": 2048})
    published = build_detector("read_as_published", config)
    sample = _sample(seed=4)
    item = published.prepare(sample)
    captured: list[torch.Tensor] = []
    real = detector_module.sparse_prompt

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(detector_module, "sparse_prompt", spy)
    detection = published.detect([item])[0]
    assert detection.diagnostics["points"] is None and detection.diagnostics["num_seg"] == 1
    (tokens,) = captured
    model = published._model()
    assert tokens.shape == (2, 256)
    torch.testing.assert_close(tokens[0], padding_point_token(model.sam)[0], atol=0, rtol=0)
    expected = decode_low_res(model.sam, model.sam_image_embeddings(item.sam[None]), tokens[None])[0]
    np.testing.assert_allclose(
        detection.logits.maps[0].astype(np.float32), expected.float().numpy(), rtol=2e-3, atol=2e-3
    )
    lisa = build_detector("lisa", config)
    lisa_maps = lisa.detect([lisa.prepare(sample)])[0].logits.maps
    assert captured[-1].shape == (1, 256)  # lisa: [SEG] alone
    assert not np.allclose(detection.logits.maps.astype(np.float32), lisa_maps.astype(np.float32), atol=1e-3)


def test_max_new_tokens_is_checked() -> None:
    with pytest.raises(DetectorError, match="between 1 and 2048"):
        build_detector("read", _config(extra={"max_new_tokens": 4096}))
