"""Conformance suite of ``server.ports.BlobStore``: local directory and S3 (moto_server)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest

from server.blob import open_blob_store
from server.blob.local import LocalBlobStore
from server.blob.s3 import S3BlobStore
from server.domain.errors import NotFoundError
from server.ports import BlobStore
from tests._services import free_port

REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A private moto_server on a free port for the whole session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    binary = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    pytest.fail("moto_server did not answer within 20 s")
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _dummy_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BlobStore]:
    """A fresh, empty store of each kind."""
    if request.param == "local":
        blob: BlobStore = LocalBlobStore(tmp_path / "blobs")
    else:
        endpoint: str = request.getfixturevalue("moto_endpoint")
        _dummy_aws_credentials(monkeypatch)
        bucket = f"amtest-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(Bucket=bucket)
        blob = S3BlobStore(bucket, "snapshots/run1", endpoint_url=endpoint, region=REGION)
    yield blob
    await blob.aclose()


async def test_put_get(store: BlobStore) -> None:
    await store.put("a/b/snapshot.bin", b"\x00\x01payload")
    assert await store.get("a/b/snapshot.bin") == b"\x00\x01payload"
    await store.put("empty", b"")
    assert await store.get("empty") == b""


async def test_put_replaces(store: BlobStore) -> None:
    await store.put("k", b"old-and-longer")
    await store.put("k", b"new")
    assert await store.get("k") == b"new"
    [info] = await store.list("")
    assert (info.key, info.size) == ("k", 3)
    assert info.modified > 0


async def test_list_by_prefix_is_ordered(store: BlobStore) -> None:
    for key in ["snap/2024-02", "snap/2024-01", "snap/x/deep", "snapshot", "other/1"]:
        await store.put(key, key.encode())
    assert [i.key for i in await store.list("snap/")] == [
        "snap/2024-01", "snap/2024-02", "snap/x/deep"]
    assert [i.key for i in await store.list("snap/2024")] == ["snap/2024-01", "snap/2024-02"]
    assert [i.key for i in await store.list("snap")] == [
        "snap/2024-01", "snap/2024-02", "snap/x/deep", "snapshot"]
    assert [i.key for i in await store.list("")] == [
        "other/1", "snap/2024-01", "snap/2024-02", "snap/x/deep", "snapshot"]
    assert await store.list("nothing/") == []
    sizes = {i.key: i.size for i in await store.list("")}
    assert sizes["snap/x/deep"] == len(b"snap/x/deep")


async def test_delete(store: BlobStore) -> None:
    await store.put("gone/soon", b"x")
    await store.delete("gone/soon")
    with pytest.raises(NotFoundError):
        await store.get("gone/soon")
    assert await store.list("gone/") == []
    await store.delete("gone/soon")  # absent: not an error
    await store.delete("never/was")


async def test_missing_key(store: BlobStore) -> None:
    with pytest.raises(NotFoundError) as info:
        await store.get("no/such/key")
    assert info.value.resource_name == "no/such/key"


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../b", "a//b", ""])
async def test_bad_keys_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        await store.put(key, b"x")
    with pytest.raises(ValueError, match="key"):
        await store.get(key)


async def test_s3_creates_bucket_only_when_asked(moto_endpoint: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _dummy_aws_credentials(monkeypatch)
    bucket = f"amtest-{uuid.uuid4().hex[:12]}"
    plain = S3BlobStore(bucket, endpoint_url=moto_endpoint, region=REGION)
    with pytest.raises(Exception, match="NoSuchBucket"):
        await plain.put("k", b"v")
    await plain.aclose()
    creating = S3BlobStore(bucket, endpoint_url=moto_endpoint, region=REGION,
                           create_bucket=True)
    await creating.put("k", b"v")
    assert await creating.get("k") == b"v"
    await creating.aclose()
    await creating.aclose()


def test_open_blob_store(tmp_path: Path) -> None:
    local = open_blob_store(f"file://{tmp_path}")
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path.resolve()
    plain = open_blob_store(str(tmp_path / "plain"))
    assert isinstance(plain, LocalBlobStore)
    s3 = open_blob_store("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(s3, S3BlobStore)
    assert (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ValueError, match="unknown blob store URL"):
        open_blob_store("gs://bucket/x")
