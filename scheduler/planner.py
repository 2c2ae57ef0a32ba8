"""Run planning: index the dataset, create (or find) the run record and one SQL row per test image."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.models import Run
from storage.repository import PlannedImage, Repository

# Configuration keys that define a run: resuming with different values would mix incompatible results.
IDENTITY_KEYS = ("classes", "max_per_class", "exclude_defects", "detector_config")


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for: dataset selection plus detector."""

    mvtec_root: Path
    detector: str
    detector_config: dict[str, Any]
    classes: tuple[str, ...] | None = None
    max_per_class: int = -1
    exclude_defects: tuple[str, ...] = ()
    run_name: str | None = None

    def identity(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes) if self.classes else None,
            "max_per_class": self.max_per_class,
            "exclude_defects": sorted(self.exclude_defects),
            "detector_config": self.detector_config,
        }

    def default_name(self) -> str:
        digest = hashlib.sha256(
            json.dumps({"root": str(self.mvtec_root.resolve()), "detector": self.detector, **self.identity()},
                       sort_keys=True).encode()
        ).hexdigest()[:8]
        return f"{self.detector}-{self.mvtec_root.resolve().name}-{digest}"


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = version("readar")
    except PackageNotFoundError:
        base = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{base}+{commit}" if commit else base


def plan_run(
    repo: Repository, request: RunRequest, *, model_fingerprint: str | None, uses_ground_truth_names: bool,
    settings_public: dict[str, Any],
) -> tuple[Run, int]:
    """Index the dataset and create the run with one row per image (idempotent). Returns (run, new rows)."""
    from scheduler.dataset import index_dataset

    index = index_dataset(
        request.mvtec_root, classes=list(request.classes) if request.classes else None,
        max_per_class=request.max_per_class, exclude_defects=list(request.exclude_defects),
    )
    config = {
        **request.identity(),
        "category_defects": {c: list(d) for c, d in index.category_defects.items()},
        "uses_ground_truth_names": uses_ground_truth_names,
        "settings": settings_public,
    }
    run = repo.create_run(
        name=request.run_name or request.default_name(), detector=request.detector,
        dataset_root=str(request.mvtec_root.resolve()), config=config, code_version=code_version(),
        model_fingerprint=model_fingerprint, identity_keys=IDENTITY_KEYS,
    )
    new_rows = repo.add_images(run.id, (_planned(entry) for entry in index.entries))
    return run, new_rows


def _planned(entry: Any) -> PlannedImage:
    status = {"ok": "queued"}.get(entry.status, entry.status)
    return PlannedImage(
        category=entry.category, defect=entry.defect, label=int(entry.label), image_path=entry.image_path,
        mask_path=entry.mask_path, height=entry.height, width=entry.width, status=status, reason=entry.reason,
    )


def parse_list(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")``; empty → None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    cleaned = tuple(item.strip() for item in items if item.strip())
    return cleaned or None
