"""A broken setup stops before it costs images: one clear line, a non-zero exit, nothing charged."""

from __future__ import annotations

import shutil
import sqlite3
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from read_fixtures import tiny_checkpoint

from scheduler.cli import cli


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scheduler.sample_data import make_sample_data

    root = tmp_path_factory.mktemp("preflight") / "data"
    make_sample_data(root, categories=("brick",), size=64, per_class=4, train_per_class=2)
    return root


def _checkpoint_copy(tmp_path: Path) -> tuple[Path, Path]:
    read_dir, clip_dir = tiny_checkpoint()
    copy = tmp_path / "read"
    shutil.copytree(read_dir, copy)
    return copy, clip_dir


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("pytorch_model-*.bin"))


def _run(work: Path, data: Path, checkpoint: Path, clip: Path, *extra: str):  # noqa: ANN202
    return CliRunner().invoke(cli, [
        "--work-dir", str(work), "run", "--mvtec-root", str(data), "--run-name", "r", "--detector", "read",
        "--checkpoint", str(checkpoint), "--clip", str(clip), *extra,
    ], catch_exceptions=False)


def _attempts(work: Path) -> list[tuple[str, int]]:
    database = work / "readar.sqlite"
    if not database.exists():
        return []
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT status, attempts FROM images").fetchall()


def test_missing_shard_is_one_line_and_no_image_is_attempted(tmp_path: Path, data: Path) -> None:
    checkpoint, clip = _checkpoint_copy(tmp_path)
    missing = _shards(checkpoint)[1]
    missing.unlink()
    result = _run(tmp_path / "work", data, checkpoint, clip)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "lists shards that are not there" in lines[0] and missing.name in lines[0]
    assert "Traceback" not in result.output
    assert all(attempts == 0 for _, attempts in _attempts(tmp_path / "work"))


def test_truncated_shard_is_caught_before_the_run(tmp_path: Path, data: Path) -> None:
    checkpoint, clip = _checkpoint_copy(tmp_path)
    shard = _shards(checkpoint)[0]
    shard.write_bytes(b"")
    result = _run(tmp_path / "work", data, checkpoint, clip)
    assert result.exit_code != 0 and f"weight shard {shard}" in result.output and "copy it again" in result.output
    assert _attempts(tmp_path / "work") == []


def test_a_shard_unreadable_at_load_stops_the_run_and_charges_nothing(tmp_path: Path, data: Path) -> None:
    """The file looks whole (preflight passes: its zip directory reads) but the weights cannot load: the run
    stops at the first batch, every image is given back untouched, and resume finishes it once the file is fixed.
    (A truncated shard is caught before planning: tests/test_read_cli.py.)"""
    checkpoint, clip = _checkpoint_copy(tmp_path)
    shard = _shards(checkpoint)[0]
    good = shard.read_bytes()
    with zipfile.ZipFile(shard) as archive:  # garble the pickle inside, keeping every size and offset
        pickle = next(member for member in archive.infolist() if member.filename.endswith("data.pkl"))
    local = pickle.header_offset  # the local header's name and extra lengths (torch pads the extra to align)
    start = local + 30 + int.from_bytes(good[local + 26 : local + 28], "little") + int.from_bytes(
        good[local + 28 : local + 30], "little")
    garbled = bytearray(good)
    garbled[start : start + 16] = b"\xff" * 16
    # One byte more: the size is part of the model cache's key (the digest reads no weights), so the process does
    # not reuse a model loaded from the whole file by an earlier test.
    shard.write_bytes(bytes(garbled) + b"\0")
    work = tmp_path / "work"
    result = _run(work, data, checkpoint, clip, "--batch-size", "2")
    assert result.exit_code == 1, result.output
    assert "cannot be read" in result.output and "No image was charged" in result.output
    assert f"readar --work-dir {work.resolve()} resume r" in " ".join(result.output.split())
    rows = _attempts(work)
    assert rows and all(status == "queued" and attempts == 0 for status, attempts in rows), rows
    shard.write_bytes(good)
    resumed = CliRunner().invoke(cli, ["--work-dir", str(work), "resume", "r"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert {status for status, _ in _attempts(work)} == {"done"}


def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path: Path, data: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check cannot fail here")
    checkpoint, clip = tiny_checkpoint()
    result = _run(tmp_path / "work", data, checkpoint, clip, "--device", "cuda")
    assert result.exit_code != 0
    assert "sees no CUDA device" in result.output and "--device cpu" in result.output
    assert _attempts(tmp_path / "work") == []


def test_tokenizer_folder_problems_stop_the_run(tmp_path: Path, data: Path) -> None:
    checkpoint, clip = _checkpoint_copy(tmp_path)
    (checkpoint / "tokenizer.model").unlink()
    result = _run(tmp_path / "work", data, checkpoint, clip)
    assert result.exit_code != 0 and "has no tokenizer.model" in result.output
    assert _attempts(tmp_path / "work") == []


def test_failed_images_can_be_retried_and_a_run_deleted(tmp_path: Path, data: Path) -> None:
    """Images that failed for a reason since fixed get a fresh start; a run can be removed with its logits."""
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    victim = sorted((broken / "brick" / "test").rglob("*.png"))[0]
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")
    work = tmp_path / "work"

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(cli, ["--work-dir", str(work), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    invoke("run", "--mvtec-root", str(broken), "--run-name", "r")
    assert sorted(status for status, _ in _attempts(work)).count("failed") == 1
    victim.write_bytes(good)
    output = invoke("retry", "r")
    assert "1 failed image(s) queued again" in output
    assert {status for status, _ in _attempts(work)} == {"done"}
    objects = list((work / "objects").rglob("*.npz"))
    assert objects
    assert "deleted" in invoke("delete", "r", "--yes")
    assert _attempts(work) == [] and not list((work / "objects").rglob("*.npz"))
    assert "no run named" in CliRunner().invoke(cli, ["--work-dir", str(work), "status", "r"]).output
