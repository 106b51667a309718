"""The IPC transport's control frames (one TCP connection per sender and endpoint; the KV
itself never crosses it: the sender writes the receiver's blocks in shared memory).

    HEADER (40 bytes, network order): magic "KVIP" | version u8 | kind u8 | handoff id 16 B
                                      | layer u16 | num_layers u16 | nbytes u32 | value u64
    sender -> receiver   HELLO    payload = JSON {pid, host}: once, first
                         BEGIN    num_layers: start writing this handoff
                         WRITTEN  layer, value = check of the layer's bytes (host_check): its
                                  writes are complete (the sender's copies have finished)
                         ABORT    payload = reason: the sender gave up on the handoff and no
                                  longer writes it (its last write is complete)
    receiver -> sender   MAP      payload = JSON: how to map the receiver's KV cache (ipc/memory)
                         BLOCKS   value = bytes per layer, payload = the handoff's reserved
                                  block ids (u32, little-endian): the only blocks it may write
                         ACK      every layer verified
                         NACK     payload = reason: the handoff (or, with no id, the connection)
                                  failed; the sender stops writing it and answers ABORT

`nbytes` is the payload's size, at most MAX_PAYLOAD_BYTES.
"""

from __future__ import annotations

import json
import socket
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from kvmesh.shared.handoff.wire import HeaderFormat, ProtocolError, read_bounded

SCHEME = "ipc://"
NO_ID = bytes(16)  # the handoff id of frames about the connection (HELLO, MAP, its NACK)
MAX_PAYLOAD_BYTES = 1 << 20  # a BLOCKS frame: 262,144 block ids


class IpcFrameKind(IntEnum):
    HELLO = 1
    MAP = 2
    BEGIN = 3
    BLOCKS = 4
    WRITTEN = 5
    ABORT = 6
    ACK = 7
    NACK = 8


HEADER = HeaderFormat("16sHHIQ", b"KVIP", 1, IpcFrameKind, "IPC frame header")


@dataclass(frozen=True)
class Frame:
    kind: IpcFrameKind
    handoff_id: bytes = NO_ID
    layer: int = 0
    num_layers: int = 0
    nbytes: int = 0
    value: int = 0


def pack(frame: Frame, payload: bytes = b"") -> bytes:
    assert frame.nbytes == len(payload) <= MAX_PAYLOAD_BYTES
    return HEADER.pack(frame) + payload


def message(
    kind: IpcFrameKind, handoff_id: bytes = NO_ID, payload: bytes = b"", **fields: int
) -> bytes:
    return pack(Frame(kind, handoff_id, nbytes=len(payload), **fields), payload)


def text(kind: IpcFrameKind, handoff_id: bytes, reason: str) -> bytes:
    return message(kind, handoff_id, reason.encode()[:4096])


def document(kind: IpcFrameKind, fields: dict[str, Any]) -> bytes:
    return message(kind, payload=json.dumps(fields).encode())


def read_frame(sock: socket.socket) -> tuple[Frame, bytes] | None:
    """The next frame and its payload, or None if the peer closed cleanly between frames."""
    frame = HEADER.read(sock, Frame)
    if frame is None:
        return None
    return frame, read_bounded(sock, frame.nbytes, f"{frame.kind.name} frame", MAX_PAYLOAD_BYTES)


def parse_document(payload: bytes, what: str) -> dict[str, Any]:
    try:
        fields = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return fields


def host_check(layer: torch.Tensor) -> int:
    """WRITTEN's value for a layer on the host (contiguous): the crc32 of its bytes (zlib, in C
    without the GIL). On a GPU both ends use kernels/checksum's word sum (one launch, no copy of
    the layer to the host)."""
    return zlib.crc32(layer.reshape(-1).view(torch.uint8).numpy().data)


def parse_ipc_endpoint(endpoint: str) -> tuple[str, int]:
    """'ipc://host:port' (IPv6 as [addr]) -> (host, port)."""
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"not an {SCHEME} endpoint: {endpoint!r}")
    host, _, port = endpoint.removeprefix(SCHEME).rpartition(":")
    return host.strip("[]"), int(port)
