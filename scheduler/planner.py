"""Run planning: index the dataset, create (or find) the run record and one SQL row per test image."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.models import Run
from storage.repository import Repository, RunConflictError, RunNotFoundError

# Configuration keys that define a run: resuming with different values would mix incompatible results.
IDENTITY_KEYS = ("classes", "max_per_class", "exclude_defects", "detector_config")
# Keys of ``detector_config`` that only say how the images are executed (like a worker's --processes, which is
# not stored at all): a rerun of a run may change them. Every other key decides the results and may not change.
EXECUTION_SETTINGS = ("device", "batch_size")
# The command-line option behind a stored setting, for messages (detector_config keys map to --key-name).
_OPTION_NAMES = {"dataset_root": "--mvtec-root", "dtype": "the model dtype"}
# Run names are identifiers: they name files (<work-dir>/results/<run>.csv), appear in commands and tables.
RUN_NAME_MAX = 100
RUN_NAME_RULE = (f"letters A-Z a-z, digits, '.', '_' and '-', starting with a letter or a digit, at most "
                 f"{RUN_NAME_MAX} characters")
_RUN_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{RUN_NAME_MAX - 1}}}")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class RunNameError(ValueError):
    """A new run's name breaks :data:`RUN_NAME_RULE`; the message names the rule."""


def valid_run_name(name: str) -> bool:
    """Whether ``name`` follows :data:`RUN_NAME_RULE`."""
    return _RUN_NAME.fullmatch(name) is not None


def check_run_name(name: str) -> str:
    """``name`` when it follows :data:`RUN_NAME_RULE`, else :class:`RunNameError` naming the rule."""
    if not valid_run_name(name):
        quoted = repr(name if len(name) <= RUN_NAME_MAX + 20 else name[:RUN_NAME_MAX] + "...")
        raise RunNameError(f"run name {quoted} is not allowed: use {RUN_NAME_RULE}")
    return name


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
        """The run configuration's identity keys (:data:`IDENTITY_KEYS`), execution settings included."""
        return {
            "classes": list(self.classes) if self.classes else None,
            "max_per_class": self.max_per_class,
            "exclude_defects": sorted(self.exclude_defects),
            "detector_config": self.detector_config,
        }

    def result_settings(self) -> dict[str, Any]:
        """Every setting that decides the results, as stored: :meth:`identity` without execution settings."""
        return _result_settings(
            {"detector": self.detector, "dataset_root": str(self.mvtec_root.resolve()), **self.identity()}
        )

    def default_name(self) -> str:
        """``<detector>-<dataset folder>-<hash of the result settings>``: a rerun that changes only execution
        settings (device, batch size) finds the same run. Characters outside :data:`RUN_NAME_RULE` become
        ``_`` and long parts are shortened, so the name follows the rule."""
        detector, folder, digest = self._name_parts(self.result_settings())
        detector = _NAME_UNSAFE.sub("_", detector).lstrip("._-")[:40] or "run"
        folder = _NAME_UNSAFE.sub("_", folder)[: RUN_NAME_MAX - len(detector) - len(digest) - 2]
        return f"{detector}-{folder}-{digest}"

    def unchecked_default_name(self) -> str:
        """The default name as versions before :data:`RUN_NAME_RULE` derived it (folder name as it is)."""
        return "-".join(self._name_parts(self.result_settings()))

    def legacy_default_name(self) -> str:
        """The default name older versions derived, hashing the execution settings too."""
        return "-".join(self._name_parts(
            {"root": str(self.mvtec_root.resolve()), "detector": self.detector, **self.identity()}
        ))

    def _name_parts(self, settings: dict[str, Any]) -> tuple[str, str, str]:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        return self.detector, self.mvtec_root.resolve().name, digest


def _result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (detector, dataset_root and the identity keys) with detector_config flattened into its keys
    and the execution settings left out; values as JSON stores them."""
    flat = {key: value for key, value in settings.items() if key != "detector_config"}
    for key, value in (settings.get("detector_config") or {}).items():
        if key not in EXECUTION_SETTINGS:
            flat[f"detector_config.{key}"] = value
    return json.loads(json.dumps(flat))


def _setting_name(key: str) -> str:
    name = key.removeprefix("detector_config.").removeprefix("extra.")
    return _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))


def _shown(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "(none)"
    return repr(value)


def check_rerun(run: Run, request: RunRequest) -> None:
    """Refuse to continue ``run`` with ``request`` when a setting that decides the results differs; the error
    names each such setting with the run's value and the requested one. Execution settings may differ."""
    stored = _result_settings({"detector": run.detector, "dataset_root": run.dataset_root,
                               **{key: run.config.get(key) for key in IDENTITY_KEYS}})
    wanted = request.result_settings()
    differences = [
        f"{_setting_name(key)} is {_shown(stored.get(key))} in the run but {_shown(wanted.get(key))} now"
        for key in sorted(stored.keys() | wanted.keys()) if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise RunConflictError(
            f"run {run.name!r} was made with other result settings: {'; '.join(differences)}. Rerun it with the "
            f"run's values, continue it with `readar resume {run.name}`, or choose another --run-name for a new "
            f"run (only {', '.join('--' + key.replace('_', '-') for key in EXECUTION_SETTINGS)} may change on "
            "a rerun)"
        )


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
    """Index the dataset and create the run with one row per image (idempotent). Returns (run, new rows).

    A run of that name that exists already is continued when its result settings match (:func:`check_rerun`);
    it keeps its stored execution settings, while this invocation runs with the requested ones. A new run's
    name must follow :data:`RUN_NAME_RULE` (:class:`RunNameError`)."""
    from scheduler.dataset import DEFAULT_MAX_IMAGE_PIXELS, check_exclusions, index_dataset

    classes = list(request.classes) if request.classes else None
    check_exclusions(request.mvtec_root, request.exclude_defects, classes=classes)
    name = request.run_name or _default_name(repo, request)
    existing = _existing_run(repo, name)
    if existing is not None:
        check_rerun(existing, request)
    else:
        check_run_name(name)  # runs named before the rule existed continue under their names
    index = index_dataset(
        request.mvtec_root, classes=classes, max_per_class=request.max_per_class,
        exclude_defects=list(request.exclude_defects),
        # The run's pixel budget: the indexing checks headers against it, the workers check decodes against it.
        max_image_pixels=settings_public.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
    )
    config = {
        **request.identity(),
        "category_defects": {c: list(d) for c, d in index.category_defects.items()},
        "uses_ground_truth_names": uses_ground_truth_names,
        "settings": settings_public,
    }

    def create(existing: Run | None) -> Run:
        if existing is not None:  # same result settings: the stored execution settings make it compare equal
            config["detector_config"] = existing.config.get("detector_config")
        return repo.create_run(
            name=name, detector=request.detector, dataset_root=str(request.mvtec_root.resolve()), config=config,
            code_version=code_version(), model_fingerprint=model_fingerprint, identity_keys=IDENTITY_KEYS,
        )

    try:
        run = create(existing)
    except RunConflictError:  # another planner created it meanwhile: say what differs, or join it
        existing = _existing_run(repo, name)
        if existing is None:
            raise
        check_rerun(existing, request)
        run = create(existing)
    new_rows = repo.add_images(run.id, index.entries)
    return run, new_rows


def _existing_run(repo: Repository, name: str) -> Run | None:
    """The run of that name, or None: planning either continues a run or creates it."""
    try:
        return repo.get_run(name)
    except RunNotFoundError:
        return None


def _default_name(repo: Repository, request: RunRequest) -> str:
    """The request's default run name; a run named the way older versions named it is continued under that
    name."""
    name = request.default_name()
    if _existing_run(repo, name) is None:
        for older in dict.fromkeys((request.unchecked_default_name(), request.legacy_default_name())):
            if _existing_run(repo, older) is not None:
                return older
    return name


def parse_list(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")``; empty → None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    cleaned = tuple(item.strip() for item in items if item.strip())
    return cleaned or None
