"""Decode side of the TCP transport (wire format: frames).

A thread per connection reads each DATA payload into a reusable uint8 staging tensor, checks its
crc, then hands it to the handoff's on_layer. Payloads of frames it will not deliver (unknown
handoff, wrong size, ...) are drained through a small scratch buffer, never staged, and answered
with a NACK.
"""

from __future__ import annotations

import contextlib
import socket
import time
import zlib
from dataclasses import dataclass

import torch

from kvmesh.shared.handoff.listener import Expected, ListeningReceiver
from kvmesh.shared.handoff.tcp.frames import (
    Header,
    TcpFrameKind,
    drain,
    read_header,
    read_message,
    send_message,
)
from kvmesh.shared.handoff.wire import ProtocolError, recv_into, settle


@dataclass(eq=False)
class _Expected(Expected):
    """A handoff the TCP receiver accepts; its layers arrive on one connection."""

    conn: socket.socket | None = None  # connection its frames arrive on

    def rejects(self, header: Header) -> str:
        """Why this frame cannot be delivered ('' if it can)."""
        return self.mismatch(header.layer, header.num_layers, header.nbytes, self.layers)


class SocketKVReceiver(ListeningReceiver[_Expected]):
    """Decode side of the TCP transport (implements transport.KVReceiver).

    Binds `bind_host:port` (port 0: any free port); the endpoint it advertises uses
    `advertise_host` (default: the bound address), for when senders reach it by another name.
    """

    def __init__(
        self, bind_host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None
    ) -> None:
        super().__init__(bind_host, port, advertise_host, _Expected, "kv", "tcp://")

    def _serve(self, conn: socket.socket) -> None:
        staging = torch.empty(0, dtype=torch.uint8)  # [max layer_nbytes seen], reused
        try:
            while (header := read_header(conn)) is not None:
                staging = self._on_frame(conn, header, staging)
        except (OSError, ConnectionError):
            pass  # peer gone or protocol error: drop the connection
        finally:
            self._disconnected(conn, lambda s: s.conn is conn)
            conn.close()

    def _on_frame(self, conn: socket.socket, header: Header, staging: torch.Tensor) -> torch.Tensor:
        if header.kind == TcpFrameKind.ABORT:
            reason = read_message(conn, header)
            if (state := self._lookup(header)) is not None:
                self._fail(state, f"aborted by sender: {reason}")
            return staging
        if header.kind != TcpFrameKind.DATA:
            raise ProtocolError(f"unexpected {header.kind.name} frame from a sender")
        state = self._lookup(header)
        error = "handoff not expected (reserve first)" if state is None else state.rejects(header)
        if state is None or error:
            drain(conn, header.nbytes)
            self._reject(conn, header.handoff_id, state, error)
            return staging
        if staging.numel() < header.nbytes:
            staging = torch.empty(header.nbytes, dtype=torch.uint8)
        self._deliver(conn, header, state, staging[: header.nbytes])
        return staging

    def _lookup(self, header: Header) -> _Expected | None:
        state = self._get(header.handoff_id)
        if state is not None and not state.started:
            state.started = time.perf_counter()
        return state

    def _deliver(
        self, conn: socket.socket, header: Header, state: _Expected, payload: torch.Tensor
    ) -> None:
        """Read one layer into `payload` ([layer_nbytes] uint8), verify it, hand it over."""
        state.conn = conn
        view = payload.numpy().data
        recv_into(conn, view)
        if zlib.crc32(view) != header.crc32:
            error = f"checksum mismatch on layer {header.layer}"
            self._reject(conn, header.handoff_id, state, error)
            return
        with state.lock:
            if state.closed:
                error = "handoff cancelled or failed"
            else:
                error = state.deliver(header.layer, payload)
        if error:
            self._reject(conn, header.handoff_id, state, error)
        elif len(state.layers) == state.num_layers:
            self._complete(conn, state)

    def _complete(self, conn: socket.socket, state: _Expected) -> None:
        with state.lock:
            if state.closed:  # cancelled after its last layer: the canceller settled it
                return
            state.closed = True
            self._forget(state)
            settle(state.future, value=state.result(ok=True))  # its waiter may be gone
        with contextlib.suppress(OSError):
            send_message(conn, TcpFrameKind.ACK, state.key)

    def _reject(self, conn: socket.socket, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        with contextlib.suppress(OSError):
            send_message(conn, TcpFrameKind.NACK, key, error)
