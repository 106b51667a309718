"""The NCCL transport's control protocol: frames on a TCP connection per (prefill, decode) pair.

Each pair shares one TCP control connection and one 2-rank NCCL communicator (prefill = rank 0,
decode = rank 1), set up on the first handoff between them:

    prefill (NcclKVSender)                         decode (NcclKVReceiver, nccl://host:port)
    connect, HELLO(unique id)           ------->   ncclCommInitRank(rank 1) + 1-byte probe recv
    ncclCommInitRank(rank 0) + probe send          READY once both ranks are connected
                                        <-------
  per layer of a handoff, in one order on both sides (NCCL matches sends to recvs by order):
    DATA(id, layer, nbytes), then ncclSend on the peer's stream ->  ncclRecv into a staging
    CKSUM(id, layer, checksum) once the GPU computed it         ->  buffer; on CKSUM: verify,
                                        <-------                    scatter into the reserved
                                          ACK / NACK(reason)        blocks; ACK after the last

Every DATA frame is matched by a recv, also for handoffs the receiver rejects (into a buffer
that is dropped), so the communicator's order never breaks; a corrupt layer NACKs the handoff.
A lost control connection aborts the communicator on both sides (ncclCommAbort ends kernels that
wait on a dead peer), fails its handoffs, and drops the pair from the sender's LRU cache.
"""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass
from enum import IntEnum

from shared.handoff.wire import (
    MAX_MESSAGE_BYTES,
    HeaderFormat,
    parse_endpoint,
    read_bounded,
)

SCHEME = "nccl://"
MASK64 = (1 << 64) - 1  # a CKSUM value is the int64 checksum's bit pattern, as uint64
_NO_ID = bytes(16)


class Kind(IntEnum):
    HELLO = 1  # payload: the NCCL unique id (prefill -> decode)
    READY = 2  # the communicator is up (decode -> prefill)
    DATA = 3  # a layer of `nbytes` follows on the communicator
    CKSUM = 4  # value: the layer's checksum
    ABORT = 5  # payload: reason; the sender gives up on the handoff
    ACK = 6  # all layers delivered
    NACK = 7  # payload: reason; the handoff failed (or, at setup, the pair could not connect)


FRAME = HeaderFormat("16sHHQQ", b"KVMN", 1, Kind, "control frame")


@dataclass(frozen=True)
class Frame:
    kind: Kind
    handoff_id: bytes = _NO_ID  # 16 bytes (UUID)
    layer: int = 0
    num_layers: int = 0
    nbytes: int = 0  # DATA: payload bytes on NCCL; others: bytes of the TCP payload that follows
    value: int = 0  # CKSUM: the layer checksum (kernels/checksum), uint64

    def pack(self) -> bytes:
        return FRAME.pack(self)


def read_frame(sock: socket.socket) -> Frame | None:
    """The next frame, or None if the peer closed cleanly between frames."""
    return FRAME.read(sock, Frame)


def read_burst(sock: socket.socket, limit: int = 256) -> list[tuple[Frame, bytes]]:
    """The next frame, and those already waiting behind it (up to `limit`), with the TCP
    payloads of ABORT frames; [] once the peer closed cleanly."""
    burst: list[tuple[Frame, bytes]] = []
    while len(burst) < limit and (not burst or select.select([sock], [], [], 0)[0]):
        frame = read_frame(sock)
        if frame is None:
            break
        payload = read_payload(sock, frame) if frame.kind == Kind.ABORT else b""
        burst.append((frame, payload))
    return burst


def read_payload(sock: socket.socket, frame: Frame) -> bytes:
    """The TCP payload of a HELLO/ABORT/NACK frame."""
    return read_bounded(sock, frame.nbytes, "control payload")


def message(kind: Kind, handoff_id: bytes = _NO_ID, text: str | bytes = "") -> bytes:
    payload = (text.encode() if isinstance(text, str) else text)[:MAX_MESSAGE_BYTES]
    return Frame(kind, handoff_id, nbytes=len(payload)).pack() + payload


def parse_nccl_endpoint(endpoint: str) -> tuple[str, int]:
    """'nccl://host:port' -> (host, port)."""
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"not an nccl:// endpoint: {endpoint!r}")
    return parse_endpoint("tcp://" + endpoint.removeprefix(SCHEME))
