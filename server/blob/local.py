"""Blob store on a local directory (the embedded default for snapshots)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

from server.domain.errors import NotFoundError
from server.ports import BlobInfo

__all__ = ["LocalBlobStore", "check_key"]

_TMP_PREFIX = ".tmp-"


def check_key(key: str, *, allow_empty: bool = False) -> None:
    """Raise ValueError unless ``key`` is a safe '/'-separated relative path.

    Rejected: absolute keys, ``..`` or ``.`` segments, empty segments,
    backslashes and NUL. ``allow_empty`` admits ``""`` (a list prefix).
    """
    if not key:
        if allow_empty:
            return
        raise ValueError("blob key must not be empty")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid blob key {key!r}: must be a relative '/'-separated path")
    parts = key.split("/")
    # A prefix may end with '/', leaving one empty last segment.
    inner = parts[:-1] if allow_empty and key.endswith("/") else parts
    for part in inner:
        if part in ("", ".", ".."):
            raise ValueError(f"invalid blob key {key!r}: empty, '.' or '..' segment")
        if part.startswith(_TMP_PREFIX):
            raise ValueError(f"invalid blob key {key!r}: {_TMP_PREFIX!r} is reserved")


class LocalBlobStore:
    """``BlobStore`` keeping each object as a file under ``root_dir``.

    ``put`` writes a temporary file in the target directory and renames it over
    the old one (``os.replace``), so readers see the old or the new object,
    never a torn one. File work runs in a thread (``asyncio.to_thread``).
    """

    def __init__(self, root_dir: str | os.PathLike[str]) -> None:
        """Use ``root_dir`` (created on first write) as the store."""
        self._root = Path(root_dir).resolve()

    @property
    def root(self) -> Path:
        """The directory holding the objects."""
        return self._root

    async def __aenter__(self) -> LocalBlobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _path(self, key: str) -> Path:
        check_key(key)
        return self._root.joinpath(*key.split("/"))

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, atomically replacing any previous object."""
        await asyncio.to_thread(self._put, self._path(key), data)

    @staticmethod
    def _put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes:
        """The object; NotFoundError when absent."""
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFoundError("blob", key) from exc

    async def list(self, prefix: str) -> list[BlobInfo]:
        """Objects whose key starts with ``prefix``, ordered by key."""
        check_key(prefix, allow_empty=True)
        return await asyncio.to_thread(_scan, self._root, prefix)

    async def delete(self, key: str) -> None:
        """Remove an object; absent keys are not an error."""
        await asyncio.to_thread(self._delete, self._path(key))

    @staticmethod
    def _delete(path: Path) -> None:
        # A directory, or a path through a file, is no object by that key.
        with contextlib.suppress(IsADirectoryError, NotADirectoryError):
            path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Nothing to release."""


def _scan(root: Path, prefix: str) -> list[BlobInfo]:
    # Walk only the deepest directory the prefix names, then filter by string prefix.
    base_dir = prefix.rpartition("/")[0]
    start = root.joinpath(*base_dir.split("/")) if base_dir else root
    found: list[BlobInfo] = []
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.startswith(_TMP_PREFIX):
                continue
            key = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not key.startswith(prefix):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # deleted while listing
            found.append(BlobInfo(key=key, size=st.st_size, modified=st.st_mtime))
    found.sort(key=lambda info: info.key)
    return found

