"""The setting behind the published READAR numbers, and how a run's configuration compares with it.

The original READAR scripts saved their maps from a pass whose SasP points were always lost (an exception
swallowed), so SAM saw the [SEG] token after one not-a-point padding point; they used the ``vicuna_v1``
wording, the ``anomaly`` prompt (ground-truth defect names: an oracle setting) and let generation run to
2,048 new tokens. The ``read_as_published`` detector reproduces it (docs/DESIGN.md 5.3).
"""

from __future__ import annotations

from typing import Any

PUBLISHED_DETECTOR = "read_as_published"
PUBLISHED_SETTING: dict[str, Any] = {"prompt_mode": "anomaly", "conversation": "vicuna_v1", "max_new_tokens": 2048}


def published_setting_note(detector: str, detector_config: dict[str, Any]) -> str | None:
    """One line for tables and reports: whether a ``read_as_published`` run matches the published setting."""
    if detector != PUBLISHED_DETECTOR:
        return None
    stored = {
        "prompt_mode": detector_config.get("prompt_mode"),
        "conversation": detector_config.get("conversation"),
        "max_new_tokens": detector_config.get("extra.max_new_tokens"),
    }
    differences = [f"{name}={stored[name]} (published: {value})" for name, value in PUBLISHED_SETTING.items()
                   if stored[name] != value]
    if detector_config.get("decode_mode", "generate") != "generate":
        differences.append(f"decode_mode={detector_config.get('decode_mode')} (published: generate)")
    prompt = "SAM prompt = [SEG] after one not-a-point padding point, no SasP points"
    if differences:
        return f"read_as_published: {prompt}, but this run differs from the published setting in " + ", ".join(
            differences)
    return (f"read_as_published: matches the published READAR setting ({prompt}; vicuna_v1; anomaly prompt; "
            "up to 2,048 new tokens)")


def oracle_note(detector_config: dict[str, Any]) -> str:
    """Why a run's image-level numbers are an oracle setting, naming the setting that makes them one."""
    if detector_config.get("prompt_mode") == "template":
        cause = f"--prompt-template {detector_config.get('prompt_template')!r} names the ground-truth defect folder"
    else:
        cause = "--prompt-mode anomaly names the ground-truth defect folder"
    return (f"{cause} in every prompt (\"good\" for normal images), so iAUROC here is an oracle setting, not a "
            "zero-shot image-level result")
