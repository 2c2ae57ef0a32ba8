"""The dataset index: an MVTec-AD-format folder parsed once into a table of test-image rows.

Layout (see shared/MVTEC.md): ``<root>/<category>/test/<defect>/<image>`` with masks at
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``; ``good`` test images have no mask (all-normal).

Every image/mask pair is checked up front from file headers only (a full decode of every image would be too
slow; workers decode fully and fail single rows on corrupt pixel data). Problems with one image never stop the
index: they are recorded on that image's row as ``status`` (``queued`` / ``skipped`` / ``failed``: the row is
the :class:`~storage.repository.PlannedImage` the run stores) plus a ``reason`` that says what to fix. Problems with the dataset as a whole (missing root, no categories, unknown category, bad
arguments) raise :class:`DatasetError`.

Decisions:
- Extensions ``.png``, ``.jpg``, ``.jpeg`` in any letter case; hidden files (``.*``) and other files are ignored.
  The ``_mask.png`` name is matched case-insensitively as well.
- Masks may be in any mode that reduces to "defect where any colour channel is > 0" (8-bit, 16-bit, RGB, palette;
  see :func:`workers.images.load_mask`). Modes with no such meaning (e.g. CMYK) fail the row.
- A category whose test folder holds no images is left out of ``categories``, listed in ``empty_categories`` and
  reported in ``warnings``; the index fails only when no selected category holds any image.
- ``max_per_class`` applies after ``exclude_defects``: the first N rows of each category in index order.
- Nothing may resolve outside the root: files or folders reached through a symlink whose target lies outside
  the root are ``failed``; :func:`resolve_inside` refuses ``..``, absolute paths and escaping links.
- A path the workers' resolver would refuse (a backslash in a file or folder name: it could name another file)
  fails its row here, with the reason, rather than when a worker reaches it.
- Pixel budget: an image whose header declares more than ``max_image_pixels`` pixels (READAR_MAX_IMAGE_PIXELS) is
  ``failed``; decoding it would cost gigabytes (workers check again when they decode).
- ``<category>/train/good`` (the reference images of reference-based detectors) that is a symlink loop or leads out
  of the root is reported in ``warnings``; the workers' lookup (:func:`storage.paths.reference_folder`) refuses
  it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from storage.models import ImageStatus
from storage.paths import PathEscapeError, name_problem, resolve_inside
from storage.repository import PlannedImage
from workers.images import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GOOD = "good"
MASK_SUFFIX = "_mask.png"
# READAR_MAX_IMAGE_PIXELS unless the caller passes its settings' value.

# Pillow modes whose pixels reduce to "defect where any colour channel > 0" (workers.images.load_mask).
MASK_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "F"}
) | frozenset({"I;16", "I;16B", "I;16L", "I;16N"})

LAYOUT_HELP = (
    "expected an MVTec-AD-format folder: <root>/<category>/test/<defect>/<image>.png with masks at "
    "<root>/<category>/ground_truth/<defect>/<image>_mask.png (e.g. <root>/bottle/test/crack/003.png)"
)


class DatasetError(ValueError):
    """The dataset as a whole cannot be indexed (missing root, bad layout, bad arguments)."""


@dataclass(frozen=True)
class DatasetIndex:
    """All indexed test images of a dataset root, in deterministic order (category, defect, file name).

    root: the dataset root, resolved (absolute, symlinks followed); entry paths are relative to it.
    entries: one row per test image, as the run stores it. ``label`` is 0 for ``good`` images, 1 for every
        defect folder; ``mask_path`` is None for good images and anomalous ones without a mask; ``height`` /
        ``width`` come from the image header (None when it could not be read); ``status`` is queued (use it),
        skipped (deliberately left out, e.g. no mask) or failed (broken input), with the ``reason`` for anything
        but queued.
    categories: categories with at least one indexed image, sorted.
    category_defects: per category, its defect folder names except ``good``, sorted, after exclusions.
    empty_categories: selected categories whose test folder holds no image (after exclusions).
    warnings: human-readable notes about the layout (empty folders, stray files) that did not stop indexing.
    """

    root: Path
    entries: tuple[PlannedImage, ...]
    categories: tuple[str, ...]
    category_defects: dict[str, tuple[str, ...]]
    empty_categories: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _is_visible_dir(path: Path) -> bool:
    return not path.name.startswith(".") and path.is_dir()


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _sorted_children(folder: Path) -> list[Path]:
    """Children of ``folder`` sorted by name (byte order of the name: stable across platforms and locales)."""
    try:
        return sorted(folder.iterdir(), key=lambda child: child.name)
    except OSError:
        return []


def _fmt_size(height: int, width: int) -> str:
    return f"{height}×{width}"


def _over_budget(kind: str, relative: str, size: tuple[int, int], max_pixels: int) -> str | None:
    """A reason when an image of ``size`` (height, width) has more pixels than ``max_pixels``, else None."""
    pixels = size[0] * size[1]
    if pixels <= max_pixels:
        return None
    return (
        f"{kind} {relative} is {_fmt_size(*size)} = {pixels:,} pixels, more than the limit of {max_pixels:,} "
        "(READAR_MAX_IMAGE_PIXELS); a run keeps the limit it was planned with: start a new run with a higher "
        "limit, or with the image shrunk"
    )


def _find_categories(root: Path) -> list[str]:
    return [
        child.name for child in _sorted_children(root) if _is_visible_dir(child) and (child / "test").is_dir()
    ]


def _escape_reason(kind: str, relative: str, path: Path, root_resolved: Path) -> str | None:
    """A reason string when ``path`` resolves outside the root, else None."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        return f"{kind} {relative} cannot be resolved ({exc}); fix or remove the link"
    if not target.is_relative_to(root_resolved):
        return (
            f"{kind} {relative} resolves to {target}, outside the dataset root; "
            "copy the file into the root instead of linking to it"
        )
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type → {bit depth: the mode Pillow reports}, for the combinations the PNG standard allows.
_PNG_MODES = {
    0: {1: "1", 2: "L", 4: "L", 8: "L", 16: "I;16"},
    2: {8: "RGB", 16: "RGB"},
    3: {1: "P", 2: "P", 4: "P", 8: "P"},
    4: {8: "LA", 16: "LA"},
    6: {8: "RGBA", 16: "RGBA"},
}


def _png_header(path: Path) -> tuple[tuple[int, int], str] | None:
    """Size and mode from a PNG's IHDR chunk (33 bytes, CRC checked), or None to let Pillow decide.

    Opening each file through Pillow is most of the cost of indexing 100,000 images; MVTec is all PNG."""
    with open(path, "rb") as handle:
        head = handle.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    length, = struct.unpack(">I", head[8:12])
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    crc, = struct.unpack(">I", head[29:33])
    mode = _PNG_MODES.get(colour, {}).get(depth)
    if length != 13 or zlib.crc32(head[12:29]) != crc or not width or not height or mode is None:
        return None
    return (height, width), mode


def _read_header(path: Path) -> tuple[tuple[int, int] | None, str | None, str | None]:
    """``((height, width), mode, None)`` from the file header, or ``(None, None, error text)``."""
    try:
        if path.stat().st_size == 0:
            return None, None, "the file is empty (0 bytes)"
        if path.suffix.lower() == ".png":
            header = _png_header(path)
            if header is not None:
                return header[0], header[1], None
        with Image.open(path) as image:
            width, height = image.size
            return (int(height), int(width)), image.mode, None
    except UnidentifiedImageError:
        return None, None, "the file is not in an image format Pillow recognises"
    except Image.DecompressionBombError as exc:
        return None, None, f"it declares more pixels than Pillow opens ({exc})"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return None, None, f"its header cannot be read ({exc})"


def _scan(folder: Path) -> list[os.DirEntry]:
    """Directory entries of ``folder`` sorted by name; their file types come from the listing (no stat)."""
    try:
        with os.scandir(folder) as listing:
            return sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return []


def _inside(folder: Path, root_resolved: Path) -> bool:
    """Whether ``folder`` (symlinks followed) lies inside the root. Files in such a folder that are not links
    themselves lie inside too, so they need no resolving of their own."""
    try:
        return folder.resolve().is_relative_to(root_resolved)
    except (OSError, RuntimeError):
        return False


def _mask_lookup(folder: Path) -> dict[str, tuple[Path, bool]]:
    """Mask files of one ground-truth folder keyed by lower-case name: (path, whether it is a symlink)."""
    return {entry.name.lower(): (folder / entry.name, entry.is_symlink())
            for entry in _scan(folder) if not entry.name.startswith(".")}


def _check_image(
    root_resolved: Path,
    category: str,
    defect: str,
    image: Path,
    masks: dict[str, tuple[Path, bool]],
    *,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    needs_resolve: bool = True,
    masks_need_resolve: bool = True,
) -> PlannedImage:
    """Build one row, recording the first problem found as its status and reason.

    ``max_pixels``: the pixel budget of the image (its mask must match it). ``needs_resolve`` /
    ``masks_need_resolve``: False when the image's (masks') folder is known to lie inside the root; files that are
    symlinks are resolved anyway."""
    label = 0 if defect == GOOD else 1
    image_rel = f"{category}/test/{defect}/{image.name}"
    expected_mask_rel = f"{category}/ground_truth/{defect}/{image.stem}{MASK_SUFFIX}"
    found = masks.get(f"{image.stem}{MASK_SUFFIX}".lower()) if label else None
    mask, mask_is_link = found if found is not None else (None, False)
    mask_rel = f"{category}/ground_truth/{defect}/{mask.name}" if mask is not None else None

    def row(status: ImageStatus, reason: str | None, size: tuple[int, int] | None) -> PlannedImage:
        height, width = size if size is not None else (None, None)
        return PlannedImage(category, defect, label, image_rel, mask_rel, height, width, status, reason)

    problem = name_problem(image_rel)
    if problem is not None:
        return row(ImageStatus.FAILED, f"image {image_rel}: {problem}", None)
    escaped = _escape_reason("image", image_rel, image, root_resolved) if needs_resolve else None
    if escaped:
        return row(ImageStatus.FAILED, escaped, None)
    size, _, error = _read_header(image)
    if size is None:
        return row(ImageStatus.FAILED, f"image {image_rel}: {error}; replace or remove the file", None)
    too_large = _over_budget("image", image_rel, size, max_pixels)
    if too_large:
        return row(ImageStatus.FAILED, too_large, size)
    if label == 0:
        return row(ImageStatus.QUEUED, None, size)
    if mask is None or mask_rel is None:
        return row(
            ImageStatus.SKIPPED,
            f"anomalous image {image_rel} has no mask (expected {expected_mask_rel}); "
            "add the mask or exclude this defect type",
            size,
        )
    problem = name_problem(mask_rel)
    if problem is not None:
        return row(ImageStatus.FAILED, f"mask {mask_rel}: {problem}", size)
    escaped = (_escape_reason("mask", mask_rel, mask, root_resolved)
               if masks_need_resolve or mask_is_link else None)
    if escaped:
        return row(ImageStatus.FAILED, escaped, size)
    mask_size, mask_mode, error = _read_header(mask)
    if mask_size is None:
        return row(ImageStatus.FAILED, f"mask {mask_rel}: {error}; replace or remove the mask", size)
    if mask_mode not in MASK_MODES:
        return row(
            ImageStatus.FAILED,
            f"mask {mask_rel} has image mode {mask_mode!r}; save it as a grayscale PNG with 0 = normal, 255 = defect",
            size,
        )
    if mask_size != size:
        return row(
            ImageStatus.FAILED,
            f"mask {mask_rel} is {_fmt_size(*mask_size)} but the image {image_rel} is {_fmt_size(*size)} "
            "(height×width); masks must match their image pixel for pixel",
            size,
        )
    return row(ImageStatus.QUEUED, None, size)


def _select_categories(root: Path, available: list[str], classes: Sequence[str] | None) -> list[str]:
    if not available:
        raise DatasetError(f"no categories found in {root}: no <category>/test/ folders; {LAYOUT_HELP}")
    if not classes:
        return available
    if isinstance(classes, str):
        raise DatasetError(f"classes must be a list of category names, not the string {classes!r}")
    unknown = sorted({name for name in classes if name not in available})
    if unknown:
        raise DatasetError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))} in {root}; "
            f"available: {', '.join(available)}"
        )
    wanted = set(classes)
    return [name for name in available if name in wanted]


def check_exclusions(
    root: Path | str, exclude_defects: Sequence[str], *, classes: Sequence[str] | None = None,
) -> None:
    """Raise :class:`DatasetError` when a name in ``exclude_defects`` is a defect folder of none of the selected
    categories (a typo such as ``colour`` would otherwise exclude nothing); the error lists the valid names.

    :func:`index_dataset` itself ignores such names, so that one list of exclusions can serve several datasets.
    """
    if isinstance(exclude_defects, str):
        raise DatasetError(f"exclude_defects must be a list of defect names, not the string {exclude_defects!r}")
    if not exclude_defects:
        return
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory; {LAYOUT_HELP}")
    selected = _select_categories(root, _find_categories(root), classes)
    defects = {child.name for category in selected for child in _sorted_children(root / category / "test")
               if _is_visible_dir(child) and child.name != GOOD}
    unknown = sorted({name for name in exclude_defects if name not in defects and name != GOOD})
    if unknown:
        listing = ", ".join(sorted(defects)) or "none"
        raise DatasetError(
            f"cannot exclude {', '.join(map(repr, unknown))}: no defect folder of that name in "
            f"{'category ' if len(selected) == 1 else 'categories '}{', '.join(selected)} of {root}; "
            f"defect types there: {listing}"
        )


def index_dataset(
    root: Path | str,
    *,
    classes: Sequence[str] | None = None,
    max_per_class: int = -1,
    exclude_defects: Sequence[str] = (),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> DatasetIndex:
    """Parse an MVTec-AD-format folder into a :class:`DatasetIndex`.

    classes: category names to keep (None or empty: all). Unknown names raise :class:`DatasetError`.
    max_per_class: keep the first N images of each category in index order (after exclusions); -1 keeps all.
    exclude_defects: defect folder names to leave out everywhere (e.g. ``("color", "combined")``); names absent
        from a category are ignored. ``good`` cannot be excluded.
    max_image_pixels: the pixel budget (``Settings.max_image_pixels``): larger images are ``failed`` from their
        header, before any worker decodes them.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist; {LAYOUT_HELP}")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a directory; {LAYOUT_HELP}")
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int):
        raise DatasetError(f"max_per_class must be an integer (-1 for all images); got {max_per_class!r}")
    if max_per_class == 0 or max_per_class < -1:
        raise DatasetError(f"max_per_class must be -1 (all images) or a positive number; got {max_per_class}")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise DatasetError(f"max_image_pixels must be a positive number of pixels; got {max_image_pixels!r}")
    if isinstance(exclude_defects, str):
        raise DatasetError(
            f"exclude_defects must be a list of defect names, not the string {exclude_defects!r}"
        )
    excluded = set(exclude_defects)
    if GOOD in excluded:
        raise DatasetError("'good' cannot be excluded: good images are the negatives of every metric")

    root_resolved = root.resolve()
    selected = _select_categories(root, _find_categories(root), classes)

    entries: list[PlannedImage] = []
    categories: list[str] = []
    category_defects: dict[str, tuple[str, ...]] = {}
    empty: list[str] = []
    notes: list[str] = []
    for category in selected:
        test_dir = root / category / "test"
        children = _sorted_children(test_dir)
        defect_dirs = [child for child in children if _is_visible_dir(child) and child.name not in excluded]
        stray = [child.name for child in children if child.is_file() and _is_image_name(child.name)]
        if stray:
            notes.append(
                f"{category}/test holds {len(stray)} image(s) outside a defect folder (e.g. {stray[0]}); "
                "they were ignored: move them into test/<defect>/"
            )
        try:
            resolve_inside(root_resolved, f"{category}/train/{GOOD}")
        except PathEscapeError as exc:
            notes.append(
                f"the reference images {category}/train/{GOOD} cannot be used ({exc}); reference-based detectors "
                "(baseline) fail this category's images until it is fixed"
            )
        rows: list[PlannedImage] = []
        for defect_dir in defect_dirs:
            # Symlinks are kept even when broken or pointing elsewhere: the row then records why it failed.
            images = [
                entry
                for entry in _scan(defect_dir)
                if _is_image_name(entry.name) and (entry.is_symlink() or entry.is_file())
            ]
            if not images:
                notes.append(f"{category}/test/{defect_dir.name} holds no images")
            mask_dir = root / category / "ground_truth" / defect_dir.name
            masks = _mask_lookup(mask_dir)
            # One resolve per folder; a file is resolved on its own only when it is a symlink.
            folder_inside = _inside(defect_dir, root_resolved)
            masks_inside = bool(masks) and _inside(mask_dir, root_resolved)
            rows.extend(
                _check_image(root_resolved, category, defect_dir.name, defect_dir / entry.name, masks,
                             max_pixels=max_image_pixels, needs_resolve=not folder_inside or entry.is_symlink(),
                             masks_need_resolve=not masks_inside)
                for entry in images
            )
        category_defects[category] = tuple(d.name for d in defect_dirs if d.name != GOOD)
        if max_per_class > 0:
            rows = rows[:max_per_class]
        if not rows:
            empty.append(category)
            notes.append(
                f"category {category} has no test images under {category}/test/<defect>/; it was left out"
            )
            continue
        categories.append(category)
        entries.extend(rows)

    if not entries:
        raise DatasetError(
            f"no test images found for categories {', '.join(selected)} in {root}; {LAYOUT_HELP}"
        )
    for note in notes:
        logger.warning("dataset %s: %s", root, note)
    return DatasetIndex(
        root=root_resolved,
        entries=tuple(entries),
        categories=tuple(categories),
        category_defects={name: category_defects[name] for name in categories},
        empty_categories=tuple(empty),
        warnings=tuple(notes),
    )
