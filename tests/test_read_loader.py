"""Loading a READ folder: the tiny checkpoint through the real code path, and clear errors for broken folders."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from read_fixtures import tiny_checkpoint
from safetensors.torch import save_file as save_safetensors

from workers.read.config import ReadConfig
from workers.read.errors import (
    CheckpointError,
    ClipFolderError,
    CorruptShardError,
    MissingWeightsError,
    UnexpectedWeightsError,
    WeightShapeError,
)
from workers.read.loader import (
    cached_read_model,
    check_weight_files,
    load_read_model,
    read_state_dict,
    resolve_dtype,
)
from workers.read.preprocess import ClipPreprocessing
from workers.read.sam_keys import official_to_hf
from workers.read.tiny import make_tiny_checkpoint

SHARD_1 = "pytorch_model-00001-of-00002.bin"
SHARD_2 = "pytorch_model-00002-of-00002.bin"
INDEX = "pytorch_model.bin.index.json"


@pytest.fixture()
def copy(tmp_path: Path) -> tuple[Path, Path]:
    read_dir, clip_dir = tiny_checkpoint()
    shutil.copytree(read_dir, tmp_path / "read")
    return tmp_path / "read", clip_dir


def _edit_shard(folder: Path, shard: str, edit) -> None:
    tensors = torch.load(folder / shard, weights_only=True)
    edit(tensors)
    torch.save(tensors, folder / shard)
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | {
        k: shard for k in tensors
    }
    (folder / INDEX).write_text(json.dumps(index))


def test_tiny_checkpoint_has_the_released_layout() -> None:
    read_dir, clip_dir = tiny_checkpoint()
    config = json.loads((read_dir / "config.json").read_text())
    assert (
        config["mm_vision_select_layer"] == -2 and config["mm_use_im_start_end"] and config["out_dim"] == 256
    )
    weight_map = json.loads((read_dir / INDEX).read_text())["weight_map"]
    assert set(weight_map.values()) == {SHARD_1, SHARD_2}
    assert "model.visual_model.image_encoder.blocks.0.attn.qkv.weight" in weight_map
    assert "model.text_hidden_fcs.0.2.weight" in weight_map and "model.mm_projector.2.bias" in weight_map
    assert (clip_dir / "config.json").is_file() and (clip_dir / "preprocessor_config.json").is_file()


def test_loads_every_tensor_from_the_shards() -> None:
    read_dir, clip_dir = tiny_checkpoint()
    model = load_read_model(read_dir, clip_dir)
    state = read_state_dict(read_dir)
    torch.testing.assert_close(
        model.projector[0].weight, state["model.mm_projector.0.weight"], atol=0, rtol=0
    )
    torch.testing.assert_close(model.language_model.lm_head.weight, state["lm_head.weight"], atol=0, rtol=0)
    sam = official_to_hf(
        {
            k.removeprefix("model.visual_model."): v
            for k, v in state.items()
            if k.startswith("model.visual_model.")
        }
    )
    for name, tensor in model.sam.state_dict().items():
        assert torch.equal(tensor, sam[name]), name
    assert model.vision_tower.config.image_size == 336 and model.vision_select_layer == -2


def test_cached_loading_happens_once() -> None:
    read_dir, clip_dir = tiny_checkpoint()
    first = cached_read_model(read_dir, clip_dir, device="cpu", dtype=torch.float32)
    assert cached_read_model(read_dir, clip_dir, device="cpu", dtype=torch.float32) is first


def test_safetensors_shards_load_the_same_way(tmp_path: Path) -> None:
    read_dir, clip_dir = make_tiny_checkpoint(tmp_path, safetensors=True)
    assert (read_dir / "model.safetensors.index.json").is_file()
    model = load_read_model(read_dir, clip_dir)
    assert model.sam.vision_encoder.config.hidden_size == 32


def test_truncated_shard_names_the_file(copy) -> None:
    read_dir, clip_dir = copy
    data = (read_dir / SHARD_2).read_bytes()
    (read_dir / SHARD_2).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match=SHARD_2):
        load_read_model(read_dir, clip_dir)


def test_shard_with_pickled_objects_is_refused(copy) -> None:
    read_dir, clip_dir = copy
    torch.save({"model.norm.weight": torch.ones(2), "payload": Path("x")}, read_dir / SHARD_1)
    with pytest.raises(CorruptShardError, match=SHARD_1) as raised:
        read_state_dict(read_dir)
    # The reason is the refusal (named), not "truncated": the file is whole.
    message = str(raised.value)
    assert "Unsupported global" in message and "objects other than tensors" in message, message
    assert "truncated" not in message and "\n" not in message


def test_missing_shard_file(copy) -> None:
    read_dir, clip_dir = copy
    (read_dir / SHARD_1).unlink()
    with pytest.raises(CheckpointError, match="not there"):
        load_read_model(read_dir, clip_dir)


def test_missing_tensor_is_named(copy) -> None:
    read_dir, clip_dir = copy
    _edit_shard(read_dir, SHARD_1, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_read_model(read_dir, clip_dir)


def test_missing_sam_tensor_is_named(copy) -> None:
    read_dir, clip_dir = copy
    _edit_shard(read_dir, SHARD_2, lambda t: t.pop("model.visual_model.mask_decoder.iou_token.weight"))
    with pytest.raises(MissingWeightsError, match="iou_token"):
        load_read_model(read_dir, clip_dir)


def test_unexpected_tensor_is_named(copy) -> None:
    read_dir, clip_dir = copy
    _edit_shard(read_dir, SHARD_2, lambda t: t.update({"model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(UnexpectedWeightsError, match=r"model\.extra_head\.weight"):
        load_read_model(read_dir, clip_dir)


def test_wrong_shape_is_named(copy) -> None:
    read_dir, clip_dir = copy
    _edit_shard(read_dir, SHARD_1, lambda t: t.update({"model.mm_projector.0.weight": torch.zeros(64, 31)}))
    with pytest.raises(WeightShapeError, match=r"model\.mm_projector\.0\.weight \(64, 31\)"):
        load_read_model(read_dir, clip_dir)


def test_wrong_clip_folder_says_what_was_expected(copy, tmp_path: Path) -> None:
    read_dir, clip_dir = copy
    with pytest.raises(ClipFolderError, match="expected a local folder with tiny-random-clip"):
        load_read_model(read_dir, read_dir)  # a READ folder is not a CLIP folder
    with pytest.raises(ClipFolderError, match="no config.json"):
        load_read_model(read_dir, tmp_path / "nowhere")
    narrow = tmp_path / "clip-narrow"
    shutil.copytree(clip_dir, narrow)
    config = json.loads((narrow / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (narrow / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClipFolderError, match="width 48"):
        load_read_model(read_dir, narrow)


def test_folder_without_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_read_model(tmp_path, tmp_path)
    read_dir, _ = tiny_checkpoint()
    shutil.copy(read_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has no weights"):
        read_state_dict(tmp_path)


def test_default_dtypes() -> None:
    assert resolve_dtype("cpu", None) == torch.float32
    assert resolve_dtype("cuda:1", None) == torch.bfloat16
    with pytest.raises(CheckpointError, match="unknown dtype"):
        resolve_dtype("cpu", "float8")


# -- hostile folder files: every one is refused with an error naming the file, never a raw exception ----------
def _rewrite(path: Path, edit) -> None:
    """Replace a JSON file by edit(its object); edit returns the new text (bytes or str) or a new object."""
    value = edit(json.loads(path.read_text()))
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(value if isinstance(value, str) else json.dumps(value))


HOSTILE_CONFIGS = {
    "not JSON": lambda raw: '{"hidden_size": 64,',
    "not UTF-8": lambda raw: b'{"hidden_size": "\xff\xfe"}',
    "a list": lambda raw: [raw],
    "a string size": lambda raw: raw | {"hidden_size": "64"},
    "a negative size": lambda raw: raw | {"num_hidden_layers": -1},
    "a boolean size": lambda raw: raw | {"mm_hidden_size": True},
    "a string select layer": lambda raw: raw | {"mm_vision_select_layer": "-2"},
    "unusable llama settings": lambda raw: raw | {"rope_scaling": 7},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_checkpoint_config_is_refused_naming_the_file(copy, case: str) -> None:
    read_dir, clip_dir = copy
    _rewrite(read_dir / "config.json", HOSTILE_CONFIGS[case])
    with pytest.raises(CheckpointError, match=r"config\.json") as raised:
        load_read_model(read_dir, clip_dir)
    assert "\n" not in str(raised.value)


def test_architectures_that_are_not_a_list_are_ignored(copy) -> None:
    """The field only tells PixelLM from READ/LISA; a mangled one falls back to the other signs (it raised
    TypeError before)."""
    read_dir, clip_dir = copy
    _rewrite(read_dir / "config.json", lambda raw: raw | {"architectures": 5})
    assert ReadConfig.from_folder(read_dir).kind == "read"
    load_read_model(read_dir, clip_dir)


HOSTILE_CLIP_CONFIGS = {
    "not JSON": lambda raw: "{",
    "a list": lambda raw: [raw],
    "no vision_config": lambda raw: {k: v for k, v in raw.items() if k != "vision_config"} | {"vision_config": 3},
    "a string width": lambda raw: raw | {"vision_config": raw["vision_config"] | {"hidden_size": "wide"}},
    "a zero patch": lambda raw: raw | {"vision_config": raw["vision_config"] | {"patch_size": 0}},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CLIP_CONFIGS))
def test_hostile_clip_config_is_refused_naming_the_file(copy, tmp_path: Path, case: str) -> None:
    read_dir, clip_dir = copy
    hostile = tmp_path / "clip"
    shutil.copytree(clip_dir, hostile)
    _rewrite(hostile / "config.json", HOSTILE_CLIP_CONFIGS[case])
    with pytest.raises(ClipFolderError, match=rf"{hostile}.*expected a local folder") as raised:
        load_read_model(read_dir, hostile)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        ("weight_map a list", lambda raw: raw | {"weight_map": list(raw["weight_map"])}, "not a weight index"),
        ("a shard outside the folder", lambda raw: raw | {"weight_map": {"x": "../" + SHARD_1}}, "not a file in"),
        ("a shard in a subfolder", lambda raw: raw | {"weight_map": {"x": "sub/" + SHARD_1}}, "not a file in"),
        ("not JSON", lambda raw: "[", "not valid JSON"),
    ],
)
def test_hostile_weight_index_is_refused_naming_it(copy, case: str, edit, message: str) -> None:
    read_dir, clip_dir = copy
    _rewrite(read_dir / INDEX, edit)
    with pytest.raises(CheckpointError, match=rf"{INDEX}.*{message}|{message}.*{INDEX}"):
        load_read_model(read_dir, clip_dir)


HOSTILE_PREPROCESSORS = {
    "not JSON": "{",
    "a list": "[336]",
    "a string size": '{"size": "336"}',
    "a zero crop": '{"size": {"shortest_edge": 336}, "crop_size": {"height": 0, "width": 0}}',
    "a crop larger than the resize": '{"size": 224, "crop_size": 336}',
    "two means": '{"image_mean": [0.5, 0.5]}',
    "a text std": '{"image_std": ["a", "b", "c"]}',
    "a zero std": '{"image_std": [0.2, 0.0, 0.2]}',
    "a size dict that is a list": '{"size": [336]}',
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PREPROCESSORS))
def test_hostile_preprocessor_config_is_refused_naming_it(tmp_path: Path, case: str) -> None:
    (tmp_path / "preprocessor_config.json").write_text(HOSTILE_PREPROCESSORS[case])
    with pytest.raises(ClipFolderError, match=r"preprocessor_config\.json.*CLIP release") as raised:
        ClipPreprocessing.from_folder(tmp_path)
    assert "\n" not in str(raised.value)


def test_both_released_preprocessor_layouts_are_read(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text('{"size": 336, "crop_size": 336}')
    assert ClipPreprocessing.from_folder(tmp_path) == ClipPreprocessing(336, 336)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "image_std": [1, 1, 1]}'
    )
    assert ClipPreprocessing.from_folder(tmp_path) == ClipPreprocessing(224, 224, std=(1.0, 1.0, 1.0))


# -- truncated shards are caught by the cheap pre-run check, before any image is planned ------------------------
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_a_truncated_torch_shard_fails_the_cheap_check(copy, keep: float) -> None:
    read_dir, _ = copy
    shard = read_dir / SHARD_2
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptShardError, match=rf"{SHARD_2} \(\d+ bytes\) is truncated.*copy it again"):
        check_weight_files(read_dir)


def test_a_truncated_safetensors_file_fails_the_cheap_check(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_safetensors({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(path))
    check_weight_files(tmp_path)  # whole: passes
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # the header is whole, the last tensor is cut
    with pytest.raises(CorruptShardError, match=r"is truncated: its header needs \d+ bytes"):
        check_weight_files(tmp_path)
    path.write_bytes(data[:20])  # the header itself is cut
    with pytest.raises(CorruptShardError, match="truncated or not a safetensors file"):
        check_weight_files(tmp_path)


def test_whole_shards_pass_the_cheap_check(copy) -> None:
    read_dir, _ = copy
    check_weight_files(read_dir)


def test_a_clip_folder_given_as_the_checkpoint_says_so(copy) -> None:
    from workers.pixellm.loader import load_pixellm_model

    _, clip_dir = copy
    for load in (load_read_model, load_pixellm_model):
        with pytest.raises(CheckpointError, match=r"is a CLIP model's config.*pass that folder as --clip"):
            load(clip_dir, clip_dir)


def test_truncated_clip_weights_fail_the_cheap_check(copy, tmp_path: Path) -> None:
    from workers.read.loader import check_model_folders

    _, clip_dir = copy
    clip = tmp_path / "clip"
    shutil.copytree(clip_dir, clip)
    check_model_folders(None, clip)
    weights = next(path for path in clip.iterdir() if path.name in ("model.safetensors", "pytorch_model.bin"))
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ClipFolderError, match=rf"CLIP weights {weights} \(\d+ bytes\) is truncated"):
        check_model_folders(None, clip)


def test_the_cheap_check_reads_no_oversized_header_and_never_raises(tmp_path: Path) -> None:
    """A damaged length field must not make the check read a whole shard, nor a deep header crash it."""
    path = tmp_path / "model.safetensors"
    size = 120_000_000
    with open(path, "wb") as handle:
        handle.write((size - 8).to_bytes(8, "little"))
        handle.truncate(size)  # sparse: no disk space used
    with pytest.raises(CorruptShardError, match="more than safetensors allows"):
        check_weight_files(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(len(deep).to_bytes(8, "little") + deep)
    with pytest.raises(CorruptShardError, match="no readable safetensors header"):
        check_weight_files(tmp_path)


def test_a_zip_feature_python_cannot_read_is_left_to_torch(copy) -> None:
    """zipfile raises NotImplementedError for versions it does not know; the check must not turn that into a
    traceback nor refuse a file torch may read."""
    read_dir, _ = copy
    shard = read_dir / SHARD_1
    data = bytearray(shard.read_bytes())
    directory = data.rfind(b"PK\x01\x02")  # a central directory entry: "version needed" (one byte) at offset 6
    data[directory + 6] = 226  # version 22.6: one flipped bit; zipfile knows up to 6.3 and refuses on open
    shard.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):  # the control: Python's zipfile gives up on it
        zipfile.ZipFile(shard)
    check_weight_files(read_dir)  # no verdict from the cheap check; torch decides when it loads
