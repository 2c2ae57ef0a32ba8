"""Bad inputs end to end (issue 7): one dataset holding every kind of bad file at once, run by `readar run`.

Each bad file gets a final status and a reason that names it; the good images still give metrics; nothing in a
file name is ever executed. The unit tests of each case live in test_dataset.py, test_images.py,
test_read_loader.py and test_metrics_legacy.py (see docs/RELIABILITY.md); this file checks them together.
"""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scheduler.cli import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_NAME = "$(touch pwned);`touch pwned2`.png"


def _bad_dataset(sample_root: Path, tmp_path: Path) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    """brick plus bad files; returns (root, {image path: (expected status, words its reason must contain)})."""
    root = tmp_path / "data"
    shutil.copytree(sample_root / "brick", root / "brick")
    good = root / "brick" / "test" / "good"
    scratch = root / "brick" / "test" / "scratch"
    masks = root / "brick" / "ground_truth" / "scratch"
    source = (good / "000.png").read_bytes()
    source_mask = masks / "000_mask.png"
    expected: dict[str, tuple[str, str | None]] = {}

    def bad(name: str, content: bytes, words: str) -> None:
        (good / name).write_bytes(content)
        expected[f"brick/test/good/{name}"] = ("failed", words)

    bad("corrupt.png", source[:60] + os.urandom(2000), "corrupt.png")
    bad("truncated.png", source[:200], "truncated.png")
    bad("zero.png", b"", "zero.png")
    bad("notes.png", b"these are my notes, not an image\n", "notes.png")
    (good / "readme.txt").write_text("not an image extension: ignored")

    for name in ("a b.png", "ü.png", SHELL_NAME):  # odd names are plain file names, never shell input
        (good / name).write_bytes(source)
        expected[f"brick/test/good/{name}"] = ("done", None)

    outside = tmp_path / "outside.png"
    outside.write_bytes(source)
    os.symlink(outside, good / "link-out.png")
    expected["brick/test/good/link-out.png"] = ("failed", "outside the dataset root")
    os.symlink("../../../../outside.png", good / "dotdot.png")
    expected["brick/test/good/dotdot.png"] = ("failed", "outside the dataset root")

    image = np.asarray(Image.open(scratch / "000.png"))
    mask = np.asarray(Image.open(source_mask))
    h, w = mask.shape[:2]
    shutil.copy(scratch / "000.png", scratch / "wrongsize.png")
    Image.fromarray(mask).resize((w // 2, h // 2)).save(masks / "wrongsize_mask.png")
    expected["brick/test/scratch/wrongsize.png"] = ("failed", "wrongsize")
    shutil.copy(scratch / "000.png", scratch / "rgbmask.png")
    Image.fromarray(np.stack([mask] * 3, axis=-1)).save(masks / "rgbmask_mask.png")
    expected["brick/test/scratch/rgbmask.png"] = ("done", None)
    shutil.copy(scratch / "000.png", scratch / "mask16.png")
    Image.fromarray((mask > 0).astype(np.uint16) * 65535).save(masks / "mask16_mask.png")
    expected["brick/test/scratch/mask16.png"] = ("done", None)
    Image.fromarray(image).save(scratch / "nomask.png")
    expected["brick/test/scratch/nomask.png"] = ("skipped", "mask")

    (root / "empty" / "test" / "good").mkdir(parents=True)  # a category with no images
    return root, expected


def test_one_dataset_with_every_bad_input(sample_root: Path, tmp_path: Path) -> None:
    root, expected = _bad_dataset(sample_root, tmp_path)
    work = tmp_path / "work"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "scheduler", "--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name",
         "bad-inputs", "--batch-size", "2"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "empty" in output  # the empty category is reported, not silently dropped
    database = sqlite3.connect(work / "readar.sqlite")
    rows = {path: (status, error) for path, status, error in
            database.execute("select image_path, status, error from images")}
    assert "brick/test/good/readme.txt" not in rows and not any(p.startswith("empty/") for p in rows)
    for path, (status, words) in expected.items():
        assert path in rows, f"{path} has no row"
        got_status, error = rows[path]
        assert got_status == status, (path, got_status, error)
        if words is not None:
            assert error and words in error, (path, error)
    originals = {p: s for p, s in rows.items() if p not in expected}
    assert len(originals) == 12 and {s for s, _ in originals.values()} == {"done"}
    for leftover in (cwd, root, work, Path.cwd()):
        assert not (leftover / "pwned").exists() and not (leftover / "pwned2").exists()

    with open(work / "results" / "bad-inputs.csv") as handle:
        metrics = list(csv.DictReader(handle))
    brick = next(r for r in metrics if r["scope"] == "category" and r["category"] == "brick")
    done = sum(s == "done" for s, _ in rows.values())
    failed = sum(s == "failed" for s, _ in rows.values())
    skipped = sum(s == "skipped" for s, _ in rows.values())
    assert (int(brick["num_images"]), int(brick["num_failed"]), int(brick["num_skipped"])) == (done, failed, skipped)
    assert 0.5 < float(brick["pAUROC"]) <= 1.0 and 0.0 <= float(brick["iAUROC"]) <= 1.0
    assert {r["category"] for r in metrics} == {"brick", "ALL"}


def test_dataset_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "data" / "notes").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["--work-dir", str(tmp_path / "w"), "run", "--mvtec-root", str(tmp_path / "data")])
    assert result.exit_code != 0
    assert "no categories found" in result.output and "<root>/<category>/test/<defect>/<image>.png" in result.output


@pytest.mark.parametrize(("option", "words"), [
    (["--batch-size", "0"], "--batch-size"),
    (["--max-per-class", "-2"], "--max-per-class"),
    (["--prompt-mode", "riddle"], "--prompt-mode"),
    (["--detector", "no-such-detector"], "no-such-detector"),
])
def test_out_of_range_cli_values_are_usage_errors(option: list[str], words: str, sample_root: Path,
                                                  tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--work-dir", str(tmp_path / "w"), "run", "--mvtec-root", str(sample_root),
                                      *option])
    assert words in result.output, result.output
    assert result.exit_code == 2, f"expected a usage error (exit 2), got {result.exit_code}: {result.output}"
