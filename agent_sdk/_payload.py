"""Payload codec: Python values <-> ``agentmesh.v1.Payload``.

JSON is the default (``metadata["encoding"] = b"json/plain"``); ``bytes`` travel
as ``binary/plain`` and ``None`` as ``binary/null`` with empty data. Decoding
goes by the encoding; an unknown encoding decodes to the raw bytes.
"""

from __future__ import annotations

import json
from typing import Any

from agentmesh.v1 import common_pb2

ENCODING_KEY = "encoding"
JSON_ENCODING = b"json/plain"
BINARY_ENCODING = b"binary/plain"
NULL_ENCODING = b"binary/null"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_loads = json.loads


def encode_payload(value: Any) -> common_pb2.Payload:
    """Encode ``value`` into a Payload (JSON unless it is bytes or None).

    Raises ``TypeError`` when the value is not JSON-serialisable.
    """
    payload = common_pb2.Payload()
    if value is None:
        payload.metadata[ENCODING_KEY] = NULL_ENCODING
    elif isinstance(value, bytes | bytearray | memoryview):
        payload.metadata[ENCODING_KEY] = BINARY_ENCODING
        payload.data = bytes(value)
    else:
        payload.metadata[ENCODING_KEY] = JSON_ENCODING
        payload.data = _dumps(value).encode()
    return payload


def decode_payload(payload: common_pb2.Payload) -> Any:
    """Decode a Payload by its encoding; unknown encodings give the raw bytes.

    A payload without metadata and without data (an unset field) decodes to None.
    """
    encoding = payload.metadata.get(ENCODING_KEY)
    if encoding == JSON_ENCODING:
        return _loads(payload.data)
    if encoding == NULL_ENCODING:
        return None
    if encoding is None and not payload.data:
        return None
    return payload.data
