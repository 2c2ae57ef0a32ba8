"""The CLI's application context: settings read once, storage handles opened on first use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import click
from rich.console import Console

from storage.database import Database
from storage.models import Run
from storage.objects import ObjectStore, ObjectStoreError, check_store_url
from storage.repository import Repository, RunNotFoundError
from storage.settings import Settings


def file_in_the_way(path: Path) -> Path | None:
    """The path itself or its nearest existing parent when that is not a folder (a file), else None."""
    for candidate in (path.absolute(), *path.absolute().parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


@dataclass
class AppContext:
    settings: Settings
    verbose: bool = False
    # Tables stay readable when output is piped (rich would otherwise assume 80 columns).
    console: Console = field(default_factory=lambda: Console(width=None if Console().is_terminal else 140))
    err: Console = field(default_factory=lambda: Console(stderr=True))

    needs_existing_database: bool = False

    def check_store_url(self) -> None:
        """A work folder or store URL that cannot work is refused before the database is opened (so before a run
        is planned)."""
        blocker = file_in_the_way(self.settings.work_dir)
        if blocker is not None:
            where = "" if blocker == self.settings.work_dir.absolute() else f" (on the way to {self.settings.work_dir})"
            raise click.ClickException(f"work folder: {blocker}{where} is a file, not a folder: pass a --work-dir (or "
                                       "READAR_WORK_DIR) that is a folder or a new path")
        try:
            check_store_url(self.settings.resolved_object_store_url)
        except ObjectStoreError as exc:
            raise click.ClickException(f"object store: {exc}") from exc

    @cached_property
    def database(self) -> Database:
        self.check_store_url()
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
        try:
            return ObjectStore(self.settings.resolved_object_store_url, self.settings.storage_options())
        except ObjectStoreError as exc:
            raise click.ClickException(f"object store: {exc}") from exc


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
