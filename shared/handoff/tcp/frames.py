"""The TCP transport's wire format: raw tensor bytes, one frame per layer, crc32 per layer.

Every message is a fixed header, then `nbytes` of payload.

    HEADER (38 bytes, network order):  magic "KVMH" | version u8 | kind u8 | handoff id 16 B
                                       | layer u16 | num_layers u16 | nbytes u64 | crc32 u32
    sender -> receiver   DATA   payload = the layer's bytes, crc32 = zlib.crc32(payload)
                         ABORT  payload = UTF-8 reason: the sender gives up on the handoff
    receiver -> sender   ACK    all layers delivered (payload empty)
                         NACK   payload = UTF-8 reason: the handoff failed on the receiver

Handoffs multiplex on one connection per (sender, endpoint), frame by frame.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import IntEnum

from kvmesh.shared.handoff.wire import (
    MAX_MESSAGE_BYTES,
    HeaderFormat,
    read_bounded,
    recv_into,
)

_DRAIN_CHUNK = 1 << 20


class TcpFrameKind(IntEnum):
    DATA = 1
    ACK = 2
    NACK = 3
    ABORT = 4


HEADER = HeaderFormat("16sHHQI", b"KVMH", 1, TcpFrameKind, "frame header")


@dataclass(frozen=True)
class Header:
    kind: TcpFrameKind
    handoff_id: bytes  # 16 bytes (UUID)
    layer: int = 0
    num_layers: int = 0
    nbytes: int = 0  # payload bytes that follow the header
    crc32: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self)


def read_header(sock: socket.socket) -> Header | None:
    """The next frame header, or None if the peer closed cleanly between frames."""
    return HEADER.read(sock, Header)


def read_message(sock: socket.socket, header: Header) -> str:
    """The UTF-8 payload of an ACK/NACK/ABORT frame."""
    return read_bounded(sock, header.nbytes, "message").decode(errors="replace")


def send_message(
    sock: socket.socket, kind: TcpFrameKind, handoff_id: bytes, text: str = ""
) -> None:
    payload = text.encode()[:MAX_MESSAGE_BYTES]
    sock.sendall(Header(kind, handoff_id, nbytes=len(payload)).pack() + payload)


def drain(sock: socket.socket, nbytes: int) -> None:
    """Read and drop `nbytes` of payload through a small scratch buffer."""
    scratch = memoryview(bytearray(min(nbytes, _DRAIN_CHUNK)))
    while nbytes:
        chunk = scratch[: min(nbytes, len(scratch))]
        recv_into(sock, chunk)
        nbytes -= len(chunk)
