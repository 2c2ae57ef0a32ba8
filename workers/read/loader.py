"""Load a released READ or LISA folder plus a CLIP folder into a :class:`ReadModel` — local files only, once per
process. Both families go through the same code: what differs (projector type, CLIP geometry, token ids) comes
from the folder's config.json, the CLIP folder's config and the tokenizer files.

Checks, each with a typed error naming the file to fix: config and tokenizer present and carrying the added
tokens; the projector the config describes matching the projector tensors the weights hold; every shard listed
by the index present and readable (pickle shards only through ``torch.load(weights_only=True)``); no tensor
missing, unexpected or of the wrong shape; the CLIP folder holding the vision tower the checkpoint expects (width,
and the input size when the config names an OpenAI CLIP) (DESIGN.md 5.2). Shards that mix bfloat16 and float32
tensors (LISA's) are cast to the model's dtype on loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM, SamModel

from workers.read.config import (
    WEIGHT_INDEXES,
    ReadConfig,
    expected_clip_image_size,
    json_object,
    one_line,
    projector_weight_names,
)
from workers.read.errors import (
    CheckpointError,
    ClipFolderError,
    CorruptShardError,
    MissingWeightsError,
    UnexpectedWeightsError,
    WeightShapeError,
)
from workers.read.model import ReadModel, build_projector, build_text_hidden_fcs, fast_init
from workers.read.preprocess import ClipPreprocessing
from workers.read.sam_keys import official_to_hf, sam_config_from_weights
from workers.read.tokenizer import SENTENCEPIECE_FILE

# Released state-dict prefixes → the ReadModel part that owns them.
_LANGUAGE_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
_PROJECTOR_PREFIX = "model.mm_projector."
_TEXT_FCS_PREFIX = "model.text_hidden_fcs."
_SAM_PREFIX = "model.visual_model."
# Tolerated and skipped: a vision tower copy (the original reloads it from the CLIP folder, as here) and
# LLaMA rotary tables that old transformers versions saved as buffers (recomputed from the config).
_IGNORED_PREFIXES = ("model.vision_tower.",)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# The safetensors library refuses headers above this (100 MB); the cheap check reads no more than that either.
_SAFETENSORS_MAX_HEADER = 100_000_000

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(device: str, dtype: str | None) -> torch.dtype:
    """None → float32 on CPU, bfloat16 on CUDA; otherwise one of DTYPES' names."""
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def clip_vision_config(clip_dir: Path | None, expected: str) -> CLIPVisionConfig:
    """The vision tower's settings from a CLIP folder's config.json (a whole CLIP or a vision-only config).

    Whatever is wrong with the file — missing, not a JSON object, not CLIP, no vision settings, sizes that are
    not positive integers — raises ClipFolderError naming it and ending with ``expected`` (what belongs there).
    """
    if clip_dir is None:
        raise ClipFolderError(f"no CLIP folder was given; {expected}")
    path = Path(clip_dir) / "config.json"
    raw = json_object(path, hint=expected, error=ClipFolderError)
    model_type = raw.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise ClipFolderError(f"{clip_dir} holds a {model_type!r} model, not CLIP; {expected}")
    fields = raw.get("vision_config") if model_type == "clip" else raw
    if not isinstance(fields, dict):
        raise ClipFolderError(f"{path} has no vision_config object; {expected}")
    try:
        vision = CLIPVisionConfig(**fields)
    except Exception as exc:  # transformers validates with error classes that vary by release
        raise ClipFolderError(f"{path}: the vision tower's settings are unusable ({one_line(exc)}); {expected}") from exc
    for name in ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(vision, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ClipFolderError(f"{path}: {name} is {value!r}, not a positive integer; {expected}")
    return vision


def load_clip_config(clip_dir: Path | None, config: ReadConfig) -> CLIPVisionConfig:
    """The vision config of the CLIP folder, checked against what the READ checkpoint was trained with."""
    expected = (
        f"expected a local folder with {config.vision_tower} in transformers' CLIP format "
        f"(config.json with a vision tower of width {config.mm_hidden_size}, weights, preprocessor_config.json)"
    )
    family = config.family
    vision = clip_vision_config(clip_dir, expected)
    if vision.hidden_size != config.mm_hidden_size:
        raise ClipFolderError(
            f"{clip_dir} has a vision tower of width {vision.hidden_size} but the {family} checkpoint's projector "
            f"takes {config.mm_hidden_size}; {expected}"
        )
    if vision.image_size % vision.patch_size:
        raise ClipFolderError(
            f"{clip_dir}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )
    side = expected_clip_image_size(config.vision_tower)
    if side is not None and side != vision.image_size:
        raise ClipFolderError(
            f"{clip_dir} is a {vision.image_size} px CLIP but the {family} checkpoint was trained with "
            f"{config.vision_tower} ({side} px, {(side // vision.patch_size) ** 2} image tokens); {expected}"
        )
    return vision


def weight_files(checkpoint: Path) -> dict[Path, set[str] | None]:
    """Shard files of a checkpoint → the tensor names the index assigns them (None without an index)."""
    for index_name in WEIGHT_INDEXES:
        index_path = checkpoint / index_name
        if index_path.is_file():
            hint = "copy the weight index again from the released folder"
            weight_map = json_object(index_path, hint=hint).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(
                    f"{index_path} is not a weight index (needs a 'weight_map' from tensor names to shard file "
                    f"names); {hint}"
                )
            files: dict[Path, set[str] | None] = {}
            for name, file_name in weight_map.items():
                if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
                    raise CheckpointError(
                        f"{index_path} assigns {name} to {file_name!r}, which is not a file in the folder; {hint}"
                    )
                files.setdefault(checkpoint / file_name, set()).add(name)  # type: ignore[union-attr]
            absent = sorted(str(path) for path in files if not path.is_file())
            if absent:
                raise CheckpointError(f"{index_path} lists shards that are not there: {absent}")
            return files
    for single in _SINGLE_FILES:
        if (checkpoint / single).is_file():
            return {checkpoint / single: None}
    raise CheckpointError(
        f"{checkpoint} has no weights: expected {' or '.join(WEIGHT_INDEXES)} with its shards, or {' or '.join(_SINGLE_FILES)}"
    )


def _projector_error(config: ReadConfig, names: Iterable[str], source: Path) -> str | None:
    """Why the projector tensors among ``names`` do not fit the projector config.json describes (None: they do)."""
    found = sorted(name[len(_PROJECTOR_PREFIX) :] for name in names if name.startswith(_PROJECTOR_PREFIX))
    expected = sorted(projector_weight_names(config.projector_type))
    if found == expected:
        return None
    described = (
        "no mm_projector_type (LLaVA's rule: one Linear layer)"
        if config.projector_type == "linear"
        else f"mm_projector_type {config.projector_type!r}"
    )
    held = ", ".join(_PROJECTOR_PREFIX + name for name in found) or "no model.mm_projector.* tensors"
    return (
        f"{source} holds {held} but {config.source} says {described}, which needs "
        f"{', '.join(_PROJECTOR_PREFIX + name for name in expected)}; config.json and the weights come from "
        "different checkpoints"
    )


def check_projector_layout(checkpoint: Path, config: ReadConfig) -> None:
    """Cheap cross-check of config.json's projector against the weight index's tensor names (no shard is read;
    without an index the check happens when the weights load)."""
    for index_name in WEIGHT_INDEXES:
        path = Path(checkpoint) / index_name
        if path.is_file():
            names = {name for listed in weight_files(Path(checkpoint)).values() for name in listed or ()}
            problem = _projector_error(config, names, path)
            if problem:
                raise CheckpointError(problem)
            return


def check_model_folders(checkpoint: Path | None, clip_dir: Path | None) -> None:
    """Cheap checks before any image is claimed: every weight file of the checkpoint there and readable-looking,
    and the CLIP folder holding its weights (None: a model built from parts)."""
    if checkpoint is not None:
        check_weight_files(checkpoint)
    if clip_dir is None:
        return
    weights = [clip_dir / name for name in _SINGLE_FILES if (clip_dir / name).is_file()]
    if not weights:
        raise ClipFolderError(f"CLIP folder {clip_dir} has no {' or '.join(_SINGLE_FILES)}")
    size = weights[0].stat().st_size
    checked = _safetensors_problem if weights[0].suffix == ".safetensors" else _torch_file_problem
    problem = checked(weights[0], size)
    if problem:
        raise ClipFolderError(f"CLIP weights {weights[0]} ({size} bytes) {problem}; copy them again")


def folders_digest(name: str, folders: Iterable[Path | None]) -> str:
    """16 hex digits of sha256 over ``name``, the folders' JSON and tokenizer files and their weight files' names
    and sizes (no weight is read); None folders (a model built from parts) are left out."""
    digest = hashlib.sha256(name.encode())
    for folder in folders:
        if folder is None:
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix == ".json" or path.name == SENTENCEPIECE_FILE:
                digest.update(path.name.encode() + path.read_bytes())
            elif path.suffix in (".bin", ".safetensors"):
                digest.update(json.dumps([path.name, path.stat().st_size]).encode())
    return digest.hexdigest()[:16]


def check_weight_files(checkpoint: Path) -> None:
    """Cheap checks of every weight file before any image is claimed: present (as the index lists them), and
    whole as far as its own directory can tell without reading the tensors — a safetensors header that parses
    and whose tensors end within the file; a torch zip whose central directory (at the file's end) reads and
    whose members lie within the file; a legacy pickle's first byte."""
    for path in weight_files(Path(checkpoint)):
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path, size)
        else:
            problem = _torch_file_problem(path, size)
        if problem:
            raise CorruptShardError(f"weight shard {path} ({size} bytes) {problem}; copy it again")


def _safetensors_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_size <= size - 8:
            return "is truncated or not a safetensors file"
        if header_size > _SAFETENSORS_MAX_HEADER:
            return f"has a {header_size}-byte header, more than safetensors allows: it is damaged"
        try:
            header = json.loads(handle.read(header_size))
        except (ValueError, UnicodeDecodeError, RecursionError):
            header = None
    if not isinstance(header, dict):
        return "has no readable safetensors header"
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    needed = 8 + header_size + max(ends, default=0)
    return f"is truncated: its header needs {needed} bytes" if size < needed else None


def _torch_file_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"\x80"):
        return None  # torch.save's legacy pickle format: nothing cheap to check beyond its first byte
    if not head.startswith(b"PK\x03\x04"):
        return "is not a torch weight file (neither torch.save's zip nor its legacy pickle)"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except NotImplementedError:
        return None  # a zip feature Python's reader lacks: leave the verdict to torch at load time
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"is truncated or damaged ({exc})"
    # Each member's data follows its local header (30 bytes + name + extra, the extra not in the directory).
    if any(member.header_offset + 30 + len(member.filename) + member.compress_size > size for member in members):
        return "is truncated: its zip directory lists data beyond the file's end"
    return None


def _load_failure(exc: Exception) -> str:
    """Why a shard did not load, in one line. torch's text runs to a paragraph of advice: keep its first sentence,
    or, for the weights-only unpickler, the line that names what it refused (the file is whole, not damaged)."""
    text = str(exc)
    refused = next((line for line in text.splitlines() if "WeightsUnpickler error" in line), None)
    if refused is not None:
        return (f"{one_line(refused)[:300]}: it holds objects other than tensors, which READAR does not unpickle; "
                "use the released shard")
    return f"{type(exc).__name__}: {one_line(exc).split('. ')[0][:200]}; it is truncated or corrupt — copy it again"


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard on the CPU; CorruptShardError when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            tensors = load_safetensors(str(path), device="cpu")
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse (pickle, zip, safetensors header) means an unusable file
        raise CorruptShardError(f"weight shard {path} cannot be read ({_load_failure(exc)})") from exc
    if not isinstance(tensors, dict) or not all(
        isinstance(value, torch.Tensor) for value in tensors.values()
    ):
        raise CorruptShardError(f"weight shard {path} does not hold a name → tensor mapping")
    return tensors


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's shards, checked against the index."""
    state: dict[str, torch.Tensor] = {}
    for path, listed in weight_files(Path(checkpoint)).items():
        tensors = read_shard(path)
        if listed is not None and listed - tensors.keys():
            raise MissingWeightsError(
                f"{path} lacks tensors its index lists: {sorted(listed - tensors.keys())[:10]}"
            )
        state.update(tensors)
    return state


def _report(names: Iterable[str], limit: int = 10) -> str:
    ordered = sorted(names)
    more = f" … and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def split_state(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Released names → per-part state dicts named as the ReadModel submodules expect."""
    parts: dict[str, dict[str, torch.Tensor]] = {
        "language_model": {},
        "projector": {},
        "text_hidden_fcs": {},
        "sam": {},
    }
    unexpected = []
    for name, tensor in state.items():
        if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
            continue  # before the LLaMA prefixes: inv_freq sits under model.layers.N.
        if name.startswith(_LANGUAGE_PREFIXES):
            parts["language_model"][name] = tensor
        elif name.startswith(_PROJECTOR_PREFIX):
            parts["projector"][name[len(_PROJECTOR_PREFIX) :]] = tensor
        elif name.startswith(_TEXT_FCS_PREFIX):
            parts["text_hidden_fcs"][name[len(_TEXT_FCS_PREFIX) :]] = tensor
        elif name.startswith(_SAM_PREFIX):
            parts["sam"][name[len(_SAM_PREFIX) :]] = tensor
        else:
            unexpected.append(name)
    if unexpected:
        raise UnexpectedWeightsError(
            f"the checkpoint holds tensors READ/LISA do not use: {_report(unexpected)}"
        )
    return parts


def _check_and_load(
    module: torch.nn.Module, state: dict[str, torch.Tensor], *, prefix: str, source: Path
) -> None:
    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    if missing:
        raise MissingWeightsError(f"{source} lacks tensors: {_report(prefix + name for name in missing)}")
    unexpected = state.keys() - expected.keys()
    if unexpected:
        raise UnexpectedWeightsError(
            f"{source} holds tensors READ/LISA do not use: {_report(prefix + n for n in unexpected)}"
        )
    wrong = [
        f"{prefix}{name} {tuple(state[name].shape)} (model expects {tuple(param.shape)})"
        for name, param in expected.items()
        if state[name].shape != param.shape
    ]
    if wrong:
        raise WeightShapeError(f"{source} has tensors of the wrong shape: {_report(wrong)}")
    module.load_state_dict(state, strict=True)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (the CLIP folder's unused text tower is expected)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_read_model(
    checkpoint: Path, clip_dir: Path | None, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> ReadModel:
    """Build the model from local files (never the network) and load every weight."""
    checkpoint = Path(checkpoint)
    config = ReadConfig.from_folder(checkpoint)
    vision_config = load_clip_config(clip_dir, config)
    check_projector_layout(checkpoint, config)  # names the index file
    state = read_state_dict(checkpoint)
    files = list(weight_files(checkpoint))
    problem = _projector_error(config, state, files[0] if len(files) == 1 else checkpoint)
    if problem:
        raise CheckpointError(problem)
    parts = split_state(state)
    sam_state = official_to_hf(parts["sam"])
    sam_config = sam_config_from_weights(parts["sam"])
    try:
        with quiet_transformers():
            vision_tower, info = CLIPVisionModel.from_pretrained(
                str(clip_dir),
                config=vision_config,
                local_files_only=True,
                dtype=dtype,
                output_loading_info=True,
            )
    except (OSError, ValueError) as exc:
        raise ClipFolderError(f"cannot load the CLIP vision tower from {clip_dir}: {exc}") from exc
    if info.get("missing_keys"):
        raise ClipFolderError(f"{clip_dir} lacks vision-tower weights: {_report(info['missing_keys'])}")
    with fast_init(dtype, device):
        model = ReadModel(
            vision_tower,
            build_projector(config.mm_hidden_size, config.llama.hidden_size, config.projector_type),
            LlamaForCausalLM(config.llama),
            build_text_hidden_fcs(config.llama.hidden_size, config.out_dim),
            SamModel(sam_config),
            vision_select_layer=config.vision_select_layer,
        )
    model.vision_tower.to(device)
    _check_and_load(model.language_model, parts["language_model"], prefix="", source=checkpoint)
    _check_and_load(model.projector, parts["projector"], prefix=_PROJECTOR_PREFIX, source=checkpoint)
    _check_and_load(
        model.text_hidden_fcs, parts["text_hidden_fcs"], prefix=_TEXT_FCS_PREFIX, source=checkpoint
    )
    _check_and_load(model.sam, sam_state, prefix=_SAM_PREFIX + "(transformers name) ", source=checkpoint)
    return model.eval()


@dataclass(frozen=True)
class LoadedRead:
    """A loaded model with the pieces its callers need."""

    model: ReadModel
    config: ReadConfig


# Models already loaded in this process, by (checkpoint, clip, device, dtype): a worker loads each once.
_LOADED: dict[tuple[str, str, str, str], LoadedRead] = {}
_LOAD_LOCK = threading.Lock()


def cached_read_model(
    checkpoint: Path, clip_dir: Path | None, *, device: str, dtype: torch.dtype
) -> LoadedRead:
    """:func:`load_read_model` at most once per process and key (thread-safe)."""
    key = (
        str(Path(checkpoint).resolve()),
        str(Path(clip_dir).resolve()) if clip_dir else "",
        device,
        str(dtype),
    )
    with _LOAD_LOCK:
        if key not in _LOADED:
            model = load_read_model(Path(checkpoint), clip_dir, device=device, dtype=dtype)
            _LOADED[key] = LoadedRead(model, ReadConfig.from_folder(Path(checkpoint)))
        return _LOADED[key]


def clip_preprocessing(clip_dir: Path | None, image_size: int | None = None) -> ClipPreprocessing:
    """CLIP preprocessing settings of the folder; without a preprocessor_config.json, CLIP's defaults at
    ``image_size`` (the vision config's input side; 336 when not given)."""
    if clip_dir is None:
        return ClipPreprocessing() if image_size is None else ClipPreprocessing(image_size, image_size)
    return ClipPreprocessing.from_folder(Path(clip_dir), default_size=image_size)
