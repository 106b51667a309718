"""Prefill side of the TCP transport (wire format: frames).

A sender keeps one connection per endpoint; handoffs multiplex on it frame by frame. Each
connection has a writer thread (drains a queue of layers: compute never waits on the socket) and
a reader thread (ACK/NACK, or the connection's death, which fails every handoff on it).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
import zlib
from dataclasses import dataclass

import torch

from kvmesh.shared.handoff.channel import Connections, SendChannel, SenderConnection
from kvmesh.shared.handoff.tcp.frames import (
    Header,
    TcpFrameKind,
    read_header,
    read_message,
    send_message,
)
from kvmesh.shared.handoff.transport import HandoffError, HandoffStats
from kvmesh.shared.handoff.wire import JOIN_TIMEOUT_S, connect, parse_endpoint, settle, shutdown


@dataclass(frozen=True)
class _Job:
    """One frame for the writer thread: a layer to send, or (data None) an ABORT."""

    channel: _SocketChannel
    layer: int
    data: torch.Tensor | None  # any dtype/device; must not be mutated until sent
    reason: str = ""


def _layer_bytes(data: torch.Tensor) -> memoryview:
    """The tensor's bytes: [numel * element_size] uint8 (copied to host if on a device)."""
    flat = data.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().data


class _Connection(SenderConnection["_SocketChannel"]):
    """One TCP connection to a receiver, shared by the handoffs to it."""

    def __init__(self, endpoint: str, connect_timeout: float) -> None:
        super().__init__(endpoint)
        self.sock = connect(endpoint, parse_endpoint(endpoint), connect_timeout)
        self.sock.settimeout(None)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="kv-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="kv-ack", daemon=True)
        self._writer.start()
        self._reader.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._die("sender closed")
        self._reader.join(JOIN_TIMEOUT_S)

    def _die(self, reason: str) -> None:
        with self.lock:
            if self.dead:
                return
            self.dead = reason
            channels, self.channels = list(self.channels.values()), {}
        for channel in channels:
            channel.fail(HandoffError(f"connection to {self.endpoint} lost: {reason}"))
        self._jobs.put(None)
        shutdown(self.sock)

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.data is None:
                self._send_abort(job)
            elif not job.channel.failed:
                try:
                    self._send_layer(job.channel, job.layer, job.data)
                except OSError as exc:
                    self._die(f"send failed: {exc}")

    def _send_layer(self, channel: _SocketChannel, layer: int, data: torch.Tensor) -> None:
        start = time.perf_counter()
        payload = _layer_bytes(data)
        header = Header(
            TcpFrameKind.DATA,
            channel.key,
            layer,
            channel.num_layers,
            len(payload),
            zlib.crc32(payload),
        )
        self.sock.sendall(header.pack())
        self.sock.sendall(payload)
        channel.sent(layer, len(payload), time.perf_counter() - start)

    def _send_abort(self, job: _Job) -> None:
        with contextlib.suppress(OSError):
            send_message(self.sock, TcpFrameKind.ABORT, job.channel.key, job.reason)

    def _read_loop(self) -> None:
        reason = "receiver closed the connection"
        try:
            while (header := read_header(self.sock)) is not None:
                self.on_reply(header.handoff_id, header.kind.name, read_message(self.sock, header))
        except (OSError, ConnectionError) as exc:
            reason = str(exc)
        finally:
            self._die(reason)
            self._writer.join(JOIN_TIMEOUT_S)
            self.sock.close()


class _SocketChannel(SendChannel):
    """One handoff being pushed (implements transport.KVSendChannel).

    send_layer keeps a reference to `data` until the writer thread has sent it: do not mutate
    the tensor before finish() returns (the prefill's per-layer gather buffers never are).
    """

    def __init__(self, conn: _Connection, handoff_id: str, num_layers: int) -> None:
        super().__init__(handoff_id, num_layers)
        self.conn = conn
        self._layer_seconds = [0.0] * num_layers
        self._layers_sent = 0
        self._written = threading.Event()  # every layer is on the wire (set by the writer)

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        self.queue(layer)
        self.conn.submit(_Job(self, layer, data))

    def finish(self, timeout: float) -> HandoffStats:
        self._await_ack(timeout, self.conn)
        self._written.wait(timeout)  # the ACK can overtake the writer's bookkeeping
        return self._stats(functools.partial(list, self._layer_seconds))

    def abort(self, reason: str) -> None:
        if settle(self._done, HandoffError(f"aborted: {reason}")):
            self.conn.submit(_Job(self, 0, None, reason))

    # -- called from the connection's threads

    def sent(self, layer: int, nbytes: int, seconds: float) -> None:
        self._layer_seconds[layer] = seconds
        self._nbytes += nbytes
        self._layers_sent += 1
        if self._layers_sent == self.num_layers:
            self._written.set()


class SocketKVSender:
    """Prefill side of the TCP transport (implements transport.KVSender): a connection pool."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._conns = Connections(self._connect)

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> _SocketChannel:
        channel = _SocketChannel(self._conns.get(endpoint), handoff_id, num_layers)
        channel.conn.add(channel)
        return channel

    def close(self) -> None:
        self._conns.close()

    def _connect(self, endpoint: str) -> _Connection:
        return _Connection(endpoint, self.connect_timeout)
