"""A lean writer and reader for the small ``.npz`` archives READAR stores per image.

``np.savez`` and ``np.load`` spend most of their time in the zipfile module and in parsing each member's header
with ``ast.literal_eval``: about 80 µs to write and 150 µs to read a logit object of five tiny arrays, paid once
per image by the worker and again by the aggregator. This module writes the same format directly (a plain zip of
uncompressed ``.npy`` members, which ``np.load`` reads as usual) and reads it back with a strict fast path.
Anything the fast path does not recognise exactly (archives written by ``np.savez``, which use zip64 fields;
other dtypes; Fortran order; a checksum mismatch) returns ``None`` and the caller falls back to ``np.load``,
so no archive reads differently, only faster. No pickle either way.
"""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory entry
_END = struct.Struct("<IHHHHIIH")  # end of central directory
_LOCAL_SIGNATURE, _CENTRAL_SIGNATURE, _END_SIGNATURE = 0x04034B50, 0x02014B50, 0x06054B50
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch: archives are byte-identical for equal input
_NPY_MAGIC = b"\x93NUMPY"
_NPY_ALIGN = 64
_HEADER = re.compile(r"\{'descr': '([<>|][fiub][1248])', 'fortran_order': False, 'shape': \(((?:\d+,\s?)*\d*)\), \}")
_PLAIN_KINDS = frozenset("fiub")


def _npy(array: np.ndarray) -> bytes:
    """One ``.npy`` member (format 1.0): magic, version, padded header, C-order data."""
    if array.dtype.kind not in _PLAIN_KINDS:
        raise TypeError(f"only plain numeric arrays are stored; got dtype {array.dtype}")
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {tuple(array.shape)!r}, }}"
    # numpy pads the header with spaces and a newline so the data starts on a 64-byte boundary.
    padding = -(len(_NPY_MAGIC) + 4 + len(header) + 1) % _NPY_ALIGN
    text = (header + " " * padding + "\n").encode("latin1")
    return b"".join((_NPY_MAGIC, b"\x01\x00", struct.pack("<H", len(text)), text, array.tobytes()))


def write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as an uncompressed ``.npz`` (members named ``<name>.npy``), readable by ``np.load``."""
    parts: list[bytes] = []
    central: list[bytes] = []
    offset = 0
    for name, array in arrays.items():
        member = f"{name}.npy".encode()
        payload = _npy(np.asarray(array))
        crc = zlib.crc32(payload)
        local = _LOCAL.pack(_LOCAL_SIGNATURE, 20, 0, 0, 0, _DOS_DATE, crc, len(payload), len(payload), len(member), 0)
        central.append(_CENTRAL.pack(_CENTRAL_SIGNATURE, 20, 20, 0, 0, 0, _DOS_DATE, crc, len(payload),
                                     len(payload), len(member), 0, 0, 0, 0, 0, offset) + member)
        parts += [local, member, payload]
        offset += len(local) + len(member) + len(payload)
    directory = b"".join(central)
    end = _END.pack(_END_SIGNATURE, 0, 0, len(central), len(central), len(directory), offset, 0)
    return b"".join(parts) + directory + end


def _read_npy(payload: bytes | memoryview) -> np.ndarray | None:
    if bytes(payload[:6]) != _NPY_MAGIC or len(payload) < 10:
        return None
    major = payload[6]
    if major == 1:
        (length,), start = struct.unpack_from("<H", payload, 8), 10
    elif major in (2, 3):
        (length,), start = struct.unpack_from("<I", payload, 8), 12
    else:
        return None
    match = _HEADER.fullmatch(bytes(payload[start:start + length]).decode("latin1").rstrip(" \n"))
    if match is None:
        return None
    dtype = np.dtype(match.group(1))
    shape = tuple(int(side) for side in match.group(2).replace(",", " ").split())
    data = start + length
    if len(payload) - data != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        return None
    return np.frombuffer(payload, dtype=dtype, offset=data).reshape(shape).copy()


def read_npz(data: bytes) -> dict[str, np.ndarray] | None:
    """The arrays of an archive in exactly the layout :func:`write_npz` produces; ``None`` for anything else
    (the caller then uses ``np.load``)."""
    view = memoryview(data)
    arrays: dict[str, np.ndarray] = {}
    position = 0
    while len(data) - position >= _LOCAL.size and _LOCAL.unpack_from(data, position)[0] == _LOCAL_SIGNATURE:
        _, _, flags, method, _, _, crc, size, plain_size, name_length, extra_length = _LOCAL.unpack_from(
            data, position)
        start = position + _LOCAL.size + name_length + extra_length
        if flags or method or size != plain_size or start + size > len(data):
            return None  # a data descriptor, encryption, compression or zip64 sizes: not ours
        name = bytes(view[position + _LOCAL.size:position + _LOCAL.size + name_length]).decode("utf-8", "replace")
        payload = view[start:start + size]
        if not name.endswith(".npy") or name[:-4] in arrays or zlib.crc32(payload) != crc:
            return None
        array = _read_npy(payload)
        if array is None:
            return None
        arrays[name[:-4]] = array
        position = start + size
    if not arrays or len(data) - position < 4 or struct.unpack_from("<I", data, position)[0] != _CENTRAL_SIGNATURE:
        return None
    return arrays
