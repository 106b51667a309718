"""Throwaway certificates for a local mesh (`kvmesh up --tls`), made with `cryptography`.

    ca.pem            a CA made for this mesh; its key is never written
    mesh.pem/.key     the gateway's and the workers' certificate: server and client use, named
                      for this host (localhost, 127.0.0.1, ::1, the host name and its address)

All of it goes into a new private directory (0700, files 0600) that the caller removes when the
mesh stops. Keys are ECDSA P-256; certificates last `days` (one by default).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmesh.services.tls import TlsFiles

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Authority:
    """A CA in memory: what signs the certificates of one mesh."""

    key: Key
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "kvmesh local CA", days: int = 1) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, name: str, hosts: list[str], days: int = 1) -> tuple[Key, x509.Certificate]:
        """A leaf certificate for `hosts` (DNS names or IP addresses), for TLS servers and
        clients alike."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = (
            _builder(subject, self.cert.subject, key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return key, cert


def write_mesh_files(directory: Path, authority: Authority, hosts: list[str]) -> TlsFiles:
    """The CA certificate and a certificate for `hosts` as PEM files in `directory`."""
    key, cert = authority.issue("kvmesh", hosts)
    ca = _write(directory / "ca.pem", authority.cert.public_bytes(serialization.Encoding.PEM))
    crt = _write(directory / "mesh.pem", cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return TlsFiles(cert=crt, key=_write(directory / "mesh.key", pem), ca=ca)


def local_mesh_tls(bind_host: str) -> tuple[Path, TlsFiles]:
    """A private directory with a new CA and a certificate for this host; (directory, files)."""
    directory = Path(tempfile.mkdtemp(prefix="kvmesh-tls-"))  # mode 0700
    return directory, write_mesh_files(directory, Authority.create(), local_hosts(bind_host))


def local_hosts(bind_host: str) -> list[str]:
    """The names a process on this machine is reached by: loopback, the bind address, the host
    name and the address it resolves to (what a worker bound to 0.0.0.0 advertises)."""
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    with contextlib.suppress(OSError):
        hosts.append(socket.gethostbyname(socket.gethostname()))
    if bind_host not in ("", "0.0.0.0", "::"):
        hosts.append(bind_host)
    return list(dict.fromkeys(hosts))


def _builder(subject: x509.Name, issuer: x509.Name, key: Key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
