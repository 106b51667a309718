"""Decode side of the IPC transport (frames: ipc/frames; the shared cache: ipc/memory).

The sender writes this process's KV cache itself; the receiver decides which blocks it may
write and checks what it wrote. A thread per sender connection:

    HELLO          -> MAP: how to map this receiver's KV cache (once per connection)
    BEGIN h        -> BLOCKS: the blocks reserved for h (its on_layer's `block_ids`:
                      kv_io.scatter_into), or NACK if h is not expected: nothing is written
    WRITTEN h, l   -> the checksum of h's blocks of layer l, gathered from this cache, against
                      the sender's: equal, layer l is delivered (on_layer is not called: the KV
                      is in place already), and after the last layer ACK; else NACK
    ABORT h        -> the sender stopped writing h

A handoff's blocks must not be handed to anyone else while its sender may still write them:
a handoff that fails after its BEGIN (a corrupt layer, cancel(), a wrong frame) is NACKed, and
its future (after which decode frees the blocks) completes once the sender answered ABORT (it
stopped), or its connection ended and its process is gone, or after FENCE_TIMEOUT_S (then its
connection is dropped). cancel() waits for that.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmesh.kernels.block_copy import gather_blocks, gather_blocks_ref
from kvmesh.kernels.checksum import MASK64, layer_checksum
from kvmesh.shared.handoff.ipc.frames import (
    NO_ID,
    SCHEME,
    Frame,
    IpcFrameKind,
    document,
    host_check,
    message,
    parse_document,
    read_frame,
    text,
)
from kvmesh.shared.handoff.ipc.memory import MapError, describe, unexportable
from kvmesh.shared.handoff.listener import Expected, ListeningReceiver
from kvmesh.shared.handoff.wire import ProtocolError, settle, shutdown

# How long a failed handoff's sender has to stop writing (answer ABORT, or die) before its
# connection is dropped and the handoff's blocks are given back anyway.
FENCE_TIMEOUT_S = 5.0
_POLL_S = 0.002


@dataclass(eq=False)
class _Expected(Expected):
    """A handoff the IPC receiver accepts; a sender writes it after its BEGIN."""

    conn: socket.socket | None = None  # the connection its BEGIN came on; None before
    blocks: torch.Tensor | None = None  # [n] int64 on the cache's device: its blocks
    fenced: threading.Event = field(default_factory=threading.Event)  # its sender stopped
    error: str = ""  # why it failed, while its fence is awaited
    nacked: bool = False  # its sender was told it failed

    @property
    def writing(self) -> bool:
        """A sender may still write its blocks (under lock)."""
        return self.conn is not None and not self.fenced.is_set()


@dataclass(eq=False)
class _Sender:
    """One sender's connection, served by `thread`."""

    conn: socket.socket
    thread: threading.Thread
    pid: int = 0  # the sender's process id, from its HELLO
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    stream: torch.cuda.Stream | None = None  # the checksums' stream on a CUDA cache


class IpcKVReceiver(ListeningReceiver[_Expected]):
    """Decode side of the IPC transport (implements transport.KVReceiver) for `cache`, the
    engine's KV cache [L, 2, num_blocks, block_size, kv_heads, head_dim]: on CUDA, or on CPU in
    shared memory (allocate_kv_cache(shared=True)); MapError otherwise."""

    def __init__(
        self, cache: torch.Tensor, bind_host: str = "127.0.0.1", port: int = 0,
        advertise_host: str | None = None,
    ) -> None:  # fmt: skip
        if why := unexportable(cache):
            raise MapError(why)
        super().__init__(bind_host, port, advertise_host, _Expected, "ipc", SCHEME)
        self.cache = cache
        self._senders: dict[socket.socket, _Sender] = {}  # under _lock
        self._fencing: dict[bytes, _Expected] = {}  # failed, their senders not yet stopped

    @property
    def num_senders(self) -> int:
        """Sender connections open now."""
        with self._lock:
            return len(self._senders)

    # -- the table: a failed handoff completes once its sender stopped

    def _close(self, state: _Expected, ok: bool, error: str = "") -> bool:
        with state.lock:
            if state.closed:
                return False
            state.closed = True
            self._forget(state)
            awaiting = state.writing
            if awaiting:
                state.error, state.nacked = error, True
                with self._lock:
                    self._fencing[state.key] = state
        if not awaiting:
            settle(state.future, value=state.result(ok=ok, error=error))
            return True
        assert state.conn is not None
        sender = self._sender_of(state.conn)
        self._send(
            sender, text(IpcFrameKind.NACK, state.key, error)
        )  # it stops, then answers ABORT
        if self._closing:
            self._settle_fenced(state)
        elif sender is not None and threading.current_thread() is not sender.thread:
            if not state.fenced.wait(FENCE_TIMEOUT_S):
                shutdown(state.conn)  # cut it off
                state.error += f" (its sender did not stop within {FENCE_TIMEOUT_S} s)"
            self._settle_fenced(state)
        return True  # on the connection's own thread: its ABORT (or end) settles it

    def _settle_fenced(self, state: _Expected) -> None:
        with self._lock:
            if self._fencing.get(state.key) is state:
                del self._fencing[state.key]
        settle(state.future, value=state.result(ok=False, error=state.error))

    # -- connection threads

    def _serve(self, conn: socket.socket) -> None:
        sender = _Sender(conn, threading.current_thread())
        with self._lock:
            self._senders[conn] = sender
        try:
            self._handshake(sender)
            while (item := read_frame(conn)) is not None:
                self._on_frame(sender, *item)
        except (OSError, ConnectionError, MapError):
            pass  # peer gone, protocol error, or the cache cannot be shared: drop it
        finally:
            self._ended(sender)
            conn.close()

    def _handshake(self, sender: _Sender) -> None:
        item = read_frame(sender.conn)
        if item is None or item[0].kind != IpcFrameKind.HELLO:
            raise ProtocolError("expected HELLO")
        hello = parse_document(item[1], "HELLO")
        sender.pid = int(hello.get("pid", 0))
        try:
            mapping = describe(self.cache)
        except (MapError, RuntimeError) as exc:
            self._send(sender, text(IpcFrameKind.NACK, NO_ID, f"cannot share the KV cache: {exc}"))
            raise MapError(str(exc)) from None
        self._send(sender, document(IpcFrameKind.MAP, mapping))

    def _on_frame(self, sender: _Sender, frame: Frame, payload: bytes) -> None:
        if frame.kind == IpcFrameKind.BEGIN:
            self._begin(sender, frame)
        elif frame.kind == IpcFrameKind.WRITTEN:
            self._written(sender, frame)
        elif frame.kind == IpcFrameKind.ABORT:
            self._aborted(sender, frame, payload.decode(errors="replace"))
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")

    def _begin(self, sender: _Sender, frame: Frame) -> None:
        state = self._get(frame.handoff_id)
        if state is None:
            error = "handoff not expected (reserve first)"
            return self._send(sender, text(IpcFrameKind.NACK, frame.handoff_id, error))
        block_ids = getattr(state.on_layer, "block_ids", None)
        if block_ids is None:  # not a consumer of blocks: another transport takes it
            error = "this handoff is not written in place (its on_layer has no block_ids)"
            return self._send(sender, text(IpcFrameKind.NACK, frame.handoff_id, error))
        with state.lock:
            if state.closed:
                error = "handoff cancelled or failed"
            elif state.conn is not None:
                error = "handoff begun twice"
            elif frame.num_layers != state.num_layers:
                error = f"num_layers {frame.num_layers} != expected {state.num_layers}"
            else:
                error = ""
                state.conn, state.started = sender.conn, time.perf_counter()
                ids = torch.tensor(block_ids, dtype=torch.int64)
                state.blocks = ids.to(self.cache.device)
        if error:
            return self._reject(sender, frame.handoff_id, state, error)
        ids_bytes = struct.pack(f"<{len(block_ids)}I", *block_ids)
        reply = message(IpcFrameKind.BLOCKS, state.key, ids_bytes, num_layers=state.num_layers,
                        value=state.layer_nbytes)  # fmt: skip
        self._send(sender, reply)

    def _written(self, sender: _Sender, frame: Frame) -> None:
        state = self._get(frame.handoff_id)
        if state is None or state.closed:
            return  # failed or cancelled since: its sender learns it from the NACK
        if state.conn is not sender.conn:
            error = "layer written before the handoff's BEGIN on this connection"
            return self._reject(sender, frame.handoff_id, state, error)
        with state.lock:
            error = state.mismatch(frame.layer, frame.num_layers, state.layer_nbytes, state.layers)
        if not error and self._checksum(sender, state, frame.layer) != frame.value:
            error = f"checksum mismatch on layer {frame.layer}"
        if error:
            return self._reject(sender, frame.handoff_id, state, error)
        with state.lock:
            if state.closed:
                return
            state.layers.add(frame.layer)
            state.nbytes += state.layer_nbytes
            if len(state.layers) < state.num_layers:
                return
            state.fenced.set()  # the last layer is written: nothing more will be
        if self._close(state, ok=True):
            self._send(sender, message(IpcFrameKind.ACK, state.key))

    def _aborted(self, sender: _Sender, frame: Frame, reason: str) -> None:
        with self._lock:
            state = self._fencing.get(frame.handoff_id) or self._expected.get(frame.handoff_id)
        if state is None or state.conn is not sender.conn:
            return  # not a handoff this sender began: it wrote nothing
        state.fenced.set()
        self._fail(state, f"aborted by sender: {reason}")
        self._settle_fenced(state)

    def _checksum(self, sender: _Sender, state: _Expected, layer: int) -> int:
        """The checksum of the handoff's blocks of `layer`, gathered as the sender's layer."""
        assert state.blocks is not None
        kv_layer = self.cache[layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
        if self.cache.device.type != "cuda":
            return host_check(gather_blocks_ref(kv_layer, state.blocks))
        if sender.stream is None:
            sender.stream = torch.cuda.Stream(self.cache.device)
        with torch.cuda.device(self.cache.device), torch.cuda.stream(sender.stream):
            total = layer_checksum(gather_blocks(kv_layer, state.blocks))
            return int(total.item()) & MASK64

    def _reject(self, sender: _Sender, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        if state is None or not state.nacked:
            self._send(sender, text(IpcFrameKind.NACK, key, error))

    def _ended(self, sender: _Sender) -> None:
        """The connection ended: its handoffs fail, once its process can no longer write."""
        with self._lock:
            self._senders.pop(sender.conn, None)
            self._conns.pop(sender.conn, None)
            states = [*self._expected.values(), *self._fencing.values()]
            mine = [s for s in states if s.conn is sender.conn]
            why = "receiver closed" if self._closing else "sender disconnected mid-handoff"
        if not self._closing and any(s.writing for s in mine):
            _wait_until_gone(sender.pid, FENCE_TIMEOUT_S)  # its writes end with its process
        for state in mine:
            state.fenced.set()
            self._fail(state, why)
            self._settle_fenced(state)

    # -- helpers

    def _sender_of(self, conn: socket.socket) -> _Sender | None:
        with self._lock:
            return self._senders.get(conn)

    def _send(self, sender: _Sender | None, data: bytes) -> None:
        if sender is None:
            return
        with sender.write_lock, contextlib.suppress(OSError):
            sender.conn.sendall(data)


def _wait_until_gone(pid: int, timeout: float) -> None:
    """Until process `pid` exited (a zombie or reaped), at most `timeout` seconds: an exited
    process has closed its files, its GPU context with them."""
    deadline = time.monotonic() + timeout
    while pid > 0 and time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rpartition(")")[2].split()[0] in ("Z", "X"):
            return
        time.sleep(_POLL_S)
