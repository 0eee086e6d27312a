"""Binding listening ports: a port already in use is an error that names it.

gRPC turns ``SO_REUSEPORT`` on by default, so a second ``agentmesh serve``
on the same port used to bind it too and share its connections, silently.
The server passes ``grpc.so_reuseport=0``; on top of that each port is
probed before it is bound (a plain socket with ``SO_REUSEADDR``, the way
listeners bind, so connections of a previous run in TIME_WAIT do not count):
a port in use is a :class:`PortInUseError` naming the port and what it was
for, before gRPC tries and logs its own less helpful error. Port 0 (pick a
free one) is never probed.
"""

from __future__ import annotations

import errno
import socket

import grpc


class PortInUseError(OSError):
    """A port the server must listen on is taken (``errno`` EADDRINUSE)."""

    def __init__(self, port: int, purpose: str, host: str = "") -> None:
        """``purpose`` names the listener ("gRPC", "metrics") in the message."""
        self.port = port
        self.purpose = purpose
        self.host = host
        where = f" on {host}" if host else ""
        super().__init__(errno.EADDRINUSE,
                         f"port {port} is already in use ({purpose}{where}); "
                         "is another agentmesh running?")

    def __str__(self) -> str:
        """The message alone (OSError's default prefixes ``[Errno 98]``)."""
        return str(self.strerror)


def ensure_free(host: str, port: int, purpose: str) -> None:
    """Raise PortInUseError when something listens on ``host:port`` already.

    Other failures (an address this machine does not have, no IPv6) are left
    to the real bind, which reports them.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(port, purpose, host) from None


def add_grpc_port(server: grpc.aio.Server, host: str, port: int,
                  credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``host:port`` (TLS with ``credentials``) and return the port bound.

    PortInUseError when the port is taken; OSError when it cannot be bound
    for another reason. The server must have been made with
    ``("grpc.so_reuseport", 0)``, or a second server would share the port.
    """
    ensure_free(host, port, "gRPC")
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio >= 1.57 raises instead of returning 0
        bound = 0
    if bound == 0:
        ensure_free(host, port, "gRPC")  # taken since the probe?
        raise OSError(errno.EADDRNOTAVAIL, f"cannot bind {address} (gRPC)")
    return bound
