"""Stored logit format and the object store (local folder and a real SeaweedFS S3 server)."""

from __future__ import annotations

import base64
import io
import pickle
import struct
import zipfile
import zlib
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


# A logit object written by storage/npz.py, the hand-written writer READAR used until 2026-12-02 (zlib + base64):
# maps [[[-2.5, 0, 1.5], [3, -7, 0.25]]] float16, original_size (4, 6), input_size (2, 3), frame_size 4.
_HAND_WRITTEN_OBJECT = (
    "eNoL8GZmEWGAAEWGJRvnr+oAskBYCIjT8otyE0viy1KLijPz8/TyCion+4X6BkQyMpQxVKunpBYnF6lbKajbZFqo6yioA1WX"
    "FCXmxecXpaSCxN0Sc4pTgeLFGYkFqUC+hqaOQq0CRYCLEerWABR33xJM5e8BskCYA4hzEwuKcbs2zYgo1xrqKBjpKBhT4Ggu"
    "hoNAx9gxODEcZzBBdfEDfX7xCUAWCAsCcX5RZnpmXmJOfHFmVSrFAW2kQ2lQc7FAncqGNcATPOp4YM7nA+LMvILSkkHjdiao"
    "O5mxuv3A/vpHsEQOcntaUWJuKnXcToUEzgJ3MyOTCAPurIkKMDMqun70LIIAO5AyDLou9GSKAFmMWBItunb0ZIIAmkzoiQZd"
    "L3o0IcBTJvRIC/BmBadTViDUBTpsJjjmAdls764="
)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _archive(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, payload in members.items():
            archive.writestr(f"{name}.npy", payload)
    return buffer.getvalue()


def _members(**replace: np.ndarray) -> dict[str, bytes]:
    """The members of a valid 4×4 full-resolution logit object, some replaced."""
    arrays = {
        "format_version": np.array(1, np.int64), "maps": np.ones((1, 4, 4), np.float16),
        "original_size": np.array([4, 4], np.int64), "input_size": np.array([-1, -1], np.int64),
        "frame_size": np.array(1024, np.int64),
    }
    arrays.update(replace)
    return {name: _npy(array) for name, array in arrays.items()}


def test_logit_objects_are_numpys_own_npz() -> None:
    stored = StoredLogits(np.arange(6, dtype=np.float16).reshape(1, 2, 3), (2, 3))
    data = encode_logits(stored)
    expected = io.BytesIO()
    np.savez(expected, format_version=np.array(1, np.int64), maps=stored.maps, original_size=np.array([2, 3]),
             input_size=np.array([-1, -1]), frame_size=np.array(1024))
    assert data == expected.getvalue()
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        np.testing.assert_array_equal(archive["maps"], stored.maps)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # uncompressed: no member expands beyond the object
        assert {member.compress_type for member in archive.infolist()} == {zipfile.ZIP_STORED}


def test_objects_written_by_the_former_hand_written_writer_still_decode() -> None:
    back = decode_logits(zlib.decompress(base64.b64decode(_HAND_WRITTEN_OBJECT)))
    assert back.original_size == (4, 6) and back.input_size == (2, 3) and back.frame_size == 4
    np.testing.assert_array_equal(back.maps, np.array([[[-2.5, 0, 1.5], [3, -7, 0.25]]], np.float16))


def test_damaged_logit_objects_are_refused() -> None:
    stored = StoredLogits(np.ones((1, 3, 3), np.float16), original_size=(3, 3))
    damaged = bytearray(encode_logits(stored))
    damaged[damaged.index(b"\x93NUMPY", 200) + 130] ^= 0xFF  # a flipped byte in the maps' data
    with pytest.raises(LogitFormatError, match="not a READAR logit archive.*CRC"):
        decode_logits(bytes(damaged))
    with pytest.raises(LogitFormatError, match="not a READAR logit archive"):
        decode_logits(encode_logits(stored)[:300])  # cut short, as a power failure may leave it


@pytest.mark.parametrize(("members", "reason"), [
    (_members(maps=np.array([{"evil": 1}], dtype=object)), "Object arrays cannot be loaded"),
    (_members(format_version=np.array([1, 1])), "format_version must be integers of shape"),
    (_members(original_size=np.array(5)), "original_size must be integers of shape"),
    (_members(input_size=np.array([1.0, 1.0])), "input_size must be integers of shape"),
    (_members(maps=np.ones((1, 4, 4), np.float32)), "maps must be float16"),
    (_members(maps=np.ones((4, 4), np.float16)), "maps must be float16 \\(K, h, w\\); got float16 \\(4, 4\\)"),
    (_members(frame_size=np.array(10**9)), "frame_size must be from 1 to"),
    (_members(original_size=np.array([10**6, 10**6])), "exceeds 2,147,483,647 pixels"),
    (_members(format_version=np.array(2)), "format version 2"),
    ({**_members(), "maps": b"not an npy member"}, "maps must be float16 .*got bytes"),
    ({name: payload for name, payload in _members().items() if name != "maps"}, "lacks arrays \\['maps'\\]"),
], ids=["object-array", "version-shape", "size-scalar", "float-input-size", "float32-maps", "2-d-maps",
        "huge-frame", "huge-image", "version-2", "raw-member", "missing-maps"])
def test_hostile_logit_objects_are_refused_with_a_reason(members: dict[str, bytes], reason: str) -> None:
    with pytest.raises(LogitFormatError, match=reason):
        decode_logits(_archive(members), source="runs/1/images/1.npz")


def _lying_npy(shape: str) -> bytes:
    """A float16 ``.npy`` member whose header declares ``shape`` but that holds 32 bytes of data."""
    header = f"{{'descr': '<f2', 'fortran_order': False, 'shape': {shape}, }}"
    text = (header + " " * (-(10 + len(header) + 1) % 64) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(32)


def test_logit_objects_cannot_make_the_reader_allocate_what_they_do_not_hold() -> None:
    bomb = _members(maps=np.zeros((1, 2000, 2000), np.float16))  # 8 MB of zeros deflate to a few kB
    with pytest.raises(LogitFormatError, match="expands to 8,000,128 bytes, more than the whole object"):
        decode_logits(_archive(bomb, zipfile.ZIP_DEFLATED))
    # Headers that declare far more than the member holds: a 20 GB map (numpy reserves the address space, fills
    # it from the member and stops at the first missing byte; where memory is not overcommitted the reservation
    # itself fails) and one larger than any address space.
    with pytest.raises(LogitFormatError, match="not a READAR logit archive: (EOF|Unable to allocate)"):
        decode_logits(_archive({**_members(), "maps": _lying_npy("(1, 100000, 100000)")}))
    with pytest.raises(LogitFormatError, match="not a READAR logit archive"):
        decode_logits(_archive({**_members(), "maps": _lying_npy("(1, 10000000000, 10000000000)")}))


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
    with pytest.raises(LogitFormatError, match="runs/1/images/1.npz is not a READAR logit archive"):
        decode_logits(b"garbage", source="runs/1/images/1.npz")
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LogitFormatError, match="not a zip archive"):
        decode_logits(buffer.getvalue())
    with pytest.raises(LogitFormatError, match="not a zip archive"):
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
