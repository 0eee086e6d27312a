"""Blob stores: local directory and S3 implementations of ``server.ports.BlobStore``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.blob.local import LocalBlobStore
from server.ports import BlobStore

__all__ = ["LocalBlobStore", "open_blob_store"]


def open_blob_store(url: str, *, s3_endpoint: str | None = None) -> BlobStore:
    """Open the blob store named by ``url``.

    ``file:///abs/path`` or a plain path -> ``LocalBlobStore``;
    ``s3://bucket/prefix`` -> ``S3BlobStore`` (``s3_endpoint`` for any
    S3-compatible endpoint). ValueError for an empty URL or another scheme.
    """
    if not url:
        raise ValueError("blob store URL must not be empty")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} names a host; use file:///absolute/path")
        return LocalBlobStore(Path(unquote(parts.path)))
    if scheme == "s3":
        from server.blob.s3 import S3BlobStore  # noqa: PLC0415 - boto3 loads slowly

        if not parts.netloc:
            raise ValueError(f"s3 URL {url!r} has no bucket; use s3://bucket/prefix")
        return S3BlobStore(parts.netloc, parts.path.strip("/"), endpoint_url=s3_endpoint)
    if "://" not in url and (len(scheme) <= 1):
        # A plain path (a one-letter "scheme" is a Windows drive).
        return LocalBlobStore(Path(url))
    raise ValueError(f"unknown blob store URL {url!r}: use file:///path, a path or s3://bucket/prefix")
