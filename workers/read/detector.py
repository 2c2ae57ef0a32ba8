"""The READ detectors: prepared images + prompts in, SAM low-res logits + diagnostics out.

They differ in SAM's sparse prompt and in which checkpoints they accept (the family is read from config.json,
:func:`workers.read.config.checkpoint_kind`):
- ``read``: READ's own inference, the SasP points and the [SEG] token (DESIGN.md 5.5); READ checkpoints only;
- ``lisa``: the [SEG] token alone, in two cases that the run's fingerprint and diagnostics name:
  * a LISA checkpoint (LISA-7B-v1, LISA-13B-llama2-v1, -explanatory): LISA's own inference, as ``evaluate`` in
    LISA's model/LISA.py — one Linear projector, the 224 px CLIP (16×16 = 256 image tokens), the state that
    predicts each [SEG] → ``text_hidden_fcs`` → SAM's prompt encoder with that embedding alone (no points) → mask
    decoder with multimask_output=False; teacher-forced runs force LISA's validation answer "[SEG]." unless
    told otherwise;
  * a READ checkpoint: READ's weights prompted without the SasP points (READAR's meaning of ``lisa`` so far);
- ``read_as_published``: what the original READAR scripts saved for their published table — one not-a-point
  padding point (label −1) and the [SEG] token, no SasP points, with the ``vicuna_v1`` wording, the ``anomaly``
  prompt and up to 2,048 new tokens by default (DESIGN.md 5.3); READ checkpoints only.
A checkpoint of the wrong family is refused when the detector is built, with the detector that fits. Building a
detector reads the small files (config, tokenizer, CLIP preprocessing) and checks the CLIP folder; the weights
load lazily, once per process, on the first ``detect``.

Generation is the same for every case: greedy, stop at </s>, at most ``max_new_tokens`` (32 unless set).
LISA's ``evaluate`` is greedy too and defaults to 32 new tokens (its chat.py passes 512); it runs without a
key/value cache, which gives the same states as the cache used here. A forced [SEG] (teacher-forced mode) does
not depend on any of these.

Diagnostics per image (JSON-serialisable): ``similarity`` — the raw (un-normalised) dot products between the
first [SEG] state and the image-token states as a side×side list (side = CLIP image_size / patch_size: 24 for
READ, 16 for LISA v1), None when no [SEG]; ``points`` ([x, y] in original-image pixels, refined) and ``labels``
of that first mask; ``seg_found``; ``num_seg`` (masks stored); ``text`` (generated answer, or the forced one);
``prompt`` (the user question); ``queries`` (per question, for ``all_types``); ``checkpoint_family`` (READ or
LISA) and ``detector_case`` (what the detector did with it); ``timings_ms`` (``prepare`` per image, the rest per
batch, with ``batch_size``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metrics.published import PUBLISHED_DETECTOR, PUBLISHED_SETTING
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
from workers.read import MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP
from workers.read.config import KIND_LISA, KIND_NAMES, KIND_READ, ReadConfig
from workers.read.conversation import (
    DEFAULT_FORCED_ANSWER,
    TokenizedQuery,
    conversation_text,
    question_text,
    tokenize_query,
)
from workers.read.decode import BatchStates, QueryRow, run_queries
from workers.read.errors import WrongDetectorError
from workers.read.levers import Levers
from workers.read.loader import (
    cached_read_model,
    check_model_folders,
    check_projector_layout,
    clip_preprocessing,
    folders_digest,
    load_clip_config,
    resolve_dtype,
)
from workers.read.model import ReadModel
from workers.read.preprocess import (
    SAM_FRAME,
    ClipPreprocessing,
    as_rgb_uint8,
    clip_pixels,
    host_to_device,
    sam_frames_on_device,
    sam_pixels,
    sam_resized,
    stack_to_device,
)
from workers.read.prompting import decode_many, frame_points, sparse_prompt, sparse_prompts
from workers.read.sasp import similarity_to_points
from workers.read.tokenizer import ReadTokenizer, TokenIds, load_tokenizer

_SASP_OPTIONS = {"down_sample": int, "num_points": int, "t_pos": float, "t_neg": float}


@dataclass(frozen=True)
class PreparedQuery:
    """One question: its text, its token ids and (teacher-forced) where the forced answer starts."""

    question: str
    tokens: TokenizedQuery
    answer_start: int | None


@dataclass(frozen=True)
class PreparedImage:
    """CPU-side inputs of one image. clip: (3, S, S), S = the CLIP's input side (336 READ, 224 LISA v1);
    sam: the float32 (3, 1024, 1024) SAM frame, or, when ``sam_resized`` (the ``device_frames`` lever was on
    at prepare time), the uint8 (h_in, w_in, 3) resized image that ``detect`` turns into that frame on the
    device; sizes as (h, w)."""

    clip: torch.Tensor
    sam: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    queries: tuple[PreparedQuery, ...]
    key: str
    prepare_ms: float
    sam_resized: bool = False


@dataclass(frozen=True)
class SegPrompt:
    """One [SEG] of a batch: which image and query row it came from, and the SasP inputs of its SAM prompt
    (the first one per image becomes that image's diagnostics)."""

    image_index: int
    row_index: int
    similarity: torch.Tensor  # (N,) raw [SEG]·image-token dot products, N = number of image tokens
    points: torch.Tensor | None  # (n, 2) x, y in original-image pixels; None without SasP points
    labels: torch.Tensor | None


class StageClock:
    """Stage timings of one batch in ms, read once at its end (:meth:`read`).

    Device stages: with ``events`` on CUDA (the ``cuda_events`` lever) bracketed by CUDA events, so the host
    never waits between stages; otherwise perf_counter, synchronizing at the end of each stage on CUDA (the
    eager path). Host stages (``host=True``: CPU work while the device runs, the ``overlap`` lever's SasP) are
    perf_counter alone and never synchronize. A stage entered twice adds up.
    """

    def __init__(self, device: torch.device, *, events: bool) -> None:
        self.device = device
        self.events = events and device.type == "cuda"
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str, *, host: bool = False) -> Iterator[None]:
        if self.events and not host:
            stream = torch.cuda.current_stream(self.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            yield
            end.record(stream)
            self._pending.append((name, begin, end))
            return
        start = time.perf_counter()
        yield
        if not host and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._add(name, (time.perf_counter() - start) * 1000.0)

    def read(self) -> dict[str, float]:
        """Every stage's milliseconds, rounded to µs; waits for the events' stages to finish."""
        for name, begin, end in self._pending:
            end.synchronize()
            self._add(name, begin.elapsed_time(end))
        self._pending.clear()
        return {name: round(ms, 3) for name, ms in self._ms.items()}

    def _add(self, name: str, ms: float) -> None:
        self._ms[name] = self._ms.get(name, 0.0) + ms


def _seg_owners(rows: Sequence[QueryRow], results: Sequence[Any]) -> list[tuple[int, int]]:
    """(image index, row index) of every [SEG] of a batch, in row order, then answer order."""
    return [
        (row.image_index, row_index)
        for row_index, (row, result) in enumerate(zip(rows, results, strict=True))
        if result.seg_states is not None
        for _ in range(result.seg_states.shape[0])
    ]


def batched_similarity(
    image_states: torch.Tensor, image_index: torch.Tensor, seg_states: torch.Tensor
) -> torch.Tensor:
    """(K, N) float32 raw dot products of K [SEG] states (K, hidden) with the image-token states (B, N, hidden)
    of their images (``image_index``: (K,)), in one batched product.

    Written as (K, 1, hidden) @ (K, hidden, N): on the CPU each row then gives the same float32 numbers as the
    eager path's per-[SEG] ``image_states[i] @ seg_state`` (a batched (K, N, hidden) @ (K, hidden, 1) does not).
    """
    gathered = image_states[image_index].float()
    return torch.bmm(seg_states.float()[:, None, :], gathered.transpose(1, 2))[:, 0]


def _to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """One device→host copy that leaves the host free: on CUDA into page-locked memory, ``non_blocking``, with
    an event to wait on before reading it; on the CPU the tensor itself and no event."""
    if tensor.device.type != "cuda":
        return tensor, None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensor.device))
    return host, ready


def _image_maps(
    masks: list[torch.Tensor], prompts: list[SegPrompt], count: int, *, one_copy: bool
) -> list[np.ndarray]:
    """Each image's (k, 256, 256) float32 mask logits on the host. one_copy (the ``overlap`` lever): all masks
    of the batch cross in one device→host copy instead of one per image."""
    owned = [[i for i, prompt in enumerate(prompts) if prompt.image_index == index] for index in range(count)]
    empty = np.zeros((0, SAM_FRAME // 4, SAM_FRAME // 4), dtype=np.float32)
    if one_copy and masks:
        host = torch.stack(masks).float().cpu().numpy()
        return [host[mine] if mine else empty for mine in owned]
    return [torch.stack([masks[i] for i in mine]).float().cpu().numpy() if mine else empty for mine in owned]


# Why a config.json belongs to its family, for the wrong-detector message.
_KIND_REASONS = {
    KIND_READ: "its config.json has mm_projector_type 'mlp2x_gelu', LLaVA-1.5's projector",
    KIND_LISA: "its config.json has no mm_projector_type: one Linear projector, LLaVA v1's, as LISA v1 releases",
}


class ReadDetector(Detector):
    """READ: SasP points + [SEG] token as SAM prompt."""

    name = "read"
    use_points = True
    padding_point = False  # a lone not-a-point token before [SEG] when there are no points
    accepted_kinds: tuple[str, ...] = (KIND_READ,)

    def __init__(self, config: DetectorConfig) -> None:
        if config.checkpoint is None or config.clip is None:
            raise DetectorError(
                f"detector {self.name!r} needs --checkpoint (a {self._families()} folder) and --clip (a CLIP folder)"
            )
        checkpoint, clip_dir = Path(config.checkpoint), Path(config.clip)
        read_config = ReadConfig.from_folder(checkpoint)
        check_projector_layout(checkpoint, read_config)  # config vs weights first: the family rests on it
        self._check_kind(read_config, checkpoint)
        vision = load_clip_config(clip_dir, read_config)  # fail now, not on the first batch
        tokenizer, token_ids = load_tokenizer(checkpoint, read_config.llama.vocab_size)
        clip_settings = clip_preprocessing(clip_dir, vision.image_size)
        self._setup(config, read_config, tokenizer, token_ids, clip_settings)
        self.checkpoint, self.clip_dir = checkpoint, clip_dir
        self._loaded_model: ReadModel | None = None

    @classmethod
    def from_parts(
        cls,
        config: DetectorConfig,
        model: ReadModel,
        read_config: ReadConfig,
        tokenizer: ReadTokenizer,
        token_ids: TokenIds,
        clip_settings: ClipPreprocessing | None = None,
    ) -> ReadDetector:
        """A detector around an already-built model (benchmarks with random weights; no checkpoint files)."""
        detector = cls.__new__(cls)
        detector._check_kind(read_config, None)
        detector._setup(config, read_config, tokenizer, token_ids, clip_settings or ClipPreprocessing())
        detector.checkpoint = detector.clip_dir = None
        detector._loaded_model = model
        return detector

    @classmethod
    def _families(cls) -> str:
        return " or ".join(KIND_NAMES[kind] for kind in cls.accepted_kinds)

    def _check_kind(self, read_config: ReadConfig, checkpoint: Path | None) -> None:
        """Refuse a checkpoint of another family, naming the detector that fits."""
        if read_config.kind in self.accepted_kinds:
            return
        fits = "lisa" if read_config.kind == KIND_LISA else "read"
        where = checkpoint if checkpoint is not None else "the model"
        raise WrongDetectorError(
            f"{where} is a {read_config.family} checkpoint ({_KIND_REASONS[read_config.kind]}), but detector "
            f"{self.name!r} runs {self._families()} checkpoints: use --detector {fits}"
        )

    @property
    def case(self) -> str:
        """What this detector does with this checkpoint, in words (diagnostics and the fingerprint)."""
        return f"{self.name} on a {self.read_config.family} checkpoint"

    def _setup(
        self,
        config: DetectorConfig,
        read_config: ReadConfig,
        tokenizer: ReadTokenizer,
        token_ids: TokenIds,
        clip_settings: ClipPreprocessing,
    ) -> None:
        self.config, self.read_config = config, read_config
        self.tokenizer, self.token_ids, self.clip_settings = tokenizer, token_ids, clip_settings
        self.dtype = resolve_dtype(config.device, config.dtype)
        self.levers = Levers.from_env(config.device)
        extra = dict(config.extra)
        self.max_new_tokens = int(extra.pop("max_new_tokens", MAX_NEW_TOKENS))
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise DetectorError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}; got {self.max_new_tokens}"
            )
        # stop_at_eos=False decodes exactly max_new_tokens tokens (benchmarks); never for real runs.
        self.stop_at_eos = bool(extra.pop("stop_at_eos", True))
        self.forced_answer = str(extra.pop("forced_answer", self._default_forced_answer(read_config)))
        self.sasp_options = {
            name: cast(extra.pop(name)) for name, cast in _SASP_OPTIONS.items() if name in extra
        }
        if extra:
            raise DetectorError(
                f"unknown READ options {sorted(extra)}; known: max_new_tokens, stop_at_eos, forced_answer, "
                + ", ".join(_SASP_OPTIONS)
            )
        # The anomaly prompt (and a template naming {anomaly_type}) reads the ground-truth defect folder.
        self.uses_ground_truth_names = config.prompt_mode == "anomaly" or (
            config.prompt_mode == "template" and "{anomaly_type}" in (config.prompt_template or "")
        )

    def _default_forced_answer(self, read_config: ReadConfig) -> str:
        return DEFAULT_FORCED_ANSWER

    # -- CPU side -----------------------------------------------------------------------------------------
    def _questions(self, sample: ImageSample) -> list[str]:
        mode = self.config.prompt_mode
        if mode == "all_types":
            if not sample.category_defects:
                raise DetectorError(
                    f"prompt mode all_types needs the category's defect types; {sample.key or sample.category} has none"
                )
            return [
                question_text(mode, class_name=sample.category, anomaly_type=defect)
                for defect in sample.category_defects
            ]
        return [
            question_text(
                mode,
                class_name=sample.category,
                anomaly_type=sample.defect,
                template=self.config.prompt_template,
            )
        ]

    def _query(self, question: str) -> PreparedQuery:
        settings = {
            "template": self.config.conversation,
            "use_im_start_end": self.read_config.use_im_start_end,
        }
        prompt = tokenize_query(self.tokenizer, conversation_text(question, **settings))
        if self.config.decode_mode != "teacher_forced":
            return PreparedQuery(question, prompt, None)
        forced = tokenize_query(
            self.tokenizer, conversation_text(question, answer=self.forced_answer, **settings)
        )
        start = len(prompt.after_image)
        if forced.after_image[:start] != prompt.after_image:
            raise DetectorError(
                f"the forced answer {self.forced_answer!r} changes how the prompt tokenises; start it with a word"
            )
        return PreparedQuery(question, forced, start)

    def prepare(self, sample: ImageSample) -> PreparedImage:
        start = time.perf_counter()
        image = as_rgb_uint8(sample.image)
        resized_only = self.levers.device_frames
        if resized_only:
            resized, input_size = sam_resized(image)
            sam_input = torch.tensor(resized)
        else:
            sam_input, input_size = sam_pixels(image)
        queries = tuple(self._query(question) for question in self._questions(sample))
        return PreparedImage(
            clip=clip_pixels(image, self.clip_settings),
            sam=sam_input,
            original_size=(int(image.shape[0]), int(image.shape[1])),
            input_size=input_size,
            queries=queries,
            key=sample.key,
            prepare_ms=round((time.perf_counter() - start) * 1000.0, 3),
            sam_resized=resized_only,
        )

    # -- model side ---------------------------------------------------------------------------------------
    def _model(self) -> ReadModel:
        if self._loaded_model is None:
            loaded = cached_read_model(
                self.checkpoint, self.clip_dir, device=self.config.device, dtype=self.dtype
            )
            self._loaded_model = loaded.model
        return self._loaded_model

    @torch.no_grad()
    def detect(self, batch: Sequence[PreparedImage]) -> list[Detection]:
        """Vision, language, then SAM for every [SEG] of the batch. ``self.levers`` is read at each call (a
        benchmark swaps it between rows); its ``overlap`` picks :meth:`_masks_overlapped` over
        :meth:`_masks_eager`."""
        if not batch:
            return []
        model, levers = self._model(), self.levers
        befores = {query.tokens.before_image for item in batch for query in item.queries}
        if len(befores) != 1:
            raise DetectorError("all prompts of a batch must share the conversation template")
        clock = StageClock(model.device, events=levers.cuda_events)
        with clock.stage("vision"):
            clip = stack_to_device([item.clip for item in batch], model.device, pinned=levers.pinned)
            features = model.image_features(clip)
        rows = [
            QueryRow(index, query.tokens.after_image, query.answer_start)
            for index, item in enumerate(batch)
            for query in item.queries
        ]
        encoder = self._sam_encoder(model, batch, clock, levers)
        with clock.stage("language"):
            states = run_queries(
                model,
                next(iter(befores)),
                features,
                rows,
                seg_id=self.token_ids.seg,
                eos_id=self.token_ids.eos,
                pad_id=self.token_ids.pad,
                teacher_forced=self.config.decode_mode == "teacher_forced",
                max_new_tokens=self.max_new_tokens,
                stop_at_eos=self.stop_at_eos,
                levers=levers,
            )
        masks_of = self._masks_overlapped if levers.overlap else self._masks_eager
        prompts, maps = masks_of(model, batch, rows, states, clock, levers, encoder)
        timings = {"batch_size": len(batch), **clock.read()}
        return [
            self._detection(index, item, rows, states.rows, prompts, maps[index], timings)
            for index, item in enumerate(batch)
        ]

    def _masks_eager(
        self,
        model: ReadModel,
        batch: Sequence[PreparedImage],
        rows: list[QueryRow],
        states: BatchStates,
        clock: StageClock,
        levers: Levers,
        encoder: Callable[[bool], torch.Tensor],
    ) -> tuple[list[SegPrompt], list[np.ndarray]]:
        """SAM stage after stage: the image encoder, then per [SEG] its similarity, SasP and prompt encoder,
        then the batched mask decoder; each image's masks cross to the host on their own."""
        embeddings = encoder(True)
        jobs: list[tuple[int, torch.Tensor]] = []  # one SAM job per [SEG], in the order of prompts
        prompts: list[SegPrompt] = []
        with clock.stage("sasp"):
            for row_index, (row, result) in enumerate(zip(rows, states.rows, strict=True)):
                if result.seg_states is None:
                    continue
                item = batch[row.image_index]
                projected = model.seg_projection(result.seg_states)
                for seg_state, seg_embedding in zip(result.seg_states, projected, strict=True):
                    similarity = states.image_states[row.image_index].float() @ seg_state.float()
                    points, labels, framed = self._seg_points(similarity, item)
                    sparse = sparse_prompt(
                        model.sam, seg_embedding, framed, labels, padding_point=self.padding_point
                    )
                    jobs.append((row.image_index, sparse))
                    prompts.append(SegPrompt(row.image_index, row_index, similarity, points, labels))
        with clock.stage("mask_decoder"):
            masks = decode_many(model.sam, embeddings, jobs)
        return prompts, _image_maps(masks, prompts, len(batch), one_copy=False)

    def _masks_overlapped(
        self,
        model: ReadModel,
        batch: Sequence[PreparedImage],
        rows: list[QueryRow],
        states: BatchStates,
        clock: StageClock,
        levers: Levers,
        encoder: Callable[[bool], torch.Tensor],
    ) -> tuple[list[SegPrompt], list[np.ndarray]]:
        """The ``overlap`` lever: the device does not wait for the host's SasP, nor the host for the device.

        Every [SEG]'s similarity in one batched product and one device→host copy, queued before the SAM image
        encoder; while the encoder runs (asynchronously on CUDA) the host runs SasP for every [SEG]; then one
        prompt-encoder call for all point sets, the batched mask decoder, and one copy of all masks. The
        numbers are the eager path's (tests/test_detector_levers.py). ``sam_encoder`` times the encoder and
        the SasP run meanwhile, so it reads the longer of the two; ``sasp`` is host time alone.
        """
        owners = _seg_owners(rows, states.rows)
        with clock.stage("sasp", host=True):
            seg_states = self._seg_states(states)
            image_index = host_to_device(
                torch.tensor([image for image, _ in owners], dtype=torch.long), model.device, True
            )
            similarities, ready = _to_host(batched_similarity(states.image_states, image_index, seg_states))
            projected = model.seg_projection(seg_states)
        with clock.stage("sam_encoder"):
            embeddings = encoder(False)  # timed by this stage, which includes the SasP run meanwhile
            with clock.stage("sasp", host=True):
                if ready is not None:
                    ready.synchronize()
                found = [
                    self._seg_points(similarity, batch[image])
                    for similarity, (image, _) in zip(similarities, owners, strict=True)
                ]
        with clock.stage("mask_decoder"):
            framed = [framed_points for _, _, framed_points in found]
            labels = [point_labels for _, point_labels, _ in found]
            sparse = sparse_prompts(model.sam, projected, framed, labels, padding_point=self.padding_point)
            masks = decode_many(
                model.sam,
                embeddings,
                [(image, tokens) for (image, _), tokens in zip(owners, sparse, strict=True)],
            )
        prompts = [
            SegPrompt(image, row_index, similarity, points, point_labels)
            for (image, row_index), similarity, (points, point_labels, _) in zip(
                owners, similarities, found, strict=True
            )
        ]
        return prompts, _image_maps(masks, prompts, len(batch), one_copy=True)

    @staticmethod
    def _seg_states(states: BatchStates) -> torch.Tensor:
        """(K, hidden): every [SEG] state of the batch in :func:`_seg_owners` order (K may be 0)."""
        found = [result.seg_states for result in states.rows if result.seg_states is not None]
        if not found:
            return states.image_states.new_zeros((0, states.image_states.shape[-1]))
        return torch.cat(found)

    def _seg_points(
        self, similarity: torch.Tensor, item: PreparedImage
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """SasP of one [SEG]: points (original-image pixels) and labels, and the points in SAM's frame; all
        None for the detectors that prompt without points."""
        if not self.use_points:
            return None, None, None
        points, labels = similarity_to_points(similarity, item.original_size, **self.sasp_options)
        return points, labels, frame_points(points, item.original_size, item.input_size)

    def _sam_encoder(
        self, model: ReadModel, batch: Sequence[PreparedImage], clock: StageClock, levers: Levers
    ) -> Callable[[bool], torch.Tensor]:
        """SAM's image encoder for the batch, as a call that returns its (B, 256, 64, 64) embeddings; its
        argument says whether the call times itself as ``sam_encoder`` (False: the caller's stage does).

        Eager: the call runs the encoder then. The ``sam_stream`` lever, in generate
        mode on CUDA: the encoder is queued now on a second stream, so its kernels fill the GPU while the
        one-token decode steps leave it mostly idle; the call makes the current stream wait for it. Its
        ``sam_encoder`` time is then that stream's (CUDA events; without the ``cuda_events`` lever the stage's
        synchronize would end the overlap before decoding starts). Teacher-forced runs decode nothing, so
        there is nothing to overlap.
        """
        overlap = (
            levers.sam_stream and model.device.type == "cuda" and self.config.decode_mode != "teacher_forced"
        )
        if not overlap:

            def run_now(timed: bool) -> torch.Tensor:
                with clock.stage("sam_encoder") if timed else contextlib.nullcontext():
                    return model.sam_image_embeddings(
                        self._sam_frames(batch, model, levers.pinned), levers=levers
                    )

            return run_now
        main = torch.cuda.current_stream(model.device)
        frames = self._sam_frames(batch, model, levers.pinned)
        side = torch.cuda.Stream(model.device)
        side.wait_stream(main)  # the frames are made on the main stream
        with torch.cuda.stream(side), clock.stage("sam_encoder"):
            frames.record_stream(side)
            embeddings = model.sam_image_embeddings(frames, levers=levers)

        def joined(timed: bool) -> torch.Tensor:  # timed on its own stream when queued
            main.wait_stream(side)
            embeddings.record_stream(main)  # made on the side stream, used (and freed) on the main one
            return embeddings

        return joined

    @staticmethod
    def _sam_frames(batch: Sequence[PreparedImage], model: ReadModel, pinned: bool) -> torch.Tensor:
        """The batch's SAM frames for the image encoder, whichever form each item holds (PreparedImage): float
        frames stacked as before; uint8 resized images made into frames on the model's device."""
        resized = [index for index, item in enumerate(batch) if item.sam_resized]
        framed = [index for index, item in enumerate(batch) if not item.sam_resized]
        if not resized:
            return stack_to_device([item.sam for item in batch], model.device, pinned=pinned)
        made = sam_frames_on_device(
            [batch[i].sam for i in resized], model.device, model.dtype, pin_memory=pinned
        )
        if not framed:
            return made
        frames = made.new_empty((len(batch), *made.shape[1:]))
        frames[resized] = made
        stacked = stack_to_device([batch[i].sam for i in framed], model.device, pinned=pinned)
        frames[framed] = stacked.to(model.device, model.dtype)
        return frames

    def _detection(
        self,
        image_index: int,
        item: PreparedImage,
        rows: list[QueryRow],
        results: list[Any],
        prompts: list[SegPrompt],
        maps: np.ndarray,
        timings: dict[str, Any],
    ) -> Detection:
        mine = [i for i, prompt in enumerate(prompts) if prompt.image_index == image_index]
        finfo = np.finfo(np.float16)  # saturate instead of overflowing to inf when stored as float16
        logits = StoredLogits(
            maps=np.clip(maps, finfo.min, finfo.max),
            original_size=item.original_size,
            input_size=item.input_size,
            frame_size=SAM_FRAME,
        )
        row_indices = [i for i, row in enumerate(rows) if row.image_index == image_index]
        queries = [
            {
                "prompt": query.question,
                "text": self.tokenizer.decode(results[i].answer_ids),
                "num_seg": 0 if results[i].seg_states is None else int(results[i].seg_states.shape[0]),
            }
            for i, query in zip(row_indices, item.queries, strict=True)
        ]
        first = prompts[mine[0]] if mine else None
        similarity = first.similarity if first else None
        side = int(round(similarity.numel() ** 0.5)) if similarity is not None else 0
        diagnostics = {
            "similarity": similarity.reshape(side, side).tolist() if similarity is not None else None,
            "similarity_kind": "raw dot product",
            # None when this detector prompts without points (lisa, read_as_published); [] when SasP found none.
            "points": (first.points.tolist() if first and first.points is not None else [])
            if self.use_points
            else None,
            "labels": (first.labels.tolist() if first and first.labels is not None else [])
            if self.use_points
            else None,
            "seg_found": bool(mine),
            "num_seg": len(mine),
            "text": queries[0]["text"] if len(queries) == 1 else " | ".join(q["text"] for q in queries),
            "prompt": queries[0]["prompt"] if len(queries) == 1 else " | ".join(q["prompt"] for q in queries),
            "queries": queries,
            "decode_mode": self.config.decode_mode,
            "checkpoint_family": self.read_config.family,
            "detector_case": self.case,
            "timings_ms": {"prepare": item.prepare_ms, **timings},
        }
        return Detection(logits=logits, diagnostics=diagnostics)

    def preflight(self) -> None:
        """Device present and every weight file there and readable-looking, before any image is claimed."""
        check_device(self.config.device)
        check_model_folders(self.checkpoint, self.clip_dir)

    def fingerprint(self) -> str:
        """sha256 over the checkpoint's config, tokenizer, index and shard sizes and the CLIP config (no weight reading)."""
        return f"{self._fingerprint_name()}:{folders_digest(self.name, (self.checkpoint, self.clip_dir))}"

    def _fingerprint_name(self) -> str:
        return self.name


# The lisa detector's two cases (module docstring), as the run tables show them.
LISA_CASES = {
    KIND_LISA: "LISA checkpoint, LISA's own inference",
    KIND_READ: "READ checkpoint, [SEG] without SasP points",
}


class LisaDetector(ReadDetector):
    """lisa: only the [SEG] token as SAM prompt — LISA's own inference on a LISA checkpoint, or READ's checkpoint
    without its points (see the module docstring)."""

    name = "lisa"
    use_points = False
    accepted_kinds = (KIND_LISA, KIND_READ)

    @property
    def case(self) -> str:
        return LISA_CASES[self.read_config.kind]

    def _fingerprint_name(self) -> str:
        return f"lisa ({self.case})"

    def _default_forced_answer(self, read_config: ReadConfig) -> str:
        # LISA's validation teacher-forces "[SEG]." (train_ds.py validate); READ checkpoints keep READAR's answer.
        return LISA_FORCED_ANSWER if read_config.kind == KIND_LISA else DEFAULT_FORCED_ANSWER


LISA_FORCED_ANSWER = "[SEG]."


class PublishedReadDetector(ReadDetector):
    """The published READAR setting: one not-a-point padding point and the [SEG] token, no SasP points."""

    name = PUBLISHED_DETECTOR
    use_points = False
    padding_point = True


# Run options a user leaves out: READ's own (no-leak prompt, its training template, its 32-token cap) and, for
# read_as_published, the published setting.
_READ_DEFAULTS = {"prompt_mode": "generic", "conversation": "llava_v1", "max_new_tokens": MAX_NEW_TOKENS}


@register_detector("read", defaults=_READ_DEFAULTS)
def build_read(config: DetectorConfig) -> Detector:
    return ReadDetector(config)


@register_detector("lisa", defaults=_READ_DEFAULTS)
def build_lisa(config: DetectorConfig) -> Detector:
    return LisaDetector(config)


@register_detector(PUBLISHED_DETECTOR, defaults=PUBLISHED_SETTING)
def build_read_as_published(config: DetectorConfig) -> Detector:
    return PublishedReadDetector(config)
