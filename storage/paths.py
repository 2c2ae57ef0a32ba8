"""Path containment: no path from a dataset or a message may escape its root (DESIGN.md section 7)."""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A relative path resolves outside its root (``..`` or a symlink pointing elsewhere)."""


def resolve_inside(root: Path, relative: str | Path) -> Path:
    """``root / relative`` resolved, refusing absolute paths, ``..`` and symlinks that lead outside ``root``."""
    relative = Path(relative)
    if relative.is_absolute() or ".." in relative.parts:
        raise PathEscapeError(f"refusing path {str(relative)!r}: it must be relative to {root} without '..'")
    real_root = Path(root).resolve()
    resolved = (real_root / relative).resolve()
    if not resolved.is_relative_to(real_root):
        raise PathEscapeError(
            f"{real_root / relative} resolves to {resolved}, outside the dataset root {real_root}; "
            "copy the file into the dataset instead of linking to it"
        )
    return resolved
