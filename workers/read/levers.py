"""Speed levers of the READ-family detectors: one switch each, read once from the environment.

Every lever keeps results equal to the eager path (identical tokens and SasP points, mask logits within 1e-5 in
float32 on the CPU; within bf16 tolerance on a GPU); tests compare each one with its switch off. A lever that
only pays on a GPU stands aside on the CPU even when switched on. A lever becomes the default on CUDA once its
H200 figure is in bench/RESULTS.md; until then every lever is off by default (the ``cuda`` column below is
that plan: ``_MEASURED`` lists the levers measured so far, none yet). ``bench/device_run.sh`` switches the
non-compile levers on for its rows; ``READAR_COMPILE=1`` turns the three compile levers on.

Values: ``1``/``on``/``true``/``yes``, ``0``/``off``/``false``/``no``, or ``auto`` (the device's default).

========================  ================  =====================================================================
variable                  field             what it does
========================  ================  =====================================================================
READAR_DEVICE_FRAMES      device_frames     SAM frames travel as uint8; normalised and padded on the device
READAR_PINNED             pinned            host→device copies from pinned memory, ``non_blocking``
READAR_OVERLAP            overlap           one batched similarity and one device→host copy per batch; SasP on
                                            the CPU while the SAM image encoder runs; prompt encoder batched
READAR_CUDA_EVENTS        cuda_events       stage timings from CUDA events instead of ``synchronize``
READAR_PREFIX_CACHE       prefix_cache      the system-prompt prefix's key/value cache computed once per process
READAR_STATIC_CACHE       static_cache      a static key/value cache (prefix + suffix + max new tokens); tokens
                                            and finished flags stay on the device; no cache copy when every
                                            image has one question
READAR_SAM_ATTENTION      fused_sam         SAM's global-attention blocks without the dense relative-position
                                            mask, so a fused SDPA kernel applies
READAR_COMPILE_SAM        compile_sam       ``torch.compile`` the SAM image encoder
READAR_COMPILE_DECODE     compile_decode    ``torch.compile(mode="reduce-overhead")`` the one-token decode step
READAR_COMPILE_PREFILL    compile_prefill   ``torch.compile`` the prefill (static shapes per batch size)
READAR_SAM_STREAM         sam_stream        generate mode: the SAM encoder on a second CUDA stream during decode
========================  ================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from workers.detectors.base import SetupError

# field → (environment variable, default on CUDA once measured, default on the CPU)
_SWITCHES: dict[str, tuple[str, bool, bool]] = {
    "device_frames": ("READAR_DEVICE_FRAMES", True, False),
    "pinned": ("READAR_PINNED", True, False),
    "overlap": ("READAR_OVERLAP", True, False),
    "cuda_events": ("READAR_CUDA_EVENTS", True, False),
    "prefix_cache": ("READAR_PREFIX_CACHE", True, False),
    "static_cache": ("READAR_STATIC_CACHE", True, False),
    "fused_sam": ("READAR_SAM_ATTENTION", True, False),
    "compile_sam": ("READAR_COMPILE_SAM", False, False),
    "compile_decode": ("READAR_COMPILE_DECODE", False, False),
    "compile_prefill": ("READAR_COMPILE_PREFILL", False, False),
    "sam_stream": ("READAR_SAM_STREAM", True, False),
}
COMPILE_FIELDS = ("compile_sam", "compile_decode", "compile_prefill")
# Levers whose H200 figures are in bench/RESULTS.md: only these take their CUDA default (issue "READ at H200
# speed": on by default on CUDA once measured). Empty until a device run records them.
_MEASURED: frozenset[str] = frozenset()
_TRUE = {"1", "on", "true", "yes"}
_FALSE = {"0", "off", "false", "no"}


class LeverError(SetupError, ValueError):
    """A READAR_* lever variable holds something other than on, off or auto: a setup error (no image is to
    blame; the run or the worker stops with this line until the variable is fixed)."""


@dataclass(frozen=True)
class Levers:
    """Which speed levers a detector uses (module docstring). All off is the eager path."""

    device_frames: bool = False
    pinned: bool = False
    overlap: bool = False
    cuda_events: bool = False
    prefix_cache: bool = False
    static_cache: bool = False
    fused_sam: bool = False
    compile_sam: bool = False
    compile_decode: bool = False
    compile_prefill: bool = False
    sam_stream: bool = False

    @classmethod
    def eager(cls) -> Levers:
        return cls()

    @classmethod
    def from_env(cls, device: str | torch.device, env: Mapping[str, str] | None = None) -> Levers:
        """The levers for ``device`` (``cuda…`` or ``cpu``) as the environment sets them.

        ``READAR_COMPILE`` (on/off) sets the three compile levers at once; their own variables override it.
        """
        env = os.environ if env is None else env
        cuda = torch.device(device).type == "cuda"
        compile_all = _parse("READAR_COMPILE", env.get("READAR_COMPILE", "auto"), None)
        values = {}
        for field, (variable, on_cuda, on_cpu) in _SWITCHES.items():
            default = (on_cuda and field in _MEASURED) if cuda else on_cpu
            if field in COMPILE_FIELDS and compile_all is not None:
                default = compile_all
            values[field] = _parse(variable, env.get(variable, "auto"), default)
        return cls(**values)

    def replace(self, **changes: bool) -> Levers:
        return dataclasses.replace(self, **changes)

    def enabled(self) -> list[str]:
        """Names of the levers that are on (for diagnostics and bench rows)."""
        return [field.name for field in dataclasses.fields(self) if getattr(self, field.name)]

    @staticmethod
    def names() -> list[str]:
        return [field.name for field in dataclasses.fields(Levers)]

    @staticmethod
    def variable(field: str) -> str:
        """The environment variable of one lever (``READAR_…``)."""
        return _SWITCHES[field][0]


def _parse(variable: str, raw: str, default: bool | None) -> bool | None:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if value in {"", "auto"}:
        return default
    raise LeverError(f"{variable}={raw!r}: use on, off or auto")
