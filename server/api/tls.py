"""Server transport security: TLS with ``--tls-cert/--tls-key``, mTLS with ``--tls-client-ca``.

With a client CA every client must present a certificate signed by it
(``require_client_auth``); the handshake refuses anyone else before any RPC
runs. Certificates and keys are PEM files, read once at start-up.
"""

from __future__ import annotations

from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """A TLS option is missing or a file cannot be read."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc}") from None
    if b"-----BEGIN" not in data:
        raise TLSConfigError(f"{what} {path} is not a PEM file")
    return data


def server_credentials(cert: str | None, key: str | None,
                       client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """Credentials of the listening port; None when TLS is off (no cert, no key)."""
    if not cert and not key:
        if client_ca:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise TLSConfigError("--tls-cert and --tls-key go together")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    root = _read(client_ca, "TLS client CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root,
                                       require_client_auth=root is not None)
