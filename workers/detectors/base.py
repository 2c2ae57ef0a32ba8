"""The detector interface: preprocessed images + prompts in, stored logits + per-image diagnostics out.

A detector works in two steps so that CPU work overlaps the accelerator: ``prepare`` (thread-safe, CPU only:
decode-side preprocessing, prompt building) runs once per image in the task's thread, and ``detect`` runs one
batched forward over whatever the in-process batcher collected. Detectors are built by name from
``DETECTOR_REGISTRY``; built-ins register themselves like any plug-in.
"""

from __future__ import annotations

import importlib
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from storage.logits import StoredLogits

PROMPT_MODES = ("anomaly", "binary", "template", "generic", "all_types")
DECODE_MODES = ("generate", "teacher_forced")
CONVERSATIONS = ("llava_v1", "vicuna_v1")


class DetectorError(RuntimeError):
    """A detector cannot be built or cannot process an input; the message says what to fix."""


class SetupError(DetectorError):
    """This machine cannot run the detector at all (weights missing or unreadable, no such device). No image
    is to blame: images are given back untouched, and the run (or the worker) stops until the setup is fixed."""


def check_device(device: str) -> None:
    """SetupError unless ``device`` exists here (cpu always; cuda:N needs a CUDA build of torch and GPU N)."""
    from storage.settings import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(device):
        raise SetupError(f"device {device!r} is not one READAR runs on: use cpu, cuda or cuda:N")
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SetupError(
            f"device {device!r} was asked for, but this torch {torch.__version__} sees no CUDA device: install a "
            "CUDA build of torch on a GPU machine, or use --device cpu"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise SetupError(
            f"device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible "
            "(CUDA_VISIBLE_DEVICES)"
        )


TEMPLATE_FIELDS = ("class_name", "anomaly_type")


def template_problem(template: str | None) -> str | None:
    """Why a --prompt-template cannot be used for every image (None: it can). Only plain {class_name} and
    {anomaly_type} are allowed: no other name, no attribute or index access, no conversion or format spec, no
    lone brace (the template is checked once here instead of failing image by image)."""
    if not template:
        return None
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
    for name, spec, conversion in fields:
        if name not in TEMPLATE_FIELDS or spec or conversion:
            return (f"uses {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; only "
                    "{class_name} and {anomaly_type} can stand in it")
    return None


@dataclass(frozen=True)
class ImageSample:
    """One test image as a detector sees it.

    image: uint8 RGB array (H, W, 3); grayscale sources are already converted.
    category: category folder name, e.g. ``metal_nut``.
    defect: defect folder name (``good`` for normal images). Only prompt modes that are documented as oracle
        settings (``anomaly``) may use it.
    category_defects: the category's defect folder names (``good`` excluded), sorted; used by ``all_types``.
    train_dir: ``<root>/<category>/train/good`` when it exists (reference-based detectors), else None.
    key: a stable identifier of the image for logs and error messages (its path relative to the root).
    """

    image: np.ndarray
    category: str
    defect: str
    category_defects: tuple[str, ...] = ()
    train_dir: Path | None = None
    key: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class Detection:
    """A detector's result for one image.

    logits: the maps to store (see :class:`storage.logits.StoredLogits`).
    diagnostics: JSON-serialisable per-image facts (e.g. ``similarity`` grid (24×24 for READ, 16×16 for LISA), ``points``, ``labels``,
        ``seg_found``, ``text``, ``timings_ms``). Stored beside the logits and summarised in SQL.
    """

    logits: StoredLogits
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything a detector may need to be built. Unused fields are ignored by detectors that do not need them.

    checkpoint / clip: local folders of a released READ checkpoint and of CLIP ViT-L/14-336 (never downloaded).
    device: ``cpu``, ``cuda`` or ``cuda:N``. dtype: None picks fp32 on CPU and bf16 on CUDA.
    prompt_mode: one of PROMPT_MODES; prompt_template: the user template for ``template`` mode.
    decode_mode: one of DECODE_MODES; conversation: one of CONVERSATIONS.
    batch_size: images per forward.
    """

    checkpoint: Path | None = None
    clip: Path | None = None
    device: str = "cpu"
    dtype: str | None = None
    prompt_mode: str = "generic"
    prompt_template: str | None = None
    decode_mode: str = "generate"
    conversation: str = "llava_v1"
    batch_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise DetectorError(f"unknown prompt mode {self.prompt_mode!r}; choose one of {', '.join(PROMPT_MODES)}")
        if self.decode_mode not in DECODE_MODES:
            raise DetectorError(f"unknown decode mode {self.decode_mode!r}; choose one of {', '.join(DECODE_MODES)}")
        if self.conversation not in CONVERSATIONS:
            raise DetectorError(
                f"unknown conversation template {self.conversation!r}; choose one of {', '.join(CONVERSATIONS)}"
            )
        if self.prompt_mode == "template" and not self.prompt_template:
            raise DetectorError(
                "prompt mode 'template' needs a prompt template (--prompt-template), e.g. 'Segment the defect on the "
                "{class_name}.'"
            )
        problem = template_problem(self.prompt_template) if self.prompt_mode == "template" else None
        if problem:
            raise DetectorError(f"prompt template {self.prompt_template!r} {problem}")
        if self.batch_size < 1:
            raise DetectorError(f"batch size must be at least 1; got {self.batch_size}")

    def public(self) -> dict[str, Any]:
        """A JSON-serialisable description for the run record."""
        return {
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "clip": str(self.clip) if self.clip else None,
            "device": self.device,
            "dtype": self.dtype,
            "prompt_mode": self.prompt_mode,
            "prompt_template": self.prompt_template,
            "decode_mode": self.decode_mode,
            "conversation": self.conversation,
            "batch_size": self.batch_size,
            **{f"extra.{k}": v for k, v in sorted(self.extra.items())},
        }


class Detector(ABC):
    """Base class of all detectors."""

    name: ClassVar[str] = ""
    # True when the image-level result uses ground-truth information (e.g. the ``anomaly`` prompt names the
    # defect folder): reports must flag such runs as oracle settings.
    uses_ground_truth_names: bool = False

    @abstractmethod
    def prepare(self, sample: ImageSample) -> Any:
        """CPU preprocessing for one image; thread-safe. Returns an opaque item for :meth:`detect`."""

    @abstractmethod
    def detect(self, batch: Sequence[Any]) -> list[Detection]:
        """One batched forward over prepared items; returns one Detection per item, in order."""

    def fingerprint(self) -> str:
        """Identifies the model and weights (stored with the run); override for weighted models."""
        return self.name

    def preflight(self) -> None:  # noqa: B027 - a hook: detectors without weights have nothing to check
        """Check, before any image is claimed, what can be checked without the full model load (device, weight
        files); raises SetupError with one line saying what to fix. Detectors with weights override it."""


DetectorFactory = Callable[[DetectorConfig], Detector]

DETECTOR_REGISTRY: dict[str, DetectorFactory] = {}

# Built-in detectors live in these modules; importing one registers its names.
_BUILTIN_MODULES = (
    "workers.detectors.baseline", "workers.read.detector", "workers.pixellm.detector", "workers.detectors.noop"
)


# Per detector: the run options it uses and their values when the user leaves them out (prompt_mode,
# conversation, max_new_tokens); a detector without an entry uses none of them.
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_detector(
    name: str, *, defaults: dict[str, Any] | None = None
) -> Callable[[DetectorFactory], DetectorFactory]:
    """Decorator: register a factory ``(DetectorConfig) -> Detector`` under ``name``, with the defaults of the
    run options it reads (see DETECTOR_DEFAULTS)."""

    def decorate(factory: DetectorFactory) -> DetectorFactory:
        if name in DETECTOR_REGISTRY and DETECTOR_REGISTRY[name] is not factory:
            raise DetectorError(f"detector name {name!r} is already registered")
        DETECTOR_REGISTRY[name] = factory
        DETECTOR_DEFAULTS[name] = dict(defaults or {})
        return factory

    return decorate


def load_builtin_detectors() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Skip a built-in whose own package is absent; a missing dependency inside it is a real error.
            if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
                raise


def available_detectors() -> list[str]:
    load_builtin_detectors()
    return sorted(DETECTOR_REGISTRY)


def find_detector(name: str) -> DetectorFactory:
    """The factory registered under ``name`` (built-ins loaded first); DetectorError listing the available ones
    otherwise."""
    if name not in DETECTOR_REGISTRY:
        load_builtin_detectors()
    try:
        return DETECTOR_REGISTRY[name]
    except KeyError:
        raise DetectorError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTOR_REGISTRY))}") from None


def build_detector(name: str, config: DetectorConfig) -> Detector:
    """Build a registered detector by name; unknown names list the available ones."""
    return find_detector(name)(config)
