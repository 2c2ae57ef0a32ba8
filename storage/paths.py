"""Path containment: no path from a dataset or a message may escape its root (DESIGN.md section 7)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


class PathEscapeError(ValueError):
    """A relative path is empty, absolute, has ``..`` or a backslash, or resolves (through a symlink or a symlink
    loop) outside its root or nowhere."""


def name_problem(relative: str | PurePosixPath) -> str | None:
    """Why :func:`resolve_inside` refuses ``relative``, judged from the text alone; None when the text is fine.

    The dataset index asks this of every path it stores, so that a name the resolver refuses fails its own row
    when the run is planned instead of when a worker reaches it."""
    text = str(relative)
    if not text:
        return "it is empty"
    if "\x00" in text:
        return "it contains a NUL character"
    if "\\" in text:
        # Read as a separator, `crack/sub\000.png` would name the different file `crack/sub/000.png`.
        return (
            "it contains a backslash, which READAR refuses in names (Windows reads it as a folder separator, so it "
            "could name another file); rename the file or folder without it"
        )
    if PurePosixPath(text).is_absolute() or Path(text).is_absolute():
        return "it is absolute; paths must be relative to the dataset root"
    if ".." in PurePosixPath(text).parts:
        return "'..' components are not allowed under the dataset root"
    return None


def resolve_inside(root: Path | str, relative: str | PurePosixPath) -> Path:
    """Resolve ``relative`` (a POSIX path, e.g. from an SQL row) under ``root``; refuse anything that escapes.

    Raises :class:`PathEscapeError` for empty or absolute paths, ``..`` components, NUL characters, backslashes
    (see :func:`name_problem`), symlink loops and symlinks whose target lies outside the root. The file need not
    exist.
    """
    text = str(relative)
    problem = name_problem(text)
    if problem is not None:
        raise PathEscapeError(f"refusing path {text!r}: {problem}")
    root_resolved = Path(root).resolve()
    try:
        candidate = (root_resolved / Path(*PurePosixPath(text).parts)).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise PathEscapeError(
            f"path {text!r} under {root_resolved} cannot be resolved ({exc}); fix or remove the symlink"
        ) from None
    if not candidate.is_relative_to(root_resolved):
        raise PathEscapeError(
            f"path {text!r} resolves to {candidate}, outside the dataset root {root_resolved}; "
            "replace the symlink with the file itself"
        )
    return candidate


def reference_folder(root: Path | str, category: str) -> Path | None:
    """``<root>/<category>/train/good`` for reference-based detectors, or None when the dataset has none there.

    Only a folder that is plainly absent gives None (the detector then says it works without a reference). A
    symlink loop or a link out of the root still gives the folder, so that the detector reading it refuses it
    with the reason instead of silently working without its reference; detectors that need none never look."""
    folder = Path(root) / category / "train" / "good"
    try:
        inside = resolve_inside(root, f"{category}/train/good")
    except PathEscapeError:
        return folder
    return folder if inside.is_dir() else None


class RootResolver:
    """:func:`resolve_inside` for many paths under one root, resolving each directory once.

    A task resolves one image path per image, and resolving every component each time (``Path.resolve`` makes a
    system call per component) was a measurable part of a short task (figures: bench/RESULTS.md). Here a path's
    directory is resolved and checked once; the file itself is checked with one ``lstat`` and, when it is a
    symlink, resolved in full like any other path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self._directories: dict[str, Path] = {}

    def __call__(self, relative: str | PurePosixPath) -> Path:
        text = str(relative)
        directory_text, _, name = text.rpartition("/")
        if not directory_text or name in ("", ".", "..") or "\x00" in text or "\\" in text:
            return resolve_inside(self.root, text)  # the general path, with its errors
        directory = self._directories.get(directory_text)
        if directory is None:
            try:
                directory = resolve_inside(self.root, directory_text)
            except PathEscapeError:
                return resolve_inside(self.root, text)  # raises, naming the whole path
            self._directories[directory_text] = directory
        candidate = directory / name
        if os.path.islink(candidate):
            return resolve_inside(self.root, text)
        return candidate


class PathMap:
    """Where this machine finds the folders a run stored: ``OLD=NEW`` pairs (comma-separated), applied to the
    longest matching OLD prefix. A worker mounting the dataset or the checkpoints elsewhere than the submitting
    machine sets READAR_PATH_MAP (or ``readar worker --path-map OLD=NEW``)."""

    def __init__(self, text: str = "") -> None:
        pairs = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            old, sep, new = entry.partition("=")
            if not sep or not old.startswith("/") or not new.startswith("/"):
                raise ValueError(f"path map entry {entry!r} must be OLD=NEW with two absolute paths")
            pairs.append((old.rstrip("/") or "/", new.rstrip("/") or "/"))
        self.pairs = tuple(sorted(pairs, key=lambda pair: len(pair[0]), reverse=True))

    def __call__(self, path: str | Path) -> Path:
        text = str(path)
        for old, new in self.pairs:
            if text == old or text.startswith(old + "/") or old == "/":
                rest = text[len(old):].lstrip("/")
                return Path(new) / rest if rest else Path(new)
        return Path(text)

    def __bool__(self) -> bool:
        return bool(self.pairs)
