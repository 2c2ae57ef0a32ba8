"""The original READAR output layout: one folder per test image, read as (category, defect, logits, mask).

Layout under ``pred_root``::

    <any folder name>/metadata.json        {"image_path": ".../<category>/test/<defect>/<file>", ...}
    <any folder name>/pred_logits_*.npy    raw logits (H, W) at the image's resolution; several → per-pixel max

``image_path`` may come from another machine: only its last four parts are used, resolved against the MVTec
root; the mask is ``<mvtec_root>/<category>/ground_truth/<defect>/<stem>_mask.png``. Every problem raises
:class:`~metrics.errors.LegacyInputError` (or a :class:`~metrics.errors.GroundTruthError`) so that the caller
skips the image with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from metrics.errors import GroundTruthError, LegacyInputError
from metrics.groundtruth import load_mask

GOOD = "good"
METADATA_FILE = "metadata.json"
LOGIT_PATTERN = "pred_logits_*.npy"


@dataclass(frozen=True)
class LegacyImage:
    """One prediction folder, resolved.

    folder: the prediction folder; logit_paths: its pred_logits_*.npy files (sorted, at least one);
    mask_path: ground-truth PNG, None for ``good`` images.
    """

    folder: Path
    category: str
    defect: str
    file_name: str
    logit_paths: tuple[Path, ...]
    mask_path: Path | None

    @property
    def image_key(self) -> str:
        """``<category>/test/<defect>/<file>``, the image's path relative to the MVTec root."""
        return f"{self.category}/test/{self.defect}/{self.file_name}"


@dataclass(frozen=True)
class Skip:
    """An image left out of the metrics, and why (folder, category when known, reason)."""

    folder: str
    category: str | None
    reason: str


def image_tail(image_path: str) -> tuple[str, str, str]:
    """(category, defect, file) from the tail ``<category>/test/<defect>/<file>`` of any (foreign) path."""
    parts = [part for part in PurePosixPath(str(image_path).replace("\\", "/")).parts if part not in ("/", "")]
    if len(parts) < 4 or parts[-3] != "test":
        raise LegacyInputError(
            f"image_path {image_path!r} does not end in <category>/test/<defect>/<file>; "
            "point metadata.json at an image of an MVTec-format test split"
        )
    category, defect, file_name = parts[-4], parts[-2], parts[-1]
    for name in (category, defect, file_name):
        if name in (".", "..") or ":" in name:
            raise LegacyInputError(f"image_path {image_path!r} has an unsafe part {name!r}")
    return category, defect, file_name


def read_folder(folder: Path, mvtec_root: Path) -> LegacyImage:
    """Resolve one prediction folder (metadata, logit files, mask path) without loading any array."""
    metadata_path = folder / METADATA_FILE
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LegacyInputError(f"{metadata_path} is missing; every prediction folder needs one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacyInputError(f"{metadata_path} is not readable JSON: {exc}") from exc
    image_path = metadata.get("image_path") if isinstance(metadata, dict) else None
    if not isinstance(image_path, str) or not image_path:
        raise LegacyInputError(f"{metadata_path} has no string 'image_path'")
    category, defect, file_name = image_tail(image_path)
    logit_paths = tuple(sorted(folder.glob(LOGIT_PATTERN)))
    if not logit_paths:
        raise LegacyInputError(f"{folder} has no {LOGIT_PATTERN} file for {category}/test/{defect}/{file_name}")
    mask_path = None
    if defect != GOOD:
        mask_path = mvtec_root / category / "ground_truth" / defect / f"{PurePosixPath(file_name).stem}_mask.png"
        if not mask_path.is_file():
            raise LegacyInputError(
                f"anomalous image {category}/test/{defect}/{file_name} has no mask: {mask_path} is missing"
            )
    return LegacyImage(folder, category, defect, file_name, logit_paths, mask_path)


def discover(
    pred_root: Path, mvtec_root: Path, *, classes: Collection[str] | None = None,
) -> tuple[list[LegacyImage], list[Skip]]:
    """Every prediction folder under ``pred_root`` (sorted), resolved; folders that cannot be, as skips.

    classes: keep only these categories (None keeps all). A folder whose category cannot be read is skipped
    whatever ``classes`` says.
    """
    if not pred_root.is_dir():
        raise LegacyInputError(f"prediction root {pred_root} is not a folder")
    images: list[LegacyImage] = []
    skips: list[Skip] = []
    for folder in sorted(p for p in pred_root.iterdir() if p.is_dir()):
        try:
            image = read_folder(folder, mvtec_root)
        except LegacyInputError as exc:
            category = _category_hint(folder)
            if classes is None or category is None or category in classes:
                skips.append(Skip(str(folder), category, str(exc)))
            continue
        if classes is None or image.category in classes:
            images.append(image)
    return images, skips


def _category_hint(folder: Path) -> str | None:
    """The category of a folder that failed later than its image_path, for per-category skip counts."""
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        return image_tail(metadata["image_path"])[0]
    except Exception:  # noqa: BLE001 - only a hint: any failure means "unknown"
        return None


def _load_logits(path: Path) -> np.ndarray:
    """One pred_logits file → finite float16/float32 (H, W)."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise LegacyInputError(f"{path} is not a readable .npy file: {exc}") from exc
    if magic[:2] == b"PK":
        raise LegacyInputError(f"{path} holds an .npz archive, not a single array; save one array with np.save")
    if magic != b"\x93NUMPY":
        raise LegacyInputError(f"{path} is not a readable .npy file (no NumPy header); re-save it with np.save")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise LegacyInputError(f"{path} is not a plain numeric .npy (pickled objects are refused): {exc}") from exc
    except (OSError, EOFError) as exc:
        raise LegacyInputError(f"{path} is not a readable .npy file: {exc}") from exc
    if not isinstance(loaded, np.ndarray):
        if hasattr(loaded, "close"):
            loaded.close()
        raise LegacyInputError(f"{path} holds {type(loaded).__name__}, not a single array; save one array")
    if loaded.dtype.kind != "f":
        raise LegacyInputError(f"{path} holds {loaded.dtype} values; raw logits must be floating point")
    while loaded.ndim > 2 and loaded.shape[0] == 1:
        loaded = loaded[0]
    if loaded.ndim != 2 or loaded.size == 0:
        raise LegacyInputError(f"{path} has shape {loaded.shape}; expected a (H, W) logit map")
    if loaded.dtype not in (np.float16, np.float32):
        loaded = loaded.astype(np.float32)  # float64 maps are rounded to float32 (see metrics.binning)
    low, high = float(loaded.min()), float(loaded.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise LegacyInputError(f"{path} contains NaN or inf logits; re-run the prediction for this image")
    return loaded


def load_prediction(image: LegacyImage) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits float16/float32 (H, W), per-pixel max over the image's files; mask bool (H, W) or None)."""
    logits = _load_logits(image.logit_paths[0])
    for path in image.logit_paths[1:]:
        other = _load_logits(path)
        if other.shape != logits.shape:
            raise LegacyInputError(
                f"{path} is {other.shape} but {image.logit_paths[0]} is {logits.shape}; maps of one image must agree"
            )
        logits = np.maximum(logits.astype(np.float32, copy=False), other.astype(np.float32, copy=False))
    mask = None
    if image.mask_path is not None:
        try:
            mask = load_mask(image.mask_path, logits.shape, image_path=image.image_key)
        except GroundTruthError as exc:
            raise LegacyInputError(str(exc)) from exc
    return logits, mask
