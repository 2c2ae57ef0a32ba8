"""What the run commands share: the run options, the detector configuration and request they build, the
resume hint, the summary printed at the end, and the Celery client of the distributed commands. Both
`run.py` (this machine) and `distributed.py` (the workers) import it, and neither imports the other."""

from __future__ import annotations

import functools
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from scheduler.context import AppContext
from scheduler.planner import RUN_NAME_RULE, RunNameError, RunRequest, check_run_name, parse_list
from scheduler.tables import print_metrics, run_csv_path, shown, visible, write_run_csv
from storage.models import ImageStatus
from storage.redact import redact_text
from storage.settings import MAX_BATCH_SIZE
from workers.detectors.base import (
    CONVERSATIONS,
    DECODE_MODES,
    DETECTOR_DEFAULTS,
    PROMPT_MODES,
    DetectorConfig,
    DetectorError,
)
from workers.read import MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP

# --batch-size of run, submit, resume, retry and worker: the range READAR_BATCH_SIZE has.
BATCH_SIZE = click.IntRange(1, MAX_BATCH_SIZE)


class _MaxPerClass(click.ParamType):
    """-1 (all images) or a positive count; 0 is refused here, naming the flag, rather than by the indexer."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = click.INT.convert(value, param, ctx)
        if number == -1 or number > 0:
            return number
        self.fail(f"must be -1 (all images) or a positive number of images per category; got {number}", param, ctx)


MAX_PER_CLASS = _MaxPerClass()


class _Device(click.ParamType):
    """cpu, cuda or cuda:N, as READAR_DEVICE accepts (storage/settings.py DEVICE_PATTERN)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from storage.settings import DEVICE_PATTERN

        if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
            return value
        self.fail(f"must be cpu, cuda or cuda:N (as READAR_DEVICE); got {value!r}", param, ctx)


DEVICE = _Device()


def _check_detector(ctx: click.Context, _param: click.Parameter, name: str) -> str:
    """Unknown detector names are usage errors (exit 2) listing the registered ones."""
    from workers.detectors.base import find_detector
    from workers.runtime import import_plugins

    app = ctx.find_object(AppContext)
    if app is not None:
        import_plugins(app.settings.plugins)
    try:
        find_detector(name)
    except DetectorError as exc:
        raise click.BadParameter(str(exc)) from None
    return name


def _check_run_name(_ctx: click.Context, _param: click.Parameter, name: str | None) -> str | None:
    """A new run's name follows the rule (an older run with another name continues with ``readar resume``)."""
    if name is None:
        return None
    try:
        return check_run_name(name)
    except RunNameError as exc:
        raise click.BadParameter(f"{exc} (a run named before this rule goes on with `readar resume NAME`)") from None


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The dataset and detector options shared by ``run`` (and ``submit``)."""
    options = [
        click.option("--mvtec-root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Dataset root: <root>/<category>/test/<defect>/<image>."),
        click.option("--classes", help="Comma-separated categories (default: all)."),
        click.option("--max-per-class", default=-1, show_default=True, type=MAX_PER_CLASS,
                     help="First N images per category in sorted order (-1 = all)."),
        click.option("--exclude-defects", help="Comma-separated defect types to leave out, e.g. color,combined."),
        click.option("--detector", default="baseline", show_default=True, callback=_check_detector,
                     help="baseline (weight-free statistics), read (READ's own inference on a READ checkpoint: "
                     "SasP points + [SEG] to SAM), lisa (the [SEG] token alone: on a LISA checkpoint LISA's own "
                     "inference, on a READ checkpoint READ's weights without the points), pixellm (PixelLM's own "
                     "inference on a PixelLM checkpoint: six [SEG] codebook tokens, its multi-scale mask decoder "
                     "on CLIP features, no SAM), read_as_published (on a READ checkpoint, the setting of the "
                     "published "
                     "READAR numbers: [SEG] + one not-a-point padding point, vicuna_v1, anomaly prompt, up to "
                     "2,048 new tokens), noop, or one a plug-in registers."),
        click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Released READ, LISA or PixelLM checkpoint folder [env READAR_CHECKPOINT]."),
        click.option("--clip", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="CLIP folder: ViT-L/14-336 for READ and PixelLM, ViT-L/14 (224 px) for LISA [env READAR_CLIP]."),
        click.option("--prompt-mode", type=click.Choice(PROMPT_MODES),
                     help="The question per image. generic: 'Segment any anomaly on the {class}.'; binary: 'Is "
                     "there any anomaly in the image?'; template: --prompt-template; all_types: one query per "
                     "defect type of the category, maps combined by max; anomaly: names the ground-truth defect "
                     "folder, an ORACLE setting. Labels leak with anomaly, and with template whenever the template "
                     "uses {anomaly_type}. [default: generic; anomaly for read_as_published]"),
        click.option("--prompt-template", help="User template for --prompt-mode template, e.g. 'Segment the defect "
                     "on the {class_name}.'; fields {class_name} and {anomaly_type} (the ground-truth defect "
                     "folder: an ORACLE setting)."),
        click.option("--decode-mode", type=click.Choice(DECODE_MODES), default="generate", show_default=True,
                     help="generate: greedy decoding, [SEG] state from the step that emits it (as READ); "
                     "teacher_forced: one forward pass over the answer 'Sure, [SEG].' (faster, approximate)."),
        click.option("--conversation", type=click.Choice(CONVERSATIONS),
                     help="LLaVA template: llava_v1 (READ's training template) or vicuna_v1 (the wording of the "
                     "original READAR scripts). [default: llava_v1; vicuna_v1 for read_as_published]"),
        click.option("--max-new-tokens", type=click.IntRange(1, MAX_NEW_TOKENS_CAP),
                     help=f"READ detectors: most tokens generated per question (1-{MAX_NEW_TOKENS_CAP}). "
                     f"[default: {MAX_NEW_TOKENS}; {MAX_NEW_TOKENS_CAP} for read_as_published]"),
        click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N [env READAR_DEVICE; cpu]."),
        click.option("--batch-size", type=BATCH_SIZE,
                     help=f"Images per forward (1-{MAX_BATCH_SIZE}) [env READAR_BATCH_SIZE; 4]."),
        click.option("--run-name", callback=_check_run_name,
                     help=f"Name of the run: {RUN_NAME_RULE} (default: derived from the dataset and options)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _absolute(path: Path | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


def detector_config(app: AppContext, options: dict[str, Any]) -> DetectorConfig:
    """The detector configuration of ``options``; options left out take the detector's defaults."""
    settings = app.settings
    defaults = DETECTOR_DEFAULTS.get(options["detector"], {})
    extra: dict[str, Any] = {}
    if "max_new_tokens" in defaults:
        extra["max_new_tokens"] = options.get("max_new_tokens") or defaults["max_new_tokens"]
    elif options.get("max_new_tokens") is not None:
        raise click.UsageError(
            f"--max-new-tokens applies to the READ detectors (read, lisa, read_as_published); "
            f"{options['detector']} generates no text"
        )
    prompt_mode = options.get("prompt_mode") or defaults.get("prompt_mode", "generic")
    if options.get("prompt_template") and prompt_mode != "template":
        raise click.UsageError(f"--prompt-template is used only with --prompt-mode template (this run's mode is "
                               f"{prompt_mode}); add --prompt-mode template or drop the template")
    try:
        return DetectorConfig(
            # Stored absolute: `resume` from another folder and workers elsewhere must find the same folders.
            checkpoint=_absolute(options.get("checkpoint") or settings.checkpoint),
            clip=_absolute(options.get("clip") or settings.clip),
            device=options.get("device") or settings.device,
            prompt_mode=prompt_mode,
            prompt_template=options.get("prompt_template"),
            decode_mode=options["decode_mode"],
            conversation=options.get("conversation") or defaults.get("conversation", "llava_v1"),
            batch_size=options.get("batch_size") or settings.batch_size,
            extra=extra,
        )
    except DetectorError as exc:
        raise click.UsageError(str(exc)) from exc


def run_request(options: dict[str, Any], config: DetectorConfig) -> RunRequest:
    return RunRequest(
        mvtec_root=options["mvtec_root"], detector=options["detector"], detector_config=config.public(),
        classes=parse_list(options.get("classes")), max_per_class=options["max_per_class"],
        exclude_defects=parse_list(options.get("exclude_defects")) or (), run_name=options.get("run_name"),
    )


def resume_hint(app: AppContext, run_name: str) -> str:
    """The command that continues ``run_name`` from any folder (the work folder named when not the default)."""
    work_dir = app.settings.work_dir
    flag = "" if work_dir == Path("readar-work") else f"--work-dir {shlex.quote(str(work_dir.resolve()))} "
    return f"readar {flag}resume {shlex.quote(run_name)}"


def summarise(app: AppContext, run_id: int, run_name: str) -> Path:
    """Print the metrics table and where everything lives; returns the CSV path."""
    csv_path = write_run_csv(app.repo, run_id, run_csv_path(app.settings.work_dir, run_name))
    run = app.repo.get_run_by_id(run_id)
    print_metrics(app.console, app.repo, run)
    totals = app.repo.status_totals(run_id)
    app.console.print("images: " + ", ".join(f"{n} {shown(s)}" for s, n in sorted(totals.items())))
    unfinished = totals.get(ImageStatus.RUNNING, 0) + totals.get(ImageStatus.QUEUED, 0)
    if unfinished:  # held by another process (a second `readar run`, a worker), or an interrupted run
        app.console.print(
            f"note: {unfinished} image(s) are not finished yet (queued or running), so these metrics are partial; "
            f"`readar status {visible(run_name)}` follows them, and `readar metrics {visible(run_name)}` shows "
            "the final numbers once they finish", style="yellow", markup=False, highlight=False)
    app.console.print(f"metrics CSV:  {shown(csv_path)}")
    app.console.print(f"database:     {shown(redact_text(app.settings.resolved_database_url))}")
    app.console.print(f"logits:       {shown(app.store.describe())}/runs/{run_id}/images/")
    return csv_path


def celery_for(app: AppContext):  # noqa: ANN201 - celery.Celery
    """A Celery client with the shared configuration; refuses to run without a broker."""
    if not app.settings.broker_url:
        raise click.UsageError(
            "this command needs a broker: set READAR_BROKER_URL (e.g. redis://127.0.0.1:6379/0) or pass "
            "--broker-url; without one, `readar run` executes on this machine"
        )
    from workers.celery_app import make_app

    return make_app(app.settings)
