"""The CLI's application context: settings read once, storage handles opened on first use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import click
from rich.console import Console

from storage.database import Database
from storage.models import Run
from storage.objects import ObjectStore
from storage.repository import Repository, RunNotFoundError
from storage.settings import Settings


@dataclass
class AppContext:
    settings: Settings
    verbose: bool = False
    # Tables stay readable when output is piped (rich would otherwise assume 80 columns).
    console: Console = field(default_factory=lambda: Console(width=None if Console().is_terminal else 140))
    err: Console = field(default_factory=lambda: Console(stderr=True))

    needs_existing_database: bool = False

    @cached_property
    def database(self) -> Database:
        default_file = self.settings.work_dir / "readar.sqlite"
        if self.needs_existing_database and not self.settings.database_url and not default_file.is_file():
            raise click.ClickException(
                f"no READAR database in {self.settings.work_dir.resolve()} (no readar.sqlite there): pass the "
                "--work-dir your runs used, or set READAR_WORK_DIR or READAR_DATABASE_URL"
            )
        database = Database(self.settings.resolved_database_url,
                            tls_ca_file=str(self.settings.database_tls_ca_file) if self.settings.database_tls_ca_file else None)
        database.migrate()
        return database

    @cached_property
    def repo(self) -> Repository:
        return Repository(self.database)

    def run(self, name: str) -> Run:
        """The named run, or a CLI error that says how to list the runs."""
        try:
            return self.repo.get_run(name)
        except RunNotFoundError as exc:
            raise click.ClickException(str(exc)) from exc

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings.resolved_object_store_url, self.settings.storage_options())


class VisibleFormatter(logging.Formatter):
    """Log lines quote file and category names: the characters a terminal would act on are shown as escapes."""

    def format(self, record: logging.LogRecord) -> str:
        from metrics.output import visible

        return visible(super().format(record), keep_newlines=True)


def configure_logging(verbose: bool) -> None:
    """Rich log lines on a terminal; plain, unwrapped lines (one record, one line) into files and pipes."""
    from rich.logging import RichHandler

    err = Console(stderr=True)
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=verbose)
        log_format = "%(message)s"
    else:
        handler = logging.StreamHandler()
        log_format = "%(asctime)s %(levelname)s %(message)s"
    handler.setFormatter(VisibleFormatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    for noisy in ("alembic", "botocore", "s3fs", "aiobotocore", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
