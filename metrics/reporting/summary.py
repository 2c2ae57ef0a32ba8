"""The run facts at the top of a report: configuration, status totals, failed and skipped images."""

from __future__ import annotations

from metrics.published import oracle_note, published_setting_note
from metrics.reporting.content import RunSummary
from storage.models import ImageStatus, Run
from storage.repository import Repository

MAX_LISTED_PROBLEMS = 200
# Set in a run's stored detector configuration exactly when its detector generates text from a prompt: `run` and
# `submit` store it for every detector whose registered defaults have max_new_tokens, which are the ones that
# read prompt_mode and conversation (workers/detectors/base.py DETECTOR_DEFAULTS); every other detector's
# stored prompt_mode is the unused default.
PROMPTED_MARK = "extra.max_new_tokens"


def uses_prompt(run: Run) -> bool:
    """Whether ``run``'s detector reads its prompt mode, decoding mode and conversation template, from the run's
    stored configuration (so it holds for detectors registered by plugins, and needs no list of names)."""
    return PROMPTED_MARK in ((run.config or {}).get("detector_config") or {})


def run_summary(repo: Repository, run: Run) -> RunSummary:
    """The configuration of ``run`` as the report shows it (prompt mode, decoding, oracle flag, ...)."""
    config = run.config or {}
    detector_config = config.get("detector_config") or {}
    totals = repo.status_totals(run.id)
    uses_language = uses_prompt(run)
    return RunSummary(
        name=run.name, status=run.status, created=f"{run.created_at:%Y-%m-%d %H:%M}", detector=run.detector,
        model_fingerprint=run.model_fingerprint or "—",
        prompt_mode=str(detector_config.get("prompt_mode") or "—") if uses_language else "— (no prompt)",
        oracle=bool(config.get("uses_ground_truth_names")),
        decode_mode=str(detector_config.get("decode_mode") or "—") if uses_language else "—",
        conversation=str(detector_config.get("conversation") or "—") if uses_language else "—",
        checkpoint=str(detector_config.get("checkpoint") or "—"),
        dataset_root=run.dataset_root, code_version=run.code_version, status_totals=totals,
        setting_note=published_setting_note(run.detector, detector_config) or "",
        oracle_note=oracle_note(detector_config) if config.get("uses_ground_truth_names") else "",
    )


def problem_rows(repo: Repository, run_id: int) -> tuple[list[tuple[str, str, str]], dict[str, int]]:
    """(image path, status, reason) of failed and skipped images (at most MAX_LISTED_PROBLEMS listed) and
    the totals per status."""
    listed: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}
    for status in (ImageStatus.FAILED, ImageStatus.SKIPPED):
        rows = repo.images(run_id, status=status)
        counts[status] = len(rows)
        for row in rows:
            if len(listed) < MAX_LISTED_PROBLEMS:
                listed.append((row.image_path, status, row.error or "(no reason recorded)"))
    return listed, counts
