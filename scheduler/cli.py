"""The ``readar`` command line. Global options override ``READAR_*`` environment settings."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click
from pydantic import ValidationError

from scheduler.context import AppContext, configure_logging
from storage.settings import Settings, settings_error_line

# Commands that only make sense on runs that exist: with the default SQLite database, a work folder without one
# is a mistake (a typo in --work-dir), not a reason to create an empty database.
COMMANDS_ON_EXISTING_RUNS = frozenset({
    "runs", "status", "metrics", "results", "export", "report", "show", "resume", "retry", "delete", "cancel",
    "aggregate", "reconcile", "compare",
})


# Commands that read a stored run's images and masks again from its dataset root.
READS_STORED_DATASET = frozenset({"show", "report"})


def dataset_failure(exc: BaseException) -> str | None:
    """One line for an image or mask of a stored run that is gone (the dataset moved or changed since the run)."""
    from metrics.errors import GroundTruthError

    if isinstance(exc, FileNotFoundError):
        what = f"{exc.filename} does not exist" if exc.filename else str(exc)
    elif isinstance(exc, GroundTruthError) and "does not exist" in str(exc):
        what = str(exc).splitlines()[0]
    else:
        return None
    return (f"{what}: the run's dataset has moved or changed since the run; put it back where the run read it "
            "(the folder named here)")


class ReadarGroup(click.Group):
    """Connection and URL failures end as one line naming what failed and what to do (``-v``: traceback).

    Error messages quote names from folders, files and the database: the characters a terminal would act on
    (escape sequences, ...) are shown as escapes instead."""

    def invoke(self, ctx: click.Context) -> object:
        from metrics.output import visible

        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.message = visible(exc.message, keep_newlines=True)
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            from scheduler.failures import describe_failure

            app = ctx.obj if isinstance(ctx.obj, AppContext) else None
            settings = app.settings if app is not None else None
            message = describe_failure(
                exc,
                database_url=settings.resolved_database_url if settings else None,
                broker_url=settings.broker_url if settings else None,
            )
            if message is None and ctx.invoked_subcommand in READS_STORED_DATASET:
                message = dataset_failure(exc)
            if message is None:
                raise
            if app is not None and app.verbose:
                traceback.print_exc()
            raise click.ClickException(visible(message)) from exc


@click.group(cls=ReadarGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--work-dir", type=click.Path(path_type=Path), help="Work folder [env READAR_WORK_DIR; ./readar-work].")
@click.option("--database-url", help="SQLAlchemy URL [env READAR_DATABASE_URL; SQLite in the work folder].")
@click.option("--object-store-url", help="fsspec URL for logits [env READAR_OBJECT_STORE_URL; <work-dir>/objects].")
@click.option("--broker-url", help="Celery broker, e.g. redis://127.0.0.1:6379/0 [env READAR_BROKER_URL; unset = "
              "embedded mode].")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.pass_context
def cli(ctx: click.Context, work_dir: Path | None, database_url: str | None, object_store_url: str | None,
        broker_url: str | None, verbose: bool) -> None:
    """READAR: benchmark zero-shot anomaly segmentation by READ on MVTec-AD-format datasets."""
    overrides = {
        k: v for k, v in {"work_dir": work_dir, "database_url": database_url, "object_store_url": object_store_url,
                          "broker_url": broker_url}
        .items() if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise click.UsageError(f"invalid setting: {settings_error_line(exc)}") from exc
    configure_logging(verbose)
    ctx.obj = AppContext(settings=settings, verbose=verbose,
                         needs_existing_database=ctx.invoked_subcommand in COMMANDS_ON_EXISTING_RUNS)


def _register() -> None:
    from scheduler.commands import compare, data, distributed, query, report, run

    for command in (*run.COMMANDS, *distributed.COMMANDS, *query.COMMANDS, *report.COMMANDS, *compare.COMMANDS,
                    *data.COMMANDS):
        cli.add_command(command)
    from scheduler.commands.eval import eval_command

    cli.add_command(eval_command, name="eval")


_register()


def main() -> None:
    try:
        cli(prog_name="readar")
    except KeyboardInterrupt:  # pragma: no cover - handled inside long commands
        sys.exit(130)
