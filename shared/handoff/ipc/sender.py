"""Prefill side of the IPC transport (frames: ipc/frames; the shared cache: ipc/memory).

A sender keeps one connection per endpoint, with the receiver's KV cache mapped into this
process (its MAP answer to our HELLO). open() sends a handoff's BEGIN and waits for its BLOCKS:
the receiver's blocks reserved for it, the only ones it writes. Each connection has

    a writer thread   takes the layers queued by send_layer in order: (CUDA: waits for the
                      event the caller's stream recorded,) checks the layer (ipc/frames
                      host_check, or kernels/checksum), copies it into the receiver's blocks
                      (CUDA: device copies on a stream of its own, then waits for them), and
                      only then sends WRITTEN with the check; a handoff that failed is never
                      written again. Its ABORT goes ahead of the layers still queued (the
                      receiver waits for it), but never during a copy: between two layers no
                      copy runs
    a reader thread   BLOCKS, ACK, NACK; a NACK queues the handoff's ABORT (the receiver
                      gives its blocks back once it came), as does abort()
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import struct
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from kvmesh.kernels.block_copy import scatter_blocks, scatter_blocks_ref
from kvmesh.kernels.checksum import MASK64, layer_checksum
from kvmesh.shared.handoff.channel import Connections, SendChannel, SenderConnection
from kvmesh.shared.handoff.ipc.frames import (
    Frame,
    IpcFrameKind,
    document,
    host_check,
    message,
    parse_document,
    parse_ipc_endpoint,
    read_frame,
    text,
)
from kvmesh.shared.handoff.ipc.memory import MapError, open_mapping
from kvmesh.shared.handoff.locality import host_id
from kvmesh.shared.handoff.transport import HandoffError, HandoffStats, handoff_id_bytes
from kvmesh.shared.handoff.wire import JOIN_TIMEOUT_S, ProtocolError, connect, settle, shutdown


@dataclass(frozen=True)
class _Job:
    """One step for the writer thread: a layer to write, or (data None) the handoff's ABORT
    (of `key`, when no channel of this sender holds it any more)."""

    channel: IpcSendChannel | None
    key: bytes = b""
    layer: int = 0
    data: torch.Tensor | None = None  # any dtype/device; not mutated until written
    ready: torch.cuda.Event | None = None  # recorded on the caller's stream after `data`
    reason: str = ""


_WAKE = _Job(None, data=torch.empty(0))  # wakes the writer for the ABORTs queued ahead


class _Connection(SenderConnection["IpcSendChannel"]):
    """One connection to a receiver, with its KV cache mapped; shared by the handoffs to it."""

    def __init__(
        self, endpoint: str, device: torch.device, timeout: float, reply_timeout: float
    ) -> None:
        super().__init__(endpoint)
        self.device, self.timeout, self.reply_timeout = device, timeout, reply_timeout
        self._send_lock = threading.Lock()
        self.sock = connect(endpoint, parse_ipc_endpoint(endpoint), timeout)
        try:
            self.cache = self._map()  # [L, 2, num_blocks, block_size, kv_heads, head_dim]
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self._begins: dict[bytes, Future[tuple[int, list[int]]]] = {}  # under lock
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._aborts: collections.deque[_Job] = collections.deque()  # ahead of _jobs
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # the writer's, per device
        self._writer = threading.Thread(target=self._write_loop, name="ipc-write", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="ipc-ack", daemon=True)
        self._writer.start()
        self._reader.start()

    def _map(self) -> torch.Tensor:
        hello = {"pid": os.getpid(), "host": host_id()}
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(document(IpcFrameKind.HELLO, hello))
            item = read_frame(self.sock)
        except OSError as exc:
            raise HandoffError(f"IPC handshake with {self.endpoint} failed: {exc}") from exc
        if item is None or item[0].kind not in (IpcFrameKind.MAP, IpcFrameKind.NACK):
            raise HandoffError(f"{self.endpoint} answered HELLO with no MAP")
        frame, payload = item
        if frame.kind == IpcFrameKind.NACK:
            why = payload.decode(errors="replace")
            raise HandoffError(f"{self.endpoint} cannot share its KV cache: {why}")
        try:
            return open_mapping(parse_document(payload, "MAP"), self.device)
        except (MapError, ProtocolError) as exc:
            raise HandoffError(f"cannot map the KV cache of {self.endpoint}: {exc}") from exc

    # -- opening a handoff

    def begin(self, channel: IpcSendChannel) -> None:
        """Send the handoff's BEGIN; give the channel its blocks once they came."""
        reply: Future[tuple[int, list[int]]] = Future()
        with self.lock:
            self._begins[channel.key] = reply
        self.add(channel)
        try:
            self.write(message(IpcFrameKind.BEGIN, channel.key, num_layers=channel.num_layers))
            layer_nbytes, blocks = reply.result(self.reply_timeout)
        except FutureTimeout:
            why = f"{self.endpoint} did not answer BEGIN in {self.reply_timeout} s"
            self.submit(_Job(None, channel.key, reason=why))  # it may yet: it must not wait
            raise HandoffError(why) from None
        finally:
            with self.lock:
                self._begins.pop(channel.key, None)
        num_blocks = self.cache.shape[2]
        if any(b >= num_blocks for b in blocks):
            raise HandoffError(f"{self.endpoint} gave blocks beyond its {num_blocks}")
        channel.target(layer_nbytes, torch.tensor(blocks, dtype=torch.int64).to(self.cache.device))

    # -- called by channels

    def submit(self, job: _Job) -> None:
        """Queue a job for the writer: a layer after those queued, an ABORT ahead of them."""
        if job.data is None:
            self._aborts.append(job)
            job = _WAKE
        self._jobs.put(job)

    def write(self, data: bytes) -> None:
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            self.die(f"send failed: {exc}")
            raise HandoffError(f"connection to {self.endpoint} lost: {exc}") from exc

    def close(self) -> None:
        """Stop every handoff (each ABORTed after its last copy), then the connection."""
        with self.lock:
            channels = list(self.channels.values())
        for channel in channels:
            channel.abort("sender closed")
        self._jobs.put(None)
        self._writer.join(JOIN_TIMEOUT_S)
        self.die("sender closed")
        self._reader.join(JOIN_TIMEOUT_S)

    def die(self, reason: str) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = reason
            channels, self.channels = list(self.channels.values()), {}
            begins, self._begins = list(self._begins.values()), {}
        error = HandoffError(f"connection to {self.endpoint} lost: {reason}")
        for channel in channels:
            channel.fail(error)
        for reply in begins:
            settle(reply, error)
        self._jobs.put(None)
        shutdown(self.sock)

    # -- the writer thread

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            while self._aborts:  # no copy runs now: the ABORTs may go
                abort = self._aborts.popleft()
                if abort.channel is None or abort.channel.stop():
                    key = abort.key if abort.channel is None else abort.channel.key
                    self._send_quietly(text(IpcFrameKind.ABORT, key, abort.reason))
            channel = job.channel
            if channel is not None and job.data is not None and not channel.failed:
                try:
                    value, seconds = self._write_layer(channel, job)
                except Exception as exc:  # a copy failed: give the handoff up
                    channel.abort(f"writing layer {job.layer} failed: {exc!r}")
                    continue
                channel.written(job.layer, seconds)
                self._send_quietly(message(IpcFrameKind.WRITTEN, channel.key, layer=job.layer,
                                           num_layers=channel.num_layers, value=value))  # fmt: skip

    def _write_layer(self, channel: IpcSendChannel, job: _Job) -> tuple[int, float]:
        """Copy the layer into the receiver's blocks; (its checksum, seconds). Returns once the
        copies completed."""
        assert job.data is not None and channel.blocks is not None
        start = time.perf_counter()
        data = job.data.detach()
        if not data.is_contiguous():  # a copy would run before the caller's event is waited on
            raise ValueError("send_layer takes a contiguous layer")
        if (nbytes := data.numel() * data.element_size()) != channel.layer_nbytes:
            raise ValueError(f"a layer of {nbytes} bytes, not {channel.layer_nbytes}")
        shape = (2, channel.blocks.numel(), *self.cache.shape[3:])
        src = data.view(-1).view(torch.uint8).view(self.cache.dtype).view(shape)  # views only
        dst = self.cache[job.layer]  # [2, num_blocks, block_size, kv_heads, head_dim]
        if src.device.type != "cuda":
            scatter_blocks_ref(dst, channel.blocks, src)
            value = host_check(src)
        else:
            value = self._write_cuda(src, dst, channel.blocks, job.ready)
        return value & MASK64, time.perf_counter() - start

    def _write_cuda(
        self, src: torch.Tensor, dst: torch.Tensor, blocks: torch.Tensor,
        ready: torch.cuda.Event | None,
    ) -> int:  # fmt: skip
        here, there = self._stream(src.device), self._stream(dst.device)
        with torch.cuda.device(src.device), torch.cuda.stream(here):
            if ready is not None:
                here.wait_event(ready)
            total = layer_checksum(src).to("cpu", non_blocking=True)
            moved = src if src.device == dst.device else src.to(dst.device, non_blocking=True)
        with torch.cuda.device(dst.device), torch.cuda.stream(there):
            if there is not here:
                there.wait_stream(here)
            scatter_blocks(dst, blocks, moved)
            done = torch.cuda.Event()
            done.record(there)
        done.synchronize()  # the layer is in the receiver's blocks (and the checksum here)
        return int(total)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(HandoffError):
            self.write(data)

    # -- the reader thread

    def _read_loop(self) -> None:
        reason = "receiver closed the connection"
        try:
            while (item := read_frame(self.sock)) is not None:
                self._on_reply(*item)
        except (OSError, ConnectionError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.die(reason)
            self.sock.close()

    def _on_reply(self, frame: Frame, payload: bytes) -> None:
        with self.lock:
            reply = self._begins.get(frame.handoff_id)
            channel = self.channels.get(frame.handoff_id)
        if frame.kind == IpcFrameKind.BLOCKS:
            if reply is not None:  # else a late answer to a BEGIN given up (and ABORTed)
                count = frame.nbytes // 4
                settle(reply, value=(frame.value, list(struct.unpack(f"<{count}I", payload))))
        elif frame.kind == IpcFrameKind.NACK and reply is not None:
            why = payload.decode(errors="replace")
            settle(reply, HandoffError(f"receiver rejected handoff: {why}"))
        elif frame.kind in (IpcFrameKind.ACK, IpcFrameKind.NACK):
            self.on_reply(frame.handoff_id, frame.kind.name, payload.decode(errors="replace"))
            if frame.kind == IpcFrameKind.NACK:
                # the receiver frees the blocks once it knows nothing more is written to them:
                # ABORT after this channel's copies, or at once for a handoff no channel holds
                if channel is not None:
                    channel.stop_writing()
                else:
                    self.submit(_Job(None, frame.handoff_id, reason="not written here"))
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from a receiver")


class IpcSendChannel(SendChannel):
    """One handoff being written (implements transport.KVSendChannel). send_layer takes the
    layer on its device (KVPusher gives device tensors to channels that are `on_device`) and
    keeps it until written: do not mutate it before finish() returns."""

    transport = "ipc"
    on_device = True

    def __init__(self, conn: _Connection, handoff_id: str, num_layers: int) -> None:
        super().__init__(handoff_id, num_layers)
        self.conn = conn
        self.layer_nbytes = 0
        self.blocks: torch.Tensor | None = None  # [n] int64 on the receiver's cache's device
        self._layer_seconds = [0.0] * num_layers
        self._stopped = False  # its ABORT was queued: the writer writes no more of it
        self._stop_lock = threading.Lock()

    def target(self, layer_nbytes: int, blocks: torch.Tensor) -> None:
        self.layer_nbytes, self.blocks = layer_nbytes, blocks

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        self.queue(layer)
        ready = None
        if data.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(data.device))
        self.conn.submit(_Job(self, layer=layer, data=data, ready=ready))

    def finish(self, timeout: float) -> HandoffStats:
        self._await_ack(timeout, self.conn)
        return self._stats(functools.partial(list, self._layer_seconds))

    def abort(self, reason: str) -> None:
        settle(self._done, HandoffError(f"aborted: {reason}"))
        self.stop_writing(reason)

    def stop_writing(self, reason: str = "stopped after the receiver's NACK") -> None:
        """Queue the handoff's ABORT (once): the writer sends it after the copies it started."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.conn.submit(_Job(self, reason=reason))

    # -- called from the connection's threads

    def stop(self) -> bool:
        """The writer reached the ABORT: True (it sends it) unless the handoff is complete."""
        return not (self._done.done() and self._done.exception() is None)

    def written(self, layer: int, seconds: float) -> None:
        self._layer_seconds[layer] = seconds
        self._nbytes += self.layer_nbytes


class IpcKVSender:
    """Prefill side of the IPC transport (implements transport.KVSender) on `device`: a
    connection per endpoint, each with its receiver's cache mapped."""

    def __init__(
        self, device: torch.device, timeout: float = 5.0, reply_timeout: float = 30.0
    ) -> None:
        # timeout: connecting and mapping; reply_timeout: the receiver's answer to a BEGIN
        self.device, self.timeout, self.reply_timeout = device, timeout, reply_timeout
        self._conns = Connections(self._connect)

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> IpcSendChannel:
        handoff_id_bytes(handoff_id)  # ValueError if it is not a UUID
        conn = self._conns.get(endpoint)
        channel = IpcSendChannel(conn, handoff_id, num_layers)
        try:
            conn.begin(channel)
        except BaseException:
            conn.remove(channel)
            raise
        return channel

    def connected(self, endpoint: str) -> bool:
        """Whether a live connection to `endpoint` (its cache mapped) exists."""
        return self._conns.live(endpoint)

    def close(self) -> None:
        self._conns.close()

    def _connect(self, endpoint: str) -> _Connection:
        return _Connection(endpoint, self.device, self.timeout, self.reply_timeout)
