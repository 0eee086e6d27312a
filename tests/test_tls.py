"""TLS and mTLS with a throwaway CA made by the `cryptography` package."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from agentmesh.v1 import task_pb2, task_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent_sdk import MeshClient
from server.api.tls import TLSConfigError, server_credentials
from server.app import running_server
from tests._services import free_port
from tests.conftest import embedded_settings


@dataclass
class Pki:
    """PEM files of a CA, a server and clients."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, *,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None,
           cert: x509.Certificate | None) -> Path:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    """A CA with a server (CN/SAN 127.0.0.1 and localhost) and a client; a rogue CA's client."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _ca("agentmesh test CA")
    s_key, s_cert = _leaf("127.0.0.1", ca_key, ca, server=True)
    c_key, c_cert = _leaf("client", ca_key, ca, server=False)
    r_ca_key, r_ca = _ca("rogue CA")
    r_key, r_cert = _leaf("client", r_ca_key, r_ca, server=False)
    yield Pki(_write(d / "ca.pem", None, ca), _write(d / "server.pem", None, s_cert),
              _write(d / "server.key", s_key, None), _write(d / "client.pem", None, c_cert),
              _write(d / "client.key", c_key, None), _write(d / "rogue.pem", None, r_cert),
              _write(d / "rogue.key", r_key, None))


async def _status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await task_pb2_grpc.TaskServiceStub(channel).GetStats(task_pb2.GetStatsRequest(),
                                                               timeout=3)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _creds(pki: Pki, cert: Path | None = None, key: Path | None = None,
           ) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)


async def test_tls_encrypts_and_refuses_plaintext(pki: Pki) -> None:
    settings = embedded_settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    async with running_server(settings) as mesh:
        async with grpc.aio.secure_channel(mesh.address, _creds(pki)) as ch:
            assert await _status(ch) == grpc.StatusCode.OK
        async with grpc.aio.secure_channel(f"localhost:{mesh.port}", _creds(pki)) as ch:
            assert await _status(ch) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(mesh.address) as ch:
            assert await _status(ch) == grpc.StatusCode.UNAVAILABLE
        async with MeshClient(mesh.address, tls_ca=pki.ca) as client:
            assert (await client.stats()).agents_live == 0


async def test_mtls_refuses_clients_without_a_valid_certificate(pki: Pki) -> None:
    settings = embedded_settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                 tls_client_ca=str(pki.ca))
    async with running_server(settings) as mesh:
        async with grpc.aio.secure_channel(
                mesh.address, _creds(pki, pki.client_cert, pki.client_key)) as ch:
            assert await _status(ch) == grpc.StatusCode.OK
        async with grpc.aio.secure_channel(mesh.address, _creds(pki)) as ch:
            assert await _status(ch) == grpc.StatusCode.UNAVAILABLE  # no certificate
        async with grpc.aio.secure_channel(
                mesh.address, _creds(pki, pki.rogue_cert, pki.rogue_key)) as ch:
            assert await _status(ch) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
        async with grpc.aio.insecure_channel(mesh.address) as ch:
            assert await _status(ch) == grpc.StatusCode.UNAVAILABLE
        async with MeshClient(mesh.address, tls_ca=pki.ca, tls_cert=pki.client_cert,
                              tls_key=pki.client_key) as client:
            assert (await client.stats()).agents_live == 0


def test_tls_options_are_checked(pki: Pki, tmp_path: Path) -> None:
    assert server_credentials(None, None) is None
    with pytest.raises(TLSConfigError):
        server_credentials(str(pki.server_cert), None)
    with pytest.raises(TLSConfigError):
        server_credentials(None, None, str(pki.ca))
    with pytest.raises(TLSConfigError):
        server_credentials(str(tmp_path / "missing.pem"), str(pki.server_key))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TLSConfigError):
        server_credentials(str(tmp_path / "junk.pem"), str(pki.server_key))
    with pytest.raises(ValueError, match="go together"):
        MeshClient("127.0.0.1:1", tls_cert=pki.client_cert)


async def test_the_a2a_gateway_serves_https_with_the_servers_certificate(pki: Pki) -> None:
    settings = embedded_settings(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                 a2a_port=free_port())
    async with running_server(settings) as mesh:
        assert mesh.a2a_url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(pki.ca))
        async with httpx.AsyncClient(verify=trust, timeout=10) as http:
            card = await http.get(f"{mesh.a2a_url}.well-known/agent-card.json")
        assert card.json()["supportedInterfaces"][0]["url"] == mesh.a2a_url
        plain = mesh.a2a_url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=10) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{plain}.well-known/agent-card.json")
