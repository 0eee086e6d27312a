"""Client side of authentication and transport security.

:func:`bearer_token_interceptors` add ``authorization: Bearer <token>`` to
every call (unary and streaming); :func:`tls_credentials` builds TLS (and,
with a client certificate, mTLS) channel credentials from PEM files. Both are
used through ``ChannelConfig.secure(...)`` or the ``token=``/``tls_*=``
arguments of :class:`~agent_sdk.MeshClient` and :class:`~agent_sdk.Agent`.

A token sent without TLS travels in clear: outside loopback, use ``tls_ca``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

PemSource = str | Path | bytes
"""A PEM file path, or the PEM bytes themselves."""


def _pem(value: PemSource | None, what: str) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {value}: {exc}") from None


def tls_credentials(tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                    tls_key: PemSource | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: ``tls_ca`` verifies the server (system roots when None);
    ``tls_cert`` + ``tls_key`` present a client certificate (mTLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca, "TLS CA"),
        private_key=_pem(tls_key, "TLS key"),
        certificate_chain=_pem(tls_cert, "TLS certificate"))


def _with_token(details: grpc.aio.ClientCallDetails,
                header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*[(k, v) for k, v in (details.metadata or ())
                                   if k != "authorization"])
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _Bearer:
    """Holds the ``authorization`` header (never shown in repr)."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError("token must be a non-empty string without spaces")
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token=***)"


class _UnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._header), request)


class _UnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails, request: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._header), request)


class _StreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._header),
                                  request_iterator)


class _StreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._header),
                                  request_iterator)


def bearer_token_interceptors(token: str) -> tuple[grpc.aio.ClientInterceptor, ...]:
    """Interceptors adding ``authorization: Bearer <token>`` to every kind of call.

    One per call kind: a grpc.aio channel files each interceptor under the
    first kind it implements only.
    """
    return (_UnaryUnary(token), _UnaryStream(token), _StreamUnary(token),
            _StreamStream(token))
