"""TLS for every gRPC hop, built here and nowhere else.

    client --TLS--> gateway --mTLS--> prefill / decode / aggregated --mTLS--> decode (NCCL links)

One set of PEM files per process (`TlsFiles`): its certificate chain and key (presented as a
server and, between mesh processes, as a client) and the CA bundle its peers must chain to.
Servers: `ServerTls` (the gateway asks clients for no certificate; workers require one that
chains to the CA); its files are read again on `reload()` (SIGHUP), and new handshakes take the
new ones while connections already open keep theirs. Clients: `aio_channel` / `sync_channel`
pick TLS or plaintext from the files given; channel credentials are read from the files each
time a channel is made, so channels made after a rotation present the new certificate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# gRPC channel options every kvmesh channel takes (message size as the servers allow)
Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one process; every field empty: plaintext."""

    cert: Path | None = None  # certificate chain this process presents
    key: Path | None = None  # its private key
    ca: Path | None = None  # CA bundle the peer's certificate must chain to

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        for name, path in (("--tls-cert", self.cert), ("--tls-key", self.key),
                           ("--tls-ca", self.ca)):  # fmt: skip
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no file {path}")

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    def require_mesh(self) -> None:
        """A mesh process (gateway, worker) with TLS needs all three files: it serves with its
        certificate and proves itself with it to the workers it calls, which check it against
        the CA."""
        if self.enabled and (self.cert is None or self.ca is None):
            raise ValueError(
                "a mesh process with TLS needs --tls-cert, --tls-key and --tls-ca (mutual TLS "
                "between the gateway and the workers)"
            )


PLAINTEXT = TlsFiles()


class ServerTls:
    """A server's TLS credentials, reloadable from their files; `require_client_auth`: only
    clients whose certificate chains to the CA complete the handshake."""

    def __init__(self, files: TlsFiles, require_client_auth: bool) -> None:
        if files.cert is None or files.key is None:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        if require_client_auth and files.ca is None:
            raise ValueError("mutual TLS needs --tls-ca: the CA client certificates chain to")
        self.files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch, require_client_authentication=require_client_auth
        )

    def reload(self) -> bool:
        """Read the files again; new handshakes use them. A file that cannot be read leaves
        the current ones in force (False, logged)."""
        try:
            config = self._configuration()
        except OSError as e:
            log.error("TLS files not reloaded, the current ones stay in force: %s", e)
            return False
        with self._lock:
            self._pending = config
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        assert self.files.cert is not None and self.files.key is not None
        pair = (self.files.key.read_bytes(), self.files.cert.read_bytes())
        ca = self.files.ca.read_bytes() if self.files.ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # called by gRPC before each handshake: None keeps the configuration in force
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def add_port(server: Any, address: str, tls: ServerTls | None) -> int:
    """Bind `server` (grpc or grpc.aio) to address with TLS or plaintext; the bound port."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, tls.credentials))


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Trust the CA (the system's roots without one); present the certificate if given."""

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(files.ca), private_key=read(files.key),
        certificate_chain=read(files.cert),
    )  # fmt: skip


def aio_channel(
    address: str, files: TlsFiles, options: Options = (), interceptors: Sequence[Any] = ()
) -> grpc.aio.Channel:
    if not files.enabled:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        address, channel_credentials(files), options=options, interceptors=interceptors
    )


def sync_channel(address: str, files: TlsFiles, options: Options = ()) -> grpc.Channel:
    if not files.enabled:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(files), options=options)
