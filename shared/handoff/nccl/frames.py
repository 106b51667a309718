"""The NCCL transport's control protocol: frames on a TCP connection per (prefill, decode) pair.

Each pair shares one TCP control connection and one 2-rank NCCL communicator (prefill = rank 0,
decode = rank 1), set up on the first handoff between them:

    prefill (NcclKVSender)                         decode (NcclKVReceiver, nccl://host:port)
    (the unique id went over gRPC: link)
    connect, HELLO(link id)             ------->   its unique id (link.Rendezvous),
                                                   ncclCommInitRank(rank 1) + 1-byte probe recv
    ncclCommInitRank(rank 0) + probe send          READY once both ranks are connected
                                        <-------
  per batch of messages, in one order on both sides (NCCL matches sends to recvs by order):
    DATA(id, layer, nbytes) per message, ncclSend of each   ->  ncclRecv of each message into a
    SUMS(count, programs), ncclSend of the batch's checksums     staging buffer, then of the
    ([count, programs] int64 partial sums) once computed         checksums; checksum the landed
                                        <-------                 layers, verify, scatter them into
                                          ACK / NACK(reason)     the reserved blocks; ACK after
                                                                 the last

A DATA frame announces `count` layers (its value field, >= 1) of `nbytes` each, starting at
`layer`: the sender coalesces consecutive layers of a handoff that it launches together and that
lie back to back in its memory (a handoff's last layer always goes alone, so that after the
last byte only it waits for its checksum). A SUMS frame announces the checksums of the layers of
the DATA frames since the previous SUMS frame, in their order: row i of the partial sums
(kernels/checksum; a row adds up to its layer's checksum) is the i-th of those layers
(NcclKVSender folds them on its GPU: one value a layer, `programs` = 1). Every
DATA and SUMS frame is matched by a recv, also for handoffs the receiver rejects (into a buffer
that is dropped), so the communicator's order never breaks; a corrupt layer NACKs the handoff.
A lost control connection aborts the communicator on both sides (ncclCommAbort ends kernels that
wait on a dead peer), fails its handoffs, and drops the pair from the sender's LRU cache.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import IntEnum

from kvmesh.shared.handoff.wire import (
    MAX_MESSAGE_BYTES,
    HeaderFormat,
    ProtocolError,
    parse_endpoint,
    read_bounded,
)

SCHEME = "nccl://"
NO_ID = bytes(16)  # the handoff id of frames about no one handoff
MAX_SUMS_PROGRAMS = 1 << 12  # partial sums a layer at most (kernels/checksum's grid)


class NcclFrameKind(IntEnum):
    HELLO = 1  # payload: the link id whose NCCL unique id came over gRPC (prefill -> decode)
    READY = 2  # the communicator is up (decode -> prefill)
    DATA = 3  # `value` layers (>= 1) of `nbytes` each, from `layer` on, follow on the communicator
    SUMS = 4  # the partial checksums of the last `num_layers` layers (`value` a layer) follow
    ABORT = 5  # payload: reason; the sender gives up on the handoff
    ACK = 6  # all layers delivered
    NACK = 7  # payload: reason; the handoff failed (or, at setup, the pair could not connect)


# 2: DATA has a count; 3: the checksums follow their data on the communicator (SUMS)
FRAME = HeaderFormat("16sHHQQ", b"KVMN", 3, NcclFrameKind, "control frame")
_LAYOUT = FRAME.layout
_KINDS = frozenset(NcclFrameKind)
# frames whose nbytes travel on the communicator
_ON_NCCL = frozenset((NcclFrameKind.DATA, NcclFrameKind.SUMS))


@dataclass(frozen=True)
class Frame:
    kind: NcclFrameKind
    handoff_id: bytes = NO_ID  # 16 bytes (UUID)
    layer: int = 0
    num_layers: int = 0
    # DATA: bytes of each layer on NCCL; SUMS: bytes of the partials; others: the TCP payload's
    nbytes: int = 0
    value: int = 0  # DATA: layer count; SUMS: partial sums a layer

    @property
    def count(self) -> int:
        """DATA: how many consecutive layers the message holds."""
        return self.value

    def pack(self) -> bytes:
        return FRAME.pack(self)


def read_frame(sock: socket.socket) -> Frame | None:
    """The next frame, or None if the peer closed cleanly between frames."""
    return FRAME.read(sock, Frame)


def pack(
    kind: NcclFrameKind, handoff_id: bytes, layer: int = 0, num_layers: int = 0, nbytes: int = 0,
    value: int = 0,
) -> bytes:  # fmt: skip
    """Frame(...).pack(), without making the Frame (the hot path: SUMS and DATA frames)."""
    return _LAYOUT.pack(FRAME.magic, FRAME.version, kind, handoff_id, layer, num_layers, nbytes,
                        value)  # fmt: skip


class FrameReader:
    """Reads a connection's frames in bursts: one recv takes every byte that has arrived, and
    `burst` returns all the complete frames in them (with the TCP payloads of the frames that
    have one: all but DATA and SUMS, whose nbytes travel on NCCL)."""

    def __init__(self, sock: socket.socket, chunk: int = 1 << 16) -> None:
        self.sock, self.chunk = sock, chunk
        self._buf = bytearray()

    def burst(self) -> list[tuple[Frame, bytes]]:
        """The frames that arrived, at least one (waits for it); [] once the peer closed
        cleanly between frames. ProtocolError on bytes that are not this protocol's frames."""
        while True:
            frames, used = self._parse()
            if frames:
                del self._buf[:used]
                return frames
            data = self.sock.recv(self.chunk)
            if not data:
                if self._buf:
                    raise ConnectionError("peer closed the connection mid-frame")
                return []
            self._buf += data

    def _parse(self) -> tuple[list[tuple[Frame, bytes]], int]:
        buf, at, size = self._buf, 0, FRAME.size
        frames: list[tuple[Frame, bytes]] = []
        while len(buf) - at >= size:
            magic, version, kind, hid, layer, num_layers, nbytes, value = _LAYOUT.unpack_from(
                buf, at
            )
            if magic != FRAME.magic or version != FRAME.version or kind not in _KINDS:
                raise ProtocolError(f"bad control frame (magic {magic!r}, version {version})")
            payload = nbytes if kind not in _ON_NCCL else 0
            if payload > MAX_MESSAGE_BYTES:
                raise ProtocolError(f"control payload of {nbytes} bytes")
            if len(buf) - at - size < payload:
                break
            frame = Frame(NcclFrameKind(kind), hid, layer, num_layers, nbytes, value)
            frames.append((frame, bytes(buf[at + size : at + size + payload])))
            at += size + payload
        return frames, at


def read_payload(sock: socket.socket, frame: Frame) -> bytes:
    """The TCP payload of a HELLO/ABORT/NACK frame."""
    return read_bounded(sock, frame.nbytes, "control payload")


def message(kind: NcclFrameKind, handoff_id: bytes = NO_ID, text: str | bytes = "") -> bytes:
    payload = (text.encode() if isinstance(text, str) else text)[:MAX_MESSAGE_BYTES]
    return Frame(kind, handoff_id, nbytes=len(payload)).pack() + payload


def parse_nccl_endpoint(endpoint: str) -> tuple[str, int]:
    """'nccl://host:port' -> (host, port)."""
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"not an nccl:// endpoint: {endpoint!r}")
    return parse_endpoint("tcp://" + endpoint.removeprefix(SCHEME))
