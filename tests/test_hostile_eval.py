"""`readar eval` on a prediction folder holding every hostile input at once, next to good folders.

One evaluation (a subprocess of ``python -m scheduler.commands.eval``, under a time limit and an address-space
limit, so that a hang or a runaway allocation fails the test instead of the machine) must finish, list every
bad folder as skipped with its own reason, keep raw control characters out of the terminal, and give the good
folders exactly the metrics of an evaluation without the bad ones.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.errors import LegacyInputError
from metrics.legacy import LegacyImage, load_prediction
from metrics.legacy_evaluation import evaluate_legacy
from metrics.scopes import METRIC_COLUMNS
from tests.test_metrics_legacy import SIZE, _add, _dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # the whole evaluation takes a few seconds; a FIFO read would block forever
ADDRESS_SPACE_LIMIT = 6 << 30  # a 37 GiB allocation or an endless read of /dev/zero fails fast under it
ESCAPE_FOLDER = "esc\x1b[2J\x1b[H\x1b]0;pwned\x07"  # clears the screen and retitles the terminal if printed raw
UNDECODABLE_FOLDER = os.fsdecode(b"latin1_\xff")  # not UTF-8: a lone surrogate that strict UTF-8 cannot print


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header declares width × height (1-bit grey); its pixel data is never complete."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00"))
                     + chunk(b"IEND", b""))


def _npy_declaring(path: Path, shape: tuple[int, ...], total_bytes: int = 128) -> None:
    """An .npy file of ``total_bytes`` whose header declares a float32 array of ``shape``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    data = buffer.getvalue()
    path.write_bytes(data + b"\x00" * max(0, total_bytes - len(data)))


def _folder(pred_root: Path, name: str, image_path: str | None = None, *, logits: bool = True) -> Path:
    """A prediction folder with a metadata.json naming image_path (when given) and one all-zero logit map."""
    folder = pred_root / name
    folder.mkdir()
    if image_path is not None:
        (folder / "metadata.json").write_text(json.dumps({"image_path": image_path}))
    if logits:
        np.save(folder / "pred_logits_0.npy", np.zeros(SIZE, np.float32))
    return folder


def add_bad_inputs(pred_root: Path, mvtec_root: Path, outside: Path) -> dict[str, str]:
    """Every hostile input of the issue, one folder each; returns folder name → words its reason must hold."""
    expected: dict[str, str] = {}
    prefix = "/elsewhere/mvtec"
    mask = np.zeros(SIZE, dtype=bool)
    mask[1:4, 2:5] = True

    folder = _folder(pred_root, "deep_json")
    (folder / "metadata.json").write_text("[" * 200_000)
    expected[folder.name] = "metadata.json is nested more than 64 levels deep"

    folder = _folder(pred_root, "big_json")
    (folder / "metadata.json").write_text(json.dumps({"image_path": f"{prefix}/bottle/test/good/070.png",
                                                      "padding": " " * (2 << 20)}))
    expected[folder.name] = "more than the 1,048,576 allowed for a metadata.json"

    folder = _folder(pred_root, "escaped_quotes_json")  # a quadratic scan for strings would take hours on it
    (folder / "metadata.json").write_text('"' + '\\"' * 300_000)
    expected[folder.name] = "metadata.json is not readable JSON: Unterminated string"

    folder = _folder(pred_root, "huge_npy", f"{prefix}/bottle/test/good/071.png")
    _npy_declaring(folder / "pred_logits_0.npy", (100_000, 100_000))
    assert (folder / "pred_logits_0.npy").stat().st_size == 128
    expected[folder.name] = "declares a 100000×100000 map (10,000,000,000 values)"

    folder = _folder(pred_root, "markup_path", "[/]")
    expected[folder.name] = "image_path '[/]' does not end in <category>/test/<defect>/<file>"

    for name, index, (width, height) in (("bomb_mask", 72, (30_000, 30_000)),
                                         ("bomb_warning_mask", 73, (9_500, 9_500))):
        folder = _folder(pred_root, name, f"{prefix}/bottle/test/crack/{index:03d}.png")
        _png_declaring(mvtec_root / "bottle" / "ground_truth" / "crack" / f"{index:03d}_mask.png", width, height)
        expected[folder.name] = f"crack/{index:03d}_mask.png for image bottle/test/crack/{index:03d}.png is refused"

    folder = _folder(pred_root, "fifo_metadata")
    os.mkfifo(folder / "metadata.json")
    expected[folder.name] = "metadata.json is a FIFO (named pipe), not a regular file"

    folder = _folder(pred_root, "fifo_npy", f"{prefix}/bottle/test/good/074.png", logits=False)
    os.mkfifo(folder / "pred_logits_0.npy")
    expected[folder.name] = "pred_logits_0.npy is a FIFO (named pipe), not a regular file"

    folder = _folder(pred_root, "zero_metadata")
    (folder / "metadata.json").symlink_to("/dev/zero")
    expected[folder.name] = "metadata.json (a link to /dev/zero) is a character device, not a regular file"

    folder = _folder(pred_root, "zero_npy", f"{prefix}/bottle/test/good/075.png", logits=False)
    (folder / "pred_logits_0.npy").symlink_to("/dev/zero")
    expected[folder.name] = "pred_logits_0.npy (a link to /dev/zero) is a character device"

    folder = _folder(pred_root, "escaping_mask", f"{prefix}/bottle/test/crack/076.png")
    outside.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(outside / "076_mask.png")
    (mvtec_root / "bottle" / "ground_truth" / "crack" / "076_mask.png").symlink_to(outside / "076_mask.png")
    expected[folder.name] = "outside the dataset root"

    claimants = [f"dup_{index}" for index in range(6)]
    for name in claimants:
        _folder(pred_root, name, f"/host{name[-1]}/mvtec/bottle/test/good/077.png")
        expected[name] = (f"6 prediction folders claim the same image bottle/test/good/077.png "
                          f"({', '.join(claimants)}); none of them is evaluated")

    folder = _folder(pred_root, "unknown_category", f"{prefix}/nosuch/test/good/000.png")
    expected[folder.name] = "category 'nosuch' is not under --mvtec-root"

    folder = _folder(pred_root, ESCAPE_FOLDER, f"{prefix}/bottle/test/good/078.png", logits=False)
    expected[folder.name] = "has no pred_logits_*.npy file for bottle/test/good/078.png"

    folder = _folder(pred_root, UNDECODABLE_FOLDER, f"{prefix}/bottle/test/good/079.png", logits=False)
    expected[folder.name] = "has no pred_logits_*.npy file for bottle/test/good/079.png"

    elsewhere = _folder(outside, "real_prediction", f"{prefix}/bottle/test/good/080.png")
    (pred_root / "link_out").symlink_to(elsewhere, target_is_directory=True)
    expected["link_out"] = "is a link to"  # + "outside --pred-root"

    folder = _folder(pred_root, "many_logits", f"{prefix}/bottle/test/good/081.png")
    for index in range(1, 70):
        np.save(folder / f"pred_logits_{index}.npy", np.zeros(SIZE, np.float32))
    expected[folder.name] = "has more than 64 pred_logits_*.npy files for bottle/test/good/081.png"
    return expected


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_eval(pred_root: Path, mvtec_root: Path, out_csv: Path, workers: int = 1) -> subprocess.CompletedProcess:
    """`python -m scheduler.commands.eval` in a subprocess; a hang fails with TimeoutExpired."""
    env = {**os.environ, "COLUMNS": "1000", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "scheduler.commands.eval", "--pred-root", str(pred_root), "--mvtec-root",
         str(mvtec_root), "--out-csv", str(out_csv), "--workers", str(workers)],
        cwd=REPO_ROOT, env=env, capture_output=True, timeout=TIMEOUT_S, preexec_fn=_limit_address_space,
        check=False,
    )


def _skip_rows(output: str) -> dict[str, str]:
    """folder → reason, from the rows of the printed skip table (cells separated by │)."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) == 5 and cells[2] not in ("folder", ""):
            rows[cells[2]] = cells[3]
    return rows


def _metrics(out_csv: Path) -> list[dict[str, str]]:
    with out_csv.open(newline="") as handle:
        return [{key: row[key] for key in ("scope", "category", "defect_type", *METRIC_COLUMNS, "num_images",
                                           "num_anom_images")} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the two evaluations once: the good folders alone, then with every bad input added."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    clean_csv = tmp_path / "clean.csv"
    clean = run_eval(pred_root, mvtec_root, clean_csv)
    assert clean.returncode == 0, clean.stderr.decode(errors="replace")
    expected = add_bad_inputs(pred_root, mvtec_root, tmp_path / "outside")
    hostile_csv = tmp_path / "hostile.csv"
    result = run_eval(pred_root, mvtec_root, hostile_csv)
    output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    return {"result": result, "output": output, "expected": expected, "skips": _skip_rows(output),
            "clean_csv": clean_csv, "hostile_csv": hostile_csv, "pred_root": pred_root, "mvtec_root": mvtec_root}


@pytest.fixture
def alarm():
    """Fails an in-process test that blocks for more than TIMEOUT_S instead of hanging the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"the test blocked for more than {TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


BAD_INPUTS = ["deep_json", "big_json", "escaped_quotes_json", "huge_npy", "markup_path", "bomb_mask",
              "bomb_warning_mask", "fifo_metadata", "fifo_npy", "zero_metadata", "zero_npy", "escaping_mask",
              "dup_0", "dup_5", "unknown_category", "escape_sequence_folder", "undecodable_folder_name",
              "link_out", "many_logits"]


def test_eval_with_every_bad_input_finishes(hostile: dict) -> None:
    result = hostile["result"]
    assert result.returncode == 0, hostile["output"][-4000:]
    assert f"{len(hostile['expected'])} image(s) skipped" in hostile["output"]
    assert f"12 image(s) evaluated, {len(hostile['expected'])} skipped" in hostile["output"]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_each_bad_input_is_skipped_with_its_reason(hostile: dict, name: str) -> None:
    folder = {"escape_sequence_folder": ESCAPE_FOLDER, "undecodable_folder_name": UNDECODABLE_FOLDER}.get(name, name)
    shown = folder.encode("unicode_escape").decode("ascii")  # control characters are printed as escapes
    words = hostile["expected"][folder]
    assert shown in hostile["skips"], f"{shown} is not listed as skipped:\n{hostile['output'][-4000:]}"
    assert words in hostile["skips"][shown], (shown, hostile["skips"][shown])


def test_no_control_character_or_markup_error_reaches_the_terminal(hostile: dict) -> None:
    output = hostile["output"]
    assert "\x1b" not in output and "\x07" not in output
    assert "MarkupError" not in output and "Traceback" not in output
    assert "esc\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07" in output


def test_good_folders_get_the_metrics_of_an_eval_without_the_bad_ones(hostile: dict) -> None:
    assert hostile["result"].returncode == 0, hostile["output"][-4000:]
    clean, dirty = _metrics(hostile["clean_csv"]), _metrics(hostile["hostile_csv"])
    assert [row["category"] for row in dirty] == ["ALL", "ALL", "bottle", "zipper", "bottle", "bottle", "zipper",
                                                  "zipper"]  # mean, overall, categories, defect types
    assert dirty == clean


def test_two_workers_skip_the_same_folders_and_give_the_same_metrics(hostile: dict, tmp_path: Path) -> None:
    out_csv = tmp_path / "parallel.csv"
    result = run_eval(hostile["pred_root"], hostile["mvtec_root"], out_csv, workers=2)
    output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    assert result.returncode == 0, output[-4000:]
    assert _skip_rows(output) == hostile["skips"]
    assert _metrics(out_csv) == _metrics(hostile["hostile_csv"])


def test_a_duplicate_of_a_good_image_names_both_folders(tmp_path: Path, alarm: None) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    shutil.copytree(pred_root / "bottle_good_000", pred_root / "bottle_good_000 copy")
    result = evaluate_legacy(pred_root, mvtec_root)
    reasons = {Path(skip.folder).name: skip.reason for skip in result.skips}
    assert set(reasons) == {"bottle_good_000", "bottle_good_000 copy"}
    assert "2 prediction folders claim the same image bottle/test/good/000.png (bottle_good_000, bottle_good_000 " \
           "copy)" in reasons["bottle_good_000"]
    assert result.num_evaluated == 11


def test_markup_and_escapes_in_category_names_print_safely(tmp_path: Path) -> None:
    pred_root, mvtec_root, _ = _dataset(tmp_path)
    category = "[bold]x\x1b[2J"
    (mvtec_root / category).mkdir()
    _add(pred_root, mvtec_root, category, "good", 0, np.zeros(SIZE, np.float32), None)
    out_csv = tmp_path / "metrics.csv"
    result = run_eval(pred_root, mvtec_root, out_csv)
    output = (result.stdout + result.stderr).decode("utf-8", errors="replace")
    assert result.returncode == 0, output
    assert "\\[bold]x\\x1b[2J" not in output and "[bold]x\\x1b[2J" in output and "\x1b" not in output
    assert category in {row["category"] for row in _metrics(out_csv)}  # the CSV keeps the name as it is


def _good_image(path: Path) -> LegacyImage:
    return LegacyImage(path.parent, "bottle", "good", "000.png", (path,), None)


@pytest.mark.parametrize("variant", ["float64", "big-endian", "fortran-order", "leading-1", "float16"])
def test_arrays_read_header_first_equal_np_load(tmp_path: Path, variant: str) -> None:
    rng = np.random.default_rng(1)
    array = rng.normal(size=SIZE).astype(np.float32)
    stored = {"float64": array.astype(np.float64), "big-endian": array.astype(">f4"),
              "fortran-order": np.asfortranarray(array), "leading-1": array[None, None],
              "float16": array.astype(np.float16)}[variant]
    path = tmp_path / "pred_logits_0.npy"
    np.save(path, stored)
    logits, mask = load_prediction(_good_image(path))
    reference = np.load(path).reshape(SIZE)
    assert mask is None and logits.shape == SIZE and logits.dtype.isnative
    assert np.array_equal(logits, reference.astype(logits.dtype))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(("variant", "words"), [
    ("truncated", "but holds 40 bytes after its header; it is truncated"),
    ("trailing bytes", "but holds 200 bytes after its header"),
    ("4 GiB header length", "is not a readable .npy file (bad header)"),
    ("format 9.9", "is .npy format 9.9; save the logits with np.save"),
    ("integers", "holds int32 values; raw logits must be floating point"),
    ("complex", "holds complex64 values"),
    ("structured", "raw logits must be floating point"),
    ("three planes", "has shape 3×6×8; expected a (H, W) logit map"),
])
def test_bad_npy_headers_are_refused_before_loading(tmp_path: Path, variant: str, words: str, alarm: None) -> None:
    zeros = np.zeros(SIZE, np.float32)
    data = {
        "truncated": lambda: _npy_bytes(zeros)[:-(zeros.nbytes - 40)],
        "trailing bytes": lambda: _npy_bytes(zeros) + b"\x00" * 8,
        "4 GiB header length": lambda: b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{" * 100,
        "format 9.9": lambda: b"\x93NUMPY\x09\x09" + _npy_bytes(zeros)[8:],
        "integers": lambda: _npy_bytes(zeros.astype(np.int32)),
        "complex": lambda: _npy_bytes(zeros.astype(np.complex64)),
        "structured": lambda: _npy_bytes(np.zeros(SIZE, dtype=[("a", "<f4")])),
        "three planes": lambda: _npy_bytes(np.zeros((3, *SIZE), np.float32)),
    }[variant]()
    path = tmp_path / "pred_logits_0.npy"
    path.write_bytes(data)
    with pytest.raises(LegacyInputError) as caught:
        load_prediction(_good_image(path))
    assert words in str(caught.value) and str(path) in str(caught.value)
