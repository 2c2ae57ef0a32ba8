"""Benchmark of `readar eval` on a synthetic MVTec-AD-shaped prediction set in the original READAR layout.

1. Writes (once; reused when present) float32 logit maps at native resolution, 8-connected blob masks and
   metadata.json files for the 15 categories of shared/MVTEC.md (``--scale`` shrinks the image counts).
2. Runs `readar eval` (as ``python -m scheduler.commands.eval``) in a subprocess: wall time, peak RSS.
3. On one category (hazelnut), times a faithful re-implementation of the original evaluator (stack every map,
   sklearn over all pixels, a per-threshold region loop) against ours, and prints the ratio and the largest
   difference of the metric values.

    python bench/metrics_bench.py --full --out /tmp/readar-bench      # 1,725 images, ~6.4 GB of logits
    python bench/metrics_bench.py --scale 0.25                         # quarter of the images
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np

# category: (side in px, good images, {defect: images}) — shared/MVTEC.md
MVTEC_TEST = {
    "bottle": (900, 20, {"broken_large": 20, "broken_small": 22, "contamination": 21}),
    "cable": (1024, 58, {"bent_wire": 13, "cable_swap": 12, "combined": 11, "cut_inner_insulation": 14,
                         "cut_outer_insulation": 10, "missing_cable": 12, "missing_wire": 10, "poke_insulation": 10}),
    "capsule": (1000, 23, {"crack": 23, "faulty_imprint": 22, "poke": 21, "scratch": 23, "squeeze": 20}),
    "carpet": (1024, 28, {"color": 19, "cut": 17, "hole": 17, "metal_contamination": 17, "thread": 19}),
    "grid": (1024, 21, {"bent": 12, "broken": 12, "glue": 11, "metal_contamination": 11, "thread": 11}),
    "hazelnut": (1024, 40, {"crack": 18, "cut": 17, "hole": 18, "print": 17}),
    "leather": (1024, 32, {"color": 19, "cut": 19, "fold": 17, "glue": 19, "poke": 18}),
    "metal_nut": (700, 22, {"bent": 25, "color": 22, "flip": 23, "scratch": 23}),
    "pill": (800, 26, {"color": 25, "combined": 17, "contamination": 21, "crack": 26, "faulty_imprint": 19,
                       "pill_type": 9, "scratch": 24}),
    "screw": (1024, 41, {"manipulated_front": 24, "scratch_head": 24, "scratch_neck": 25, "thread_side": 23,
                         "thread_top": 23}),
    "tile": (840, 33, {"crack": 17, "glue_strip": 18, "gray_stroke": 16, "oil": 18, "rough": 15}),
    "toothbrush": (1024, 12, {"defective": 30}),
    "transistor": (1024, 60, {"bent_lead": 10, "cut_lead": 10, "damaged_case": 10, "misplaced": 10}),
    "wood": (1024, 19, {"color": 8, "combined": 11, "hole": 10, "liquid": 10, "scratch": 21}),
    "zipper": (1024, 32, {"broken_teeth": 19, "combined": 16, "fabric_border": 17, "fabric_interior": 16,
                          "rough": 17, "split_teeth": 18, "squeezed_teeth": 16}),
}
WALL_TARGET_S = 60.0
RSS_TARGET_MB = 2048.0
NAIVE_CATEGORY = "hazelnut"


# ----------------------------------------------------------------------------------------------- data set
def _blob_mask(rng: np.random.Generator, side: int) -> np.ndarray:
    """1–3 filled ellipses (each 8-connected) of 1–8 % of the side in radius."""
    yy, xx = np.ogrid[:side, :side]
    mask = np.zeros((side, side), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.integers(0, side, size=2)
        ry, rx = rng.uniform(0.01, 0.08, size=2) * side
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def _smooth_field(rng: np.random.Generator, side: int) -> np.ndarray:
    """Low-frequency noise (side, side) float32: a 16×16 grid, bilinearly upsampled (like SAM's low-res maps)."""
    import torch
    import torch.nn.functional as F

    grid = torch.from_numpy(rng.standard_normal((1, 1, 16, 16), dtype=np.float32))
    return F.interpolate(grid, (side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def _write_category(job: tuple[str, float, str, str]) -> int:
    from PIL import Image

    category, scale, pred_root, mvtec_root = job
    side, good, defects = MVTEC_TEST[category]
    rng = np.random.default_rng(zlib.crc32(category.encode()))
    written = 0
    for defect, count in {"good": good, **defects}.items():
        for index in range(max(1, round(count * scale))):
            mask = _blob_mask(rng, side) if defect != "good" else np.zeros((side, side), dtype=bool)
            logits = -3.0 + 1.5 * _smooth_field(rng, side) + 0.7 * rng.standard_normal((side, side), np.float32)
            logits += 3.0 * mask
            folder = Path(pred_root) / f"{category}__{defect}__{index:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            image_path = f"/home/someone/data/mvtec_anomaly_detection/{category}/test/{defect}/{index:03d}.png"
            (folder / "metadata.json").write_text(json.dumps({"image_path": image_path}))
            np.save(folder / "pred_logits_0.npy", logits.astype(np.float32))
            if defect != "good":
                mask_path = Path(mvtec_root) / category / "ground_truth" / defect / f"{index:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)
            written += 1
    return written


def ensure_dataset(root: Path, scale: float) -> tuple[Path, Path, int]:
    """Write the synthetic set under root/scale-<scale>/ unless a complete one is there; returns its roots."""
    base = root / f"scale-{scale:g}"
    pred_root, mvtec_root, done = base / "pred", base / "mvtec", base / "COMPLETE"
    if done.exists():
        return pred_root, mvtec_root, int(done.read_text())
    started = time.perf_counter()
    jobs = [(c, scale, str(pred_root), str(mvtec_root)) for c in MVTEC_TEST]
    with Pool(2) as pool:
        total = sum(pool.imap_unordered(_write_category, jobs))
    done.write_text(str(total))
    print(f"generated {total} images in {time.perf_counter() - started:.0f} s under {base}")
    return pred_root, mvtec_root, total


# ------------------------------------------------------------------------------------------- measurement
def _tree_rss_kb(pid: int) -> int:
    """Sum of VmRSS over a process and its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(child) for child in (task / "children").read_text().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measure(command: list[str]) -> dict[str, float]:
    """Run a command; wall seconds, peak summed RSS of its process tree (sampled), largest single RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{stdout}\n{stderr}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"wall_s": wall, "tree_rss_mb": peak[0] / 1024.0, "largest_rss_mb": largest, "stdout": stdout}


# --------------------------------------------------------------------------- the original approach, naive
def naive_evaluate(pred_root: Path, mvtec_root: Path, category: str) -> dict[str, float]:
    """The original evaluator's way: stack every map and mask of the category, sklearn over all pixels,
    200 thresholds × every region for PRO, the official sort-based PRO_hard. Probabilities in float64."""
    from PIL import Image
    from scipy.special import expit
    from skimage.measure import label
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    maps, masks, labels = [], [], []
    for folder in sorted(pred_root.glob(f"{category}__*")):
        image_path = json.loads((folder / "metadata.json").read_text())["image_path"]
        defect, file_name = image_path.split("/")[-2:]
        logits = np.load(folder / "pred_logits_0.npy", allow_pickle=False)
        if defect == "good":
            mask = np.zeros(logits.shape, dtype=bool)
        else:
            mask_file = mvtec_root / category / "ground_truth" / defect / f"{Path(file_name).stem}_mask.png"
            mask = np.asarray(Image.open(mask_file)) > 0
        maps.append(expit(logits.astype(np.float64)))
        masks.append(mask)
        labels.append(defect != "good")
    scores = np.stack(maps)
    truth = np.stack(masks)
    del maps, masks
    result = {"iAUROC": roc_auc_score(labels, scores.reshape(len(labels), -1).max(axis=1))}
    flat_scores, flat_truth = scores.ravel(), truth.ravel()
    result["pAUROC"] = roc_auc_score(flat_truth, flat_scores)
    precision, recall, _ = precision_recall_curve(flat_truth, flat_scores)
    result["F1_max"] = float(np.nanmax(2 * precision * recall / (precision + recall + 1e-300)))
    regions = []
    for index, mask in enumerate(truth):
        labelled = label(mask, connectivity=2)
        for value in range(1, labelled.max() + 1):
            regions.append(np.flatnonzero(labelled == value) + index * mask.size)
    normal = ~flat_truth
    normal_total = normal.sum()
    points = []
    for threshold in np.linspace(flat_scores.max(), flat_scores.min(), 200):
        flagged = flat_scores >= threshold
        pro = np.mean([flagged[region].mean() for region in regions])
        points.append(((flagged & normal).sum() / normal_total, pro))
    points.sort()
    x = [f for f, _ in points if f <= 0.3]
    y = [p for f, p in points if f <= 0.3]
    if not x or x[0] > 0:
        x, y = [0.0, *x], [0.0, *y]
    if x[-1] < 0.3:
        nf, npro = next((f, p) for f, p in points if f > 0.3)
        y.append(y[-1] + (npro - y[-1]) * (0.3 - x[-1]) / (nf - x[-1]))
        x.append(0.3)
    result["PRO"] = float(np.trapezoid(y, x) / 0.3)
    # Official MVTec AD PRO: per-pixel increments, sorted by score, ties merged.
    fpr_step = np.where(flat_truth, 0.0, 1.0 / normal_total)
    pro_step = np.zeros(flat_scores.size)
    for region in regions:
        pro_step[region] = 1.0 / (region.size * len(regions))
    order = np.argsort(flat_scores, kind="mergesort")[::-1]
    sorted_scores = flat_scores[order]
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fprs = np.concatenate(([0.0], np.minimum(np.cumsum(fpr_step[order])[keep], 1), [1.0]))
    pros = np.concatenate(([0.0], np.minimum(np.cumsum(pro_step[order])[keep], 1), [1.0]))
    inside = fprs <= 0.3
    area = np.trapezoid(pros[inside], fprs[inside])
    last = np.flatnonzero(inside)[-1]
    if fprs[last] < 0.3:
        cut = pros[last] + (pros[last + 1] - pros[last]) * (0.3 - fprs[last]) / (fprs[last + 1] - fprs[last])
        area += (cut + pros[last]) / 2 * (0.3 - fprs[last])
    result["PRO_hard"] = float(area / 0.3)
    return {name: float(value) for name, value in result.items()}


# ------------------------------------------------------------------------------------------------- main
def _eval_command(pred_root: Path, mvtec_root: Path, out_csv: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "scheduler.commands.eval", "--pred-root", str(pred_root),
            "--mvtec-root", str(mvtec_root), "--out-csv", str(out_csv), *extra]


def _category_row(csv_path: Path, category: str) -> dict[str, float]:
    with csv_path.open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["scope"] == "category" and r["category"] == category)
    return {name: float(row[name]) for name in ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of each folder's images (default 0.25)")
    parser.add_argument("--full", action="store_true", help="all 1,725 images (same as --scale 1)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "readar-metrics-bench",
                        help="where the synthetic set is written (reused between runs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true", help="do not run the original-approach comparison")
    parser.add_argument("--naive-worker", nargs=3, metavar=("PRED", "MVTEC", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_worker:
        pred, mvtec, out = args.naive_worker
        Path(out).write_text(json.dumps(naive_evaluate(Path(pred), Path(mvtec), NAIVE_CATEGORY)))
        return
    scale = 1.0 if args.full else args.scale
    pred_root, mvtec_root, total = ensure_dataset(args.out, scale)
    out_csv = args.out / f"metrics-scale-{scale:g}.csv"
    full = measure(_eval_command(pred_root, mvtec_root, out_csv, "--workers", str(args.workers)))
    print(f"\nreadar eval, {total} images (scale {scale:g}), {args.workers} workers, PRO_hard + defect rows:")
    print(f"  wall {full['wall_s']:.1f} s (target {WALL_TARGET_S:.0f} s)   peak RSS: process tree "
          f"{full['tree_rss_mb']:.0f} MB, largest process {full['largest_rss_mb']:.0f} MB "
          f"(target {RSS_TARGET_MB:.0f} MB)")
    if args.skip_naive:
        return
    ours_csv = args.out / "metrics-naive-category.csv"
    ours = measure(_eval_command(pred_root, mvtec_root, ours_csv, "--classes", NAIVE_CATEGORY, "--workers", "1"))
    naive_json = args.out / "naive.json"
    naive = measure([sys.executable, __file__, "--naive-worker", str(pred_root), str(mvtec_root), str(naive_json)])
    naive_values = json.loads(naive_json.read_text())
    ours_values = _category_row(ours_csv, NAIVE_CATEGORY)
    print(f"\n{NAIVE_CATEGORY} only ({sum(1 for _ in pred_root.glob(NAIVE_CATEGORY + '__*'))} images), 1 process:")
    print(f"  {'':<18}{'wall s':>8}{'tree RSS MB':>13}")
    print(f"  {'streaming (ours)':<18}{ours['wall_s']:>8.1f}{ours['tree_rss_mb']:>13.0f}")
    print(f"  {'original approach':<18}{naive['wall_s']:>8.1f}{naive['tree_rss_mb']:>13.0f}")
    print(f"  ratio original/ours: {naive['wall_s'] / ours['wall_s']:.1f}× time, "
          f"{naive['tree_rss_mb'] / ours['tree_rss_mb']:.1f}× memory")
    for name, value in ours_values.items():
        difference = abs(value - naive_values[name])
        print(f"  {name:<9} ours {value:.6f}  original {naive_values[name]:.6f}  |diff| {difference:.2e}")
    if any(math.isnan(v) for v in ours_values.values()):
        print("  warning: NaN metric in our row")


if __name__ == "__main__":
    main()
