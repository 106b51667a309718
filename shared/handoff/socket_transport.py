"""KV handoff over TCP: raw tensor bytes, one frame per layer, crc32 per layer.

Wire format: every message is a fixed header, then `nbytes` of payload.

    HEADER (38 bytes, network order):  magic "KVMH" | version u8 | kind u8 | handoff id 16 B
                                       | layer u16 | num_layers u16 | nbytes u64 | crc32 u32
    sender -> receiver   DATA   payload = the layer's bytes, crc32 = zlib.crc32(payload)
                         ABORT  payload = UTF-8 reason: the sender gives up on the handoff
    receiver -> sender   ACK    all layers delivered (payload empty)
                         NACK   payload = UTF-8 reason: the handoff failed on the receiver

A sender keeps one connection per endpoint; handoffs multiplex on it frame by frame. Each
connection has a writer thread (drains a queue of layers: compute never waits on the socket) and
a reader thread (ACK/NACK, or the connection's death, which fails every handoff on it). The
receiver runs a thread per connection that reads each DATA payload into a reusable uint8 staging
tensor, checks its crc, then hands it to the handoff's on_layer. Payloads of frames it will not
deliver (unknown handoff, wrong size, ...) are drained through a small scratch buffer, never
staged, and answered with a NACK.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from shared.handoff.transport import (
    HandoffError,
    HandoffResult,
    HandoffStats,
    LayerCallback,
    handoff_id_bytes,
)

MAGIC = b"KVMH"
VERSION = 1
HEADER = struct.Struct("!4sBB16sHHQI")
MAX_MESSAGE_BYTES = 64 * 1024  # bound on ACK/NACK/ABORT payloads
_DRAIN_CHUNK = 1 << 20
_JOIN_TIMEOUT_S = 5.0


class Kind(IntEnum):
    DATA = 1
    ACK = 2
    NACK = 3
    ABORT = 4


class ProtocolError(ConnectionError):
    """The peer sent something that is not a frame of this protocol; the connection is dropped."""


@dataclass(frozen=True)
class Header:
    kind: Kind
    handoff_id: bytes  # 16 bytes (UUID)
    layer: int = 0
    num_layers: int = 0
    nbytes: int = 0  # payload bytes that follow the header
    crc32: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.handoff_id,
            self.layer,
            self.num_layers,
            self.nbytes,
            self.crc32,
        )

    @staticmethod
    def unpack(raw: bytes) -> Header:
        magic, version, kind, hid, layer, num_layers, nbytes, crc = HEADER.unpack(raw)
        if magic != MAGIC or version != VERSION or kind not in set(Kind):
            raise ProtocolError(f"bad frame header (magic {magic!r}, version {version})")
        return Header(Kind(kind), hid, layer, num_layers, nbytes, crc)


# ---- socket helpers ------------------------------------------------------------------------


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'tcp://host:port' (IPv6 as [addr]) -> (host, port)."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"not a tcp:// endpoint: {endpoint!r}")
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def format_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; ConnectionError if the peer closes first."""
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        view = view[n:]


def read_header(sock: socket.socket) -> Header | None:
    """The next frame header, or None if the peer closed cleanly between frames."""
    raw = bytearray(HEADER.size)
    n = sock.recv_into(raw)
    if n == 0:
        return None
    recv_into(sock, memoryview(raw)[n:])
    return Header.unpack(bytes(raw))


def read_message(sock: socket.socket, header: Header) -> str:
    """The UTF-8 payload of an ACK/NACK/ABORT frame."""
    if header.nbytes > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {header.nbytes} bytes")
    raw = bytearray(header.nbytes)
    recv_into(sock, memoryview(raw))
    return raw.decode(errors="replace")


def send_message(sock: socket.socket, kind: Kind, handoff_id: bytes, text: str = "") -> None:
    payload = text.encode()[:MAX_MESSAGE_BYTES]
    sock.sendall(Header(kind, handoff_id, nbytes=len(payload)).pack() + payload)


def drain(sock: socket.socket, nbytes: int) -> None:
    """Read and drop `nbytes` of payload through a small scratch buffer."""
    scratch = memoryview(bytearray(min(nbytes, _DRAIN_CHUNK)))
    while nbytes:
        chunk = scratch[: min(nbytes, len(scratch))]
        recv_into(sock, chunk)
        nbytes -= len(chunk)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on the socket (its recv returns EOF)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _settle(future: Future[None], error: BaseException | None = None) -> bool:
    """Complete `future` unless it already is; True if this call completed it."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except InvalidStateError:
        return False
    return True


# ---- receiver ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Expected:
    """One handoff the receiver accepts. `lock` serializes on_layer against cancel/fail."""

    key: bytes  # the handoff id's 16 wire bytes
    num_layers: int
    layer_nbytes: int
    on_layer: LayerCallback
    future: Future[HandoffResult] = field(default_factory=Future)
    lock: threading.RLock = field(default_factory=threading.RLock)
    layers: set[int] = field(default_factory=set)  # delivered layers
    nbytes: int = 0
    started: float = 0.0  # perf_counter of the first frame, 0 before
    conn: socket.socket | None = None  # connection its frames arrive on
    closed: bool = False  # completed, failed or cancelled: on_layer is never called again

    def rejects(self, header: Header) -> str:
        """Why this frame cannot be delivered ('' if it can)."""
        if header.num_layers != self.num_layers:
            return f"num_layers {header.num_layers} != expected {self.num_layers}"
        if header.nbytes != self.layer_nbytes:
            return f"layer of {header.nbytes} bytes != expected {self.layer_nbytes}"
        if header.layer >= self.num_layers or header.layer in self.layers:
            return f"layer {header.layer} out of range or repeated"
        return ""

    def result(self, ok: bool, error: str = "") -> HandoffResult:
        seconds = time.perf_counter() - self.started if self.started else 0.0
        return HandoffResult(ok=ok, nbytes=self.nbytes, seconds=seconds, error=error)


class SocketKVReceiver:
    """Decode side of the TCP transport (implements transport.KVReceiver).

    Binds `bind_host:port` (port 0: any free port); the endpoint it advertises uses
    `advertise_host` (default: the bound address), for when senders reach it by another name.
    """

    def __init__(
        self, bind_host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None
    ) -> None:
        self.bind_host, self.port = bind_host, port
        self.advertise_host = advertise_host or bind_host
        self._lock = threading.Lock()  # guards _expected and _conns
        self._expected: dict[bytes, _Expected] = {}
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._acceptor.start()
        return format_endpoint(self.advertise_host, self.port)

    def expect(
        self, handoff_id: str, num_layers: int, layer_nbytes: int, on_layer: LayerCallback
    ) -> Future[HandoffResult]:
        key = handoff_id_bytes(handoff_id)
        state = _Expected(key, num_layers, layer_nbytes, on_layer)
        with self._lock:
            if key in self._expected:
                raise ValueError(f"handoff {handoff_id} is already expected")
            self._expected[key] = state
        return state.future

    def cancel(self, handoff_id: str) -> None:
        with self._lock:
            state = self._expected.get(handoff_id_bytes(handoff_id))
        if state is not None:
            self._fail(state, "cancelled")

    def close(self) -> None:
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._lock:
            conns, states = dict(self._conns), list(self._expected.values())
        for state in states:
            self._fail(state, "receiver closed")
        for conn in conns:
            _shutdown(conn)
        for thread in [*conns.values(), *([self._acceptor] if self._acceptor else [])]:
            thread.join(_JOIN_TIMEOUT_S)

    # -- connection threads

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # listener closed
                return
            _tune(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-recv", daemon=True)
            with self._lock:
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        staging = torch.empty(0, dtype=torch.uint8)  # [max layer_nbytes seen], reused
        try:
            while (header := read_header(conn)) is not None:
                staging = self._on_frame(conn, header, staging)
        except (OSError, ConnectionError):
            pass  # peer gone or protocol error: drop the connection
        finally:
            self._drop_connection(conn)

    def _drop_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
            orphans = [s for s in self._expected.values() if s.conn is conn]
        for state in orphans:
            self._fail(state, "sender disconnected mid-handoff")
        conn.close()

    def _on_frame(self, conn: socket.socket, header: Header, staging: torch.Tensor) -> torch.Tensor:
        if header.kind == Kind.ABORT:
            reason = read_message(conn, header)
            if (state := self._lookup(header)) is not None:
                self._fail(state, f"aborted by sender: {reason}")
            return staging
        if header.kind != Kind.DATA:
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
        with self._lock:
            state = self._expected.get(header.handoff_id)
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
                error = self._call_on_layer(state, header.layer, payload)
        if error:
            self._reject(conn, header.handoff_id, state, error)
        elif len(state.layers) == state.num_layers:
            self._complete(conn, state)

    @staticmethod
    def _call_on_layer(state: _Expected, layer: int, payload: torch.Tensor) -> str:
        try:
            state.on_layer(layer, payload)
        except Exception as exc:  # the consumer's bug must not kill the connection
            return f"on_layer failed on layer {layer}: {exc!r}"
        state.layers.add(layer)
        state.nbytes += payload.numel()
        return ""

    def _complete(self, conn: socket.socket, state: _Expected) -> None:
        with state.lock:
            state.closed = True
            self._forget(state)
            state.future.set_result(state.result(ok=True))
        with contextlib.suppress(OSError):
            send_message(conn, Kind.ACK, state.key)

    def _reject(self, conn: socket.socket, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        with contextlib.suppress(OSError):
            send_message(conn, Kind.NACK, key, error)

    def _fail(self, state: _Expected, error: str) -> None:
        with state.lock:
            if state.closed:
                return
            state.closed = True
            self._forget(state)
            state.future.set_result(state.result(ok=False, error=error))

    def _forget(self, state: _Expected) -> None:
        with self._lock:
            if self._expected.get(state.key) is state:
                del self._expected[state.key]


# ---- sender --------------------------------------------------------------------------------


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


class _Connection:
    """One TCP connection to a receiver, shared by the handoffs to it."""

    def __init__(self, endpoint: str, connect_timeout: float) -> None:
        self.endpoint = endpoint
        try:
            self.sock = socket.create_connection(parse_endpoint(endpoint), connect_timeout)
        except OSError as exc:
            raise HandoffError(f"cannot connect to {endpoint}: {exc}") from exc
        self.sock.settimeout(None)
        _tune(self.sock)
        self.dead = ""  # why the connection died; empty while alive
        self._lock = threading.Lock()
        self._channels: dict[bytes, _SocketChannel] = {}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="kv-send", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="kv-ack", daemon=True)
        self._writer.start()
        self._reader.start()

    def add(self, channel: _SocketChannel) -> None:
        with self._lock:
            if self.dead:
                raise HandoffError(f"connection to {self.endpoint} lost: {self.dead}")
            if channel.key in self._channels:
                raise ValueError(f"handoff {channel.handoff_id} is already open")
            self._channels[channel.key] = channel

    def remove(self, channel: _SocketChannel) -> None:
        with self._lock:
            if self._channels.get(channel.key) is channel:
                del self._channels[channel.key]

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._die("sender closed")
        self._reader.join(_JOIN_TIMEOUT_S)

    def _die(self, reason: str) -> None:
        with self._lock:
            if self.dead:
                return
            self.dead = reason
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.fail(HandoffError(f"connection to {self.endpoint} lost: {reason}"))
        self._jobs.put(None)
        _shutdown(self.sock)

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
            Kind.DATA, channel.key, layer, channel.num_layers, len(payload), zlib.crc32(payload)
        )
        self.sock.sendall(header.pack())
        self.sock.sendall(payload)
        channel.sent(layer, len(payload), time.perf_counter() - start)

    def _send_abort(self, job: _Job) -> None:
        with contextlib.suppress(OSError):
            send_message(self.sock, Kind.ABORT, job.channel.key, job.reason)

    def _read_loop(self) -> None:
        reason = "receiver closed the connection"
        try:
            while (header := read_header(self.sock)) is not None:
                self._on_reply(header, read_message(self.sock, header))
        except (OSError, ConnectionError) as exc:
            reason = str(exc)
        finally:
            self._die(reason)
            self._writer.join(_JOIN_TIMEOUT_S)
            self.sock.close()

    def _on_reply(self, header: Header, message: str) -> None:
        with self._lock:
            channel = self._channels.get(header.handoff_id)
        if channel is None:
            return  # a late reply for a handoff that already ended
        if header.kind == Kind.ACK:
            channel.acked()
        elif header.kind == Kind.NACK:
            channel.fail(HandoffError(f"receiver rejected handoff {channel.handoff_id}: {message}"))
        else:
            raise ProtocolError(f"unexpected {header.kind.name} frame from a receiver")


class _SocketChannel:
    """One handoff being pushed (implements transport.KVSendChannel).

    send_layer keeps a reference to `data` until the writer thread has sent it: do not mutate
    the tensor before finish() returns (the prefill's per-layer gather buffers never are).
    """

    def __init__(self, conn: _Connection, handoff_id: str, num_layers: int) -> None:
        self.conn, self.handoff_id, self.num_layers = conn, handoff_id, num_layers
        self.key = handoff_id_bytes(handoff_id)
        self._done: Future[None] = Future()
        self._queued: set[int] = set()
        self._layer_seconds = [0.0] * num_layers
        self._nbytes = 0
        self._layers_sent = 0
        self._written = threading.Event()  # every layer is on the wire (set by the writer)
        self._first_send = 0.0
        self._acked_at = 0.0

    @property
    def failed(self) -> bool:
        return self._done.done() and self._done.exception() is not None

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        if self.failed:
            raise self._error()
        if not 0 <= layer < self.num_layers or layer in self._queued:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers}) or repeated")
        self._queued.add(layer)
        self._first_send = self._first_send or time.perf_counter()
        self.conn.submit(_Job(self, layer, data))

    def finish(self, timeout: float) -> HandoffStats:
        try:
            if len(self._queued) != self.num_layers:
                raise HandoffError(f"finish() after {len(self._queued)}/{self.num_layers} layers")
            self._done.result(timeout)
            self._written.wait(timeout)  # the ACK can overtake the writer's bookkeeping
        except FutureTimeout:
            self.abort(f"sender saw no ACK within {timeout} s")
            raise HandoffError(f"handoff {self.handoff_id}: no ACK within {timeout} s") from None
        except HandoffError as exc:
            self.abort(str(exc))
            raise
        finally:
            self.conn.remove(self)
        return self._stats()

    def abort(self, reason: str) -> None:
        if _settle(self._done, HandoffError(f"aborted: {reason}")):
            self.conn.submit(_Job(self, 0, None, reason))

    # -- called from the connection's threads

    def sent(self, layer: int, nbytes: int, seconds: float) -> None:
        self._layer_seconds[layer] = seconds
        self._nbytes += nbytes
        self._layers_sent += 1
        if self._layers_sent == self.num_layers:
            self._written.set()

    def acked(self) -> None:
        self._acked_at = time.perf_counter()
        _settle(self._done)

    def fail(self, error: HandoffError) -> None:
        _settle(self._done, error)

    def _error(self) -> HandoffError:
        error = self._done.exception()
        assert isinstance(error, HandoffError)
        return error

    def _stats(self) -> HandoffStats:
        seconds = max(self._acked_at - self._first_send, 1e-9)
        return HandoffStats(
            nbytes=self._nbytes,
            seconds=seconds,
            gbps=self._nbytes / seconds / 1e9,
            layer_seconds=list(self._layer_seconds),
        )


class SocketKVSender:
    """Prefill side of the TCP transport (implements transport.KVSender): a connection pool."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conns: dict[str, _Connection] = {}

    def open(self, endpoint: str, handoff_id: str, num_layers: int) -> _SocketChannel:
        channel = _SocketChannel(self._connection(endpoint), handoff_id, num_layers)
        channel.conn.add(channel)
        return channel

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def _connection(self, endpoint: str) -> _Connection:
        with self._lock:
            conn = self._conns.get(endpoint)
            if conn is None or conn.dead:
                conn = self._conns[endpoint] = _Connection(endpoint, self.connect_timeout)
            return conn
