"""What a fresh-user walkthrough ran into: tracebacks for output folders that are taken, a hint that named the
wrong `results` filter, limits that the flags and the environment disagreed on, silent long runs in log files, a
silent `reconcile`, a prompt help that hid a label leak, and a declined `delete` that looked like a failure."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from scheduler.cli import cli
from scheduler.sample_data import make_sample_data
from storage.settings import MAX_BATCH_SIZE, Settings

PROGRESS_LINE = re.compile(r"^run (\S+): (\d+)/(\d+) images done \((\d+) failed\), [\d.]+ images/s", re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_readar_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walkthrough starts from the defaults: no READAR_* variable of the machine running the tests."""
    for name in [n for n in os.environ if n.startswith("READAR_")]:
        monkeypatch.delenv(name)


def _invoke(args: list[str], **kwargs: object) -> Result:
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kwargs)


def _ok(args: list[str], **kwargs: object) -> str:
    result = _invoke(args, **kwargs)
    assert result.exit_code == 0, result.output
    return result.output


def _one_line_error(result: Result, exit_code: int = 1) -> str:
    """The command failed with ``exit_code`` and said why in one ``Error:`` line, without a traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    if exit_code == 2:  # usage errors: "Usage: ...", "Try ... --help", then the one error line
        lines = [line for line in lines if not line.startswith(("Usage: ", "Try "))]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def _flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small categories: brick has a defect image without its mask (skipped), chelsea one whose pixel data
    is cut off (failed). Read-only for tests."""
    root = tmp_path_factory.mktemp("walkthrough") / "data"
    make_sample_data(root, categories=("brick", "chelsea"), size=32, per_class=6, train_per_class=2)
    (root / "brick" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    broken = root / "chelsea" / "test" / "patch" / "000.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header passes the index, decoding fails
    return root


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> tuple[Path, str, str]:
    """(work folder, run name, output) of a finished run over brick only: one skipped image, none failed."""
    work = tmp_path_factory.mktemp("walkthrough-work")
    name = "skipped-only"
    output = _ok(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--classes", "brick",
                  "--run-name", name])
    return work, name, output


# 1. Output folders that are taken or are files: one line, and the flag to pass.

def test_make_sample_data_on_a_dataset_names_the_overwrite_flag(tmp_path: Path) -> None:
    target = tmp_path / "data"
    _ok(["make-sample-data", str(target), "--size", "32", "--per-class", "4"])
    line = _one_line_error(_invoke(["make-sample-data", str(target), "--size", "32", "--per-class", "4"]))
    assert "already holds brick, chelsea, coffee" in line and "--overwrite" in line, line
    assert "overwrite=True" not in line
    assert "sample dataset written" in _ok(["make-sample-data", str(target), "--size", "32", "--per-class", "4",
                                            "--overwrite"])


@pytest.mark.parametrize("command", ["make-sample-data", "make-tiny-checkpoint"])
@pytest.mark.parametrize("below", [False, True], ids=["the-file", "inside-the-file"])
def test_writing_into_a_file_is_one_line(tmp_path: Path, command: str, below: bool) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    line = _one_line_error(_invoke([command, str(afile / "sub" if below else afile)]))
    assert f"{afile} is a file, not a folder" in line, line
    assert afile.read_text() == "not a folder"


# 2. The line under the metrics names the `results` filter of each kind of image it leaves out.

def test_skipped_images_point_to_the_skipped_filter(skipped_run: tuple[Path, str, str]) -> None:
    work, name, output = skipped_run
    output = _flat(output)
    assert "left out of these metrics: 1 skipped image(s)" in output, output
    assert f"`readar results {name} --status skipped`" in output and "--status failed" not in output, output
    listed = _ok(["--work-dir", str(work), "results", name, "--status", "skipped"])
    assert "brick/test/scratch/000.png" in listed and "has no mask" in _flat(listed), listed


def test_failed_and_skipped_images_name_both_filters(tmp_path: Path, dataset: Path) -> None:
    name = "both-kinds"
    output = _flat(_ok(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset), "--run-name", name]))
    assert "left out of these metrics: 1 failed and 1 skipped image(s)" in output, output
    assert f"`readar results {name} --status failed` and `readar results {name} --status skipped`" in output


# 3. The flags take the ranges the settings take, and messages name what the user sets.

@pytest.mark.parametrize("command", [["run", "--mvtec-root", "{data}"], ["submit", "--mvtec-root", "{data}"],
                                     ["resume", "r"], ["retry", "r"], ["worker"]])
def test_batch_size_flags_have_the_settings_bound(tmp_path: Path, dataset: Path, command: list[str]) -> None:
    args = [a.format(data=dataset) for a in command]
    line = _one_line_error(_invoke(["--work-dir", str(tmp_path), *args, "--batch-size", str(MAX_BATCH_SIZE + 1)]),
                           exit_code=2)
    assert "--batch-size" in line and f"1<=x<={MAX_BATCH_SIZE}" in line, line
    # ... the bound READAR_BATCH_SIZE has
    line = _one_line_error(_invoke(["--work-dir", str(tmp_path), "runs"],
                                   env={"READAR_BATCH_SIZE": str(MAX_BATCH_SIZE + 1)}), exit_code=2)
    assert f"READAR_BATCH_SIZE: Input should be less than or equal to {MAX_BATCH_SIZE}" in line, line
    assert Settings(batch_size=MAX_BATCH_SIZE).batch_size == MAX_BATCH_SIZE


def test_max_per_class_zero_names_the_flag(tmp_path: Path, dataset: Path) -> None:
    line = _one_line_error(_invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset),
                                    "--max-per-class", "0"]), exit_code=2)
    assert "--max-per-class" in line and "-1" in line and "max_per_class" not in line, line
    assert not (tmp_path / "readar.sqlite").exists()  # refused before anything was planned


@pytest.mark.parametrize(("environment", "named"), [
    ({"READAR_SOFT_TIME_LIMIT": "2000"}, ("READAR_SOFT_TIME_LIMIT (2000)", "READAR_HARD_TIME_LIMIT (900)")),
    ({"READAR_LEASE_SECONDS": "100"}, ("READAR_HARD_TIME_LIMIT (900)", "READAR_LEASE_SECONDS (100)",
                                       "READAR_VISIBILITY_TIMEOUT (1500)")),
])
def test_time_limit_messages_name_the_environment_variables(tmp_path: Path, environment: dict[str, str],
                                                            named: tuple[str, ...]) -> None:
    line = _one_line_error(_invoke(["--work-dir", str(tmp_path), "runs"], env=environment), exit_code=2)
    assert all(text in line for text in named), line
    assert not re.search(r"\b(soft_time_limit|hard_time_limit|lease_seconds) \(", line), line


def test_sample_data_flags_have_the_generator_bounds(tmp_path: Path) -> None:
    for flag, value in (("--per-class", "3"), ("--size", "4096")):
        line = _one_line_error(_invoke(["make-sample-data", str(tmp_path / "data"), flag, value]), exit_code=2)
        assert flag in line, line
    assert not (tmp_path / "data").exists()


# 4. A run whose output goes to a log file prints plain progress lines now and then.

def test_runs_in_a_log_print_progress_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.commands.run as run_module

    root = tmp_path / "data"
    make_sample_data(root, categories=("brick", "chelsea", "coffee"), size=32, per_class=20, train_per_class=2)
    monkeypatch.setattr(run_module, "PROGRESS_MIN_GAP_S", 0.0)  # a line at every tenth, however fast the run
    output = _ok(["--work-dir", str(tmp_path / "work"), "run", "--mvtec-root", str(root), "--run-name", "logged"])
    lines = PROGRESS_LINE.findall(output)
    assert [(name, int(done), int(total)) for name, done, total, _ in lines] == \
        [("logged", done, 60) for done in range(6, 61, 6)], output
    assert all(failed == "0" for *_, failed in lines)


def test_slow_runs_print_a_line_every_interval(tmp_path: Path, dataset: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.commands.run as run_module

    monkeypatch.setattr(run_module, "PROGRESS_EVERY_S", 0.0)  # every image is "30 s later"
    output = _ok(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset), "--classes", "chelsea",
                  "--run-name", "slow"])
    done = [(int(d), int(failed)) for _, d, total, failed in PROGRESS_LINE.findall(output) if total == "6"]
    assert [d for d, _ in done] == [1, 2, 3, 4, 5, 6], output
    assert done[-1][1] == 1  # the broken chelsea image


def test_only_results_count_as_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A held, cancelled, stale or retried delivery is not an image done (a setup error cancels every pending
    image: the line must not say they are all done)."""
    import io

    from rich.console import Console

    import scheduler.commands.run as run_module
    from workers.task import Outcome

    monkeypatch.setattr(run_module, "PROGRESS_EVERY_S", 0.0)
    console = Console(file=io.StringIO(), width=200)
    progress = run_module.PlainProgress(console, "r", total=4)
    for outcome in (Outcome.HELD, Outcome.CANCELLED, Outcome.STALE, Outcome.RETRY, Outcome.NOT_CLAIMED,
                    Outcome.DONE, Outcome.FAILED, Outcome.CANCELLED):
        progress(1, outcome.value)
    assert [(d, t, f) for _, d, t, f in PROGRESS_LINE.findall(console.file.getvalue())] == [
        ("1", "4", "0"), ("2", "4", "1")]


def test_small_fast_runs_stay_quiet(skipped_run: tuple[Path, str, str]) -> None:
    _, _, output = skipped_run
    assert not PROGRESS_LINE.search(output), output


# 5. `reconcile` says what it did, also when there was nothing to do.

def test_reconcile_without_distributed_runs_says_so(skipped_run: tuple[Path, str, str]) -> None:
    work, _, _ = skipped_run
    output = _ok(["--work-dir", str(work), "--broker-url", "redis://127.0.0.1:1/0", "reconcile"])
    assert output.startswith("nothing to reconcile: no unfinished run was submitted to workers"), output


@pytest.mark.services
def test_reconcile_of_a_run_prints_its_counts(tmp_path: Path, dataset: Path) -> None:
    from test_distributed import RedisServer

    server = RedisServer(tmp_path)
    try:
        base = ["--work-dir", str(tmp_path / "work"), "--broker-url", server.url]
        _ok([*base, "submit", "--mvtec-root", str(dataset), "--classes", "brick", "--run-name", "sent"])
        output = _ok([*base, "reconcile"])  # no worker took the tasks: they wait in the queue
    finally:
        server.stop()
    assert re.fullmatch(r"reconciled sent: \d+ expired lease\(s\) requeued, \d+ task\(s\) enqueued, \d+ lost "
                        r"message\(s\) sent again, \d+ aggregation\(s\) triggered", output.strip()), output


# 6. The prompt help and the template error name every way labels leak, and suggest a template that does not.

def test_prompt_help_says_templates_with_anomaly_type_leak_labels() -> None:
    text = _flat(_ok(["run", "--help"]))
    assert "Only anomaly leaks labels" not in text
    assert "template whenever the template uses {anomaly_type}" in text, text


def test_template_error_suggests_a_template_without_the_label(tmp_path: Path, dataset: Path) -> None:
    line = _one_line_error(_invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset),
                                    "--prompt-mode", "template"]), exit_code=2)
    assert "--prompt-template" in line and "'Segment the defect on the {class_name}.'" in line, line
    assert "{anomaly_type}" not in line


# 7. Declining `delete` deletes nothing and is no error.

def test_declined_delete_keeps_the_run_and_exits_0(skipped_run: tuple[Path, str, str]) -> None:
    work, name, _ = skipped_run
    result = _invoke(["--work-dir", str(work), "delete", name], input="n\n")
    assert result.exit_code == 0, result.output
    assert "Aborted" not in result.output and f"nothing deleted: run {name} is kept" in result.output
    assert name in _ok(["--work-dir", str(work), "runs"])


# Adversarial pass: what used to be charged image by image (or a traceback) is refused before planning.

@pytest.mark.parametrize("device", ["mps", "CPU", "cuda:-1", "cuda:0 "])
def test_a_device_readar_does_not_run_on_is_a_usage_error(tmp_path: Path, dataset: Path, device: str) -> None:
    result = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset), "--device", device])
    assert result.exit_code == 2 and "must be cpu, cuda or cuda:N" in result.output, result.output
    assert not (tmp_path / "readar.sqlite").exists() or "planned" not in result.output


@pytest.mark.parametrize(("template", "problem"), [
    ("Segment {foo}", "uses {foo}"),
    ("Segment {", "is not a valid template"),
    ("Segment {class_name.__class__}", "uses {class_name.__class__}"),
    ("Find the {class_name!r}", "uses {class_name!r}"),
])
def test_a_template_that_cannot_be_filled_is_refused_before_planning(tmp_path: Path, dataset: Path, template: str,
                                                                      problem: str) -> None:
    result = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset), "--prompt-mode", "template",
                      "--prompt-template", template])
    assert result.exit_code == 2 and problem in result.output and "planned" not in result.output, result.output


def test_a_template_without_the_template_mode_is_refused(tmp_path: Path, dataset: Path) -> None:
    result = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset),
                      "--prompt-template", "Segment the defect on the {class_name}."])
    assert result.exit_code == 2 and "used only with --prompt-mode template" in result.output, result.output


def test_a_bad_lever_variable_stops_the_run_in_one_line(tmp_path: Path, dataset: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.read_fixtures import tiny_checkpoint

    read_dir, clip_dir = tiny_checkpoint()
    monkeypatch.setenv("READAR_COMPILE", "banana")
    result = _invoke(["--work-dir", str(tmp_path), "run", "--mvtec-root", str(dataset), "--classes", "brick",
                      "--detector", "read", "--checkpoint", str(read_dir), "--clip", str(clip_dir)])
    assert result.exit_code == 1, result.output
    assert "READAR_COMPILE='banana': use on, off or auto" in result.output and "Traceback" not in result.output


def test_a_run_is_not_continued_with_changed_model_files(tmp_path: Path, dataset: Path) -> None:
    """The checkpoint path is part of a run's identity, its files are not: a changed file under the same path
    must not be mixed into the run, neither by `run` again nor by `resume`."""
    import json
    import shutil

    from tests.read_fixtures import tiny_checkpoint

    read_dir, clip_dir = tiny_checkpoint()
    checkpoint = tmp_path / "ck"
    shutil.copytree(read_dir, checkpoint)
    command = ["--work-dir", str(tmp_path / "work"), "run", "--mvtec-root", str(dataset), "--classes", "brick",
               "--max-per-class", "4", "--run-name", "fp", "--detector", "read", "--checkpoint", str(checkpoint),
               "--clip", str(clip_dir)]
    _ok(command)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "note": "another model"}))
    for args in (command, ["--work-dir", str(tmp_path / "work"), "resume", "fp"]):
        result = _invoke(args)
        assert result.exit_code == 1 and "the model files of run fp changed since its first results" in result.output, result.output


def test_a_run_a_live_process_executes_is_not_deleted(tmp_path: Path, dataset: Path) -> None:
    import socket
    import subprocess

    from scheduler.context import AppContext
    from storage.models import RunStatus

    work = tmp_path / "work"
    _ok(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--classes", "brick", "--run-name", "busy"])
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("busy")
    executor = subprocess.Popen(["sleep", "60"])  # stands for the `readar run` process still executing it
    try:
        app.repo.set_run_executor(run.id, f"{socket.gethostname()}:{executor.pid}")
        app.repo.set_run_status(run.id, RunStatus.RUNNING)
        result = _invoke(["--work-dir", str(work), "delete", "busy", "--yes"])
        assert result.exit_code == 1 and f"is being worked on by {socket.gethostname()}:{executor.pid}" in \
            result.output, result.output
    finally:
        executor.kill()
        executor.wait()
    _ok(["--work-dir", str(work), "delete", "busy", "--yes"])  # its process is gone: deleted
    assert "busy" not in _ok(["--work-dir", str(work), "runs"])


def test_metrics_printed_while_images_are_unfinished_say_they_are_partial(tmp_path: Path, dataset: Path) -> None:
    """A second `readar run` of the same run that finishes first, or `aggregate` of an interrupted run, printed
    partial numbers as if final."""
    from scheduler.context import AppContext
    from storage.models import ImageStatus

    work = tmp_path / "work"
    _ok(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--classes", "brick", "--run-name", "part"])
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("part")
    image = next(row for row in app.repo.images(run.id) if row.status == ImageStatus.DONE)
    with app.repo.db.session() as session, session.begin():  # as if another process still held it
        from sqlalchemy import update

        from storage.models import Image
        session.execute(update(Image).where(Image.id == image.id).values(status=ImageStatus.RUNNING))
    output = _ok(["--work-dir", str(work), "aggregate", "part"])
    assert "1 image(s) are not finished yet" in " ".join(output.split()), output


def test_images_skipped_at_aggregation_are_explained(tmp_path: Path) -> None:
    """A mask that goes missing after its image is done: the metrics skip it, its row stays done, and no results
    filter lists it; the line under the table says so and how to fix it."""
    root = tmp_path / "data"
    make_sample_data(root, categories=("brick",), size=32, per_class=4, train_per_class=2)
    work = tmp_path / "work"
    _ok(["--work-dir", str(work), "run", "--mvtec-root", str(root), "--run-name", "late"])
    next(root.glob("brick/ground_truth/*/*.png")).unlink()
    output = " ".join(_ok(["--work-dir", str(work), "aggregate", "late"]).split())
    assert "1 skipped image(s) were done, but their mask was missing" in output, output
    assert "--status skipped" not in output and "readar aggregate late" in output


def test_watching_an_interrupted_run_ends(tmp_path: Path, dataset: Path) -> None:
    """Nothing works on an interrupted run, so `status --watch` said so at the start and then looped forever."""
    import subprocess
    import sys

    from scheduler.context import AppContext
    from storage.models import RunStatus

    work = tmp_path / "work"
    _ok(["--work-dir", str(work), "run", "--mvtec-root", str(dataset), "--classes", "brick", "--run-name", "stopped"])
    app = AppContext(settings=Settings(work_dir=work))
    run = app.repo.get_run("stopped")
    app.repo.set_run_status(run.id, RunStatus.INTERRUPTED)
    with app.repo.db.session() as session, session.begin():  # one image left to do, as after a Ctrl-C
        from sqlalchemy import update

        from storage.models import Image, ImageStatus
        image = app.repo.images(run.id, status=ImageStatus.DONE)[0]
        session.execute(update(Image).where(Image.id == image.id).values(status=ImageStatus.QUEUED))
    completed = subprocess.run([sys.executable, "-m", "scheduler", "--work-dir", str(work), "status", "stopped",
                                "--watch", "--interval", "0.5"], capture_output=True, text=True, timeout=120,
                               env={k: v for k, v in os.environ.items() if not k.startswith("READAR_")})
    assert completed.returncode == 0, completed.stderr
    assert "is interrupted; nothing is working on it" in " ".join(completed.stdout.split()), completed.stdout
