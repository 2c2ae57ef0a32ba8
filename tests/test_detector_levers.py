"""The READ detector's host-side levers (device_frames, pinned, overlap, cuda_events) give the eager path's
results: identical text, similarity, SasP points and labels, mask logits within 1e-5 (float32, CPU, the tiny
random checkpoint). pinned and cuda_events change nothing on the CPU; they are checked for not getting in the
way. Every detection is computed once per process (``_run``) and shared by the tests that read it."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from read_fixtures import random_image, tiny_checkpoint

from workers.detectors.base import DetectorConfig, ImageSample, build_detector
from workers.read import detector as detector_module
from workers.read.detector import batched_similarity
from workers.read.levers import Levers
from workers.read.preprocess import sam_frames_on_device, sam_pixels, sam_resized
from workers.read.prompting import point_tokens

HOST_LEVERS = ("device_frames", "pinned", "overlap", "cuda_events")
ALL_FOUR = "all four"
EVERY = "every lever"  # decode, SAM and stream levers too; on the CPU the CUDA-only ones stand aside
# (detector, decode mode, forced answer or None): each a case of the equality test.
CASES = {
    "read-forced": ("read", "teacher_forced", None),
    "read-two-segs": ("read", "teacher_forced", "[SEG] and [SEG]."),
    "read-generate": ("read", "generate", None),
    "lisa": ("lisa", "generate", None),
    "read_as_published": ("read_as_published", "teacher_forced", None),
    "no-seg": ("read", "generate", None),  # two new tokens, "Sure,": no [SEG], no mask
}
BATCHES = {"three": ((200, 256), (256, 200), (150, 150)), "one": ((180, 240),)}


def _levers(name: str) -> Levers:
    if name == "eager":
        return Levers()
    if name == ALL_FOUR:
        return Levers(**dict.fromkeys(HOST_LEVERS, True))
    if name == EVERY:
        return Levers(**dict.fromkeys(Levers.names(), True))
    return Levers(**{name: True})


@functools.cache
def _detector(case: str):
    name, mode, answer = CASES[case]
    read_dir, clip_dir = tiny_checkpoint()
    extra = {"forced_answer": answer} if answer else {}
    if case == "no-seg":
        extra["max_new_tokens"] = 2
    settings = {"prompt_mode": "anomaly", "conversation": "vicuna_v1"} if name == "read_as_published" else {}
    return build_detector(
        name, DetectorConfig(checkpoint=read_dir, clip=clip_dir, decode_mode=mode, extra=extra, **settings)
    )


def _samples(batch: str) -> list[ImageSample]:
    return [
        ImageSample(
            image=random_image(height, width, seed),
            category="bottle",
            defect="crack",
            category_defects=("crack",),
            key=f"bottle/test/crack/{seed:03d}.png",
        )
        for seed, (height, width) in enumerate(BATCHES[batch])
    ]


@functools.cache
def _run(case: str, levers: str, batch: str):
    """:func:`_detect` of one case under one setting; prepare and detect both see the setting, as in a run."""
    detector = _detector(case)
    detector.levers = _levers(levers)
    try:
        return _detect(detector, [detector.prepare(sample) for sample in _samples(batch)])
    finally:
        detector.levers = Levers()


def _detect(detector, prepared):
    """(detections, the mask decoder's float32 masks, prompt-encoder calls) of one ``detect``."""
    calls, masks = [], []
    real_decode = detector_module.decode_many

    def recording_decode(*args, **kwargs):
        decoded = real_decode(*args, **kwargs)
        masks.extend(mask.clone() for mask in decoded)
        return decoded

    hook = detector._model().sam.prompt_encoder.register_forward_hook(lambda *_: calls.append(1))
    detector_module.decode_many = recording_decode
    try:
        detections = detector.detect(prepared)
    finally:
        detector_module.decode_many = real_decode
        hook.remove()
    return detections, masks, len(calls)


def _assert_same(actual, expected) -> None:
    detections, masks, _ = actual
    eager_detections, eager_masks, _ = expected
    assert len(masks) == len(eager_masks)
    for mask, eager_mask in zip(masks, eager_masks, strict=True):
        torch.testing.assert_close(mask, eager_mask, atol=1e-5, rtol=0)
    for detection, eager in zip(detections, eager_detections, strict=True):
        for key in ("text", "similarity", "points", "labels", "num_seg", "queries"):
            assert detection.diagnostics[key] == eager.diagnostics[key], key
        assert set(detection.diagnostics["timings_ms"]) == set(eager.diagnostics["timings_ms"])
        # stored as float16: a float32 difference below 1e-5 can at most cross one float16 rounding step
        np.testing.assert_allclose(
            detection.logits.maps.astype(np.float32),
            eager.logits.maps.astype(np.float32),
            atol=1e-5,
            rtol=1e-3,
        )
        assert (detection.logits.input_size, detection.logits.original_size) == (
            eager.logits.input_size,
            eager.logits.original_size,
        )


@pytest.mark.slow
@pytest.mark.parametrize("levers", [*HOST_LEVERS, ALL_FOUR])
def test_each_lever_matches_eager_on_three_images(levers: str) -> None:
    _assert_same(_run("read-forced", levers, "three"), _run("read-forced", "eager", "three"))


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if case not in ("read-forced", "no-seg")])
@pytest.mark.parametrize("levers", ["overlap", ALL_FOUR])
def test_other_cases_match_eager(case: str, levers: str) -> None:
    _assert_same(_run(case, levers, "three"), _run(case, "eager", "three"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["read-forced", "read-generate", "no-seg"])
def test_all_four_match_eager_on_one_image(case: str) -> None:
    _assert_same(_run(case, ALL_FOUR, "one"), _run(case, "eager", "one"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["read-two-segs", "read-generate", "lisa"])
def test_every_lever_at_once_matches_eager(case: str) -> None:
    """With the decode levers the language model's states are the eager ones to float32 rounding (their products
    run in other shapes), not bit for bit: texts and labels identical, the rest within 1e-5."""
    (detections, masks, _), (eager_detections, eager_masks, _) = (
        _run(case, EVERY, "three"),
        _run(case, "eager", "three"),
    )
    assert len(masks) == len(eager_masks)
    for mask, eager_mask in zip(masks, eager_masks, strict=True):
        torch.testing.assert_close(mask, eager_mask, atol=1e-5, rtol=1e-5)
    for detection, eager in zip(detections, eager_detections, strict=True):
        for key in ("text", "labels", "num_seg", "queries"):
            assert detection.diagnostics[key] == eager.diagnostics[key], key
        for key in ("similarity", "points"):
            if eager.diagnostics[key] is None:
                assert detection.diagnostics[key] is None
            else:
                np.testing.assert_allclose(
                    detection.diagnostics[key], eager.diagnostics[key], atol=1e-4, rtol=1e-5
                )


@pytest.mark.slow
def test_detections_hold_what_the_cases_are_about() -> None:
    """The comparisons above are not vacuous: points where READ uses them, two [SEG]s where forced."""
    read = _run("read-forced", "eager", "three")[0]
    assert all(d.diagnostics["num_seg"] == 1 and len(d.diagnostics["points"]) > 0 for d in read)
    two = _run("read-two-segs", ALL_FOUR, "three")[0]
    assert all(d.diagnostics["num_seg"] == 2 and d.logits.num_maps == 2 for d in two)
    assert all(d.diagnostics["points"] is None for d in _run("lisa", ALL_FOUR, "three")[0])
    (nothing,) = _run("no-seg", ALL_FOUR, "one")[0]
    assert nothing.diagnostics["num_seg"] == 0 and nothing.logits.num_maps == 0


@pytest.mark.slow
def test_overlap_calls_the_prompt_encoder_once_per_batch() -> None:
    assert _run("read-two-segs", "overlap", "three")[2] == 1
    assert _run("read-two-segs", "eager", "three")[2] == 6  # one per [SEG]: two on each of three images


@pytest.mark.slow
def test_detect_follows_what_prepare_made() -> None:
    """Items prepared with device_frames on and off, detected together under either setting: one result."""
    detector = _detector("read-forced")
    samples = _samples("three")
    try:
        detector.levers = Levers(device_frames=True)
        resized = [detector.prepare(sample) for sample in samples[:2]]
        detector.levers = Levers()
        framed = detector.prepare(samples[2])
        assert [item.sam_resized for item in (*resized, framed)] == [True, True, False]
        assert resized[0].sam.dtype == torch.uint8 and framed.sam.dtype == torch.float32
        for levers in (Levers(), Levers(overlap=True)):
            detector.levers = levers
            _assert_same(_detect(detector, [*resized, framed]), _run("read-forced", "eager", "three"))
    finally:
        detector.levers = Levers()


@pytest.mark.parametrize("size", [(700, 700), (800, 800), (840, 840), (900, 900), (1000, 1000), (1024, 1024)])
def test_device_frames_equal_sam_pixels_bit_for_bit(size: tuple[int, int]) -> None:
    image = random_image(*size, seed=size[0])
    expected, input_size = sam_pixels(image)
    resized, resized_size = sam_resized(image)
    assert resized_size == input_size and resized.dtype == np.uint8
    actual = sam_frames_on_device([resized], "cpu", torch.float32)[0]
    assert actual.is_contiguous() and torch.equal(actual, expected)


def test_device_frames_of_a_mixed_batch_equal_sam_pixels_bit_for_bit() -> None:
    images = [random_image(333, 1000, seed=1), random_image(1000, 333, seed=2), random_image(64, 48, seed=3)]
    frames = sam_frames_on_device(
        [torch.from_numpy(sam_resized(image)[0].copy()) for image in images], "cpu", torch.float32
    )
    for frame, image in zip(frames, images, strict=True):
        assert torch.equal(frame, sam_pixels(image)[0])
    half = sam_frames_on_device([sam_resized(images[0])[0]], "cpu", torch.bfloat16)[0]
    assert half.dtype == torch.bfloat16 and torch.equal(half, sam_pixels(images[0])[0].to(torch.bfloat16))


def test_batched_similarity_equals_each_product_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    image_states = torch.randn(3, 576, 96, generator=generator)
    seg_states = torch.randn(5, 96, generator=generator)
    owners = [0, 2, 2, 1, 0]
    batched = batched_similarity(image_states, torch.tensor(owners), seg_states)
    for row, (image, seg_state) in enumerate(zip(owners, seg_states, strict=True)):
        assert torch.equal(batched[row], image_states[image] @ seg_state)


@torch.no_grad()
def test_padded_point_tokens_equal_one_call_per_set() -> None:
    """transformers' padding label (−10) lets point sets of different sizes share one prompt-encoder call.

    Padding changes no kept token: a set's tokens are the same bits however much the batch is padded. Against
    one call per set they agree to float32 rounding, not always bit for bit: MKL multiplies the few rows of a
    small set by the (2, 128) positional matrix on another code path than the many rows of a batch (grouping
    sets by point count would do the same), which is why mask logits are compared within 1e-5.
    """
    sam = _detector("read-forced")._model().sam
    generator = torch.Generator().manual_seed(0)
    counts = [5, 1, 30, 12]
    points = [torch.rand(n, 2, generator=generator) * 1024 for n in counts]
    labels = [torch.randint(-1, 2, (n,), generator=generator) for n in counts]
    batched = point_tokens(sam, points, labels)
    padded_more = point_tokens(
        sam, [*points, torch.zeros(45, 2)], [*labels, torch.ones(45, dtype=torch.long)]
    )
    for tokens, more, set_points, set_labels in zip(batched, padded_more, points, labels, strict=False):
        assert torch.equal(tokens, more)
        alone, _ = sam.prompt_encoder(
            input_points=set_points[None, None],
            input_labels=set_labels[None, None],
            input_boxes=None,
            input_masks=None,
        )
        assert tokens.shape == (set_points.shape[0] + 1, alone.shape[-1])
        torch.testing.assert_close(tokens, alone[0, 0], atol=1e-6, rtol=0)
