"""READ at H200 speed: one script that measures READ (or LISA, PixelLM) inference from the original one-image loop
to a real Celery worker, lever by lever, with equality checks. Its defaults are sized for about 8 minutes on an
H200 (not yet measured there: each row's ``seconds`` in the JSON says what it cost, and the row-size flags trim).

One command on the H200 (bf16 random weights built on the GPU, no checkpoint files). The device image lacks
READAR's services stack (Celery, SQLAlchemy, pydantic, …) and a Redis server: ``bash bench/device_prep.sh``
here puts their wheels in ``.whl`` and a redis-server with its libraries in ``.devbin``; then on the device
``bash bench/device_run.sh`` (carry ``.whl`` and ``.devbin``) installs them and runs this script into $OUT. With
no PostgreSQL there, the worker row keeps its results in SQLite and says so; without a broker it is recorded as
an error ("no broker") and every other row still runs.

    python bench/gpu_throughput.py                       # writes $OUT/gpu_throughput.json (or ./)
    python bench/gpu_throughput.py --detector lisa       # or pixellm (rows a, b, d only)
    python bench/gpu_throughput.py --tiny --device cpu --images 16 --batch-sizes 1,4   # CI-sized, ≤ 2 min

``--tiny`` shrinks the rows too (4 images for batch 1, one batch per lever row); on the CPU rows run without
warm-up (``--warmups``; compile rows keep theirs). CPU figures only show that the script works.

The model: the full-size architecture (LLaMA-2-7B + CLIP ViT-L/14-336 + mlp2x_gelu projector + SAM ViT-H for
``read``; LISA-7B-v1's and PixelLM-7B's geometries for ``lisa``/``pixellm``) with random weights from a fixed
seed, built by ``bench/gpu_plugin.py`` — the same builder a worker process uses, so every row runs the same model.
Random weights never emit [SEG], so an answer schedule steers greedy decoding (gpu_plugin.AnswerSchedule): every
row answers "Sure, [SEG]." then </s> (stop_at_eos on, max_new_tokens 32), except the last row of every batch of
two or more, which never stops and runs to 32 tokens. Generate mode therefore runs SasP and the mask decoder.
PixelLM keeps a fixed ``--new-tokens`` generation without stopping (its rows have no masks; a "forced masks"
row times its mask path on random [SEGk] states).

The images: ``--images`` (256) PNGs of smooth random content at MVTec sizes (700, 800, 840, 900, 1000, 1024
squares and one 1024×768), written once into an MVTec-layout folder (one category, so its aggregation starts
after the last image; every 4th image a defect with its mask). Direct rows decode them once up front; worker
rows read the PNGs as a worker does.

Rows, in order (each printed as a markdown line and saved to the JSON after it finishes; a row that fails is
recorded with its error and the script goes on):

(a) ``original`` — READ's evaluation loop: batch 1, every image run twice (generate, then a second forward for
    the [SEG] state), all levers off, on ``--subset`` images. The 1.00× reference of the "vs original" column.
(b) ``direct`` — ``detect`` on prepared images at each batch size, generate and teacher-forced, with every
    non-compile lever as ``Levers.from_env`` sets it for the device (compile levers off). Batch-1 rows use the
    ``--subset`` images, larger batches all of them.
(c) ``lever`` — per non-compile lever, eager + only that lever against eager (all off) at the largest batch on
    ``--ab-images`` images: images/s of both, and the lever's detections of the first batch against eager's —
    identical texts and SasP points, mask logits within 1e-5 (fp32) or 0.05·max|logit| (bf16), similarity diff.
(d) ``worker`` — a real ``readar worker`` process (``python -m scheduler worker``, detector ``<family>_bench``
    from READAR_PLUGINS=bench.gpu_plugin, levers as in (b)) on Redis (a private ``redis-server`` if one is on
    PATH, else 127.0.0.1:6379) and PostgreSQL (a fresh database on 127.0.0.1:5432, else SQLite). On a GPU the
    process starts before row (a), so its start-up overlaps the direct rows; after a warm-up run (which builds
    its model) it is timed from ``submit`` to the last image row done; the aggregation finishes untimed.
    ``embedded`` — the same images through ``scheduler.runner.execute_run`` (SQLite, local objects, no servers)
    with the direct detector. Both print their ratio to the direct generate row at the same batch (target ≥ 0.9).
(e) ``compile`` — last: each compile lever on top of (b)'s levers, warm-up (compilation) excluded, with the
    equality checks of (c).

A lever the detector does not have yet (no ``detector.levers``) gives rows with status "unavailable".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.gpu_plugin import (  # noqa: E402 - imported as bench.gpu_plugin, as the worker imports it
    DETECTORS,
    Geometry,
    Parts,
    build_model,
    build_parts,
    detector_options,
    make_detector,
)
from workers.detectors.base import DetectorConfig, ImageSample  # noqa: E402
from workers.read.loader import resolve_dtype  # noqa: E402

TITLES = {"read": "READ", "lisa": "LISA", "pixellm": "PixelLM"}
# Per-batch stage times each detector reports in diagnostics["timings_ms"].
STAGES = {
    "read": ("vision", "language", "sam_encoder", "sasp", "mask_decoder"),
    "lisa": ("vision", "language", "sam_encoder", "sasp", "mask_decoder"),
    "pixellm": ("vision", "language", "masks"),
}
# MVTec AD's image sides (metal_nut 700, pill 800, tile 840, bottle 900, capsule… 1000, most 1024) and one
# non-square image, as (height, width).
SIZES = ((700, 700), (800, 800), (840, 840), (900, 900), (1000, 1000), (1024, 1024), (768, 1024))
CATEGORY = "bottle"
DEFECT = "crack"
FORCED_MASKS = "forced masks (parts)"
ROW_KINDS = ("original", "direct", "lever", "worker", "embedded", "compile")


# -- output -----------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """What ran the benchmark (top of the JSON and of the output)."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    else:
        info["gpu"] = None
    return info


def fused_attention_probe(device: str, dtype: torch.dtype) -> dict[str, str]:
    """Which fused SDPA kernels take the ``sam_attention`` lever's folded global attention at ViT-H's shapes
    (16 heads, 64×64 tokens, q'/k' head dim 80 + 64 + 64 = 208, v padded to it): per backend "ok" or its refusal.
    With none, SDPA falls back to the unfused math kernel and the lever's row can show no gain; this says why."""
    if not device.startswith("cuda"):
        return {"skipped": "not a CUDA device"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from workers.read.sam_fast import padded_sdpa

    generator = torch.Generator(device=device).manual_seed(0)
    query = torch.randn((1, 16, 4096, 208), generator=generator, device=device, dtype=dtype)
    value = torch.randn((1, 16, 4096, 80), generator=generator, device=device, dtype=dtype)
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                padded_sdpa(query, query, value, scale=1.0)
            torch.cuda.synchronize(device)
            results[backend.name.lower()] = "ok"
        except RuntimeError as exc:
            results[backend.name.lower()] = " ".join(str(exc).split())[:300]
    return results


class Report:
    """Rows as they finish: a markdown line on stdout and the whole JSON rewritten (a crash keeps every row)."""

    def __init__(self, path: Path, header: dict[str, Any], stages: Sequence[str]) -> None:
        self.path, self.header, self.stages = path, header, tuple(stages)
        self.rows: list[dict[str, Any]] = []
        self.original_rate: float | None = None

    def table_header(self) -> str:
        columns = ["row", "mode", "batch", "images", "images/s", "ms/image", "vs original",
                   *(f"{s} ms/batch" for s in self.stages), "peak GiB", "check", "note"]
        return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        rate = row.get("images_per_s")
        if row["kind"] == "original" and rate:
            self.original_rate = rate
        if rate and self.original_rate:
            row["vs_original"] = rate / self.original_rate
        self.rows.append(row)
        print(self.markdown(row), flush=True)
        self.write()
        return row

    def markdown(self, row: dict[str, Any]) -> str:
        stages = row.get("stages_ms_per_batch") or {}
        cells = [row["label"], row.get("mode", ""), _text(row.get("batch")), _text(row.get("images")),
                 _num(row.get("images_per_s"), 2), _num(row.get("ms_per_image"), 1),
                 _num(row.get("vs_original"), 2, "×"), *(_num(stages.get(s), 1) for s in self.stages),
                 _num(row.get("peak_gib"), 1), check_text(row.get("equality")), note_text(row)]
        return "| " + " | ".join(cells) + " |"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1, default=str))
        os.replace(temporary, self.path)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _num(value: Any, digits: int, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}{suffix}"


def check_text(equality: dict[str, Any] | None) -> str:
    if not equality:
        return ""
    verdict = "pass" if equality["passed"] else "FAIL"
    mask, similarity = equality["mask_max_abs_diff"], equality["similarity_max_abs_diff"]
    return f"{verdict} (mask Δ {mask:.1e}, sim Δ {similarity:.1e})"


def note_text(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {(row.get('error') or '').splitlines()[0][:160]}"
    return row.get("note", "")


def run_row(report: Report, kind: str, label: str, body: Callable[[], dict[str, Any]], **fields: Any) -> dict:
    """One row: ``body`` returns its measurements; any failure is recorded as the row's error, and the run goes on.
    ``LeverUnavailable`` makes the row "unavailable" instead of an error."""
    row = {"kind": kind, "label": label, "status": "ok", "error": None, **fields}
    start = time.perf_counter()
    try:
        row.update(body())
    except LeverUnavailable as exc:
        row.update(status="unavailable", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the row records it; the next row runs
        row.update(status="error", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return report.add(row)


class LeverUnavailable(RuntimeError):
    """The detector (or Levers) lacks what a row needs: the row says so instead of failing."""


# -- the images -------------------------------------------------------------------------------------------------
def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth random colour fields (bicubic upsampling of a coarse random grid): PNG-compressible like photos."""
    from PIL import Image

    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def write_image(root: Path, index: int, seed: int) -> None:
    """Image ``index``: its size cycles through SIZES; every 4th (from the second on) is a defect with a
    rectangular mask, so even two images give the aggregation both classes."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    height, width = SIZES[index % len(SIZES)]
    image = smooth_image(rng, height, width)
    defect = DEFECT if index % 4 == 1 else "good"
    folder = root / CATEGORY / "test" / defect
    folder.mkdir(parents=True, exist_ok=True)
    if defect != "good":
        mask = np.zeros((height, width), dtype=np.uint8)
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        mask[top : top + height // 8, left : left + width // 6] = 255
        image = image.copy()
        image[mask > 0] = 255 - image[mask > 0]
        masks = root / CATEGORY / "ground_truth" / defect
        masks.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(masks / f"{index:03d}_mask.png", compress_level=1)
    Image.fromarray(image).save(folder / f"{index:03d}.png", compress_level=1)


def write_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """The MVTec-layout folder every row reads (written once, in parallel)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda index: write_image(root, index, seed), range(count)))
    return root


def load_samples(root: Path) -> list[ImageSample]:
    """Every test image decoded once, as the task path decodes it (workers.images.load_rgb), in path order."""
    from workers.images import load_rgb

    paths = sorted((root / CATEGORY / "test").glob("*/*.png"))

    def load(path: Path) -> ImageSample:
        return ImageSample(image=load_rgb(path), category=CATEGORY, defect=path.parent.name,
                           category_defects=(DEFECT,), key=str(path.relative_to(root)))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(load, paths))


# -- direct measurements ----------------------------------------------------------------------------------------
@dataclass
class Bench:
    """The random model, one detector per decode mode around it, and the prepared images per lever setting."""

    args: argparse.Namespace
    parts: Parts
    model: torch.nn.Module
    detectors: dict[str, Any]
    samples: list[ImageSample]
    build_seconds: float
    _prepared: dict[tuple[str, Any], list[Any]] = field(default_factory=dict)

    @property
    def has_levers(self) -> bool:
        return all(hasattr(detector, "levers") for detector in self.detectors.values())

    def set_levers(self, levers: Any) -> None:
        """Swap the levers of every detector (``detect`` reads ``detector.levers`` at each call)."""
        if levers is None:
            return
        if not self.has_levers:
            raise LeverUnavailable("lever not available: the detector has no `levers` attribute yet "
                                   "(workers/read/detector.py)")
        for detector in self.detectors.values():
            detector.levers = levers

    def prepared(self, mode: str, count: int) -> list[Any]:
        """The first ``count`` images prepared by the ``mode`` detector under its current levers (prepare may
        depend on them: uint8 frames, pinned memory), cached per lever setting; threads as the worker's tasks."""
        detector = self.detectors[mode]
        key = (mode, getattr(detector, "levers", None))
        cached = self._prepared.get(key, [])
        if len(cached) < count:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
                cached = cached + list(pool.map(detector.prepare, self.samples[len(cached) : count]))
            self._prepared = {k: v for k, v in self._prepared.items() if k[0] != mode or k == key}
            self._prepared[key] = cached
        return cached[:count]


def build_bench(args: argparse.Namespace, workdir: Path, samples: list[ImageSample]) -> Bench:
    start = time.perf_counter()
    geometry = bench_geometry(args)
    parts = build_parts(geometry, workdir)
    model = build_model(parts, args.device)
    modes = ("generate",) if args.detector == "pixellm" else ("generate", "teacher_forced")
    detectors = {mode: make_detector(parts, detector_config(args, mode, geometry), model) for mode in modes}
    return Bench(args, parts, model, detectors, samples, time.perf_counter() - start)


def bench_geometry(args: argparse.Namespace) -> Geometry:
    return Geometry(detector=args.detector, tiny=args.tiny, seed=args.seed, dtype=args.dtype,
                    new_tokens=args.new_tokens)


def detector_config(args: argparse.Namespace, mode: str, geometry: Geometry,
                    batch_size: int = 1) -> DetectorConfig:
    return DetectorConfig(device=args.device, dtype=args.dtype, prompt_mode="generic", decode_mode=mode,
                          batch_size=batch_size, extra=detector_options(geometry))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Measurement:
    images_per_s: float
    ms_per_image: float
    stages: dict[str, float]
    peak_gib: float | None
    first_batch: list[Any]  # the warm-up's output for the first batch: what the equality checks compare

    def fields(self) -> dict[str, Any]:
        return {"images_per_s": self.images_per_s, "ms_per_image": self.ms_per_image,
                "stages_ms_per_batch": self.stages, "peak_gib": self.peak_gib}


def measure(run: Callable[[Sequence[Any]], list[Any] | dict], device: str, prepared: list[Any], batch_size: int,
            *, warmups: int, repeats: int = 1) -> Measurement:
    """Warm up ``warmups`` times on the first batch, then run every prepared image ``repeats`` times in batches.
    The first batch's output (the last warm-up's, or the timed run's without warm-up) is kept for the equality
    checks. ``run``: a batch → detections (stage times from the first one's diagnostics) or stage times."""
    first: Any = None
    for _ in range(warmups):
        first = run(prepared[:batch_size])
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    totals: dict[str, float] = {}
    batches = 0
    start = time.perf_counter()
    for offset in range(0, len(prepared), batch_size):
        chunk = prepared[offset : offset + batch_size]
        for _ in range(repeats):
            output = run(chunk)
            if first is None:
                first = output
            timings = stage_times(output)
            batches += 1
            for stage, value in timings.items():
                totals[stage] = totals.get(stage, 0.0) + value
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return Measurement(len(prepared) / seconds, 1000 * seconds / len(prepared),
                       {stage: total / batches for stage, total in totals.items()}, peak,
                       first if isinstance(first, list) else [])


def stage_times(result: list[Any] | dict) -> dict[str, float]:
    """Per-batch stage times: a dict as given, or the first detection's ``timings_ms`` (per-image ``prepare``
    and ``batch_size`` left out)."""
    timings = result if isinstance(result, dict) else result[0].diagnostics.get("timings_ms", {})
    return {k: float(v) for k, v in timings.items() if k not in ("prepare", "batch_size")
            and isinstance(v, int | float)}


def compare(reference: list[Any], candidate: list[Any], dtype: torch.dtype) -> dict[str, Any]:
    """The equality check of one lever's detections against eager's, image by image."""
    if len(reference) != len(candidate) or not reference:
        raise RuntimeError(f"equality check got {len(candidate)} detections against {len(reference)}")
    pairs = list(zip(reference, candidate, strict=True))
    texts = all(r.diagnostics.get("text") == c.diagnostics.get("text") for r, c in pairs)
    points = all(r.diagnostics.get("points") == c.diagnostics.get("points")
                 and r.diagnostics.get("labels") == c.diagnostics.get("labels") for r, c in pairs)
    mask_diff, scale, sim_diff = 0.0, 0.0, 0.0
    for r, c in pairs:
        a, b = r.logits.maps, c.logits.maps
        mask_diff = max(mask_diff, float(np.abs(a - b).max()) if a.shape == b.shape and a.size else
                        (0.0 if a.shape == b.shape else math.inf))
        scale = max(scale, float(np.abs(a).max()) if a.size else 0.0)
        sa, sb = r.diagnostics.get("similarity"), c.diagnostics.get("similarity")
        if (sa is None) != (sb is None):
            sim_diff = math.inf
        elif sa is not None:
            sim_diff = max(sim_diff, float(np.abs(np.asarray(sa) - np.asarray(sb)).max()))
    tolerance = 1e-5 if dtype == torch.float32 else 0.05 * scale
    return {"texts_equal": texts, "points_equal": points, "mask_max_abs_diff": mask_diff,
            "mask_tolerance": tolerance, "mask_max_abs": scale, "similarity_max_abs_diff": sim_diff,
            "images": len(reference), "passed": bool(texts and points and mask_diff <= tolerance)}


def lever_type() -> Any:
    """``workers.read.levers.Levers`` or None while the module is absent."""
    try:
        from workers.read.levers import Levers
    except ImportError:
        return None
    return Levers


def compile_fields() -> tuple[str, ...]:
    levers = lever_type()
    if levers is None:
        return ()
    from workers.read import levers as module

    listed = tuple(getattr(module, "COMPILE_FIELDS", ()))
    return tuple(name for name in levers.names() if name in listed or name.startswith("compile"))


def speed_levers() -> tuple[str, ...]:
    levers = lever_type()
    return tuple(name for name in levers.names() if name not in compile_fields()) if levers else ()


def production_levers(device: str) -> Any:
    """Every non-compile lever as the environment sets it for the device (auto: the device's default)."""
    levers = lever_type()
    if levers is None:
        return None
    return levers.from_env(device).replace(**dict.fromkeys(compile_fields(), False))


def eager_levers() -> Any:
    levers = lever_type()
    return levers.eager() if levers else None


def enabled(levers: Any) -> list[str] | None:
    return levers.enabled() if levers is not None else None


# -- rows (a)–(c), (e) ------------------------------------------------------------------------------------------
def subset(args: argparse.Namespace, bench: Bench) -> int:
    return max(1, min(args.subset, len(bench.samples)))


def row_original(report: Report, bench: Bench) -> None:
    """(a) READ's evaluation loop: batch 1, each image twice (PixelLM: once), levers off."""
    args = bench.args
    repeats = 1 if args.detector == "pixellm" else 2
    count = subset(args, bench)

    def body() -> dict[str, Any]:
        levers = eager_levers() if bench.has_levers else None
        bench.set_levers(levers)
        detector = bench.detectors["generate"]
        result = measure(detector.detect, args.device, bench.prepared("generate", count), 1, repeats=repeats,
                         warmups=args.warmups)
        note = "" if levers is not None else "levers n/a: the detector's own defaults"
        return {**result.fields(), "levers": enabled(levers), "note": note}

    run_row(report, "original", f"original loop (generate ×{repeats})", body, mode="generate", batch=1,
            images=count)


def direct_rows(report: Report, bench: Bench, batch_sizes: Sequence[int]) -> dict[tuple[str, int], dict]:
    """(b) ``detect`` at each batch size and mode with the production levers."""
    args, rows = bench.args, {}
    levers = production_levers(args.device) if bench.has_levers else None
    for mode in bench.detectors:
        for batch_size in batch_sizes:
            count = subset(args, bench) if batch_size == 1 else len(bench.samples)
            count = max(count, batch_size)

            def body(mode: str = mode, batch_size: int = batch_size, count: int = count) -> dict[str, Any]:
                bench.set_levers(levers)
                detector = bench.detectors[mode]
                result = measure(detector.detect, args.device, bench.prepared(mode, count), batch_size,
                                 warmups=args.warmups)
                return {**result.fields(), "levers": enabled(levers),
                        "note": "" if levers is not None else "levers n/a"}

            rows[(mode, batch_size)] = run_row(report, "direct", mode, body, mode=mode, batch=batch_size,
                                               images=count)
    if args.detector == "pixellm":
        batch_size = max(batch_sizes)
        rows[(FORCED_MASKS, batch_size)] = run_row(
            report, "direct", FORCED_MASKS,
            lambda: measure(pixellm_forced_masks(bench.detectors["generate"], bench.model), args.device,
                            bench.prepared("generate", len(bench.samples)), batch_size,
                            warmups=args.warmups).fields(),
            mode="generate", batch=batch_size, images=len(bench.samples))
    return rows


def ab_count(args: argparse.Namespace, bench: Bench, batch_size: int) -> int:
    return min(len(bench.samples), max(batch_size, args.ab_images))


def lever_rows(report: Report, bench: Bench, batch_size: int) -> list[Any] | None:
    """(c) eager (all levers off), then eager + one lever at a time: rates and equality. Returns eager's
    first-batch detections (the reference of the compile rows)."""
    args = bench.args
    count = ab_count(args, bench, batch_size)
    fields = dict(mode="generate", batch=batch_size, images=count)
    if args.detector == "pixellm":
        run_row(report, "lever", "levers", _raise(LeverUnavailable("PixelLM's detector has no speed levers")),
                **fields)
        return None
    detector = bench.detectors["generate"]
    eager: dict[str, Any] = {}

    def eager_body(note: str = "A/B base") -> dict[str, Any]:
        if lever_type() is None:
            raise LeverUnavailable("lever not available: workers/read/levers.py is missing")
        bench.set_levers(eager_levers())
        result = measure(detector.detect, args.device, bench.prepared("generate", count), batch_size,
                         warmups=args.warmups)
        eager.update(rate=result.images_per_s, detections=result.first_batch)
        return {**result.fields(), "levers": [], "note": note}

    run_row(report, "lever", "eager (all levers off)", eager_body, **fields)
    for name in speed_levers():

        def body(name: str = name) -> dict[str, Any]:
            if "detections" not in eager:
                raise LeverUnavailable("lever not available: the eager A/B base did not run")
            levers = eager_levers().replace(**{name: True})
            bench.set_levers(levers)
            result = measure(detector.detect, args.device, bench.prepared("generate", count), batch_size,
                             warmups=args.warmups)
            equality = compare(eager["detections"], result.first_batch, detector.dtype)
            return {**result.fields(), "levers": enabled(levers), "eager_images_per_s": eager["rate"],
                    "speedup_vs_eager": result.images_per_s / eager["rate"], "equality": equality,
                    "note": f"{result.images_per_s / eager['rate']:.2f}× eager"}

        run_row(report, "lever", f"lever {name}", body, lever=name, **fields)
    if "detections" in eager:
        again = dict(eager)
        run_row(report, "lever", "eager again (drift check)", lambda: eager_body(f"first: {again['rate']:.2f}/s"),
                **fields)
        eager.update(again)  # the reference stays the first eager run
    return eager.get("detections")


def compile_rows(report: Report, bench: Bench, batch_size: int, reference: list[Any] | None,
                 direct: dict | None) -> None:
    """(e) each compile lever on top of the production levers; compilation in the excluded warm-up."""
    args = bench.args
    count = min(len(bench.samples), max(batch_size, args.compile_images))
    names = compile_fields()
    wanted = None if args.compile_levers in ("", "all") else set(args.compile_levers.split(",")) - {"none"}
    if args.detector == "pixellm" or not names:
        reason = "PixelLM's detector has no speed levers" if args.detector == "pixellm" else \
            "lever not available: no compile levers in workers/read/levers.py"
        run_row(report, "compile", "compile", _raise(LeverUnavailable(reason)), mode="generate", batch=batch_size,
                images=count)
        return
    detector = bench.detectors["generate"]
    for name in (n for n in names if wanted is None or n in wanted):

        def body(name: str = name) -> dict[str, Any]:
            if reference is None:
                raise LeverUnavailable("lever not available: no eager reference (the A/B rows did not run)")
            levers = production_levers(args.device).replace(**{name: True})
            bench.set_levers(levers)
            start = time.perf_counter()
            result = measure(detector.detect, args.device, bench.prepared("generate", count), batch_size,
                             warmups=args.compile_warmups)
            equality = compare(reference, result.first_batch, detector.dtype)
            base = (direct or {}).get("images_per_s")
            return {**result.fields(), "levers": enabled(levers), "equality": equality,
                    "warmup_and_run_s": round(time.perf_counter() - start, 1), "direct_images_per_s": base,
                    "note": f"{result.images_per_s / base:.2f}× no compile" if base else ""}

        run_row(report, "compile", f"compile {name}", body, lever=name, mode="generate", batch=batch_size,
                images=count)


def _raise(exc: Exception) -> Callable[[], dict[str, Any]]:
    def body() -> dict[str, Any]:
        raise exc

    return body


def pixellm_forced_masks(detector: Any, model: Any) -> Callable[[Sequence[Any]], dict]:
    """PixelLM's parts as ``detect`` runs them — vision, the fixed-token generation — then per image the mask
    path on six random [SEG0]…[SEG5] states (one object: 2 scales × 3 tokens), which random weights never
    produce. Returns stage times in ms."""
    from workers.pixellm.decode import PixelRow, generate_rows
    from workers.pixellm.detector import fuse_codebook

    codebook = len(detector.tokens.seg)
    generator = torch.Generator(device=model.device).manual_seed(1)
    finfo = np.finfo(np.float16)

    def elapsed(start: float) -> float:
        synchronize(str(model.device))
        return (time.perf_counter() - start) * 1000.0

    @torch.no_grad()
    def run(batch: Sequence[Any]) -> dict[str, float]:
        timings, start = {}, time.perf_counter()
        tokens, llm_mask, features = model.image_inputs(torch.stack([item.pixels for item in batch]),
                                                        [item.input_size for item in batch])
        timings["vision"] = elapsed(start)
        start = time.perf_counter()
        rows = [PixelRow(index, after) for index, item in enumerate(batch) for after in item.afters]
        generate_rows(model, batch[0].before, tokens, llm_mask, rows, seg_ids=detector.tokens.seg,
                      eos_id=detector.tokens.eos, pad_id=detector.tokens.pad,
                      max_new_tokens=detector.max_new_tokens, stop_at_eos=detector.stop_at_eos)
        timings["language"] = elapsed(start)
        hidden = model.language_model.config.hidden_size
        states = torch.randn((len(batch), codebook, hidden), generator=generator, device=model.device)
        start = time.perf_counter()
        for index in range(len(batch)):
            objects = fuse_codebook(model.seg_projection(states[index].to(model.dtype)), detector.seg_per_scale)
            np.clip(model.low_res_masks(features[index], objects).float().cpu().numpy(), finfo.min, finfo.max)
        timings["masks"] = elapsed(start)
        return timings

    return run


# -- (d) the worker path ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


class Services(contextlib.ExitStack):
    """Broker and database of the worker row: ``--broker-url`` / ``--database-url`` when given; else a private
    redis-server (if on PATH) or Redis on 127.0.0.1:6379, and a fresh PostgreSQL database on 127.0.0.1:5432 or a
    SQLite file. Everything started or created here is stopped or dropped on exit."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        super().__init__()
        self.args, self.workdir = args, workdir
        self.broker_url: str | None = args.broker_url
        self.database_url: str = args.database_url or ""
        self.notes: list[str] = []

    def __enter__(self) -> Services:
        super().__enter__()
        if not self.broker_url:
            self.broker_url = self._redis()
        if not self.database_url:
            self.database_url = self._postgres() or f"sqlite:///{self.workdir / 'worker.sqlite'}"
        return self

    def _redis(self) -> str | None:
        binary = self.args.redis_server
        if binary:
            port = _free_port()
            command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.callback(_stop, process)
            for _ in range(100):
                if _reachable("127.0.0.1", port):
                    self.notes.append(f"private redis-server :{port}")
                    return f"redis://127.0.0.1:{port}/0"
                time.sleep(0.05)
        if _reachable("127.0.0.1", 6379):
            self.notes.append("Redis 127.0.0.1:6379/12")
            return "redis://127.0.0.1:6379/12"
        return None

    def _postgres(self) -> str | None:
        try:
            import psycopg
        except ImportError:
            return None
        name = f"readar_bench_{uuid.uuid4().hex[:10]}"
        try:
            with psycopg.connect(self.args.pg_admin_url, autocommit=True, connect_timeout=3) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error:
            return None
        self.callback(_drop_database, self.args.pg_admin_url, name)
        self.notes.append(f"PostgreSQL database {name}")
        base = self.args.pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        return f"{base}/{name}"


def _stop(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process we started (the worker supervisor passes it on to its children), then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def lever_env(levers: Any) -> dict[str, str]:
    """READAR_* lever variables that give a worker process the same levers (compile off)."""
    levers_class = lever_type()
    if levers_class is None or levers is None:
        return {}
    env = {levers_class.variable(name): "on" if getattr(levers, name) else "off" for name in levers_class.names()}
    env["READAR_COMPILE"] = "off"
    return env


def wait_images(repo: Any, run_id: int, timeout: float, alive: Callable[[], str | None]) -> dict:
    """Poll until no image row of the run is queued or running (every row is planned before the first message
    goes out); returns the status totals. ``alive`` returns a reason when the process doing the work has gone."""
    deadline = time.monotonic() + timeout
    while True:
        totals = repo.status_totals(run_id)
        if not totals.get("queued", 0) + totals.get("running", 0):
            return totals
        if (reason := alive()) is not None:
            totals = repo.status_totals(run_id)  # the work may have ended between the two reads
            if not totals.get("queued", 0) + totals.get("running", 0):
                return totals
            raise RuntimeError(f"{reason} ({totals})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"images not done after {timeout:.0f} s: {totals}")
        time.sleep(0.05)


def wait_run_done(repo: Any, run_id: int, timeout: float, alive: Callable[[], str | None]) -> float:
    """Wait for the run's aggregation to finish (untimed); returns the seconds it took, NaN on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if str(repo.get_run_by_id(run_id).status) == "done":
            return time.monotonic() - start
        if alive() is not None:
            break
        time.sleep(0.1)
    return math.nan


def failed_text(repo: Any, run_id: int, totals: dict) -> str | None:
    if not totals.get("failed"):
        return None
    errors = [row.error for row in repo.images(run_id) if row.error][:1]
    return f"{totals['failed']} image(s) failed: {errors[0] if errors else '?'}"


class Worker:
    """A real ``readar worker`` process (supervisor + one child) with the plug-in detector."""

    def __init__(self, args: argparse.Namespace, services: Services, workdir: Path, batch_size: int,
                 levers: Any) -> None:
        self.args, self.services, self.batch_size = args, services, batch_size
        self.log_path = workdir / "worker.log"
        self.cli_flags = ["--broker-url", services.broker_url, "--database-url", services.database_url,
                          "--object-store-url", str(workdir / "objects"), "--work-dir", str(workdir / "work")]
        self.env = {**os.environ, **bench_geometry(args).env(), **lever_env(levers),
                    "READAR_PLUGINS": "bench.gpu_plugin",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                    "READAR_DEVICE": args.device}
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        device = ["--device", "cpu"] if args_cpu(self.args) else []
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scheduler", *self.cli_flags, "worker", *device, "--batch-size",
             str(self.batch_size), "--processes", "1"],
            env=self.env, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def alive(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"the worker exited ({self.process.returncode}); log tail:\n{self.log_tail()}"
        return None

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def submit(self, root: Path, run_name: str, max_per_class: int = -1) -> None:
        """``readar submit`` in this process (so no interpreter start-up sits in the timed window), with the
        plug-in geometry in the environment as the worker has it."""
        from scheduler.cli import cli

        plugin_env = {k: v for k, v in self.env.items() if k.startswith("READAR_BENCH_") or k == "READAR_PLUGINS"}
        args = [*self.cli_flags, "submit", "--mvtec-root", str(root), "--detector", f"{self.args.detector}_bench",
                "--decode-mode", "generate", "--batch-size", str(self.batch_size), "--device", self.args.device,
                "--run-name", run_name, "--max-per-class", str(max_per_class)]
        output = io.StringIO()
        try:
            with patched_environ(plugin_env), contextlib.redirect_stdout(output), \
                    contextlib.redirect_stderr(output):
                cli.main(args=args, prog_name="readar", standalone_mode=False)
        except Exception as exc:
            raise RuntimeError(f"readar submit failed: {exc}\n{output.getvalue()[-2000:]}") from exc

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.log.close()


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Any:
    """``values`` in os.environ for the block only (an in-process submit reads its settings from there)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def args_cpu(args: argparse.Namespace) -> bool:
    return not args.device.startswith("cuda")


class WorkerPath(contextlib.ExitStack):
    """The services and the ``readar worker`` process of row (d). On a GPU machine started before row (a), so
    that the process's start-up (interpreter, imports; no GPU work until its first task) overlaps the direct rows;
    closed (worker stopped, services gone) right after its row. A start that fails is reported by the row."""

    def __init__(self, bench: Bench, root: Path, workdir: Path, batch_size: int) -> None:
        super().__init__()
        self.bench, self.root, self.workdir, self.batch_size = bench, root, workdir, batch_size
        self.levers = production_levers(bench.args.device) if bench.has_levers else None
        self.error: Exception | None = None

    def start(self) -> WorkerPath:
        from storage.database import Database
        from storage.repository import Repository

        try:
            self.services = self.enter_context(Services(self.bench.args, self.workdir))
            if not self.services.broker_url:
                raise RuntimeError("no broker: pass --broker-url or --redis-server, or run Redis on 127.0.0.1:6379")
            database = Database(self.services.database_url)
            database.migrate()  # before the worker and submit race to do it
            self.callback(database.dispose)
            self.repo = Repository(database)
            self.worker = Worker(self.bench.args, self.services, self.workdir, self.batch_size, self.levers)
            self.callback(self.worker.stop)
            self.worker.start()
        except Exception as exc:  # noqa: BLE001 - the worker row reports it
            self.error = exc
        return self

    def measure(self, direct: dict | None) -> dict[str, Any]:
        """Warm-up run (the model is built in the worker), then the timed run: submit → last image row done."""
        if self.error is not None:
            raise self.error
        args, repo, worker = self.bench.args, self.repo, self.worker
        warm = time.perf_counter()
        worker.submit(self.root, "bench-warmup", max_per_class=self.batch_size)
        warm_run = repo.get_run("bench-warmup")
        wait_images(repo, warm_run.id, args.worker_timeout, worker.alive)
        wait_run_done(repo, warm_run.id, args.aggregation_timeout, worker.alive)
        warmup_s = time.perf_counter() - warm
        start = time.perf_counter()
        worker.submit(self.root, "bench-worker")
        run = repo.get_run("bench-worker")
        totals = wait_images(repo, run.id, args.worker_timeout, worker.alive)
        seconds = time.perf_counter() - start
        if (failed := failed_text(repo, run.id, totals)) is not None:
            raise RuntimeError(failed)
        aggregation = wait_run_done(repo, run.id, args.aggregation_timeout, worker.alive)
        return ratio_fields(totals.get("done", 0) / seconds, direct, {
            "levers": enabled(self.levers), "services": self.services.notes or ["given URLs"],
            "warmup_s": round(warmup_s, 1), "aggregation_s_untimed": round(aggregation, 1)})


def worker_row(report: Report, path: WorkerPath, direct: dict | None) -> None:
    """(d) a real Celery worker process, timed from submit to the last image done; then the process stops."""
    with path:
        run_row(report, "worker", "worker (Celery process)", lambda: path.measure(direct), mode="generate",
                batch=path.batch_size, images=len(path.bench.samples))


def embedded_row(report: Report, bench: Bench, root: Path, workdir: Path, batch_size: int,
                 direct: dict | None) -> None:
    """(d) the embedded runner (SQLite, local objects) with the direct detector, timed to the last image done."""
    args = bench.args
    count = len(bench.samples)

    def body() -> dict[str, Any]:
        from scheduler.planner import RunRequest, plan_run
        from scheduler.runner import execute_run
        from storage.database import Database
        from storage.objects import ObjectStore
        from storage.repository import Repository

        levers = production_levers(args.device) if bench.has_levers else None
        bench.set_levers(levers)
        detector = bench.detectors["generate"]
        database = Database(f"sqlite:///{workdir / 'embedded.sqlite'}")
        database.migrate()
        repo = Repository(database)
        store = ObjectStore(str(workdir / "embedded-objects"))

        def execute(name: str, max_per_class: int) -> tuple[float, dict, float]:
            request = RunRequest(mvtec_root=root, detector=detector.name, detector_config=detector.config.public(),
                                 max_per_class=max_per_class, run_name=name)
            run, _ = plan_run(repo, request, model_fingerprint=None, uses_ground_truth_names=False,
                              settings_public={})
            watch: dict[str, Any] = {}
            returned = threading.Event()
            watcher_repo = Repository(Database(f"sqlite:///{workdir / 'embedded.sqlite'}"))

            def watcher() -> None:
                """Stamps the moment the last image row is done (execute_run goes on to aggregate)."""
                try:
                    watch["totals"] = wait_images(watcher_repo, run.id, args.worker_timeout, lambda: (
                        "execute_run returned with images pending" if returned.is_set() else None))
                    watch["end"] = time.perf_counter()
                except Exception as exc:  # noqa: BLE001 - reported by the row
                    watch["error"] = exc

            thread = threading.Thread(target=watcher, daemon=True)
            start = time.perf_counter()
            thread.start()
            log = io.StringIO()
            try:
                with contextlib.redirect_stderr(log):
                    outcome = execute_run(repo, store, run, detector, batch_size=batch_size, lease_seconds=3600,
                                          max_attempts=1, device=args.device)
            finally:
                finished = time.perf_counter()
                returned.set()
                thread.join(timeout=args.worker_timeout)
                watcher_repo.db.dispose()
            if outcome.interrupted:
                raise RuntimeError(f"execute_run stopped early: {log.getvalue()[-1500:]}")
            if "error" in watch:
                raise watch["error"]
            return watch["end"] - start, watch["totals"], finished - watch["end"]

        try:
            if args.warmups:
                execute("bench-embedded-warmup", batch_size)
            seconds, totals, aggregation = execute("bench-embedded", -1)
            run = repo.get_run("bench-embedded")
            if (failed := failed_text(repo, run.id, totals)) is not None:
                raise RuntimeError(failed)
        finally:
            database.dispose()
        return ratio_fields(totals.get("done", 0) / seconds, direct, {"levers": enabled(levers),
                                                      "aggregation_s_untimed": round(aggregation, 1)})

    run_row(report, "embedded", "embedded runner (SQLite)", body, mode="generate", batch=batch_size, images=count)


def ratio_fields(rate: float, direct: dict | None, extra: dict[str, Any]) -> dict[str, Any]:
    """images/s of a path and its ratio to the direct generate row at the same batch (target ≥ 0.9)."""
    direct_rate = (direct or {}).get("images_per_s")
    ratio = rate / direct_rate if direct_rate else None
    note = f"{ratio:.2f} of direct (target ≥ 0.9)" if ratio is not None else "no direct row to compare"
    return {"images_per_s": rate, "ms_per_image": 1000 / rate, "direct_images_per_s": direct_rate,
            "ratio_to_direct": ratio, "note": note, **extra}


# -- main -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (CPU smoke test of this script)")
    parser.add_argument("--detector", choices=DETECTORS, default="read")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (the worker builds the same model)")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--images", type=int, default=256, help="generated PNGs (every batch>1 row uses all)")
    parser.add_argument("--subset", type=int, default=None,
                        help="images of the original loop and the batch-1 rows (default 32; --tiny: 4)")
    parser.add_argument("--ab-images", type=int, default=None,
                        help="images per lever A/B row, at the largest batch (default 64; --tiny: one batch)")
    parser.add_argument("--compile-images", type=int, default=None,
                        help="images per compile row (default 64; --tiny: one batch)")
    parser.add_argument("--compile-levers", default="all", help="all, none, or a comma list of compile levers")
    parser.add_argument("--warmups", type=int, default=None,
                        help="untimed runs of the first batch before a row (default: 1 on CUDA, 0 on the CPU, "
                        "where there are no kernels to load and CI time counts)")
    parser.add_argument("--compile-warmups", type=int, default=None,
                        help="untimed runs of the first batch before a compile row (default 2; --tiny: 1)")
    parser.add_argument("--new-tokens", type=int, default=8, help="PixelLM only: fixed generate length")
    parser.add_argument("--worker-batch", type=int, default=None,
                        help="batch of the worker rows (default: the largest batch size; 0 = skip them)")
    parser.add_argument("--broker-url", default=None, help="default: private redis-server, else 127.0.0.1:6379")
    parser.add_argument("--database-url", default=None,
                        help="default: a fresh database on --pg-admin-url when reachable, else SQLite")
    parser.add_argument("--pg-admin-url",
                        default=os.environ.get("READAR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--worker-timeout", type=float, default=900, help="seconds a worker step may take")
    parser.add_argument("--aggregation-timeout", type=float, default=300,
                        help="seconds to wait (untimed) for a worker run's aggregation")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"),
                        help="redis-server binary for a private broker (default: the one on PATH)")
    default_out = Path(os.environ["OUT"]) / "gpu_throughput.json" if os.environ.get("OUT") else \
        Path("gpu_throughput.json")
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    args.batch_sizes = sorted({int(v) for v in str(args.batch_sizes).split(",") if v.strip()})
    apply_size_defaults(args)
    return args


def apply_size_defaults(args: argparse.Namespace) -> None:
    """Row sizes left unset: the H200 budget (≈ 8 minutes) at full size; the least that still runs every row
    kind with --tiny (CI time on two CPU cores)."""
    largest = max(args.batch_sizes)
    defaults = {"subset": 4, "ab_images": largest, "compile_images": largest, "compile_warmups": 1} if args.tiny \
        else {"subset": 32, "ab_images": 64, "compile_images": 64, "compile_warmups": 2}
    defaults["warmups"] = 1 if args.device.startswith("cuda") else 0
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine_info(args.device)
    dtype = resolve_dtype(args.device, args.dtype)
    header = {"title": f"{TITLES[args.detector]} at H200 speed", "machine": info,
              "command": "python bench/gpu_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "dtype": str(dtype)}
    print(f"## {header['title']} — {info.get('gpu') or platform.processor() or 'CPU'}\n")
    print(f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}, "
          f"{info['cpu_count']} CPUs, dtype {dtype}; JSON: {args.out}")
    header["sam_attention_kernels"] = fused_attention_probe(args.device, dtype)
    print(f"fused SDPA kernels for the folded SAM attention: {header['sam_attention_kernels']}")
    with tempfile.TemporaryDirectory(prefix="readar-gpu-bench-") as temporary:
        workdir = Path(temporary)
        root = write_dataset(workdir / "mvtec", args.images, args.seed)
        samples = load_samples(root)
        bench = build_bench(args, _mkdir(workdir / "tokenizer"), samples)
        header.update(geometry=bench.parts.description, build_seconds=round(bench.build_seconds, 1),
                      levers_available=bench.has_levers, answer_schedule=args.detector != "pixellm")
        print(f"model: {'tiny' if args.tiny else 'full size'} — {bench.parts.description}; built in "
              f"{bench.build_seconds:.1f} s; levers on detector: {bench.has_levers}\n")
        report = Report(args.out, header, STAGES[args.detector])
        report.write()
        largest = max(args.batch_sizes)
        worker_batch = largest if args.worker_batch is None else args.worker_batch
        # On a GPU machine the worker starts now, its start-up overlapping the direct rows; on the CPU it would
        # compete with them for the cores, so it starts right before its row.
        early = args.device.startswith("cuda")
        with contextlib.ExitStack() as guard:  # the worker process stops even if a row escapes (Ctrl-C)
            path = None
            if worker_batch:
                path = guard.enter_context(WorkerPath(bench, root, _mkdir(workdir / "worker"), worker_batch))
                if early:
                    path.start()
            print(report.table_header(), flush=True)
            row_original(report, bench)
            direct = direct_rows(report, bench, args.batch_sizes)
            reference = lever_rows(report, bench, largest)
            if path is not None:
                bench._prepared.clear()  # the worker rows prepare their own; free the host memory
                direct_row = direct.get(("generate", worker_batch))
                if not early:
                    path.start()
                worker_row(report, path, direct_row)
                embedded_row(report, bench, root, _mkdir(workdir / "embedded"), worker_batch, direct_row)
        compile_rows(report, bench, largest, reference, direct.get(("generate", largest)))
    header["wall_seconds"] = round(time.perf_counter() - started, 1)
    report.write()
    ratios = [f"{row['label']}: {row['ratio_to_direct']:.2f}" for row in report.rows
              if row.get("ratio_to_direct") is not None]
    print(f"\nworker/direct ratios (target ≥ 0.9): {', '.join(ratios) or 'none measured'}")
    print(f"wall time {header['wall_seconds']:.0f} s; JSON: {args.out}")
    return 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
