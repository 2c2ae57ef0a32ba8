"""Stored logit format and the object store (local folder and a real SeaweedFS S3 server)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from storage.logits import (
    NO_MASK_LOGIT,
    LogitFormatError,
    StoredLogits,
    decode_logits,
    encode_logits,
    full_resolution_logits,
)
from storage.objects import ObjectStore, ObjectStoreError, check_key, image_object_key


def test_logits_round_trip_keeps_geometry_and_values() -> None:
    maps = np.random.default_rng(0).normal(size=(2, 256, 256)).astype(np.float16)
    stored = StoredLogits(maps, original_size=(900, 700), input_size=(1024, 796))
    back = decode_logits(encode_logits(stored))
    assert back.original_size == (900, 700) and back.input_size == (1024, 796) and back.frame_size == 1024
    np.testing.assert_array_equal(back.maps, maps)


@pytest.mark.parametrize("array", [
    np.array(7, np.int64), np.array([3, -1], np.int64), np.zeros((0, 4, 5), np.float16),
    np.arange(12, dtype=np.uint8).reshape(3, 4), np.array([True, False]),
    np.random.default_rng(1).normal(size=(1, 256, 256)).astype(np.float16),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
], ids=["0-d", "1-d", "empty", "uint8", "bool", "sam-sized", "fortran"])
def test_npz_writer_is_what_numpy_reads_and_the_fast_reader_agrees(array: np.ndarray) -> None:
    from storage.npz import read_npz, write_npz

    data = write_npz({"a": array, "b": np.array(1, np.int64)})
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        from_numpy = archive["a"]
    fast = read_npz(data)
    assert fast is not None
    for back in (from_numpy, fast["a"]):
        assert back.dtype == array.dtype and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
    member = io.BytesIO()  # each member is byte for byte what numpy itself writes for the array
    np.lib.format.write_array(member, np.require(array, requirements="C"), version=(1, 0))
    assert member.getvalue() in data


def test_archives_written_by_numpy_and_damaged_archives_take_numpys_path() -> None:
    from storage.npz import read_npz

    stored = StoredLogits(np.ones((1, 3, 3), np.float16), original_size=(3, 3))
    legacy = io.BytesIO()  # how earlier READAR versions wrote logit objects
    np.savez(legacy, format_version=np.array(1, np.int64), maps=stored.maps, original_size=np.array([3, 3]),
             input_size=np.array([-1, -1]), frame_size=np.array(1024))
    assert read_npz(legacy.getvalue()) is None  # zip64 fields: not the fast layout
    back = decode_logits(legacy.getvalue())
    np.testing.assert_array_equal(back.maps, stored.maps)
    damaged = bytearray(encode_logits(stored))
    damaged[damaged.index(b"\x93NUMPY", 200) + 130] ^= 0xFF  # a flipped byte in the maps' data
    assert read_npz(bytes(damaged)) is None  # the checksum no longer matches
    with pytest.raises(LogitFormatError, match="not a READAR logit archive"):
        decode_logits(bytes(damaged))


def test_full_resolution_of_low_res_maps_follows_the_crop_geometry() -> None:
    # Low-res maps cover a 1024 frame whose valid part is the top-left input_size region. Put +8 in the
    # valid region's left half, -8 elsewhere (including the padding): the full map must split at the middle.
    height, width = 300, 600
    input_size = (512, 1024)  # longest side 1024
    low = np.full((256, 256), -8.0, dtype=np.float16)
    low[:128, :128] = 8.0  # left half of the valid region (rows < 128 are the valid 512 rows)
    full = full_resolution_logits(StoredLogits(low, (height, width), input_size))
    assert full.shape == (height, width) and full.dtype == np.float16
    assert (full[:-2, : width // 2 - 3] == 8).all()
    assert (full[:, width // 2 + 3 :] == -8).all()
    # The padding rows (>= 128 in the low-res map) touch only the last image row, through the bilinear
    # kernel at the crop edge, as in the original post-processing.
    assert (full[-1, : width // 2 - 3] > -8).all() and (full[-1, : width // 2 - 3] < 8).all()


def test_several_maps_combine_by_per_pixel_max_and_empty_means_no_mask() -> None:
    a = np.zeros((4, 5), dtype=np.float16)
    b = np.zeros((4, 5), dtype=np.float16)
    a[0, 0], b[3, 4] = 5, 7
    full = full_resolution_logits(StoredLogits(np.stack([a, b]), (4, 5)))
    assert full[0, 0] == 5 and full[3, 4] == 7 and full[1, 1] == 0
    empty = full_resolution_logits(StoredLogits(np.zeros((0, 4, 5), np.float16), (4, 5)))
    assert (empty == np.float16(NO_MASK_LOGIT)).all()


def test_bad_logit_objects_are_refused_with_a_reason() -> None:
    with pytest.raises(LogitFormatError, match="NaN or inf"):
        StoredLogits(np.array([[np.nan]], dtype=np.float32), (1, 1))
    with pytest.raises(LogitFormatError, match="image is 3×3"):
        StoredLogits(np.zeros((1, 2, 2)), (3, 3))
    with pytest.raises(LogitFormatError, match="not a READAR logit archive"):
        decode_logits(b"garbage", source="runs/1/images/1.npz")
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LogitFormatError):
        decode_logits(buffer.getvalue())
    with pytest.raises(LogitFormatError):
        decode_logits(pickle.dumps({"maps": 1}))


@pytest.mark.parametrize("key", ["../x", "/abs/x", "a//b", "a/./b", "a/b c", "a/..", ""])
def test_keys_cannot_escape_the_prefix(key: str) -> None:
    with pytest.raises(ObjectStoreError, match="refusing object key"):
        check_key(key)


def _exercise(store: ObjectStore) -> None:
    key = image_object_key(3, 17)
    assert not store.exists(key)
    store.put(key, b"first")
    store.put(key, b"second")  # a rerun overwrites the same key
    assert store.get(key) == b"second"
    assert store.exists(key)
    store.put("runs/3/images/18.npz", b"x")
    assert store.list("runs/3") == ["runs/3/images/17.npz", "runs/3/images/18.npz"]
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectStoreError, match="does not exist"):
        store.get(key)


def test_local_store_writes_atomically(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "objects"))
    _exercise(store)
    assert not [p for p in (tmp_path / "objects").rglob("*") if p.name.startswith(".tmp-")]


def test_local_store_failed_write_leaves_no_partial_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(str(tmp_path / "objects"))
    store.put("runs/1/images/1.npz", b"old")

    def broken_replace(_source: str, _target: str) -> None:  # the temporary file is written, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(ObjectStoreError, match="No space left"):
        store.put("runs/1/images/1.npz", b"new-but-broken")
    monkeypatch.undo()
    assert store.get("runs/1/images/1.npz") == b"old"
    assert not [p for p in (tmp_path / "objects").rglob(".tmp-*")]


@pytest.mark.services
def test_s3_store_against_seaweedfs(seaweed, s3_settings_env: str) -> None:  # noqa: ANN001
    from storage.settings import Settings

    settings = Settings(object_store_url=s3_settings_env)
    store = ObjectStore(settings.resolved_object_store_url, settings.storage_options())
    _exercise(store)
    assert seaweed.secret_key not in store.describe()


@pytest.mark.services
def test_s3_errors_do_not_leak_credentials(seaweed) -> None:  # noqa: ANN001
    store = ObjectStore(
        "s3://no-such-bucket-readar/x",
        {"key": seaweed.access_key, "secret": seaweed.secret_key, "client_kwargs": {"endpoint_url": seaweed.endpoint}},
    )
    with pytest.raises(ObjectStoreError) as info:
        store.get("runs/1/images/1.npz")
    assert seaweed.secret_key not in str(info.value)


def test_an_unreachable_s3_endpoint_is_a_store_error_not_a_client_crash() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = ObjectStore("s3://readar-nowhere/x", {
        "key": "k", "secret": "s", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    })
    with pytest.raises(ObjectStoreError, match="cannot write object"):
        store.put("runs/1/images/1.npz", b"x")
