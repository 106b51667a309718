"""TCP plumbing both transports share: endpoints, connecting, frame headers, exact reads.

The TCP transport frames its whole payload on a connection; the NCCL transport frames only its
control messages on one. Either way a frame starts with a fixed header (a HeaderFormat: magic,
version, kind, then the protocol's fields); messages carry a payload of at most
MAX_MESSAGE_BYTES, read with `read_bounded`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import fields as dataclass_fields
from enum import IntEnum
from typing import Any, TypeVar

from kvmesh.shared.handoff.transport import HandoffError

MAX_MESSAGE_BYTES = 64 * 1024  # bound on ACK/NACK/ABORT (and HELLO) payloads
JOIN_TIMEOUT_S = 5.0


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this protocol; the connection is dropped."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'tcp://host:port' (IPv6 as [addr]) -> (host, port)."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"not a tcp:// endpoint: {endpoint!r}")
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def format_endpoint(host: str, port: int, scheme: str = "tcp://") -> str:
    return f"{scheme}[{host}]:{port}" if ":" in host else f"{scheme}{host}:{port}"


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionError if the peer closes first."""
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def read_fixed(sock: socket.socket, size: int) -> bytes | None:
    """The next `size` bytes (a frame header), or None if the peer closed cleanly before them."""
    raw = bytearray(size)
    n = sock.recv_into(raw)
    if n == 0:
        return None
    recv_into(sock, memoryview(raw)[n:])
    return bytes(raw)


def read_bounded(
    sock: socket.socket, nbytes: int, what: str, limit: int = MAX_MESSAGE_BYTES
) -> bytes:
    """A message payload of `nbytes` (at most `limit`: else ProtocolError)."""
    if nbytes > limit:
        raise ProtocolError(f"{what} of {nbytes} bytes")
    raw = bytearray(nbytes)
    recv_into(sock, memoryview(raw))
    return bytes(raw)


T = TypeVar("T")


class HeaderFormat:
    """A protocol's fixed frame header, network order: magic 4 B | version u8 | kind u8 | then
    `fields` (struct codes). Headers are dataclasses whose fields, in order, are the kind and
    then these. `what` names the header in errors."""

    def __init__(
        self, fields: str, magic: bytes, version: int, kinds: type[IntEnum], what: str
    ) -> None:
        self.layout = struct.Struct("!4sBB" + fields)
        self.size = self.layout.size
        self.magic, self.version, self.kinds, self.what = magic, version, kinds, what

    def pack(self, header: Any) -> bytes:
        values = [getattr(header, f.name) for f in dataclass_fields(header)]
        return self.layout.pack(self.magic, self.version, *values)

    def read(self, sock: socket.socket, header: Callable[..., T]) -> T | None:
        """The next header, or None if the peer closed cleanly between frames; ProtocolError
        if it is not a header of this protocol."""
        raw = read_fixed(sock, self.size)
        if raw is None:
            return None
        magic, version, kind, *fields = self.layout.unpack(raw)
        if magic != self.magic or version != self.version or kind not in set(self.kinds):
            raise ProtocolError(f"bad {self.what} (magic {magic!r}, version {version})")
        return header(self.kinds(kind), *fields)


def connect(endpoint: str, address: tuple[str, int], timeout: float) -> socket.socket:
    """A tuned connection to `address` (what `endpoint` names); HandoffError if unreachable."""
    try:
        sock = socket.create_connection(address, timeout)
    except OSError as exc:
        raise HandoffError(f"cannot connect to {endpoint}: {exc}") from exc
    tune(sock)
    return sock


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on the socket (its recv returns EOF)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def settle(future: Future[Any], error: BaseException | None = None, value: Any = None) -> bool:
    """Complete `future` unless it already is; True if this call completed it."""
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        return False
    return True
