"""READ inference throughput: the project's batched path vs the original one-image-twice loop.

Builds the full-size architecture (LLaMA-2-7B, CLIP ViT-L/14-336, SAM ViT-H) with random bf16 weights directly on
the GPU (no checkpoint files), runs ``ReadDetector.detect`` on random 1024×1024 images and prints a markdown
table: images/s at batch sizes 1, 8, 32 for generate and teacher-forced decoding, the original-style loop
(batch 1, generate, every image run twice — LISA/READ's evaluation generated, then ran a second forward for the
[SEG] state), per-stage times and peak GPU memory.

Random weights never emit [SEG] on their own, so generate mode decodes a fixed ``--new-tokens`` tokens
(default 8 ≈ "Sure, [SEG].</s>" in LLaMA tokens) without stopping at </s>, and its rows include no SAM mask
decoding; the teacher-forced rows ("Sure, [SEG].") include SasP and the mask decoder, shown per stage. Prompts use
the small tokenizer of the tiny checkpoint (token counts differ slightly from LLaMA's; the 576 image tokens
dominate).

    python bench/gpu_throughput.py                 # H200: about 2–3 minutes
    python bench/gpu_throughput.py --tiny --device cpu --batch-sizes 1,2 --images 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, SamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.detectors.base import DetectorConfig, ImageSample  # noqa: E402
from workers.read.config import ReadConfig  # noqa: E402
from workers.read.detector import ReadDetector  # noqa: E402
from workers.read.loader import resolve_dtype  # noqa: E402
from workers.read.model import ReadModel, fast_init  # noqa: E402
from workers.read.tiny import (  # noqa: E402
    TINY_CLIP_WIDTH,
    TINY_HIDDEN,
    tiny_clip_config,
    tiny_sam_config,
    write_tiny_tokenizer,
)
from workers.read.tokenizer import load_read_tokenizer, load_tokenizer  # noqa: E402

STAGES = ("vision", "language", "sam_encoder", "sasp", "mask_decoder")


def full_size_configs() -> tuple[LlamaConfig, CLIPVisionConfig, SamConfig, int]:
    """LLaMA-2-7B (vocab + 3 READ tokens), CLIP ViT-L/14-336, SAM ViT-H."""
    llama = LlamaConfig(
        vocab_size=32003,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    clip = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    sam = SamConfig(
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
    return llama, clip, sam, 1024


def tiny_configs(vocab_size: int) -> tuple[LlamaConfig, CLIPVisionConfig, SamConfig, int]:
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


def build_detectors(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, ReadDetector], float]:
    """One detector per decode mode around one random-weight model; returns them and the build seconds."""
    start = time.perf_counter()
    write_tiny_tokenizer(workdir)
    vocab = 32003 if not args.tiny else len(load_read_tokenizer(workdir))
    llama, clip, sam, mm_hidden = tiny_configs(vocab) if args.tiny else full_size_configs()
    dtype = resolve_dtype(args.device, args.dtype)
    with fast_init(dtype, args.device):
        model = ReadModel.from_configs(llama, clip, sam, mm_hidden_size=mm_hidden, out_dim=256)
    generator = torch.Generator(device=args.device).manual_seed(0)
    with torch.no_grad():  # uninitialised memory may hold NaN/inf; random weights keep every stage finite
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    model.eval()
    read_config = ReadConfig(
        llama=llama,
        mm_hidden_size=mm_hidden,
        vision_select_layer=-2,
        use_im_start_end=True,
        out_dim=256,
        vision_tower="random",
    )
    tokenizer, token_ids = load_tokenizer(workdir, llama.vocab_size)
    detectors = {}
    for mode in ("generate", "teacher_forced"):
        config = DetectorConfig(
            device=args.device,
            dtype=args.dtype,
            prompt_mode="generic",
            decode_mode=mode,
            extra={"max_new_tokens": args.new_tokens, "stop_at_eos": False},
        )
        detectors[mode] = ReadDetector.from_parts(config, model, read_config, tokenizer, token_ids)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return detectors, time.perf_counter() - start


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
    detector: ReadDetector, prepared: list[Any], batch_size: int, *, repeats: int = 1
) -> dict[str, float]:
    """Warm up once, then run every prepared image ``repeats`` times in batches; returns rates and stage times."""
    device = torch.device(detector.config.device)
    detector.detect(prepared[:batch_size])  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stage_totals = dict.fromkeys(STAGES, 0.0)
    batches = 0
    start = time.perf_counter()
    for first in range(0, len(prepared), batch_size):
        chunk = prepared[first : first + batch_size]
        for _ in range(repeats):
            timings = detector.detect(chunk)[0].diagnostics["timings_ms"]
            batches += 1
            for stage in STAGES:
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


def measure_worker_path(detector: ReadDetector, batch_size: int, count: int, workdir: Path) -> dict[str, float]:
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
        request = RunRequest(mvtec_root=root, detector="read", detector_config=detector.config.public(),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model (CPU smoke test of this script)"
    )
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

    with tempfile.TemporaryDirectory() as workdir:
        detectors, build_seconds = build_detectors(args, Path(workdir))
        count = max(max(batch_sizes), args.images)
        start = time.perf_counter()
        prepared = [detectors["generate"].prepare(s) for s in random_samples(count, 1024)]
        forced_prepared = [detectors["teacher_forced"].prepare(s) for s in random_samples(count, 1024)]
        prepare_ms = 1000 * (time.perf_counter() - start) / (2 * count)

        rows = []
        original_images = prepared[: min(args.images, 8 if not args.tiny else args.images)]
        original = measure(detectors["generate"], original_images, 1, repeats=2)
        rows.append(("original loop (generate ×2)", 1, original))
        for mode, items in (("generate", prepared), ("teacher_forced", forced_prepared)):
            for batch_size in batch_sizes:
                images = items[: max(batch_size, math.ceil(args.images / batch_size) * batch_size)][:count]
                rows.append((mode, batch_size, measure(detectors[mode], images, batch_size)))
        worker_batch = max(batch_sizes) if args.worker_batch is None else args.worker_batch
        worker_rows = []
        if worker_batch:
            worker_count = max(2 * worker_batch, args.images)
            for mode in ("generate", "teacher_forced"):
                direct = next(r for m, b, r in rows if m == mode and b == worker_batch)
                path = measure_worker_path(detectors[mode], worker_batch, worker_count, Path(workdir) / mode)
                worker_rows.append((mode, worker_batch, direct, path))

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    )
    print(f"\n## READ throughput — {datetime.date.today()} — {device_name}\n")
    print(
        f"Command: `python bench/gpu_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"model {'tiny' if args.tiny else '7B + ViT-L/14-336 + SAM ViT-H'}, dtype "
        f"{resolve_dtype(args.device, args.dtype)}, torch {torch.__version__}, build {build_seconds:.1f} s, "
        f"CPU prepare {prepare_ms:.1f} ms/image (not in the rates), generate = {args.new_tokens} fixed tokens.\n"
    )
    header = "| mode | batch | images/s | ms/image | vs original | " + " | ".join(
        f"{s} ms/batch" for s in STAGES
    )
    print(header + " | peak GiB |")
    print("|" + "---|" * (6 + len(STAGES)))
    for mode, batch_size, result in rows:
        ratio = result["images_per_s"] / original["images_per_s"]
        stages = " | ".join(f"{result[s]:.1f}" for s in STAGES)
        print(
            f"| {mode} | {batch_size} | {result['images_per_s']:.2f} | {result['ms_per_image']:.1f} | "
            f"{ratio:.2f}× | {stages} | {result['peak_gib']:.1f} |"
        )
    print("\nGenerate rows have no mask decoding (random weights emit no [SEG]); teacher-forced rows do.")
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
