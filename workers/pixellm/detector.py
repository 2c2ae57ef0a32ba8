"""The ``pixellm`` detector: PixelLM's ``evaluate`` (model/PixelLM.py) on each image, stored as 128×128 low-res
logits on PixelLM's 448 px frame.

Per image: the longest side resized to 448 (PIL bilinear), normalised with SAM's mean/std, zero-padded to 448²
(chat.py, identical to SAM's preprocessing at 448) → CLIP with padded patches masked → 256 pooled tokens for the
LLM (padded ones masked as keys) and two mask-feature scales. Per question: greedy generation (``max_new_tokens``,
32 unless set; PixelLM's chat passes 512) and the state predicting each [SEGk] (:mod:`workers.pixellm.decode`)
→ ``text_hidden_fcs``. If a row's count is not a multiple of the codebook size (6), all of that row's states are
dropped, as evaluate does; otherwise they are viewed as (objects, 2 scales, 3 tokens) and fused with PixelLM's
unregistered scalars, fixed at 1/3 per token. Each object's two scale embeddings go through the prompt encoder
and the two decoder levels, mixed 1/2 each at 128². The stored geometry (frame 448, input_size = the 448-scale
resized size) makes :func:`storage.logits.full_resolution_logits` perform postprocess_masks exactly: resize to
448², crop, resize to the image. Objects from all questions of an image combine by per-pixel max downstream.

Diagnostics: ``seg_found``, ``num_seg`` (masks stored), ``num_seg_tokens`` and ``dropped_rows`` (rows whose
[SEGk] count was not a multiple of 6), ``text``, ``prompt``, ``queries``, ``checkpoint_family``,
``detector_case``, ``timings_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage.logits import StoredLogits
from workers.detectors.base import (
    Detection,
    Detector,
    DetectorConfig,
    DetectorError,
    ImageSample,
    check_device,
    register_detector,
)
from workers.pixellm.config import CLIP_SIDE, MASK_SIZE, SCALE_NUM, PixelLMConfig
from workers.pixellm.decode import PixelRow, generate_rows
from workers.pixellm.loader import (
    PixelTokens,
    cached_pixellm_model,
    load_pixellm_clip_config,
    load_pixellm_tokenizer,
)
from workers.pixellm.model import PixelLMModel
from workers.read import MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP
from workers.read.conversation import conversation_text, question_text, tokenize_query
from workers.read.loader import check_model_folders, folders_digest, resolve_dtype
from workers.read.preprocess import as_rgb_uint8, sam_pixels
from workers.read.tokenizer import ReadTokenizer

CASE = "PixelLM checkpoint, PixelLM's own inference"


@dataclass(frozen=True)
class PixelPrepared:
    pixels: torch.Tensor  # (3, 448, 448)
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    questions: tuple[str, ...]
    before: tuple[int, ...]
    afters: tuple[tuple[int, ...], ...]
    key: str
    prepare_ms: float


def fuse_codebook(embeddings: torch.Tensor, seg_per_scale: int) -> torch.Tensor:
    """(K·6, C) projected [SEGk] states of one row → (K, 2, C): PixelLM's view(N, scale, seg, C) and the sum with
    its 1/seg_per_scale scalars (float32 0-dim tensors, added in token order from zero)."""
    grouped = embeddings.reshape(-1, SCALE_NUM, seg_per_scale, embeddings.shape[-1])
    scalar = torch.ones([]) / seg_per_scale
    fused = grouped[:, :, 0] * 0
    for index in range(seg_per_scale):
        fused = fused + scalar.to(grouped.device) * grouped[:, :, index]
    return fused


class PixelLMDetector(Detector):
    name = "pixellm"

    def __init__(self, config: DetectorConfig) -> None:
        if config.checkpoint is None or config.clip is None:
            raise DetectorError("detector 'pixellm' needs --checkpoint (a PixelLM hf_model folder) and --clip (the "
                                "openai/clip-vit-large-patch14-336 folder)")
        self.checkpoint, self.clip_dir = Path(config.checkpoint), Path(config.clip)
        self.pixel_config = PixelLMConfig.from_folder(self.checkpoint)
        load_pixellm_clip_config(self.clip_dir, self.pixel_config)
        tokenizer, tokens = load_pixellm_tokenizer(self.checkpoint, self.pixel_config.llama.vocab_size)
        self._setup(config, tokenizer, tokens)
        self._loaded: PixelLMModel | None = None

    @classmethod
    def from_parts(cls, config: DetectorConfig, model: PixelLMModel, pixel_config: PixelLMConfig,
                   tokenizer: ReadTokenizer, tokens: PixelTokens) -> PixelLMDetector:
        detector = cls.__new__(cls)
        detector.checkpoint = detector.clip_dir = None
        detector.pixel_config = pixel_config
        detector._setup(config, tokenizer, tokens)
        detector._loaded = model
        return detector

    def _setup(self, config: DetectorConfig, tokenizer: ReadTokenizer, tokens: PixelTokens) -> None:
        if config.decode_mode != "generate":
            raise DetectorError("detector 'pixellm' runs PixelLM's evaluate, which generates: use --decode-mode "
                                "generate")
        self.config, self.tokenizer, self.tokens = config, tokenizer, tokens
        self.dtype = resolve_dtype(config.device, config.dtype)
        extra = dict(config.extra)
        self.max_new_tokens = int(extra.pop("max_new_tokens", MAX_NEW_TOKENS))
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise DetectorError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}")
        self.stop_at_eos = bool(extra.pop("stop_at_eos", True))
        if extra:
            raise DetectorError(f"unknown PixelLM options {sorted(extra)}; known: max_new_tokens, stop_at_eos")
        self.seg_per_scale = len(tokens.seg) // SCALE_NUM
        self.uses_ground_truth_names = config.prompt_mode == "anomaly" or (
            config.prompt_mode == "template" and "{anomaly_type}" in (config.prompt_template or "")
        )

    def _questions(self, sample: ImageSample) -> list[str]:
        mode = self.config.prompt_mode
        if mode == "all_types":
            if not sample.category_defects:
                raise DetectorError(f"prompt mode all_types needs the category's defect types; {sample.key} has none")
            return [question_text(mode, class_name=sample.category, anomaly_type=d) for d in sample.category_defects]
        return [question_text(mode, class_name=sample.category, anomaly_type=sample.defect,
                              template=self.config.prompt_template)]

    def prepare(self, sample: ImageSample) -> PixelPrepared:
        start = time.perf_counter()
        image = as_rgb_uint8(sample.image)
        pixels, input_size = sam_pixels(image, CLIP_SIDE)
        questions = tuple(self._questions(sample))
        queries = [
            tokenize_query(self.tokenizer, conversation_text(
                q, template=self.config.conversation, use_im_start_end=self.pixel_config.use_im_start_end))
            for q in questions
        ]
        return PixelPrepared(pixels, (int(image.shape[0]), int(image.shape[1])), input_size, questions,
                             queries[0].before_image, tuple(q.after_image for q in queries), sample.key,
                             round((time.perf_counter() - start) * 1000.0, 3))

    def _model(self) -> PixelLMModel:
        if self._loaded is None:
            self._loaded = cached_pixellm_model(self.checkpoint, self.clip_dir, device=self.config.device,
                                                dtype=self.dtype)
        return self._loaded

    @torch.no_grad()
    def detect(self, batch: Sequence[PixelPrepared]) -> list[Detection]:
        if not batch:
            return []
        model = self._model()
        timings: dict[str, float] = {"batch_size": len(batch)}
        start = time.perf_counter()
        tokens, llm_mask, features = model.image_inputs(torch.stack([item.pixels for item in batch]),
                                                        [item.input_size for item in batch])
        timings["vision"] = _ms(start, model.device)
        start = time.perf_counter()
        rows = [PixelRow(index, after) for index, item in enumerate(batch) for after in item.afters]
        generate_rows(model, batch[0].before, tokens, llm_mask, rows, seg_ids=self.tokens.seg,
                      eos_id=self.tokens.eos, pad_id=self.tokens.pad, max_new_tokens=self.max_new_tokens,
                      stop_at_eos=self.stop_at_eos)
        timings["language"] = _ms(start, model.device)
        start = time.perf_counter()
        codebook = SCALE_NUM * self.seg_per_scale
        results = []
        for image_index, item in enumerate(batch):
            mine = [row for row in rows if row.image_index == image_index]
            objects, dropped = [], 0
            for row in mine:
                if not row.seg_states:
                    continue
                if len(row.seg_states) % codebook:
                    dropped += 1  # PixelLM zeroes the whole row's seg_token_mask
                    continue
                objects.append(fuse_codebook(model.seg_projection(torch.stack(row.seg_states)), self.seg_per_scale))
            if objects:
                maps = model.low_res_masks(features[image_index], torch.cat(objects)).float().cpu().numpy()
            else:
                maps = np.zeros((0, MASK_SIZE, MASK_SIZE), dtype=np.float32)
            finfo = np.finfo(np.float16)
            logits = StoredLogits(maps=np.clip(maps, finfo.min, finfo.max), original_size=item.original_size,
                                  input_size=item.input_size, frame_size=CLIP_SIDE)
            queries = [{"prompt": q, "text": self.tokenizer.decode(row.answer_ids),
                        "num_seg_tokens": len(row.seg_states)} for q, row in zip(item.questions, mine, strict=True)]
            results.append((item, logits, queries, dropped))
        timings["masks"] = _ms(start, model.device)
        detections = []
        for item, logits, queries, dropped in results:
            diagnostics = {
                "seg_found": logits.num_maps > 0,
                "num_seg": logits.num_maps,
                "num_seg_tokens": sum(q["num_seg_tokens"] for q in queries),
                "dropped_rows": dropped,
                "text": " | ".join(q["text"] for q in queries),
                "prompt": " | ".join(q["prompt"] for q in queries),
                "queries": queries,
                "decode_mode": self.config.decode_mode,
                "checkpoint_family": "PixelLM",
                "detector_case": CASE,
                "timings_ms": {"prepare": item.prepare_ms, **timings},
            }
            detections.append(Detection(logits=logits, diagnostics=diagnostics))
        return detections

    def preflight(self) -> None:
        check_device(self.config.device)
        check_model_folders(self.checkpoint, self.clip_dir)

    def fingerprint(self) -> str:
        return f"pixellm:{folders_digest(self.name, (self.checkpoint, self.clip_dir))}"


def _ms(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - start) * 1000.0, 3)


_DEFAULTS = {"prompt_mode": "generic", "conversation": "llava_v1", "max_new_tokens": MAX_NEW_TOKENS}


@register_detector("pixellm", defaults=_DEFAULTS)
def build_pixellm(config: DetectorConfig) -> Detector:
    return PixelLMDetector(config)

