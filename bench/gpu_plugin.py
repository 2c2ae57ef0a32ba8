"""Random-weight READ, LISA and PixelLM models for ``bench/gpu_throughput.py``, and the plug-in detectors that let
a real worker process run them.

Full-size random weights cannot come from checkpoint files cheaply, so both paths of the benchmark build the
model here from the same geometry and the same seed: the script for its direct rows, and a ``readar worker``
process that imports this module through ``READAR_PLUGINS=bench.gpu_plugin`` (with the repository root on
``PYTHONPATH``) for its worker row. The geometry travels to the worker in environment variables
(:class:`Geometry`), so the two paths run identical models.

Registered detectors: ``read_bench``, ``lisa_bench`` and ``pixellm_bench``. Each is the real detector class
(``ReadDetector``, ``LisaDetector``, ``PixelLMDetector``) built with ``from_parts``; only the model is made
lazily, once per process, on the first ``detect`` — so ``readar submit`` (which builds the detector on the CPU to
read its fingerprint) never builds a 7B model.

Answer schedule (READ and LISA): random weights never emit [SEG], which would leave SasP and the mask decoder
out of generate mode. :class:`AnswerSchedule` wraps the model's ``next_token_logits`` (the real ``lm_head`` still
runs, so its cost stays) and makes greedy decoding answer "Sure, [SEG]." then </s> on every row, except the last
row of every batch of two or more rows, which never emits </s> and runs to ``max_new_tokens`` (a long answer in
the batch, as real data has). A batch of one answers short: otherwise the one-image reference loop would pay 32
tokens per image and flatter the batched rows. The schedule restarts at every ``image_features`` call (once per
``detect``). PixelLM keeps its fixed-length scheme (``new_tokens`` tokens without stopping at </s>).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig

from workers.detectors.base import DETECTOR_DEFAULTS, DetectorConfig, check_device, register_detector
from workers.pixellm.config import EXTRA_CLIP_LAYER, LLM_GRID, MASK_SIZE, SCALE_NUM, PixelLMConfig
from workers.pixellm.detector import PixelLMDetector
from workers.pixellm.loader import load_pixellm_tokenizer
from workers.pixellm.model import PixelLMHeads, PixelLMModel, resize_clip_to_448
from workers.pixellm.tiny import TINY_CLIP_LAYERS, write_pixellm_tokenizer
from workers.read.config import KIND_LISA, KIND_READ, LINEAR_PROJECTOR, ReadConfig
from workers.read.conversation import DEFAULT_FORCED_ANSWER, conversation_text, question_text, tokenize_query
from workers.read.detector import LisaDetector, ReadDetector
from workers.read.loader import resolve_dtype
from workers.read.model import ReadModel, fast_init
from workers.read.preprocess import ClipPreprocessing
from workers.read.tiny import (
    TINY_CLIP_WIDTH,
    TINY_HIDDEN,
    tiny_clip_config,
    tiny_sam_config,
    write_tiny_tokenizer,
)
from workers.read.tokenizer import load_read_tokenizer, load_tokenizer

DETECTORS = ("read", "lisa", "pixellm")
# Environment variables that carry the geometry to a worker process.
ENV_DETECTOR = "READAR_BENCH_DETECTOR"
ENV_TINY = "READAR_BENCH_TINY"
ENV_DTYPE = "READAR_BENCH_DTYPE"
ENV_SEED = "READAR_BENCH_SEED"
ENV_NEW_TOKENS = "READAR_BENCH_NEW_TOKENS"
# Vocabularies of the released 7B models: LLaMA's 32000 plus the added tokens (READ: [SEG], <im_start>, <im_end>;
# LISA-7B-v1: <im_patch>, <im_start>, <im_end>, [SEG]; PixelLM-7B: those three and [SEG0]…[SEG5]).
FULL_VOCAB = {"read": 32003, "lisa": 32004, "pixellm": 32009}


@dataclass(frozen=True)
class Geometry:
    """What to build: the family, tiny or full size, the weight seed, the dtype (None: bf16 on CUDA, fp32 on the
    CPU) and PixelLM's fixed generate length."""

    detector: str = "read"
    tiny: bool = False
    seed: int = 0
    dtype: str | None = None
    new_tokens: int = 8

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Geometry:
        env = os.environ if env is None else env
        return cls(
            detector=env.get(ENV_DETECTOR, "read"),
            tiny=env.get(ENV_TINY, "0") == "1",
            seed=int(env.get(ENV_SEED, "0")),
            dtype=env.get(ENV_DTYPE) or None,
            new_tokens=int(env.get(ENV_NEW_TOKENS, "8")),
        )

    def env(self) -> dict[str, str]:
        """The variables that make :meth:`from_env` return this geometry in another process."""
        return {ENV_DETECTOR: self.detector, ENV_TINY: "1" if self.tiny else "0", ENV_SEED: str(self.seed),
                ENV_DTYPE: self.dtype or "", ENV_NEW_TOKENS: str(self.new_tokens)}

    @property
    def registered_name(self) -> str:
        return f"{self.detector}_bench"


# -- configurations ---------------------------------------------------------------------------------------------
def full_size_llama(vocab_size: int = 32003, *, max_positions: int = 4096,
                    rms_norm_eps: float = 1e-5) -> LlamaConfig:
    """The 7B LLaMA (LLaMA-2-7B's shapes; the LLaVA-v1-based LISA-7B-v1 and PixelLM-7B have 2048 positions)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max_positions,
                       rms_norm_eps=rms_norm_eps, tie_word_embeddings=False)


def full_size_clip(image_size: int = 336) -> CLIPVisionConfig:
    """CLIP ViT-L/14 at ``image_size`` px (336: openai/clip-vit-large-patch14-336; 224: …-patch14)."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=14, hidden_act="quick_gelu")


def full_size_sam() -> SamConfig:
    """SAM ViT-H."""
    return SamConfig(
        vision_config={"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                       "global_attn_indexes": [7, 15, 23, 31], "window_size": 14, "output_channels": 256},
        mask_decoder_config={"layer_norm_eps": 1e-5},
    )


def full_size_configs(detector: str = "read") -> tuple[LlamaConfig, CLIPVisionConfig, SamConfig | None, int]:
    """read: LLaMA-2-7B (vocab + 3 READ tokens), CLIP ViT-L/14-336, SAM ViT-H. lisa: LISA-7B-v1's 7B (vocab
    32004, 2048 positions), CLIP ViT-L/14 at 224 px, SAM ViT-H. pixellm: PixelLM-7B's 7B (vocab 32009, 2048
    positions), CLIP ViT-L/14-336 (resized to 448 when built), no SAM."""
    if detector == "read":
        return full_size_llama(FULL_VOCAB["read"]), full_size_clip(336), full_size_sam(), 1024
    llama = full_size_llama(FULL_VOCAB[detector], max_positions=2048, rms_norm_eps=1e-6)
    if detector == "lisa":
        return llama, full_size_clip(224), full_size_sam(), 1024
    return llama, full_size_clip(336), None, 1024


def tiny_llama(vocab_size: int, *, max_positions: int = 4096, rms_norm_eps: float = 1e-6) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                       rms_norm_eps=rms_norm_eps, tie_word_embeddings=False)


def tiny_configs(vocab_size: int,
                 detector: str = "read") -> tuple[LlamaConfig, CLIPVisionConfig, SamConfig | None, int]:
    """The tiny checkpoints' shapes (workers.read.tiny, workers.pixellm.tiny): read a 336 px CLIP, lisa 224 px,
    pixellm a 336 px CLIP with 12 layers (layer −11 must exist) and no SAM."""
    if detector == "read":
        llama = tiny_llama(vocab_size, rms_norm_eps=1e-6)
        return llama, tiny_clip_config().vision_config, tiny_sam_config(), TINY_CLIP_WIDTH
    llama = tiny_llama(vocab_size, max_positions=2048)
    if detector == "lisa":
        return llama, tiny_clip_config(224).vision_config, tiny_sam_config(), TINY_CLIP_WIDTH
    clip = tiny_clip_config(336).vision_config
    clip.num_hidden_layers = TINY_CLIP_LAYERS
    return llama, clip, None, TINY_CLIP_WIDTH


def geometry_text(detector: str, llama: LlamaConfig, clip: CLIPVisionConfig, sam: SamConfig | None,
                  mm_hidden: int, source_side: int) -> str:
    """What was built, from the configs themselves (so it is right for the tiny model too)."""
    llm = (f"LLaMA hidden {llama.hidden_size}, {llama.num_hidden_layers} layers, vocab {llama.vocab_size}, "
           f"{llama.max_position_embeddings} positions")
    grid = clip.image_size // clip.patch_size
    resized = f" (built at {source_side} px, resized)" if clip.image_size != source_side else ""
    vision = (f"CLIP ViT width {clip.hidden_size}, {clip.num_hidden_layers} layers, {clip.image_size} px / patch "
              f"{clip.patch_size}{resized} → {grid}×{grid} patches")
    if detector == "pixellm":
        return (f"{vision} (layers −2 and −{-EXTRA_CLIP_LAYER}), layer −2 pooled to {LLM_GRID}×{LLM_GRID} = "
                f"{LLM_GRID**2} image tokens; two mlp2x_gelu projectors {mm_hidden}→{2 * llama.hidden_size}→"
                f"{llama.hidden_size} (LLM input, mask features); {llm}; neck + prompt encoder + "
                f"{SCALE_NUM}-level mask decoder (256 channels) → {MASK_SIZE}×{MASK_SIZE} masks, no SAM image encoder")
    projector = "one Linear (linear)" if detector == "lisa" else "Linear–GELU–Linear (mlp2x_gelu)"
    prompt = "[SEG] embedding alone, no SasP points" if detector == "lisa" else "SasP points + [SEG] embedding"
    return (f"{vision} = {grid * grid} image tokens; projector {projector} {mm_hidden}→{llama.hidden_size}; "
            f"{llm}; SAM ViT width {sam.vision_config.hidden_size}, {sam.vision_config.num_hidden_layers} layers, "
            f"1024 px → 64×64 embeddings; SAM prompt: {prompt}")


# -- the answer schedule ----------------------------------------------------------------------------------------
def answer_token_ids(tokenizer: Any, answer: str = DEFAULT_FORCED_ANSWER) -> tuple[int, ...]:
    """The answer's token ids as a teacher-forced query holds them (workers/read/conversation.py): the prompt
    with the answer, minus the prompt without it — so they are the ids READ itself would emit."""
    question = question_text("generic", class_name="bottle", anomaly_type="good")
    prompt = tokenize_query(tokenizer, conversation_text(question))
    forced = tokenize_query(tokenizer, conversation_text(question, answer=answer))
    return tuple(forced.after_image[len(prompt.after_image):])


class AnswerSchedule:
    """Steers greedy decoding of a random-weight READ model to a realistic answer (module docstring).

    Installed on the model instance: ``image_features`` restarts the schedule (one call per ``detect``) and
    ``next_token_logits`` runs the real ``lm_head`` and then returns logits whose argmax is the scheduled token.
    The per-step target tensors are cached on the device so steering adds no host→device copy (and no sync) to
    decode steps after the first batch of each size. One ``detect`` at a time per model, as the batcher runs it.
    """

    def __init__(self, model: Any, answer: tuple[int, ...], eos_id: int, seg_id: int) -> None:
        if not answer:
            raise ValueError("the answer schedule needs a non-empty answer")
        self.answer, self.eos_id = answer, eos_id
        # The long row's filler after the answer: an ordinary token of the answer (never [SEG] or </s>).
        self.filler = next(t for t in reversed(answer) if t not in (seg_id, eos_id))
        self.step = 0
        self._targets: dict[tuple[int, int, str], torch.Tensor] = {}
        self._features, self._logits = model.image_features, model.next_token_logits
        model.image_features = self.image_features
        model.next_token_logits = self.next_token_logits

    def image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.step = 0
        return self._features(*args, **kwargs)

    def token(self, step: int, row: int, rows: int) -> int:
        """The scheduled token of one row at one decode step."""
        if step < len(self.answer):
            return self.answer[step]
        long_row = rows > 1 and row == rows - 1
        return self.filler if long_row else self.eos_id

    def targets(self, step: int, rows: int, device: torch.device) -> torch.Tensor:
        key = (min(step, len(self.answer)), rows, str(device))
        if key not in self._targets:
            ids = [self.token(key[0], row, rows) for row in range(rows)]
            self._targets[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._targets[key]

    def next_token_logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = self._logits(states)
        flat = logits.reshape(-1, logits.shape[-1])
        targets = self.targets(self.step, flat.shape[0], flat.device)
        self.step += 1
        steered = torch.zeros_like(flat)
        steered.scatter_(1, targets[:, None], 1.0)
        return steered.reshape(logits.shape)


# -- building ---------------------------------------------------------------------------------------------------
def randomise(model: torch.nn.Module, device: str, seed: int) -> None:
    """N(0, 0.02) weights from a fixed seed: uninitialised memory may hold NaN/inf, random weights keep every stage
    finite, and the seed makes the worker's model the same as the script's."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.eval()


@dataclass
class Parts:
    """Everything ``from_parts`` needs except the model (cheap: configs and the tokenizer), plus the text that
    says what the model is."""

    geometry: Geometry
    llama: LlamaConfig
    clip: CLIPVisionConfig
    sam: SamConfig | None
    mm_hidden: int
    family_config: Any  # ReadConfig or PixelLMConfig
    tokenizer: Any
    token_ids: Any  # TokenIds or PixelTokens
    clip_settings: ClipPreprocessing | None
    description: str


def build_parts(geometry: Geometry, workdir: Path) -> Parts:
    """Configs and tokenizer of one geometry (the tokenizer files of the tiny checkpoints, written to
    ``workdir``: prompt token counts differ slightly from LLaMA's; the 576 or 256 image tokens dominate)."""
    detector = geometry.detector
    if detector == "pixellm":
        write_pixellm_tokenizer(workdir, "7b")
    else:
        write_tiny_tokenizer(workdir, KIND_LISA if detector == "lisa" else KIND_READ)
    vocab = len(load_read_tokenizer(workdir)) if geometry.tiny else FULL_VOCAB[detector]
    llama, clip, sam, mm_hidden = tiny_configs(vocab, detector) if geometry.tiny else full_size_configs(detector)
    source_side = clip.image_size
    if detector == "pixellm":
        tokenizer, tokens = load_pixellm_tokenizer(workdir, llama.vocab_size)
        config = PixelLMConfig(llama=llama, mm_hidden_size=mm_hidden, vision_select_layer=-2,
                               use_im_start_end=True, out_dim=256, vision_tower="random")
        resized = clip_copy(clip)
        resized.image_size = 448  # as resize_clip_to_448 leaves the built tower
        description = geometry_text(detector, llama, resized, None, mm_hidden, source_side)
        return Parts(geometry, llama, clip, None, mm_hidden, config, tokenizer, tokens, None, description)
    projector = LINEAR_PROJECTOR if detector == "lisa" else "mlp2x_gelu"
    config = ReadConfig(llama=llama, mm_hidden_size=mm_hidden, vision_select_layer=-2, use_im_start_end=True,
                        out_dim=256, vision_tower="random", projector_type=projector,
                        kind=KIND_LISA if detector == "lisa" else KIND_READ)
    tokenizer, token_ids = load_tokenizer(workdir, llama.vocab_size)
    description = geometry_text(detector, llama, clip, sam, mm_hidden, source_side)
    return Parts(geometry, llama, clip, sam, mm_hidden, config, tokenizer, token_ids,
                 ClipPreprocessing(clip.image_size, clip.image_size), description)


def build_model(parts: Parts, device: str) -> torch.nn.Module:
    """The random-weight model on ``device`` (READ/LISA with the answer schedule installed)."""
    geometry = parts.geometry
    dtype = resolve_dtype(device, geometry.dtype)
    if geometry.detector == "pixellm":
        with fast_init(dtype, device):
            vision_tower = CLIPVisionModel(clip_copy(parts.clip))
            resize_clip_to_448(vision_tower)
            model = PixelLMModel(vision_tower, LlamaForCausalLM(parts.llama),
                                 PixelLMHeads(parts.mm_hidden, parts.llama.hidden_size, 256))
        randomise(model, device, geometry.seed)
        return model
    projector = parts.family_config.projector_type
    with fast_init(dtype, device):
        model = ReadModel.from_configs(parts.llama, parts.clip, parts.sam, mm_hidden_size=parts.mm_hidden,
                                       out_dim=256, projector_type=projector)
    randomise(model, device, geometry.seed)
    AnswerSchedule(model, answer_token_ids(parts.tokenizer), parts.token_ids.eos, parts.token_ids.seg)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return model


def clip_copy(config: CLIPVisionConfig) -> CLIPVisionConfig:
    """A copy of a CLIP config: resize_clip_to_448 changes the config it is given, and Parts keeps the original."""
    return CLIPVisionConfig.from_dict(config.to_dict())


def detector_options(geometry: Geometry) -> dict[str, Any]:
    """``extra`` of the detector config: READ/LISA stop at </s> within 32 tokens (the defaults of a real run);
    PixelLM decodes exactly ``new_tokens`` (its random weights emit no [SEGk] and no schedule steers it)."""
    if geometry.detector == "pixellm":
        return {"max_new_tokens": geometry.new_tokens, "stop_at_eos": False}
    return {"max_new_tokens": 32, "stop_at_eos": True}


def make_detector(parts: Parts, config: DetectorConfig, model: torch.nn.Module | None) -> Any:
    """The real detector class around ``model`` (None: the plug-in's lazy subclass builds it on first use)."""
    lazy = model is None
    detector = parts.geometry.detector
    if detector == "pixellm":
        cls = BenchPixelLMDetector if lazy else PixelLMDetector
        return cls.from_parts(config, model, parts.family_config, parts.tokenizer, parts.token_ids)
    if detector == "lisa":
        cls = BenchLisaDetector if lazy else LisaDetector
    else:
        cls = BenchReadDetector if lazy else ReadDetector
    return cls.from_parts(config, model, parts.family_config, parts.tokenizer, parts.token_ids,
                          parts.clip_settings)


# -- the plug-in: lazy detectors a worker builds by name ------------------------------------------------------
_MODELS: dict[tuple[Geometry, str], torch.nn.Module] = {}
_PARTS: dict[Geometry, Parts] = {}
_LOCK = threading.Lock()


def shared_parts(geometry: Geometry) -> Parts:
    """One Parts per geometry and process (the tokenizer files go to a folder kept for the process's life)."""
    with _LOCK:
        if geometry not in _PARTS:
            folder = tempfile.mkdtemp(prefix="readar-bench-")
            atexit.register(shutil.rmtree, folder, True)
            _PARTS[geometry] = build_parts(geometry, Path(folder))
        return _PARTS[geometry]


def shared_model(geometry: Geometry, device: str) -> torch.nn.Module:
    """One model per geometry and device in this process, built on first use."""
    parts = shared_parts(geometry)
    with _LOCK:
        key = (geometry, device)
        if key not in _MODELS:
            _MODELS[key] = build_model(parts, device)
        return _MODELS[key]


class _Lazy:
    """Mixin of the plug-in detectors: the model is the shared random one, built on the first ``detect``."""

    geometry: Geometry

    def _bench_model(self) -> torch.nn.Module:
        return shared_model(self.geometry, self.config.device)

    def preflight(self) -> None:
        check_device(self.config.device)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr(self.geometry).encode()).hexdigest()[:12]
        return f"{self.geometry.registered_name}:{digest}"


class BenchReadDetector(_Lazy, ReadDetector):
    def _model(self) -> ReadModel:
        if self._loaded_model is None:
            self._loaded_model = self._bench_model()
        return self._loaded_model


class BenchLisaDetector(_Lazy, LisaDetector):
    def _model(self) -> ReadModel:
        if self._loaded_model is None:
            self._loaded_model = self._bench_model()
        return self._loaded_model


class BenchPixelLMDetector(_Lazy, PixelLMDetector):
    def _model(self) -> PixelLMModel:
        if self._loaded is None:
            self._loaded = self._bench_model()
        return self._loaded


def _factory(family: str) -> Any:
    def build(config: DetectorConfig) -> Any:
        geometry = Geometry.from_env()
        if geometry.detector != family:
            geometry = dataclasses.replace(geometry, detector=family)
        config = dataclasses.replace(config, dtype=config.dtype or geometry.dtype,
                                     extra={**config.extra, **detector_options(geometry)})
        detector = make_detector(shared_parts(geometry), config, None)
        detector.geometry = geometry
        return detector

    return build


def _register() -> None:
    """``<family>_bench`` with the family's run-option defaults (so ``readar submit`` fills them as for the real
    detector)."""
    from workers.detectors.base import load_builtin_detectors

    load_builtin_detectors()
    for family in DETECTORS:
        register_detector(f"{family}_bench", defaults=DETECTOR_DEFAULTS.get(family, {}))(_factory(family))


_register()
