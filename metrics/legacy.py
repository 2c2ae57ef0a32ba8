"""The original READAR output layout: one folder per test image, read as (category, defect, logits, mask).

Layout under ``pred_root``::

    <any folder name>/metadata.json        {"image_path": ".../<category>/test/<defect>/<file>", ...}
    <any folder name>/pred_logits_*.npy    raw logits (H, W) at the image's resolution; several → per-pixel max

``image_path`` may come from another machine: only its last four parts are used, resolved against the MVTec
root; the mask is ``<mvtec_root>/<category>/ground_truth/<defect>/<stem>_mask.png``. Every problem raises
:class:`~metrics.errors.LegacyInputError` (or a :class:`~metrics.errors.GroundTruthError`) so that the caller
skips the image with that reason.

The folders are treated as untrusted input: only regular files are opened (a FIFO, a device or a socket is
refused before it is opened, and files are opened non-blocking), metadata.json is bounded in size and nesting,
an ``.npy`` header is read and checked (dtype, shape, size against the mask or a bound, file length) before
any array is allocated, a mask header is checked against Pillow's decompression-bomb limit before decoding,
and masks are resolved with :func:`storage.paths.resolve_inside`, so no link leads out of the MVTec root.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import stat
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np

from metrics.errors import GroundTruthError, LegacyInputError
from metrics.groundtruth import load_mask
from storage.paths import PathEscapeError, resolve_inside

GOOD = "good"
METADATA_FILE = "metadata.json"
LOGIT_PATTERN = "pred_logits_*.npy"
MAX_METADATA_BYTES = 1 << 20  # a metadata.json is a few hundred bytes; anything past 1 MiB is not one
MAX_JSON_DEPTH = 64  # nesting of metadata.json; json.loads recurses once per level
MAX_MAP_PIXELS = 1 << 26  # values in one logit map (8192 × 8192); MVTec AD images are at most 1024 × 1024
MAX_LOGIT_FILES = 64  # pred_logits_*.npy per folder: one per query (a defect-type list is at most a dozen)
_NPY_PREFIX_BYTES = 1 << 16  # an .npy header longer than this is not one np.save wrote
_JSON_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)  # an escaped character, a quote or a bracket
_MAX_NAMED_CLAIMANTS = 10


@dataclass(frozen=True)
class LegacyImage:
    """One prediction folder, resolved.

    folder: the prediction folder; logit_paths: its pred_logits_*.npy files (sorted, at least one);
    mask_path: ground-truth PNG (resolved inside the MVTec root), None for ``good`` images.
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


@dataclass
class RootSurvey:
    """Where the predictions' images were when they were predicted, against ``--mvtec-root``.

    recorded_roots: the folder above ``<category>/test/<defect>/<file>`` of each metadata.json image_path (as
    written, from any machine) → how many predictions name it. anomalous: predictions of an anomalous image (of
    the selected categories); anomalous_with_mask: those whose mask is under the MVTec root;
    first_missing_mask: the first mask that is not, with why (missing, or refused and the reason).
    """

    mvtec_root: Path
    recorded_roots: Counter[str] = field(default_factory=Counter)
    anomalous: int = 0
    anomalous_with_mask: int = 0
    first_missing_mask: str = ""

    def foreign_roots(self) -> list[str]:
        """The recorded absolute roots that are not ``mvtec_root``, as written or through their links (most
        predictions first). A relative root was relative to wherever the predictions were made, so it cannot be
        placed and is left out."""
        own = {os.path.normpath(self.mvtec_root.absolute()), os.path.realpath(self.mvtec_root)}
        return [root for root, _ in self.recorded_roots.most_common()
                if os.path.isabs(root) and {os.path.normpath(root), os.path.realpath(root)}.isdisjoint(own)]

    def _roots_text(self, roots: list[str]) -> str:
        more = f" (and {len(roots) - 1} other folder(s))" if len(roots) > 1 else ""
        return f"{roots[0]}{more}"

    def mismatch_warning(self) -> str | None:
        """One line when some predictions were made on images outside ``mvtec_root``, else None."""
        roots = self.foreign_roots()
        if not roots:
            return None
        return (f"the predictions' metadata.json image paths are under {self._roots_text(roots)}, not under "
                f"--mvtec-root {self.mvtec_root}; masks are looked up under --mvtec-root by each image's "
                "<category>/test/<defect>/<file> path, which is right only for a copy of the dataset they were "
                "made on")

    def no_match_error(self) -> str | None:
        """One line when there are anomalous predictions and not one of them has its mask under ``mvtec_root``
        (every metric would be NaN: ``mvtec_root`` is not the predictions' dataset), else None."""
        if not self.anomalous or self.anomalous_with_mask:
            return None
        roots = self.foreign_roots()
        if " is refused: " in self.first_missing_mask:
            made_on = "masks must be files inside --mvtec-root (replace links that lead out of it with the files)"
        elif roots:
            made_on = (f"they were made on images under {self._roots_text(roots)}: give that dataset (or a copy) "
                       "as --mvtec-root")
        else:
            made_on = "check that --mvtec-root holds the dataset's ground_truth folders"
        return (f"no prediction matches --mvtec-root {self.mvtec_root}: none of the {self.anomalous} anomalous "
                f"image(s) has its mask there (e.g. {self.first_missing_mask}); {made_on}")


def recorded_root(image_path: str) -> str:
    """The folder above the ``<category>/test/<defect>/<file>`` tail of a (possibly foreign) image path."""
    parts = PurePosixPath(str(image_path).replace("\\", "/")).parts
    return str(PurePosixPath(*parts[:-4])) if len(parts) > 4 else "."


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
        if name in (".", "..") or ":" in name or "\x00" in name:
            raise LegacyInputError(f"image_path {image_path!r} has an unsafe part {name!r}")
    return category, defect, file_name


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: Path, missing: str) -> tuple[BinaryIO, int]:
    """Open a regular file for reading; returns (binary handle, size in bytes).

    Anything else (FIFO, device, socket, folder; also through a symlink) is refused before it is opened, and
    the file is opened non-blocking, so that one swapped in between the check and the open cannot block
    either. missing: the reason when the path does not exist.
    """
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise LegacyInputError(missing) from None
    except OSError as exc:
        raise LegacyInputError(f"{path} cannot be read: {exc}") from exc
    if not stat.S_ISREG(before.st_mode):
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise LegacyInputError(f"{path}{link} is {_file_kind(before.st_mode)}, not a regular file; refusing to open it")
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise LegacyInputError(f"{path} cannot be read: {exc}") from exc
    after = os.fstat(descriptor)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(descriptor)
        raise LegacyInputError(f"{path} was replaced while it was being opened; refusing to read it")
    return os.fdopen(descriptor, "rb"), after.st_size


def _json_depth(text: str) -> int:
    """The deepest nesting of brackets and braces in JSON text, strings left out (counted up to MAX + 1).

    One pass over the quotes, brackets and escapes (linear in the text, whatever it holds)."""
    depth = deepest = 0
    in_string = False
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue  # a bracket inside a string, or an escaped character
        elif token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break  # deep enough to refuse
        else:
            depth -= 1
    return deepest


def read_metadata(folder: Path) -> dict:
    """The folder's metadata.json as a dict: a regular file of at most 1 MiB, nested at most 64 levels."""
    path = folder / METADATA_FILE
    handle, size = _open_regular(path, f"{path} is missing; every prediction folder needs one")
    with handle:
        if size > MAX_METADATA_BYTES:
            raise LegacyInputError(
                f"{path} is {size:,} bytes, more than the {MAX_METADATA_BYTES:,} allowed for a metadata.json"
            )
        raw = handle.read(MAX_METADATA_BYTES + 1)
    if len(raw) > MAX_METADATA_BYTES:
        raise LegacyInputError(f"{path} grew past the {MAX_METADATA_BYTES:,} bytes allowed for a metadata.json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LegacyInputError(f"{path} is not readable JSON: {exc}") from exc
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise LegacyInputError(
            f"{path} is nested more than {MAX_JSON_DEPTH} levels deep, more than a metadata.json may be"
        )
    try:
        metadata = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise LegacyInputError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise LegacyInputError(f"{path} holds {type(metadata).__name__}, not a JSON object with 'image_path'")
    return metadata


def claimed_image(folder: Path) -> tuple[str, str, str]:
    """(category, defect, file) of the image a prediction folder's metadata.json names."""
    return image_tail(_recorded_path(folder))


def _recorded_path(folder: Path) -> str:
    """The image_path a prediction folder's metadata.json records."""
    image_path = read_metadata(folder).get("image_path")
    if not isinstance(image_path, str) or not image_path:
        raise LegacyInputError(f"{folder / METADATA_FILE} has no string 'image_path'")
    return image_path


def _mask_relative(category: str, defect: str, file_name: str) -> str:
    return f"{category}/ground_truth/{defect}/{PurePosixPath(file_name).stem}_mask.png"


def _mask_problem(mvtec_root: Path, category: str, defect: str, file_name: str) -> str | None:
    """None when the image's mask is under ``mvtec_root``; else the mask and why not (missing, or refused)."""
    relative = _mask_relative(category, defect, file_name)
    try:
        present = resolve_inside(mvtec_root, relative).exists()
    except (PathEscapeError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        return f"{relative} is refused: {exc}"
    return None if present else f"{relative} is missing"


def _resolve(folder: Path, mvtec_root: Path, category: str, defect: str, file_name: str) -> LegacyImage:
    """The LegacyImage of a folder claiming ``category/test/defect/file_name``; its mask must be in the root."""
    key = f"{category}/test/{defect}/{file_name}"
    try:
        category_dir = resolve_inside(mvtec_root, category)
    except (PathEscapeError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise LegacyInputError(f"{folder} claims {key}, whose category is refused: {exc}") from exc
    if not category_dir.is_dir():
        raise LegacyInputError(
            f"{folder} claims {key}, but category {category!r} is not under --mvtec-root {mvtec_root}; "
            "evaluate it against a dataset that has this category"
        )
    logit_paths = tuple(sorted(itertools.islice(folder.glob(LOGIT_PATTERN), MAX_LOGIT_FILES + 1)))
    if not logit_paths:
        raise LegacyInputError(f"{folder} has no {LOGIT_PATTERN} file for {key}")
    if len(logit_paths) > MAX_LOGIT_FILES:
        raise LegacyInputError(
            f"{folder} has more than {MAX_LOGIT_FILES} {LOGIT_PATTERN} files for {key}; the original layout has "
            "one per query: keep those of this image only"
        )
    mask_path = None
    if defect != GOOD:
        relative = _mask_relative(category, defect, file_name)
        try:
            mask_path = resolve_inside(mvtec_root, relative)
        except (PathEscapeError, OSError, RuntimeError) as exc:
            raise LegacyInputError(f"the mask of {key} is refused: {exc}") from exc
        try:
            mask_stat = os.stat(mask_path)
        except FileNotFoundError:
            raise LegacyInputError(f"anomalous image {key} has no mask: {mask_path} is missing") from None
        except OSError as exc:
            raise LegacyInputError(f"the mask {mask_path} of {key} cannot be read: {exc}") from exc
        if not stat.S_ISREG(mask_stat.st_mode):
            raise LegacyInputError(
                f"the mask {mask_path} of {key} is {_file_kind(mask_stat.st_mode)}, not a regular file"
            )
    return LegacyImage(folder, category, defect, file_name, logit_paths, mask_path)


def read_folder(folder: Path, mvtec_root: Path) -> LegacyImage:
    """Resolve one prediction folder (metadata, logit files, mask path) without loading any array."""
    return _resolve(folder, mvtec_root, *claimed_image(folder))


def _inside_pred_root(pred_root: Path, folder: Path) -> None:
    """A prediction folder that is a link must lead to a folder inside ``pred_root``: one leading elsewhere
    would make the evaluation read whatever that folder holds."""
    if not folder.is_symlink():
        return
    try:
        resolve_inside(pred_root, folder.name)
    except (PathEscapeError, OSError, RuntimeError) as exc:
        raise LegacyInputError(
            f"{folder} is a link to {os.path.realpath(folder)}, outside --pred-root; prediction folders must be "
            f"folders under the prediction root ({exc})"
        ) from exc


def discover(
    pred_root: Path, mvtec_root: Path, *, classes: Collection[str] | None = None,
) -> tuple[list[LegacyImage], list[Skip], RootSurvey]:
    """Every prediction folder under ``pred_root`` (sorted), resolved; folders that cannot be, as skips; and
    where the predictions' images were against ``mvtec_root`` (:class:`RootSurvey`).

    classes: keep only these categories (None keeps all). A folder whose category cannot be read is skipped
    whatever ``classes`` says. Folders claiming the same image are all skipped, each reason naming every one
    of them: which of them is right cannot be told, and counting the image more than once would be wrong.
    """
    if not pred_root.is_dir():
        raise LegacyInputError(f"prediction root {pred_root} is not a folder")
    if not mvtec_root.is_dir():
        raise LegacyInputError(f"MVTec root {mvtec_root} is not a folder; give the dataset of the predictions")
    claims: dict[str, list[LegacyImage]] = defaultdict(list)
    skips: list[Skip] = []
    survey = RootSurvey(mvtec_root)
    for folder in sorted(p for p in pred_root.iterdir() if p.is_dir()):
        category = None
        try:
            _inside_pred_root(pred_root, folder)
            image_path = _recorded_path(folder)
            category, defect, file_name = image_tail(image_path)
            if classes is not None and category not in classes:
                continue
            survey.recorded_roots[recorded_root(image_path)] += 1
            if defect != GOOD:
                survey.anomalous += 1
                problem = _mask_problem(mvtec_root, category, defect, file_name)
                if problem is None:
                    survey.anomalous_with_mask += 1
                elif not survey.first_missing_mask:
                    survey.first_missing_mask = problem
            image = _resolve(folder, mvtec_root, category, defect, file_name)
        except LegacyInputError as exc:
            if classes is None or category is None or category in classes:
                skips.append(Skip(str(folder), category, str(exc)))
            continue
        claims[image.image_key].append(image)
    images: list[LegacyImage] = []
    for key, claimants in claims.items():
        if len(claimants) == 1:
            images.extend(claimants)
            continue
        names = [image.folder.name for image in claimants]
        listed = ", ".join(names[:_MAX_NAMED_CLAIMANTS])
        if len(names) > _MAX_NAMED_CLAIMANTS:
            listed += f" and {len(names) - _MAX_NAMED_CLAIMANTS} more"
        reason = (f"{len(names)} prediction folders claim the same image {key} ({listed}); none of them is "
                  "evaluated: keep exactly one folder per image")
        skips.extend(Skip(str(image.folder), image.category, reason) for image in claimants)
    images.sort(key=lambda image: image.folder)
    skips.sort(key=lambda skip: skip.folder)
    return images, skips, survey


def _npy_header(handle: BinaryIO, path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy file, read from its first 64 KiB only."""
    prefix = handle.read(_NPY_PREFIX_BYTES)
    if prefix[:2] == b"PK":
        raise LegacyInputError(f"{path} holds an .npz archive, not a single array; save one array with np.save")
    if prefix[:6] != b"\x93NUMPY":
        raise LegacyInputError(f"{path} is not a readable .npy file (no NumPy header); re-save it with np.save")
    buffer = io.BytesIO(prefix)
    version = tuple(prefix[6:8])
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:  # 3.0 only differs for structured dtypes with non-Latin-1 names, refused anyway
        raise LegacyInputError(f"{path} is .npy format {'.'.join(map(str, version))}; save the logits with np.save")
    try:
        np.lib.format.read_magic(buffer)
        shape, fortran_order, dtype = readers[version](buffer)
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise LegacyInputError(f"{path} is not a readable .npy file (bad header): {exc}") from exc
    return tuple(int(v) for v in shape), dtype, bool(fortran_order), buffer.tell()


def _size_text(shape: tuple[int, ...]) -> str:
    if len(shape) > 8:  # a hostile header may declare thousands of dimensions
        return f"{'×'.join(str(v) for v in shape[:4])}×…×{shape[-1]} ({len(shape)} dimensions)"
    return "×".join(str(v) for v in shape)


def _load_logits(
    path: Path, expected: tuple[int, int] | None = None, mismatch: Callable[[str], str] | None = None,
) -> np.ndarray:
    """One pred_logits file → finite float16/float32 (H, W).

    The header is checked before anything is allocated: plain floating-point dtype, a (H, W) shape (leading
    1s dropped) equal to ``expected`` when given (else ``mismatch(its H×W)`` is the reason) and within
    MAX_MAP_PIXELS, and a file length that matches what the header declares.
    """
    handle, size = _open_regular(path, f"{path} is missing")
    with handle:
        shape, dtype, fortran_order, offset = _npy_header(handle, path)
        if dtype.hasobject:
            raise LegacyInputError(f"{path} is not a plain numeric .npy (pickled objects are refused): dtype {dtype}")
        if dtype.kind != "f" or dtype.fields is not None or dtype.subdtype is not None:
            raise LegacyInputError(f"{path} holds {dtype} values; raw logits must be floating point")
        plane = shape
        while len(plane) > 2 and plane[0] == 1:
            plane = plane[1:]
        if len(plane) != 2 or min(plane) <= 0:
            raise LegacyInputError(f"{path} has shape {_size_text(shape)}; expected a (H, W) logit map")
        if expected is not None and plane != tuple(expected):
            raise LegacyInputError(mismatch(_size_text(plane)) if mismatch else f"{path} is {_size_text(plane)}, "
                                   f"expected {_size_text(expected)}")
        count = math.prod(plane)
        if count > MAX_MAP_PIXELS:
            raise LegacyInputError(
                f"{path} declares a {_size_text(plane)} map ({count:,} values), more than the {MAX_MAP_PIXELS:,} "
                "allowed; it is not read"
            )
        nbytes = count * dtype.itemsize
        if size - offset != nbytes:
            raise LegacyInputError(
                f"{path} declares {_size_text(plane)} {dtype} ({nbytes:,} bytes of data) but holds {size - offset:,} "
                "bytes after its header; it is truncated or not what its header says"
            )
        loaded = np.empty(count, dtype=dtype)
        handle.seek(offset)
        target = memoryview(loaded.view(np.uint8))
        filled = 0
        while filled < nbytes:
            got = handle.readinto(target[filled:])
            if not got:
                raise LegacyInputError(f"{path} ended after {filled:,} of its {nbytes:,} bytes of data")
            filled += got
    loaded = loaded.reshape(plane, order="F" if fortran_order else "C")
    if loaded.dtype not in (np.float16, np.float32):
        loaded = loaded.astype(np.float32)  # float64 maps are rounded to float32 (see metrics.binning)
    low, high = float(loaded.min()), float(loaded.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise LegacyInputError(f"{path} contains NaN or inf logits; re-run the prediction for this image")
    return loaded


def _mask_shape(image: LegacyImage) -> tuple[int, int]:
    """(H, W) a mask declares, from its header only; decompression bombs (Pillow's limit) are refused."""
    from PIL import Image

    path = image.mask_path
    handle, _ = _open_regular(path, f"anomalous image {image.image_key} has no mask: {path} is missing")
    with handle, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(handle) as mask:
                width, height = mask.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise LegacyInputError(f"mask {path} for image {image.image_key} is refused: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # UnidentifiedImageError is an OSError
            raise LegacyInputError(f"mask {path} for image {image.image_key} is not a readable image: {exc}") from exc
    return int(height), int(width)


def load_prediction(image: LegacyImage) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits float16/float32 (H, W), per-pixel max over the image's files; mask bool (H, W) or None)."""
    from PIL import Image

    expected = None if image.mask_path is None else _mask_shape(image)

    def against_mask(shape: str) -> str:
        return (f"mask {image.mask_path} is {_size_text(expected)} but image {image.image_key} is {shape} (H×W); "
                "regenerate the mask or the prediction at the image's resolution")

    logits = _load_logits(image.logit_paths[0], expected, against_mask)
    first = f"{image.logit_paths[0]} is {_size_text(logits.shape)}"
    for path in image.logit_paths[1:]:
        other = _load_logits(path, logits.shape,
                             lambda shape, path=path: f"{path} is {shape} but {first}; maps of one image must agree")
        logits = np.maximum(logits.astype(np.float32, copy=False), other.astype(np.float32, copy=False))
    mask = None
    if image.mask_path is not None:
        try:
            mask = load_mask(image.mask_path, logits.shape, image_path=image.image_key)
        except GroundTruthError as exc:
            raise LegacyInputError(str(exc)) from exc
        except Image.DecompressionBombError as exc:
            raise LegacyInputError(f"mask {image.mask_path} for image {image.image_key} is refused: {exc}") from exc
    return logits, mask
