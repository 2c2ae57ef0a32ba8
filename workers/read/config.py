"""The settings of a released READ or LISA checkpoint, read once from its ``config.json`` and checked when built.

A released folder (e.g. READ-LLaVA-v1.5-7B-for-ReasonSeg-valset, LISA-7B-v1) carries a LLaVA-LLaMA
``config.json``: the LLaMA fields plus the multimodal ones (``mm_vision_select_layer``, ``mm_use_im_start_end``,
``mm_hidden_size``, ``mm_projector_type``, ``out_dim`` ...). Only what inference needs is kept; unknown fields are
ignored like transformers does.

Which family a folder belongs to (:func:`checkpoint_kind`) is decided by the projector its config describes,
because that is what the two families' architectures actually differ in and it can be checked against the weight
names (``model.mm_projector.weight`` vs ``model.mm_projector.0.weight``):

- READ is trained from LLaVA-1.5, whose configs always record ``mm_projector_type: "mlp2x_gelu"``
  (Linear–GELU–Linear) and a 336 px CLIP;
- LISA's v1 releases (LISA-7B-v1, -explanatory, LISA-13B-llama2-v1) are trained from LLaVA v1 "Lightning"
  models whose configs have no ``mm_projector_type``: by LLaVA's own rule that is a single Linear projector
  (LISA's vendored llava_arch builds ``nn.Linear(mm_hidden_size, hidden_size)``), with a 224 px CLIP.

A config that leaves ``mm_projector_type`` out is completed from the weight index's projector tensor names
(:func:`projector_in_index`) before LLaVA's rule applies, so a READ folder is never taken for LISA because one
field is missing. ``architectures`` and ``_name_or_path`` are not used: READ reuses LISA's model class name, and the base-model path
is free text. A PixelLM folder (``PixelLMForCausalLM``, two projectors, no SAM image encoder) is recognised
and refused here with the detector that runs it (``pixellm``, :mod:`workers.pixellm`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from workers.read.errors import CheckpointError, WrongDetectorError

# LLaMA fields copied into transformers' LlamaConfig when present in the READ config.
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
)
# The sizes every LLaVA-LLaMA config here must give (positive integers).
_REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                   "mm_hidden_size")


def json_object(path: Path, *, hint: str, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """The JSON object in ``path``. No file, an unreadable one, one that is not UTF-8 JSON or not an object raises
    ``error`` naming the file and ending with ``hint`` (what to do about it)."""
    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}; {hint}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not a {type(value).__name__}; {hint}")
    return value


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (transformers' validation errors span several)."""
    return " ".join(str(exc).split())


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def refuse_clip_config(raw: dict[str, Any], *, source: str, family: str) -> None:
    """A CLIP folder given where the checkpoint belongs (the two sit side by side) gets an error that says so."""
    if raw.get("model_type") in ("clip", "clip_vision_model"):
        raise CheckpointError(
            f"{source} is a CLIP model's config, not a {family} checkpoint: pass that folder as --clip and the "
            f"{family} folder (config.json with mm_hidden_size, the weight shards, the tokenizer) as --checkpoint"
        )


def llava_fields(raw: dict[str, Any], *, source: str, family: str, vision_tower: str) -> dict[str, Any]:
    """The LLaVA-LLaMA settings READ, LISA and PixelLM configs share, as keyword arguments of their config classes
    (``llama``, ``mm_hidden_size``, ``vision_select_layer``, ``use_im_start_end``, ``out_dim``, ``vision_tower``;
    ``vision_tower`` is the default when the file names none). A missing or unusable field raises CheckpointError
    naming ``source`` and the field; ``family`` (e.g. "READ/LISA") goes into the message."""
    missing = [name for name in _REQUIRED_SIZES if name not in raw]
    if missing:
        raise CheckpointError(f"{source} lacks the fields {missing}; is it a {family} (LLaVA-LLaMA) config?")
    for name in (*_REQUIRED_SIZES, "out_dim"):
        if name in raw and not _positive_int(raw[name]):
            raise CheckpointError(
                f"{source}: {name} is {raw[name]!r}, not a positive integer; copy config.json from the released "
                "folder again"
            )
    select_layer = raw.get("mm_vision_select_layer", -2)
    if not isinstance(select_layer, int) or isinstance(select_layer, bool) or select_layer >= 0:
        raise CheckpointError(
            f"{source}: mm_vision_select_layer must be a negative integer ({family} use -2); got {select_layer!r}"
        )
    try:
        llama = LlamaConfig(**{name: raw[name] for name in _LLAMA_FIELDS if raw.get(name) is not None})
    except Exception as exc:  # transformers validates with error classes that vary by release
        raise CheckpointError(f"{source}: the language model's settings are unusable ({one_line(exc)})") from exc
    return {
        "llama": llama,
        "mm_hidden_size": raw["mm_hidden_size"],
        "vision_select_layer": select_layer,
        "use_im_start_end": bool(raw.get("mm_use_im_start_end", True)),
        "out_dim": raw.get("out_dim", 256),
        "vision_tower": str(raw.get("mm_vision_tower") or raw.get("vision_tower") or vision_tower),
    }


# The extra tokens LISA/READ add to the LLaMA vocabulary (ids 32000-32002 in the released 7B model).
SEG_TOKEN = "[SEG]"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

# Checkpoint families (see the module docstring) and the detectors that fit them.
KIND_READ = "read"
KIND_LISA = "lisa"
KIND_PIXELLM = "pixellm"
KIND_NAMES = {KIND_READ: "READ", KIND_LISA: "LISA", KIND_PIXELLM: "PixelLM"}

# LLaVA's projector types: "linear" (also what a config without mm_projector_type means) and "mlpNx_gelu".
LINEAR_PROJECTOR = "linear"
_MLP_PROJECTOR = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str, *, source: str = "config.json") -> int:
    """Number of Linear layers of a LLaVA projector type: 1 for ``linear``, N for ``mlpNx_gelu``."""
    if projector_type == LINEAR_PROJECTOR:
        return 1
    match = _MLP_PROJECTOR.match(projector_type)
    if match is None or int(match.group(1)) < 1:
        raise CheckpointError(
            f"{source}: mm_projector_type {projector_type!r} is not supported; READ uses 'mlp2x_gelu' and LISA "
            "a single Linear (no mm_projector_type)"
        )
    return int(match.group(1))


def projector_weight_names(projector_type: str) -> tuple[str, ...]:
    """The tensor names under ``model.mm_projector.`` that a projector type has (LLaVA's module layout:
    a bare Linear, or a Sequential whose Linears sit at even indices with GELUs between them)."""
    depth = projector_depth(projector_type)
    if projector_type == LINEAR_PROJECTOR:
        return ("weight", "bias")
    return tuple(f"{2 * layer}.{part}" for layer in range(depth) for part in ("weight", "bias"))


_OPENAI_CLIP = re.compile(r"clip-vit-(?:base|large)-patch\d+(?:-(\d+))?$")


def expected_clip_image_size(vision_tower: str) -> int | None:
    """The input side of an OpenAI CLIP named in a config (``...-patch14`` → 224, ``...-patch14-336`` → 336);
    None for a name that does not say (a local path, a test model)."""
    match = _OPENAI_CLIP.search(vision_tower.rstrip("/"))
    if match is None:
        return None
    return int(match.group(1)) if match.group(1) else 224


WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def projector_in_index(folder: Path) -> str | None:
    """The projector type the weight index's tensor names show (``linear`` for ``model.mm_projector.weight``,
    ``mlpNx_gelu`` for ``model.mm_projector.{0,2,...}.weight``); None without an index or projector tensors.

    A config without ``mm_projector_type`` is read by LLaVA's rule (one Linear) only when the weights cannot
    say: a READ folder whose config omitted the field is still READ, because its tensors are ``.0.``/``.2.``."""
    for name in WEIGHT_INDEXES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return None  # the loader reports a broken index with its own message
        if not isinstance(weight_map, dict):
            return None
        if "model.mm_projector.weight" in weight_map:
            return LINEAR_PROJECTOR
        layers = {key.split(".")[2] for key in weight_map
                  if key.startswith("model.mm_projector.") and key.count(".") == 3 and key.split(".")[2].isdigit()}
        return f"mlp{len(layers)}x_gelu" if layers else None
    return None


def checkpoint_kind(raw: dict[str, Any]) -> str:
    """``read``, ``lisa`` or ``pixellm`` for a parsed ``config.json`` (the rule is in the module docstring)."""
    architectures = raw.get("architectures")
    if not isinstance(architectures, list):
        architectures = []
    if (
        "PixelLMForCausalLM" in architectures
        or raw.get("separate_mm_projector")
        or "image_feature_scale_num" in raw
    ):
        return KIND_PIXELLM
    projector = raw.get("mm_projector_type") or LINEAR_PROJECTOR
    return KIND_LISA if projector == LINEAR_PROJECTOR else KIND_READ


@dataclass(frozen=True)
class ReadConfig:
    """What inference needs from a READ ``config.json``.

    llama: the language model's configuration (transformers LlamaConfig).
    mm_hidden_size: width of the CLIP features fed to the projector (1024 for ViT-L/14).
    vision_select_layer: index into CLIP's hidden states (-2: the second-to-last layer, as LLaVA-1.5).
    use_im_start_end: whether ``<im_start>``/``<im_end>`` surround the image features (True for READ).
    out_dim: width of the [SEG] projection = SAM's prompt width (256).
    vision_tower: the CLIP model the checkpoint was trained with (a hub name or path, used in messages only).
    projector_type: ``linear`` (LISA) or ``mlpNx_gelu`` (``mlp2x_gelu`` for READ), from ``mm_projector_type``.
    kind: the checkpoint family, ``read`` or ``lisa`` (:func:`checkpoint_kind`).
    """

    llama: LlamaConfig
    mm_hidden_size: int
    vision_select_layer: int
    use_im_start_end: bool
    out_dim: int
    vision_tower: str
    projector_type: str = "mlp2x_gelu"
    kind: str = KIND_READ
    source: str = "config.json"

    @property
    def family(self) -> str:
        """The family's display name: READ or LISA."""
        return KIND_NAMES[self.kind]

    @classmethod
    def from_folder(cls, folder: Path) -> ReadConfig:
        """Read ``folder/config.json``; raises CheckpointError naming the file and field when it is unusable."""
        path = Path(folder) / "config.json"
        raw = json_object(path, hint="it is not a READ or LISA checkpoint folder (the one holding config.json, "
                          "the weight shards and the tokenizer files)")
        if "mm_projector_type" not in raw:
            held = projector_in_index(Path(folder))
            if held is not None:  # the weights say what the config leaves out
                raw = {**raw, "mm_projector_type": held}
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ReadConfig:
        refuse_clip_config(raw, source=source, family="READ/LISA")
        kind = checkpoint_kind(raw)
        default_tower = "openai/clip-vit-large-patch14" if kind == KIND_LISA else "openai/clip-vit-large-patch14-336"
        fields = llava_fields(raw, source=source, family="READ/LISA", vision_tower=default_tower)
        if kind == KIND_PIXELLM:
            raise WrongDetectorError(
                f"{source} is a PixelLM checkpoint (two projectors, multi-scale mask decoder, no SAM image "
                "encoder), which the READ/LISA detectors do not run: use --detector pixellm"
            )
        # LLaVA's rule: no mm_projector_type means one Linear layer.
        projector = str(raw.get("mm_projector_type") or LINEAR_PROJECTOR)
        projector_depth(projector, source=source)
        select_feature = raw.get("mm_vision_select_feature", "patch")
        if select_feature != "patch":
            raise CheckpointError(
                f"{source}: mm_vision_select_feature {select_feature!r} is not supported; READ and LISA use 'patch'"
            )
        return cls(
            **fields,
            projector_type=projector,
            kind=kind,
            source=source,
        )
