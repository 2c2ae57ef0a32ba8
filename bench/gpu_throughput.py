"""Inference throughput of READ, LISA or PixelLM: the project's batched path vs the original one-image loop.

Builds the full-size architecture with random bf16 weights directly on the GPU (no checkpoint files), runs the
detector's ``detect`` on random 1024×1024 images and prints a markdown table: images/s at batch sizes 1, 8, 32,
the original-style loop (batch 1) as the 1.00× reference, per-stage times and peak GPU memory, then the worker
path against the direct batched forward. ``--detector`` picks the model (default ``read``):

- ``read``: ``ReadDetector`` on LLaMA-2-7B, CLIP ViT-L/14-336 (576 image tokens), the ``mlp2x_gelu`` projector
  and SAM ViT-H; generate and teacher-forced rows; stages vision, language, sam_encoder, sasp, mask_decoder.
- ``lisa``: ``LisaDetector`` on the same model class with LISA-7B-v1's geometry: a 7B LLaMA (vocab 32004, 2048
  positions), CLIP ViT-L/14 at 224 px (256 image tokens), one Linear projector (``linear``), SAM ViT-H, the
  [SEG] embedding alone as SAM's prompt; teacher-forced rows force LISA's "[SEG]."; same stages as read.
- ``pixellm``: ``PixelLMDetector`` on PixelLM-7B's geometry: a 7B LLaMA (vocab 32009, 2048 positions), CLIP
  ViT-L/14-336 resized to 448 px (32×32 grid pooled to 256 LLM tokens), its two ``mlp2x_gelu`` projectors,
  neck, prompt encoder and two-level mask decoder at the released sizes, no SAM image encoder; stages vision,
  language, masks. The detector only generates (teacher-forced is refused), so besides the generate rows a
  "forced_masks (parts)" row calls the model's parts as ``detect`` does and runs the mask path on six random
  [SEG0]…[SEG5] states per image (one object: 2 scales × 3 tokens), standing in for an image whose answer has them.

The original-style loop is batch 1, generate: READ/LISA run every image twice (their evaluation generated, then
ran a second forward for the [SEG] state); PixelLM runs it once (its ``evaluate`` reads the states of the one
generation, though without a key/value cache, which this reference row keeps).

Random weights never emit [SEG] on their own, so generate mode decodes a fixed ``--new-tokens`` tokens
(default 8 ≈ "Sure, [SEG].</s>" in LLaMA tokens) without stopping at </s>, and its rows include no SAM mask
decoding; the teacher-forced rows ("Sure, [SEG]."; LISA "[SEG].") include SasP and the mask decoder, shown per
stage. Prompts use the small tokenizer of the tiny checkpoint (token counts differ slightly from LLaMA's; the
576 or 256 image tokens dominate).

    python bench/gpu_throughput.py                 # H200: about 2–3 minutes
    python bench/gpu_throughput.py --detector lisa     # or pixellm
    python bench/gpu_throughput.py --tiny --device cpu --batch-sizes 1,2 --images 2   # CPU smoke run
    python bench/gpu_throughput.py --tiny --device cpu --batch-sizes 1,2 --images 2 --detector pixellm
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.detectors.base import DetectorConfig, ImageSample  # noqa: E402
from workers.pixellm.config import EXTRA_CLIP_LAYER, LLM_GRID, MASK_SIZE, SCALE_NUM, PixelLMConfig  # noqa: E402
from workers.pixellm.decode import PixelRow, generate_rows  # noqa: E402
from workers.pixellm.detector import PixelLMDetector, fuse_codebook  # noqa: E402
from workers.pixellm.loader import load_pixellm_tokenizer  # noqa: E402
from workers.pixellm.model import PixelLMHeads, PixelLMModel, resize_clip_to_448  # noqa: E402
from workers.pixellm.tiny import TINY_CLIP_LAYERS, write_pixellm_tokenizer  # noqa: E402
from workers.read.config import KIND_LISA, KIND_READ, LINEAR_PROJECTOR, ReadConfig  # noqa: E402
from workers.read.detector import LisaDetector, ReadDetector  # noqa: E402
from workers.read.loader import resolve_dtype  # noqa: E402
from workers.read.model import ReadModel, fast_init  # noqa: E402
from workers.read.preprocess import ClipPreprocessing  # noqa: E402
from workers.read.tiny import (  # noqa: E402
    TINY_CLIP_WIDTH,
    TINY_HIDDEN,
    tiny_clip_config,
    tiny_sam_config,
    write_tiny_tokenizer,
)
from workers.read.tokenizer import load_read_tokenizer, load_tokenizer  # noqa: E402

DETECTORS = ("read", "lisa", "pixellm")
TITLES = {"read": "READ", "lisa": "LISA", "pixellm": "PixelLM"}
# Per-batch stage times each detector reports in diagnostics["timings_ms"] (its per-image "prepare" is CPU work,
# shown on its own line, not in the rates).
STAGES = {
    "read": ("vision", "language", "sam_encoder", "sasp", "mask_decoder"),
    "lisa": ("vision", "language", "sam_encoder", "sasp", "mask_decoder"),
    "pixellm": ("vision", "language", "masks"),
}
# The model named on the Command line at full size (read's text is the one this script always printed).
FULL_SIZE_NAMES = {
    "read": "7B + ViT-L/14-336 + SAM ViT-H",
    "lisa": "LISA-7B-v1 geometry: 7B + ViT-L/14-224 + linear projector + SAM ViT-H",
    "pixellm": "PixelLM-7B geometry: 7B + ViT-L/14-336 resized to 448 + PixelLM mask heads, no SAM encoder",
}
# Vocabularies of the released 7B models: LLaMA's 32000 plus the added tokens (READ: [SEG], <im_start>, <im_end>;
# LISA-7B-v1: <im_patch>, <im_start>, <im_end>, [SEG]; PixelLM-7B: those three and [SEG0]…[SEG5]).
FULL_VOCAB = {"read": 32003, "lisa": 32004, "pixellm": 32009}
FORCED_MASKS = "forced_masks (parts)"


def full_size_llama(vocab_size: int = 32003, *, max_positions: int = 4096, rms_norm_eps: float = 1e-5) -> LlamaConfig:
    """The 7B LLaMA (LLaMA-2-7B's shapes; the LLaVA-v1-based LISA-7B-v1 and PixelLM-7B have 2048 positions)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=False,
    )


def full_size_clip(image_size: int = 336) -> CLIPVisionConfig:
    """CLIP ViT-L/14 at ``image_size`` px (336: openai/clip-vit-large-patch14-336; 224: …-patch14)."""
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        hidden_act="quick_gelu",
    )


def full_size_sam() -> SamConfig:
    """SAM ViT-H."""
    return SamConfig(
        vision_config={
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "global_attn_indexes": [7, 15, 23, 31],
            "window_size": 14,
            "output_channels": 256,
        },
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
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=False,
    )


def tiny_configs(vocab_size: int, detector: str = "read") -> tuple[LlamaConfig, CLIPVisionConfig, SamConfig | None, int]:
    """The tiny checkpoints' shapes (workers.read.tiny, workers.pixellm.tiny): read a 336 px CLIP, lisa 224 px,
    pixellm a 336 px CLIP with 12 layers (layer −11 must exist) and no SAM."""
    if detector == "read":
        llama = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=TINY_HIDDEN,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
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
                f"{llama.hidden_size} (LLM input, mask features); {llm}; neck + prompt encoder + {SCALE_NUM}-level "
                f"mask decoder (256 channels) → {MASK_SIZE}×{MASK_SIZE} masks, no SAM image encoder")
    projector = ("one Linear (linear)" if detector == "lisa" else "Linear–GELU–Linear (mlp2x_gelu)")
    prompt = "[SEG] embedding alone, no SasP points" if detector == "lisa" else "SasP points + [SEG] embedding"
    return (f"{vision} = {grid * grid} image tokens; projector {projector} {mm_hidden}→{llama.hidden_size}; "
            f"{llm}; SAM ViT width {sam.vision_config.hidden_size}, {sam.vision_config.num_hidden_layers} layers, "
            f"1024 px → 64×64 embeddings; SAM prompt: {prompt}")


@dataclass
class Bench:
    """The detectors around one random-weight model (decode mode → detector) and what was built."""

    detectors: dict[str, Any]
    model: torch.nn.Module
    geometry: str
    build_seconds: float


def _randomise(model: torch.nn.Module, device: str) -> None:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # uninitialised memory may hold NaN/inf; random weights keep every stage finite
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.eval()


def _detector_config(args: argparse.Namespace, mode: str) -> DetectorConfig:
    return DetectorConfig(
        device=args.device,
        dtype=args.dtype,
        prompt_mode="generic",
        decode_mode=mode,
        extra={"max_new_tokens": args.new_tokens, "stop_at_eos": False},
    )


def build_detectors(args: argparse.Namespace, workdir: Path) -> Bench:
    """One detector per decode mode around one random-weight model, and the build seconds."""
    detector = getattr(args, "detector", "read")
    if detector == "pixellm":
        return build_pixellm(args, workdir)
    start = time.perf_counter()
    kind = KIND_LISA if detector == "lisa" else KIND_READ
    write_tiny_tokenizer(workdir, kind)
    vocab = FULL_VOCAB[detector] if not args.tiny else len(load_read_tokenizer(workdir))
    llama, clip, sam, mm_hidden = tiny_configs(vocab, detector) if args.tiny else full_size_configs(detector)
    projector_type = LINEAR_PROJECTOR if detector == "lisa" else "mlp2x_gelu"
    dtype = resolve_dtype(args.device, args.dtype)
    with fast_init(dtype, args.device):
        model = ReadModel.from_configs(
            llama, clip, sam, mm_hidden_size=mm_hidden, out_dim=256, projector_type=projector_type
        )
    _randomise(model, args.device)
    read_config = ReadConfig(
        llama=llama,
        mm_hidden_size=mm_hidden,
        vision_select_layer=-2,
        use_im_start_end=True,
        out_dim=256,
        vision_tower="random",
        projector_type=projector_type,
        kind=kind,
    )
    tokenizer, token_ids = load_tokenizer(workdir, llama.vocab_size)
    detector_class = LisaDetector if detector == "lisa" else ReadDetector
    clip_settings = ClipPreprocessing(clip.image_size, clip.image_size)
    detectors = {
        mode: detector_class.from_parts(
            _detector_config(args, mode), model, read_config, tokenizer, token_ids, clip_settings
        )
        for mode in ("generate", "teacher_forced")
    }
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    geometry = geometry_text(detector, llama, clip, sam, mm_hidden, clip.image_size)
    return Bench(detectors, model, geometry, time.perf_counter() - start)


def build_pixellm(args: argparse.Namespace, workdir: Path) -> Bench:
    """PixelLM: CLIP (336 px, resized to 448 as PixelLM loads it) + LLaMA + the six head modules; generate only."""
    start = time.perf_counter()
    write_pixellm_tokenizer(workdir, "7b")
    vocab = FULL_VOCAB["pixellm"] if not args.tiny else len(load_read_tokenizer(workdir))
    llama, clip, _, mm_hidden = tiny_configs(vocab, "pixellm") if args.tiny else full_size_configs("pixellm")
    source_side = clip.image_size
    dtype = resolve_dtype(args.device, args.dtype)
    with fast_init(dtype, args.device):
        vision_tower = CLIPVisionModel(clip)
        resize_clip_to_448(vision_tower)  # sets clip.image_size to 448 as well
        model = PixelLMModel(vision_tower, LlamaForCausalLM(llama), PixelLMHeads(mm_hidden, llama.hidden_size, 256))
    _randomise(model, args.device)
    pixel_config = PixelLMConfig(
        llama=llama,
        mm_hidden_size=mm_hidden,
        vision_select_layer=-2,
        use_im_start_end=True,
        out_dim=256,
        vision_tower="random",
    )
    tokenizer, tokens = load_pixellm_tokenizer(workdir, llama.vocab_size)
    detector = PixelLMDetector.from_parts(_detector_config(args, "generate"), model, pixel_config, tokenizer, tokens)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    geometry = geometry_text("pixellm", llama, clip, None, mm_hidden, source_side)
    return Bench({"generate": detector}, model, geometry, time.perf_counter() - start)


def _elapsed_ms(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0


def pixellm_forced_masks(detector: PixelLMDetector, model: PixelLMModel) -> Callable[[Sequence[Any]], dict]:
    """A batch run through the model's parts as ``PixelLMDetector.detect`` runs it — vision, the same fixed-token
    generation, then per image the mask path — with six random [SEG0]…[SEG5] states per image (one object:
    ``SCALE_NUM`` scales × 3 tokens) in place of the states random weights never produce. Returns timings in ms."""
    codebook = len(detector.tokens.seg)
    generator = torch.Generator(device=model.device).manual_seed(1)
    finfo = np.finfo(np.float16)

    @torch.no_grad()
    def run(batch: Sequence[Any]) -> dict[str, float]:
        device, timings = model.device, {}
        start = time.perf_counter()
        image_tokens, llm_mask, features = model.image_inputs(
            torch.stack([item.pixels for item in batch]), [item.input_size for item in batch]
        )
        timings["vision"] = _elapsed_ms(start, device)
        start = time.perf_counter()
        rows = [PixelRow(index, after) for index, item in enumerate(batch) for after in item.afters]
        generate_rows(model, batch[0].before, image_tokens, llm_mask, rows, seg_ids=detector.tokens.seg,
                      eos_id=detector.tokens.eos, pad_id=detector.tokens.pad,
                      max_new_tokens=detector.max_new_tokens, stop_at_eos=detector.stop_at_eos)
        timings["language"] = _elapsed_ms(start, device)
        hidden = model.language_model.config.hidden_size
        seg_states = torch.randn((len(batch), codebook, hidden), generator=generator, device=device).to(model.dtype)
        start = time.perf_counter()
        for image_index in range(len(batch)):
            objects = fuse_codebook(model.seg_projection(seg_states[image_index]), detector.seg_per_scale)
            maps = model.low_res_masks(features[image_index], objects).float().cpu().numpy()
            np.clip(maps, finfo.min, finfo.max)
        timings["masks"] = _elapsed_ms(start, device)
        return timings

    return run


def detect_timings(detector: Any) -> Callable[[Sequence[Any]], dict]:
    """``detector.detect`` on a batch; its per-batch stage times (from the first image's diagnostics)."""
    return lambda batch: detector.detect(batch)[0].diagnostics["timings_ms"]


def random_samples(count: int, side: int, seed: int = 0) -> list[ImageSample]:
    rng = np.random.default_rng(seed)
    return [
        ImageSample(
            image=rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
            category="bottle",
            defect="good",
            key=f"random/{index}",
        )
        for index in range(count)
    ]


def measure(
    run: Callable[[Sequence[Any]], dict],
    device: str,
    prepared: list[Any],
    batch_size: int,
    stages: Sequence[str],
    *,
    repeats: int = 1,
) -> dict[str, float]:
    """Warm up once, then run every prepared image ``repeats`` times in batches; returns rates and stage times.
    ``run``: one batch → its stage times in ms (:func:`detect_timings`, :func:`pixellm_forced_masks`)."""
    device = torch.device(device)
    run(prepared[:batch_size])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stage_totals = dict.fromkeys(stages, 0.0)
    batches = 0
    start = time.perf_counter()
    for first in range(0, len(prepared), batch_size):
        chunk = prepared[first : first + batch_size]
        for _ in range(repeats):
            timings = run(chunk)
            batches += 1
            for stage in stages:
                stage_totals[stage] += timings[stage]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "images_per_s": len(prepared) / seconds,
        "ms_per_image": 1000 * seconds / len(prepared),
        "peak_gib": peak,
        **{stage: total / batches for stage, total in stage_totals.items()},
    }


def measure_worker_path(detector: Any, batch_size: int, count: int, workdir: Path) -> dict[str, float]:
    """The same images end to end through the worker's path: PNG decode, ``prepare`` in task threads, the
    in-process batcher, ``detect``, logits encoded into the object store, rows committed in SQL — i.e.
    ``workers.task.process_image`` driven by the embedded executor's thread pool (what a Celery worker
    process runs per task, minus the broker round trip). Returns images/s over a warm second pass."""
    from PIL import Image

    from scheduler.planner import RunRequest, plan_run
    from scheduler.runner import execute_run
    from storage.database import Database
    from storage.objects import ObjectStore
    from storage.repository import Repository

    root = workdir / f"mvtec-{batch_size}"
    rng = np.random.default_rng(1)
    folder = root / "bottle" / "test" / "good"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(folder / f"{index:04d}.png")
    rates = []
    for attempt in range(2):  # the first pass warms up threads, allocator and caches
        database = Database(f"sqlite:///{workdir / f'bench-{batch_size}-{attempt}.sqlite'}")
        database.migrate()
        repo = Repository(database)
        store = ObjectStore(str(workdir / f"objects-{batch_size}-{attempt}"))
        request = RunRequest(mvtec_root=root, detector=detector.name, detector_config=detector.config.public(),
                             run_name=f"bench-{attempt}")
        run, _ = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False,
                          settings_public={})
        start = time.perf_counter()
        execute_run(repo, store, run, detector, batch_size=batch_size, lease_seconds=3600, max_attempts=1,
                    device=detector.config.device)
        if detector.config.device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
        database.dispose()
    return {"images_per_s": rates[-1], "ms_per_image": 1000 / rates[-1]}


def footnote(detector: str, new_tokens: int, codebook: int) -> str:
    """What the rows measure, under the table."""
    if detector == "read":
        return "Generate rows have no mask decoding (random weights emit no [SEG]); teacher-forced rows do."
    if detector == "lisa":
        return ("Generate rows have no mask decoding (random weights emit no [SEG]); teacher-forced rows (LISA's "
                "validation answer \"[SEG].\") do, prompting SAM with the [SEG] embedding alone (no SasP points: "
                "the sasp column is the [SEG] projection and prompt building).")
    return (f"Rows: `original loop (generate ×1)` — batch 1, each image once through `PixelLMDetector.detect` "
            f"(PixelLM's evaluate is one generation per image, but without a key/value cache, which this row "
            f"keeps); `generate` — `detect` with {new_tokens} fixed tokens: random weights emit no [SEGk], so no "
            f"masks are decoded (the masks column is bookkeeping only); `{FORCED_MASKS}` — not `detect` (PixelLM's "
            f"detector only generates; teacher-forced is refused) but the model's parts called as `detect` calls "
            f"them: vision, the same {new_tokens}-token generation, then per image {codebook} random [SEG0]…"
            f"[SEG{codebook - 1}] states (one object) → text_hidden_fcs → codebook fusion → prompt encoder + "
            f"{SCALE_NUM}-level mask decoder → {MASK_SIZE}×{MASK_SIZE} logits copied to the CPU, i.e. the cost of "
            f"an image whose answer holds the codebook once.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model (CPU smoke test of this script)"
    )
    parser.add_argument("--detector", choices=DETECTORS, default="read",
                        help="read (default), lisa (LISA-7B-v1 geometry) or pixellm (PixelLM-7B geometry)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--images", type=int, default=32, help="images per measurement (rounded up to a batch)"
    )
    parser.add_argument("--new-tokens", type=int, default=8, help="fixed generate length (no stop at </s>)")
    parser.add_argument("--worker-batch", type=int, default=None,
                        help="batch size for the worker-path comparison (default: the largest batch size; 0 = skip)")
    args = parser.parse_args(argv)
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    stages = STAGES[args.detector]

    with tempfile.TemporaryDirectory() as workdir:
        bench = build_detectors(args, Path(workdir))
        detectors = bench.detectors
        count = max(max(batch_sizes), args.images)
        start = time.perf_counter()
        prepared = {
            mode: [detector.prepare(s) for s in random_samples(count, 1024)] for mode, detector in detectors.items()
        }
        prepare_ms = 1000 * (time.perf_counter() - start) / (len(detectors) * count)
        # decode mode → (how one batch runs, its prepared images)
        runs = {mode: (detect_timings(detector), prepared[mode]) for mode, detector in detectors.items()}
        if args.detector == "pixellm":
            runs[FORCED_MASKS] = (pixellm_forced_masks(detectors["generate"], bench.model), prepared["generate"])

        rows = []
        original_images = prepared["generate"][: min(args.images, 8 if not args.tiny else args.images)]
        repeats = 1 if args.detector == "pixellm" else 2
        original = measure(runs["generate"][0], args.device, original_images, 1, stages, repeats=repeats)
        rows.append((f"original loop (generate ×{repeats})", 1, original))
        for mode, (run, items) in runs.items():
            for batch_size in batch_sizes:
                images = items[: max(batch_size, math.ceil(args.images / batch_size) * batch_size)][:count]
                rows.append((mode, batch_size, measure(run, args.device, images, batch_size, stages)))
        worker_batch = max(batch_sizes) if args.worker_batch is None else args.worker_batch
        worker_rows = []
        if worker_batch:
            worker_count = max(2 * worker_batch, args.images)
            for mode, detector in detectors.items():
                direct = next(r for m, b, r in rows if m == mode and b == worker_batch)
                path = measure_worker_path(detector, worker_batch, worker_count, Path(workdir) / mode)
                worker_rows.append((mode, worker_batch, direct, path))

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    )
    print(f"\n## {TITLES[args.detector]} throughput — {datetime.date.today()} — {device_name}\n")
    print(
        f"Command: `python bench/gpu_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"model {'tiny' if args.tiny else FULL_SIZE_NAMES[args.detector]}, dtype "
        f"{resolve_dtype(args.device, args.dtype)}, torch {torch.__version__}, build {bench.build_seconds:.1f} s, "
        f"CPU prepare {prepare_ms:.1f} ms/image (not in the rates), generate = {args.new_tokens} fixed tokens.\n"
    )
    if args.detector != "read":  # read's output stays as it always was
        detector_class = type(detectors["generate"]).__name__
        print(f"Detector: `{args.detector}` ({detector_class}) — {bench.geometry}. Stage columns (ms per batch, "
              f"from the detector's timings): {', '.join(stages)}.\n")
    header = "| mode | batch | images/s | ms/image | vs original | " + " | ".join(
        f"{s} ms/batch" for s in stages
    )
    print(header + " | peak GiB |")
    print("|" + "---|" * (6 + len(stages)))
    for mode, batch_size, result in rows:
        ratio = result["images_per_s"] / original["images_per_s"]
        stage_times = " | ".join(f"{result[s]:.1f}" for s in stages)
        print(
            f"| {mode} | {batch_size} | {result['images_per_s']:.2f} | {result['ms_per_image']:.1f} | "
            f"{ratio:.2f}× | {stage_times} | {result['peak_gib']:.1f} |"
        )
    codebook = len(detectors["generate"].tokens.seg) if args.detector == "pixellm" else 1
    print("\n" + footnote(args.detector, args.new_tokens, codebook))
    if worker_rows:
        print("\nWorker path (decode + prepare in task threads + in-process batcher + detect + object store + SQL,"
              " as `workers.task.process_image` runs per task) against the direct batched forward:\n")
        print("| mode | batch | direct images/s | worker-path images/s | kept |")
        print("|---|---|---|---|---|")
        for mode, batch_size, direct, path in worker_rows:
            kept = path["images_per_s"] / direct["images_per_s"]
            print(f"| {mode} | {batch_size} | {direct['images_per_s']:.2f} | {path['images_per_s']:.2f} | "
                  f"{100 * kept:.0f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
