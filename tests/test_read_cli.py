"""The READ detectors from the command line: per-detector defaults, --max-new-tokens, help and the published note."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from read_fixtures import tiny_checkpoint

from scheduler.cli import cli


def _invoke(args: list[str], *, exit_code: int = 0) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return result.output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scheduler.sample_data import make_sample_data

    root = tmp_path_factory.mktemp("read-cli") / "data"
    make_sample_data(root, categories=("brick",), size=64, per_class=4, train_per_class=2)
    return root


def _detector_config(work: Path, run_name: str) -> dict:
    with sqlite3.connect(next(work.glob("*.sqlite"))) as connection:
        (config,) = connection.execute("SELECT config FROM runs WHERE name = ?", (run_name,)).fetchone()
    return json.loads(config)["detector_config"]


def _run(work: Path, data: Path, name: str, *extra: str) -> str:
    read_dir, clip_dir = tiny_checkpoint()
    return _invoke([
        "--work-dir", str(work), "run", "--mvtec-root", str(data), "--max-per-class", "4", "--run-name", name,
        "--checkpoint", str(read_dir), "--clip", str(clip_dir), *extra,
    ])


def test_read_as_published_takes_the_published_setting_and_says_so(tmp_path: Path, data: Path) -> None:
    output = _run(tmp_path, data, "published", "--detector", "read_as_published")
    assert "matches the published READAR setting" in " ".join(output.split())
    stored = _detector_config(tmp_path, "published")
    assert (stored["prompt_mode"], stored["conversation"], stored["extra.max_new_tokens"]) == (
        "anomaly", "vicuna_v1", 2048,
    )
    output = _run(tmp_path, data, "published-64", "--detector", "read_as_published", "--max-new-tokens", "64")
    assert "differs from the published setting in max_new_tokens=64 (published: 2048)" in " ".join(output.split())


def test_read_defaults_leak_no_label(tmp_path: Path, data: Path) -> None:
    output = _run(tmp_path, data, "read", "--detector", "read")
    stored = _detector_config(tmp_path, "read")
    assert (stored["prompt_mode"], stored["conversation"], stored["extra.max_new_tokens"]) == (
        "generic", "llava_v1", 32,
    )
    assert "oracle" not in output and "published" not in output


def test_max_new_tokens_is_for_read_detectors_only(tmp_path: Path, data: Path) -> None:
    output = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(data), "--max-new-tokens", "10"],
                     exit_code=2)
    assert "--max-new-tokens applies to the READ detectors" in output
    output = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(data), "--detector", "read",
                      "--max-new-tokens", "4096"], exit_code=2)
    assert "4096 is not in the range 1<=x<=2048" in output


def test_help_says_what_each_detector_reproduces() -> None:
    text = " ".join(_invoke(["run", "--help"]).split())
    for phrase in ("read (READ's own inference on a READ checkpoint: SasP points + [SEG]",
                   "lisa (the [SEG] token alone: on a LISA checkpoint LISA's own inference, on a READ checkpoint",
                   "pixellm (PixelLM's own inference on a PixelLM checkpoint",
                   "the setting of the published READAR numbers", "--max-new-tokens",
                   "an ORACLE setting", "vicuna_v1 (the wording of the original READAR scripts)"):
        assert phrase in text, phrase


def test_relative_checkpoint_paths_are_stored_absolute(tmp_path: Path, data: Path, monkeypatch) -> None:
    """A run stores resolved folders, so `resume` from elsewhere and remote workers find them."""
    read_dir, clip_dir = tiny_checkpoint()
    monkeypatch.chdir(read_dir.parent)
    _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(data), "--max-per-class", "4",
             "--run-name", "relative", "--detector", "read", "--checkpoint", read_dir.name, "--clip", clip_dir.name])
    stored = _detector_config(tmp_path, "relative")
    assert (stored["checkpoint"], stored["clip"]) == (str(read_dir.resolve()), str(clip_dir.resolve()))
    monkeypatch.chdir(tmp_path)
    _invoke(["--work-dir", str(tmp_path), "resume", "relative"])  # from another folder: same checkpoint found


def test_the_oracle_warning_names_the_setting_that_caused_it(tmp_path: Path, data: Path) -> None:
    template = "Find the {anomaly_type} on the {class_name}."
    output = " ".join(_run(tmp_path, data, "templated", "--detector", "read", "--prompt-mode", "template",
                           "--prompt-template", template).split())
    assert f"--prompt-template '{template}' names the ground-truth defect folder" in output
    assert "'anomaly'" not in output
    output = " ".join(_run(tmp_path, data, "anomaly", "--detector", "lisa", "--prompt-mode", "anomaly").split())
    assert "--prompt-mode anomaly names the ground-truth defect folder" in output


def test_read_only_commands_refuse_a_work_folder_without_a_database(tmp_path: Path) -> None:
    for command in (["runs"], ["status", "r"], ["results", "r"]):
        output = _invoke(["--work-dir", str(tmp_path / "typo"), *command], exit_code=1)
        assert "no READAR database in" in output and "--work-dir" in output
    assert not (tmp_path / "typo").exists()  # nothing created


@pytest.mark.services
def test_a_submitted_template_run_naming_the_defect_is_flagged_like_an_embedded_one(tmp_path: Path,
                                                                                     data: Path) -> None:
    """`submit` used to decide the oracle flag itself (anomaly prompt only): a distributed template run naming
    {anomaly_type} was stored as not using ground-truth names, without the warning."""
    import redis
    from conftest import REDIS_URL

    redis.Redis.from_url(REDIS_URL).flushdb()
    read_dir, clip_dir = tiny_checkpoint()
    output = _invoke([
        "--work-dir", str(tmp_path), "--broker-url", REDIS_URL, "submit", "--mvtec-root", str(data),
        "--max-per-class", "4", "--run-name", "sent", "--checkpoint", str(read_dir), "--clip", str(clip_dir),
        "--detector", "read", "--prompt-mode", "template", "--prompt-template", "Find the {anomaly_type}.",
    ])
    redis.Redis.from_url(REDIS_URL).flushdb()
    with sqlite3.connect(next(tmp_path.glob("*.sqlite"))) as connection:
        config, fingerprint = connection.execute(
            "SELECT config, model_fingerprint FROM runs WHERE name = 'sent'").fetchone()
    assert json.loads(config)["uses_ground_truth_names"] is True
    assert fingerprint
    assert "names the ground-truth defect folder" in " ".join(output.split())


def test_a_truncated_shard_stops_the_run_before_planning_with_one_line(tmp_path: Path, data: Path) -> None:
    import shutil

    read_dir, clip_dir = tiny_checkpoint()
    broken = tmp_path / "broken"
    shutil.copytree(read_dir, broken)
    shard = sorted(broken.glob("pytorch_model-*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    work = tmp_path / "work"
    output = _invoke([
        "--work-dir", str(work), "run", "--mvtec-root", str(data), "--max-per-class", "4",
        "--detector", "read", "--checkpoint", str(broken), "--clip", str(clip_dir),
    ], exit_code=1)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and shard.name in lines[0] and "truncated" in lines[0], output
    assert "planned" not in output and "Traceback" not in output
