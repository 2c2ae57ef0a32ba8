"""Path containment: no path from a dataset or a message may escape its root (DESIGN.md section 7)."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class PathEscapeError(ValueError):
    """A relative path is empty, absolute, has ``..`` or resolves (through a symlink) outside its root."""


def resolve_inside(root: Path | str, relative: str | PurePosixPath) -> Path:
    """Resolve ``relative`` (a POSIX path, e.g. from an SQL row) under ``root``; refuse anything that escapes.

    Raises :class:`PathEscapeError` for empty or absolute paths, ``..`` components (backslashes count as
    separators), NUL characters, and symlinks whose target lies outside the root. The file need not exist.
    """
    text = str(relative)
    if not text or "\x00" in text:
        raise PathEscapeError(f"refusing path {text!r}: it is empty or contains a NUL character")
    parts = PurePosixPath(text.replace("\\", "/"))
    if parts.is_absolute() or Path(text).is_absolute():
        raise PathEscapeError(f"refusing absolute path {text!r}; paths must be relative to the dataset root")
    if ".." in parts.parts:
        raise PathEscapeError(f"refusing path {text!r}: '..' components are not allowed under the dataset root")
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / Path(*parts.parts)).resolve()
    if not candidate.is_relative_to(root_resolved):
        raise PathEscapeError(
            f"path {text!r} resolves to {candidate}, outside the dataset root {root_resolved}; "
            "replace the symlink with the file itself"
        )
    return candidate
