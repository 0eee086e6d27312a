"""Blob store on S3 or any S3-compatible endpoint (boto3).

boto3 is blocking, so every call runs in a thread (``asyncio.to_thread``). The
client is made on first use. Credentials and region come from the usual boto3
chain (environment, shared config, instance role) unless ``region`` is given.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from server.blob.local import check_key
from server.domain.errors import NotFoundError
from server.ports import BlobInfo

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3BlobStore"]

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class S3BlobStore:
    """``BlobStore`` keeping each object as ``f"{prefix}/{key}"`` in one bucket.

    A PUT replaces an S3 object atomically. ``create_bucket`` makes the bucket
    on first use when it does not exist (otherwise a missing bucket is an error
    from S3).
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, create_bucket: bool = False,
                 timeout: float = 30.0, max_attempts: int = 5) -> None:
        """Describe the store; nothing is contacted until the first call.

        ``timeout`` bounds connect and read of each request; boto3 retries
        throttling and transient errors up to ``max_attempts``.
        """
        if not bucket:
            raise ValueError("bucket must not be empty")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self._endpoint_url = endpoint_url
        self._region = region
        self._create_bucket = create_bucket
        self._config = Config(connect_timeout=timeout, read_timeout=timeout,
                              retries={"max_attempts": max_attempts, "mode": "standard"})
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()

    @property
    def bucket(self) -> str:
        """The bucket name."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix inside the bucket ("" or ending with '/')."""
        return self._prefix

    async def __aenter__(self) -> S3BlobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _get_client(self) -> S3Client:
        async with self._lock:
            if self._client is None:
                client = await asyncio.to_thread(self._make_client)
                if self._create_bucket:
                    await asyncio.to_thread(self._ensure_bucket, client)
                self._client = client
            return self._client

    def _make_client(self) -> S3Client:
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self._endpoint_url,
                              region_name=self._region, config=self._config)

    def _ensure_bucket(self, client: S3Client) -> None:
        try:
            client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise
        region = self._region or client.meta.region_name
        try:
            if region and region != "us-east-1":
                client.create_bucket(
                    Bucket=self._bucket,
                    CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                )
            else:
                client.create_bucket(Bucket=self._bucket)
        except ClientError as exc:
            if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _full(self, key: str) -> str:
        check_key(key)
        return self._prefix + key

    async def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""
        full = self._full(key)
        client = await self._get_client()
        await asyncio.to_thread(client.put_object, Bucket=self._bucket, Key=full, Body=data)

    async def get(self, key: str) -> bytes:
        """The object; NotFoundError when absent."""
        full = self._full(key)
        client = await self._get_client()

        def read() -> bytes:
            response = client.get_object(Bucket=self._bucket, Key=full)
            with response["Body"] as body:
                return body.read()

        try:
            return await asyncio.to_thread(read)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise NotFoundError("blob", key) from exc
            raise

    async def list(self, prefix: str) -> list[BlobInfo]:
        """Objects whose key starts with ``prefix``, ordered by key."""
        check_key(prefix, allow_empty=True)
        client = await self._get_client()

        def collect() -> list[BlobInfo]:
            found: list[BlobInfo] = []
            paginator = client.get_paginator("list_objects_v2")
            strip = len(self._prefix)
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix + prefix):
                for obj in page.get("Contents", []):
                    found.append(BlobInfo(key=obj["Key"][strip:], size=obj["Size"],
                                          modified=obj["LastModified"].timestamp()))
            found.sort(key=lambda info: info.key)
            return found

        return await asyncio.to_thread(collect)

    async def delete(self, key: str) -> None:
        """Remove an object; absent keys are not an error."""
        full = self._full(key)
        client = await self._get_client()
        await asyncio.to_thread(client.delete_object, Bucket=self._bucket, Key=full)

    async def aclose(self) -> None:
        """Close the client's connection pool. Safe to repeat."""
        async with self._lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
