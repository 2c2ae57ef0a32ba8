"""The speed-lever switches (workers/read/levers.py): parsing, device defaults, and the device run's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.read import levers as levers_module
from workers.read.levers import COMPILE_FIELDS, LeverError, Levers

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("raw, expected", [("1", True), ("ON", True), (" yes ", True), ("0", False), ("off", False),
                                           ("No", False)])
def test_a_switch_reads_on_and_off(raw: str, expected: bool) -> None:
    assert Levers.from_env("cpu", {"READAR_OVERLAP": raw}).overlap is expected


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(LeverError, match=r"READAR_STATIC_CACHE='maybe': use on, off or auto"):
        Levers.from_env("cuda", {"READAR_STATIC_CACHE": "maybe"})


def test_nothing_is_on_by_default_before_it_is_measured() -> None:
    assert Levers.from_env("cuda", {}) == Levers.eager() == Levers.from_env("cpu", {"READAR_OVERLAP": "auto"})


def test_a_measured_lever_takes_its_cuda_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(levers_module, "_MEASURED", frozenset({"overlap", "compile_sam"}))
    assert Levers.from_env("cuda:1", {}).enabled() == ["overlap"]  # compile_sam's CUDA default stays off
    assert Levers.from_env("cpu", {}).enabled() == []


def test_compile_switches_all_three_and_each_overrides_it() -> None:
    assert Levers.from_env("cuda", {"READAR_COMPILE": "on"}).enabled() == list(COMPILE_FIELDS)
    levers = Levers.from_env("cuda", {"READAR_COMPILE": "on", "READAR_COMPILE_DECODE": "off"})
    assert levers.enabled() == ["compile_sam", "compile_prefill"]


def test_the_device_run_switches_on_every_non_compile_lever() -> None:
    script = (ROOT / "bench" / "device_run.sh").read_text()
    wanted = [Levers.variable(name) for name in Levers.names() if name not in COMPILE_FIELDS]
    assert [variable for variable in wanted if variable not in script] == []
