"""Object store for logits and metric states, through fsspec: a local folder by default, ``s3://`` for
S3-compatible stores. Keys are relative posix paths that can never escape the store's prefix."""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Any

import fsspec

from storage.redact import redact_text, redact_url

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9._\-]+$")


class ObjectStoreError(RuntimeError):
    """An object could not be read or written; the message names the key and the store (redacted)."""


class ObjectMissingError(ObjectStoreError):
    """The object does not exist (as opposed to a store that cannot be reached)."""


def image_object_key(run_id: int, image_id: int) -> str:
    """The fixed key of an image's logits: a rerun overwrites the same object (DESIGN.md section 2)."""
    return f"runs/{int(run_id)}/images/{int(image_id)}.npz"


def category_state_key(run_id: int, category_row_id: int) -> str:
    """Key of a category's serialised metric state (merged into the overall and mean rows)."""
    return f"runs/{int(run_id)}/metric-states/{int(category_row_id)}.npz"


def check_key(key: str) -> str:
    """Refuse keys that could escape the prefix (``..``, absolute paths, odd characters)."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") or not _SAFE_SEGMENT.match(p) for p in parts):
        raise ObjectStoreError(f"refusing object key {key!r}: keys are relative paths of [A-Za-z0-9._-] segments")
    return key


def check_store_url(url: str) -> None:
    """Refuse, without creating anything, a store URL that cannot work: an unknown protocol (``foo://``), or a
    local path where a file stands in place of a folder (the path itself or one of its parents)."""
    protocol, path = fsspec.core.split_protocol(url)
    if protocol not in (None, "file", "local"):
        if protocol not in fsspec.available_protocols():
            raise ObjectStoreError(f"object store URL {redact_url(url)} has an unknown protocol {protocol!r}: give "
                                   "--object-store-url (or READAR_OBJECT_STORE_URL) a folder path or an s3:// URL")
        return
    folder = os.path.abspath(path)
    while True:
        if os.path.exists(folder) and not os.path.isdir(folder):
            where = "" if folder == os.path.abspath(path) else f" (on the object store path {os.path.abspath(path)})"
            raise ObjectStoreError(f"{folder}{where} is a file, not a folder: give --object-store-url (or "
                                   "READAR_OBJECT_STORE_URL) a folder path")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


class ObjectStore:
    """Read and write whole objects by key under one fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self._secrets = [str(v) for k, v in (storage_options or {}).items() if k in ("key", "secret", "token")]
        check_store_url(self.url)
        try:
            self.filesystem, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ValueError, ImportError) as exc:  # an unknown protocol, a missing fsspec backend
            raise ObjectStoreError(redact_text(f"cannot open the object store {self.describe()}: {exc}",
                                               self._secrets)) from exc
        self.is_local = self.filesystem.protocol in ("file", ("file", "local")) or "file" in self.filesystem.protocol
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise ObjectStoreError(
                    f"cannot create the object store folder {self.root} ({exc.strerror or exc}): give "
                    "--object-store-url (or READAR_OBJECT_STORE_URL) a folder path you can write"
                ) from exc

    def describe(self) -> str:
        return redact_url(self.url) or ""

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, check_key(key))

    def _error(self, action: str, key: str, exc: BaseException) -> ObjectStoreError:
        message = redact_text(f"cannot {action} object {key!r} in {self.describe()}: {exc}", self._secrets)
        return ObjectStoreError(message)

    def put(self, key: str, data: bytes) -> None:
        """Write an object whole. Local writes go to a temporary name and are renamed into place, so a reader
        never sees a partial object; S3 PUTs are atomic by nature.

        Local writes are not forced to disk one by one (an fsync per object was the largest single cost of a
        short task: a journal commit each time; figures: bench/RESULTS.md). A crash of the process loses nothing
        (the page cache holds the bytes); a power failure can lose the last seconds of objects whose rows already
        say done. Such a result is not lost silently: every object carries checksums, the aggregator finds it
        missing or damaged, and the image is computed again (metrics/aggregator.py, LostResultsError)."""
        path = self._path(key)
        try:
            if self.is_local:
                directory = os.path.dirname(path)
                os.makedirs(directory, exist_ok=True)
                temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
                try:
                    with open(temporary, "wb") as handle:
                        handle.write(data)
                    os.replace(temporary, path)
                finally:
                    if os.path.exists(temporary):
                        os.unlink(temporary)
            else:
                self.filesystem.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001 - any client failure (OSError, botocore/aiohttp errors) is a store error
            raise self._error("write", key, exc) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return self.filesystem.cat_file(path)
        except FileNotFoundError as exc:
            raise ObjectMissingError(f"object {key!r} does not exist in {self.describe()}") from exc
        except Exception as exc:  # noqa: BLE001 - any client failure is a store error
            raise self._error("read", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            return bool(self.filesystem.exists(self._path(key)))
        except ObjectStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error("check", key, exc) from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            if self.filesystem.exists(path):
                self.filesystem.rm_file(path)
        except Exception as exc:  # noqa: BLE001
            raise self._error("delete", key, exc) from exc

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (sorted)."""
        base = self._path(prefix)
        if not self.filesystem.exists(base):
            return []
        found = self.filesystem.find(base)
        root = self.root.rstrip("/") + "/"
        keys = [p[len(root):] if p.startswith(root) else p for p in found]
        return sorted(k for k in keys if not posixpath.basename(k).startswith(".tmp-"))
