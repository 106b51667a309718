"""KV handoff over NCCL: layer payloads GPU to GPU, control over a TCP connection per pair.

Each (prefill, decode) pair shares one TCP control connection and one 2-rank NCCL communicator
(prefill = rank 0, decode = rank 1), set up on the first handoff between them:

    prefill (NcclKVSender)                         decode (NcclKVReceiver, nccl://host:port)
    connect, HELLO(unique id)           ------->   ncclCommInitRank(rank 1) + 1-byte probe recv
    ncclCommInitRank(rank 0) + probe send          READY once both ranks are connected
                                        <-------
  per layer of a handoff, in one order on both sides (NCCL matches sends to recvs by order):
    ncclSend on the peer's stream, then DATA(id, layer, nbytes) ->  ncclRecv into a staging
    CKSUM(id, layer, checksum) once the GPU computed it      ->  buffer; on CKSUM: verify,
                                        <-------                 scatter into the reserved
                                          ACK / NACK(reason)     blocks; ACK after the last

Every DATA frame is matched by a recv, also for handoffs the receiver rejects (into a buffer
that is dropped), so the communicator's order never breaks; a corrupt layer NACKs the handoff.
A lost control connection aborts the communicator on both sides (ncclCommAbort ends kernels that
wait on a dead peer), fails its handoffs, and drops the pair from the sender's LRU cache.

Streams (prefill): the engine's compute stream records an event after each layer's gather; one
sender thread makes the peer's stream wait on it and launches the send, and a checksum stream
computes the checksum. The compute stream never waits on the network. Sends of one layer to
several decode workers (one batch) are launched in one ncclGroupStart/End.

Checksum (both sides, on the GPU): the bytes viewed as little-endian int64 words w_i (a tail of
fewer than 8 bytes as single bytes), sum_i w_i * (2i + 1) mod 2^64. Odd weights are invertible
mod 2^64, so any change to one word, and any swap of two different words, changes it. Integer
sums are exact and order-free, so every device computes the same value.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol

import torch

from shared.handoff import nccl
from shared.handoff.socket_transport import (
    MAX_MESSAGE_BYTES,
    ProtocolError,
    format_endpoint,
    parse_endpoint,
    recv_into,
)
from shared.handoff.transport import (
    HandoffError,
    HandoffResult,
    HandoffStats,
    LayerCallback,
    handoff_id_bytes,
)

log = logging.getLogger(__name__)

SCHEME = "nccl://"
MAGIC = b"KVMN"
VERSION = 1
FRAME = struct.Struct("!4sBB16sHHQQ")
MASK64 = (1 << 64) - 1
_JOIN_TIMEOUT_S = 5.0
_MAX_BATCH = 256  # layers launched together when they queued up
_NO_ID = bytes(16)


class Kind(IntEnum):
    HELLO = 1  # payload: the NCCL unique id (prefill -> decode)
    READY = 2  # the communicator is up (decode -> prefill)
    DATA = 3  # a layer of `nbytes` follows on the communicator
    CKSUM = 4  # value: the layer's checksum
    ABORT = 5  # payload: reason; the sender gives up on the handoff
    ACK = 6  # all layers delivered
    NACK = 7  # payload: reason; the handoff failed (or, at setup, the pair could not connect)


@dataclass(frozen=True)
class Frame:
    kind: Kind
    handoff_id: bytes = _NO_ID  # 16 bytes (UUID)
    layer: int = 0
    num_layers: int = 0
    nbytes: int = 0  # DATA: payload bytes on NCCL; others: bytes of the TCP payload that follows
    value: int = 0  # CKSUM: the checksum (uint64)

    def pack(self) -> bytes:
        return FRAME.pack(
            MAGIC, VERSION, self.kind, self.handoff_id, self.layer, self.num_layers,
            self.nbytes, self.value,
        )  # fmt: skip

    @staticmethod
    def unpack(raw: bytes) -> Frame:
        magic, version, kind, hid, layer, num_layers, nbytes, value = FRAME.unpack(raw)
        if magic != MAGIC or version != VERSION or kind not in set(Kind):
            raise ProtocolError(f"bad control frame (magic {magic!r}, version {version})")
        return Frame(Kind(kind), hid, layer, num_layers, nbytes, value)


def read_frame(sock: socket.socket) -> Frame | None:
    """The next frame, or None if the peer closed cleanly between frames."""
    raw = bytearray(FRAME.size)
    n = sock.recv_into(raw)
    if n == 0:
        return None
    recv_into(sock, memoryview(raw)[n:])
    return Frame.unpack(bytes(raw))


def _read_burst(sock: socket.socket, limit: int = 256) -> list[tuple[Frame, bytes]]:
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
    if frame.nbytes > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"control payload of {frame.nbytes} bytes")
    raw = bytearray(frame.nbytes)
    recv_into(sock, memoryview(raw))
    return bytes(raw)


def message(kind: Kind, handoff_id: bytes = _NO_ID, text: str | bytes = "") -> bytes:
    payload = (text.encode() if isinstance(text, str) else text)[:MAX_MESSAGE_BYTES]
    return Frame(kind, handoff_id, nbytes=len(payload)).pack() + payload


def parse_nccl_endpoint(endpoint: str) -> tuple[str, int]:
    """'nccl://host:port' -> (host, port)."""
    if not endpoint.startswith(SCHEME):
        raise ValueError(f"not an nccl:// endpoint: {endpoint!r}")
    return parse_endpoint("tcp://" + endpoint.removeprefix(SCHEME))


def format_nccl_endpoint(host: str, port: int) -> str:
    return SCHEME + format_endpoint(host, port).removeprefix("tcp://")


# ---- checksum ------------------------------------------------------------------------------


def _weighted_sum(words: torch.Tensor, start: int) -> torch.Tensor:
    """sum_i words[i] * (2 (start + i) + 1) mod 2^64; words: [m] int64, any device."""
    m = words.numel()
    rows = m // 64
    dev = words.device
    # i = 64 r + c  ->  2i + 1 = 128 r + (2c + 1): no weight tensor as large as the data
    grid = words[: rows * 64].view(rows, 64)
    cols = torch.arange(1, 128, 2, dtype=torch.int64, device=dev)  # [64] 2c + 1
    row_ids = torch.arange(rows, dtype=torch.int64, device=dev)  # [rows]
    total = (grid * cols).sum() + 128 * (grid.sum(dim=1) * row_ids).sum()
    tail = words[rows * 64 :]
    tail_w = torch.arange(2 * rows * 64 + 1, 2 * m + 1, 2, dtype=torch.int64, device=dev)
    total = total + (tail * tail_w).sum()
    return total + 2 * start * words.sum()


def layer_checksum(data: torch.Tensor) -> torch.Tensor:
    """The layer checksum (module docstring) of a contiguous tensor: a 0-d int64 tensor on its
    device, computed on the current stream without a host sync."""
    raw = data.reshape(-1).view(torch.uint8)
    n8 = raw.numel() // 8 * 8
    total = _weighted_sum(raw[:n8].view(torch.int64), 0)
    if n8 < raw.numel():
        total = total + _weighted_sum(raw[n8:].to(torch.int64), n8 // 8)
    return total


class Checksummer:
    """layer_checksum in two kernels: the weights 2i + 1 are kept on the device. Use it on one
    stream only (the weights are allocated and read there)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._weights = torch.empty(0, dtype=torch.int64)

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        raw = data.reshape(-1).view(torch.uint8)
        if raw.numel() % 8:
            return layer_checksum(data)
        words = raw.view(torch.int64)  # [m]
        m = words.numel()
        if self._weights.numel() < m:  # the old weights are freed in this stream's order
            size = 1 << max(m - 1, 1).bit_length()
            self._weights = torch.arange(1, 2 * size, 2, dtype=torch.int64, device=self.device)
        return (words * self._weights[:m]).sum()


def checksum_value(data: torch.Tensor) -> int:
    """layer_checksum as a Python uint64 (syncs)."""
    return int(layer_checksum(data).item()) & MASK64


# ---- the payload path: NCCL, or anything shaped like it (tests) ----------------------------


class PairComm(Protocol):
    """One rank of a 2-rank communicator (nccl.Communicator has this shape)."""

    closed: bool

    def init(self) -> None: ...
    def send(self, data: torch.Tensor, peer: int, stream: Any) -> None: ...
    def recv(self, data: torch.Tensor, peer: int, stream: Any) -> None: ...
    def check(self) -> None: ...
    def abort(self) -> None: ...


class Fabric(Protocol):
    """Makes pair communicators: NCCL on GPUs; an in-process loopback in CPU tests."""

    def unique_id(self) -> bytes: ...
    def communicator(self, unique_id: bytes, rank: int) -> PairComm: ...
    def group(self) -> contextlib.AbstractContextManager[None]: ...


class NcclFabric:
    def __init__(self, lib: nccl.Nccl | None = None) -> None:
        self.lib = lib or nccl.load()

    def unique_id(self) -> bytes:
        return self.lib.unique_id()

    def communicator(self, unique_id: bytes, rank: int) -> PairComm:
        return nccl.Communicator(self.lib, 2, unique_id, rank)

    def group(self) -> contextlib.AbstractContextManager[None]:
        return self.lib.group()


class _Event:
    """A CUDA event, or (on CPU) one that is always complete."""

    def __init__(self, stream: torch.cuda.Stream | None, timing: bool = False) -> None:
        self.cuda = torch.cuda.Event(enable_timing=timing) if stream is not None else None
        if self.cuda is not None:
            self.cuda.record(stream)
        self.wall = time.perf_counter()

    def query(self) -> bool:
        return self.cuda is None or self.cuda.query()

    def synchronize(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()

    def seconds_until(self, later: _Event) -> float:
        if self.cuda is None or later.cuda is None:
            return later.wall - self.wall
        later.cuda.synchronize()
        return self.cuda.elapsed_time(later.cuda) / 1e3


class _Device:
    """Streams, events and buffers of one device; no-ops on CPU (the loopback fabric)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda and device.index is None:  # "cuda": the current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device

    def bind_thread(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)

    def stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.Stream(device=self.device) if self.cuda else None

    def on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def current_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def wait(self, stream: torch.cuda.Stream | None, event: _Event) -> None:
        if stream is not None and event.cuda is not None:
            stream.wait_event(event.cuda)

    def keep(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """The allocator must not reuse `tensor` before `stream`'s queued work is done."""
        if stream is not None:
            tensor.record_stream(stream)

    def host_int64(self, n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.int64, pin_memory=self.cuda)


def _settle(future: Future[Any], error: BaseException | None = None, value: Any = None) -> bool:
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except InvalidStateError:
        return False
    return True


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _connect_pair(
    fabric: Fabric, dev: _Device, unique_id: bytes, rank: int, timeout: float
) -> PairComm:
    """Init rank `rank` of the pair's communicator and connect rank 0 -> 1 with a 1-byte probe
    (NCCL connects lazily: afterwards a send only enqueues). Aborts it on failure or timeout."""
    comm = fabric.communicator(unique_id, rank)
    done: Future[None] = Future()

    def run() -> None:
        try:
            dev.bind_thread()
            stream = dev.stream()
            comm.init()
            probe = torch.zeros(1, dtype=torch.uint8, device=dev.device)
            with fabric.group():
                (comm.send if rank == 0 else comm.recv)(probe, 1 - rank, stream)
            if stream is not None:
                stream.synchronize()
            _settle(done)
        except BaseException as exc:  # reported to the caller through `done`
            _settle(done, exc)

    threading.Thread(target=run, name="nccl-setup", daemon=True).start()
    try:
        done.result(timeout)
    except FutureTimeout:
        comm.abort()
        raise HandoffError(f"NCCL pair setup timed out after {timeout} s") from None
    except Exception as exc:
        comm.abort()
        raise HandoffError(f"NCCL pair setup failed: {exc}") from exc
    return comm


# ---- receiver (decode) ---------------------------------------------------------------------


@dataclass(eq=False)
class _Expected:
    """One handoff the receiver accepts. `lock` serializes on_layer against cancel/fail."""

    key: bytes
    num_layers: int
    layer_nbytes: int
    on_layer: LayerCallback
    future: Future[HandoffResult] = field(default_factory=Future)
    lock: threading.RLock = field(default_factory=threading.RLock)
    arrived: set[int] = field(default_factory=set)  # layers whose DATA came
    layers: set[int] = field(default_factory=set)  # layers delivered to on_layer
    nbytes: int = 0
    started: float = 0.0
    link: _Link | None = None
    closed: bool = False

    def rejects(self, frame: Frame) -> str:
        if self.closed:
            return "handoff cancelled or failed"
        if frame.num_layers != self.num_layers:
            return f"num_layers {frame.num_layers} != expected {self.num_layers}"
        if frame.nbytes != self.layer_nbytes:
            return f"layer of {frame.nbytes} bytes != expected {self.layer_nbytes}"
        if frame.layer >= self.num_layers or frame.layer in self.arrived:
            return f"layer {frame.layer} out of range or repeated"
        return ""

    def result(self, ok: bool, error: str = "") -> HandoffResult:
        seconds = time.perf_counter() - self.started if self.started else 0.0
        return HandoffResult(ok=ok, nbytes=self.nbytes, seconds=seconds, error=error)


@dataclass(eq=False)
class _Landing:
    """A layer received into a staging buffer, waiting for its CKSUM frame."""

    state: _Expected
    layer: int
    buf: torch.Tensor  # [nbytes] uint8 on the device, written by the recv stream
    checksums: torch.Tensor  # [k] int64, pinned host: the checksums of one burst of layers
    index: int  # this layer's entry in checksums
    ready: _Event  # recvs + checksums of the burst done (on the check stream)


class _Link:
    """Decode side of one prefill's control connection and communicator."""

    def __init__(self, conn: socket.socket, dev: _Device) -> None:
        self.conn = conn
        self.comm: PairComm | None = None
        self.recv_stream = dev.stream()  # only recvs: they go back to back
        self.check_stream = dev.stream()  # checksums of received layers, off the recv stream
        self.scatter_stream = dev.stream()
        self.checksum = Checksummer(dev.device)  # on check_stream
        self.landings: dict[tuple[bytes, int], _Landing] = {}
        self.verify: queue.SimpleQueue[tuple[_Landing, int] | None] = queue.SimpleQueue()
        self._write_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            self.conn.sendall(data)


class NcclKVReceiver:
    """Decode side of the NCCL transport (implements transport.KVReceiver).

    Listens for control connections on `bind_host:port`; advertises nccl://advertise_host:port.
    Layers land in staging buffers on the device (never in memory that was not reserved), are
    checksummed on the GPU, verified, then handed to on_layer on this receiver's scatter stream,
    with the staging buffer ([layer_nbytes] uint8 on the device) as the payload.
    """

    def __init__(
        self, device: torch.device | str, bind_host: str = "127.0.0.1", port: int = 0,
        advertise_host: str | None = None, fabric: Fabric | None = None,
        setup_timeout: float = 60.0, max_layer_bytes: int = 1 << 34,
    ) -> None:  # fmt: skip
        self.dev = _Device(torch.device(device))
        self.fabric = fabric or NcclFabric()
        self.bind_host, self.port = bind_host, port
        self.advertise_host = advertise_host or bind_host
        self.setup_timeout = setup_timeout
        self.max_layer_bytes = max_layer_bytes
        self._lock = threading.Lock()
        self._expected: dict[bytes, _Expected] = {}
        self._links: dict[socket.socket, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    @property
    def num_links(self) -> int:
        with self._lock:
            return len(self._links)

    def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, name="nccl-accept", daemon=True)
        self._acceptor.start()
        return format_nccl_endpoint(self.advertise_host, self.port)

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
            links, states = dict(self._links), list(self._expected.values())
        for state in states:
            self._fail(state, "receiver closed")
        for conn in links:
            _shutdown(conn)
        for thread in [*links.values(), *([self._acceptor] if self._acceptor else [])]:
            thread.join(_JOIN_TIMEOUT_S)

    # -- connection threads

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), name="nccl-recv")
            thread.daemon = True
            with self._lock:
                self._links[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        self.dev.bind_thread()
        link = _Link(conn, self.dev)
        verifier = threading.Thread(target=self._verify_loop, args=(link,), name="nccl-verify")
        verifier.daemon = True
        try:
            self._handshake(link)
            verifier.start()
            while burst := _read_burst(conn):
                self._on_burst(link, burst)
        except (OSError, ConnectionError, HandoffError, RuntimeError) as exc:
            log.info("KV control connection dropped: %s", exc)
        finally:
            self._drop(link, verifier)

    def _handshake(self, link: _Link) -> None:
        hello = read_frame(link.conn)
        if hello is None or hello.kind != Kind.HELLO:
            raise ProtocolError("expected HELLO")
        unique_id = read_payload(link.conn, hello)
        try:
            link.comm = _connect_pair(self.fabric, self.dev, unique_id, 1, self.setup_timeout)
        except HandoffError as exc:
            link.send(message(Kind.NACK, text=str(exc)))
            raise
        link.send(message(Kind.READY))

    def _drop(self, link: _Link, verifier: threading.Thread) -> None:
        with self._lock:
            self._links.pop(link.conn, None)
            orphans = [s for s in self._expected.values() if s.link is link]
        for state in orphans:
            self._fail(state, "sender disconnected mid-handoff")
        if link.comm is not None:
            with contextlib.suppress(nccl.NcclError):
                link.comm.abort()  # ends recvs still waiting on the dead peer
        link.verify.put(None)
        if verifier.is_alive():
            verifier.join(_JOIN_TIMEOUT_S)
        link.landings.clear()
        link.conn.close()

    def _on_burst(self, link: _Link, burst: list[tuple[Frame, bytes]]) -> None:
        """Frames that arrived together: one group of recvs for their DATA, then each in order."""
        datas = [frame for frame, _ in burst if frame.kind == Kind.DATA]
        posted, received = self._post_recvs(link, datas)
        bufs = iter(posted)
        landed: list[tuple[Frame, _Expected, torch.Tensor]] = []
        for frame, payload in burst:
            if frame.kind == Kind.DATA:
                self._accept_layer(link, frame, next(bufs), landed)
            elif frame.kind == Kind.CKSUM:
                self._land(link, landed, received)
                landed = []
                landing = link.landings.pop((frame.handoff_id, frame.layer), None)
                if landing is not None:
                    link.verify.put((landing, frame.value))
            elif frame.kind == Kind.ABORT:
                with self._lock:
                    state = self._expected.get(frame.handoff_id)
                if state is not None:
                    reason = payload.decode(errors="replace")
                    self._fail(state, f"aborted by sender: {reason}")
            else:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")
        self._land(link, landed, received)

    def _post_recvs(self, link: _Link, datas: list[Frame]) -> tuple[list[torch.Tensor], _Event]:
        """A recv for every DATA frame (also rejected ones: NCCL's order must hold); the event
        completes once they all landed."""
        if any(f.nbytes > self.max_layer_bytes for f in datas):
            raise ProtocolError(f"a layer of more than {self.max_layer_bytes} bytes")
        assert link.comm is not None
        with self.dev.on(link.recv_stream):
            bufs = [torch.empty(f.nbytes, dtype=torch.uint8, device=self.dev.device) for f in datas]
            if datas:
                with self.fabric.group():
                    for buf in bufs:
                        link.comm.recv(buf, 0, link.recv_stream)
            received = _Event(link.recv_stream)
        return bufs, received

    def _accept_layer(
        self, link: _Link, frame: Frame, buf: torch.Tensor,
        landed: list[tuple[Frame, _Expected, torch.Tensor]],
    ) -> None:  # fmt: skip
        with self._lock:
            state = self._expected.get(frame.handoff_id)
        error = "handoff not expected (reserve first)"
        if state is not None:
            with state.lock:
                state.started = state.started or time.perf_counter()
                error = state.rejects(frame)
                state.arrived.add(frame.layer)
                state.link = link
        if state is None or error:
            self._reject(link, frame.handoff_id, state, error)
            return  # buf is freed in stream order: the recv still lands, then is dropped
        landed.append((frame, state, buf))

    def _land(
        self, link: _Link, landed: list[tuple[Frame, _Expected, torch.Tensor]], received: _Event
    ) -> None:
        """Checksum accepted layers on the check stream (the recv stream goes on receiving);
        they wait for their CKSUM frames."""
        if not landed:
            return
        with self.dev.on(link.check_stream):
            self.dev.wait(link.check_stream, received)
            sums = torch.stack([link.checksum(buf) for _, _, buf in landed])
            host = self.dev.host_int64(len(landed))
            host.copy_(sums, non_blocking=True)
            for _, _, buf in landed:
                self.dev.keep(buf, link.check_stream)
            ready = _Event(link.check_stream)
        for i, (frame, state, buf) in enumerate(landed):
            landing = _Landing(state, frame.layer, buf, host, i, ready)
            link.landings[(frame.handoff_id, frame.layer)] = landing

    def _verify_loop(self, link: _Link) -> None:
        self.dev.bind_thread()
        while (item := link.verify.get()) is not None:
            landing, expected = item
            landing.ready.synchronize()
            state = landing.state
            if int(landing.checksums[landing.index]) & MASK64 != expected:
                self._reject(link, state.key, state, f"checksum mismatch on layer {landing.layer}")
                continue
            with state.lock:
                if state.closed:
                    continue
                with self.dev.on(link.scatter_stream):
                    error = self._call_on_layer(state, landing)
                    self.dev.keep(landing.buf, link.scatter_stream)
                    done = not error and len(state.layers) == state.num_layers
                    if done:  # the scatters must have landed before decode reads the blocks
                        _Event(link.scatter_stream).synchronize()
            if error:
                self._reject(link, state.key, state, error)
            elif done:
                self._complete(link, state)

    @staticmethod
    def _call_on_layer(state: _Expected, landing: _Landing) -> str:
        try:
            state.on_layer(landing.layer, landing.buf)
        except Exception as exc:  # the consumer's bug must not kill the connection
            return f"on_layer failed on layer {landing.layer}: {exc!r}"
        state.layers.add(landing.layer)
        state.nbytes += landing.buf.numel()
        return ""

    def _complete(self, link: _Link, state: _Expected) -> None:
        with state.lock:
            if state.closed:
                return
            state.closed = True
            self._forget(state)
            state.future.set_result(state.result(ok=True))
        link.send(message(Kind.ACK, state.key))

    def _reject(self, link: _Link, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        link.send(message(Kind.NACK, key, error))

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


# ---- sender (prefill) ----------------------------------------------------------------------


class _Peer:
    """Prefill side of one decode receiver: control connection + communicator + send stream."""

    def __init__(self, sender: NcclKVSender, endpoint: str) -> None:
        self.sender, self.endpoint = sender, endpoint
        self.dead = ""  # why the pair was torn down; empty while alive
        self.lock = threading.Lock()  # guards comm: launches vs abort
        self._write_lock = threading.Lock()
        self.channels: dict[bytes, NcclSendChannel] = {}
        try:
            self.sock = socket.create_connection(
                parse_nccl_endpoint(endpoint), sender.connect_timeout
            )
        except OSError as exc:
            raise HandoffError(f"cannot connect to {endpoint}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.comm = self._handshake()
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self.stream = sender.dev.stream()
        self._reader = threading.Thread(target=self._read_loop, name="nccl-ack", daemon=True)
        self._reader.start()

    def _handshake(self) -> PairComm:
        sender = self.sender
        unique_id = sender.fabric.unique_id()
        self.sock.sendall(message(Kind.HELLO, text=unique_id))
        reply: Future[Frame] = Future()

        def read_reply() -> None:
            try:
                self.sock.settimeout(sender.setup_timeout)
                frame = read_frame(self.sock)
                if frame is None or frame.kind not in (Kind.READY, Kind.NACK):
                    raise ProtocolError("receiver closed or answered HELLO with no READY")
                if frame.kind == Kind.NACK:
                    why = read_payload(self.sock, frame).decode(errors="replace")
                    raise HandoffError(f"receiver could not set up NCCL: {why}")
                _settle(reply, value=frame)
            except BaseException as exc:
                _settle(reply, exc)
                _shutdown(self.sock)  # the peer is gone: do not wait for its rank

        threading.Thread(target=read_reply, name="nccl-hello", daemon=True).start()
        comm = _connect_pair(sender.fabric, sender.dev, unique_id, 0, sender.setup_timeout)
        try:
            reply.result(sender.setup_timeout)
        except Exception as exc:
            comm.abort()
            raise HandoffError(f"NCCL setup with {self.endpoint} failed: {exc}") from exc
        return comm

    def add(self, channel: NcclSendChannel) -> None:
        with self.lock:
            if self.dead:
                raise HandoffError(f"connection to {self.endpoint} lost: {self.dead}")
            if channel.key in self.channels:
                raise ValueError(f"handoff {channel.handoff_id} is already open")
            self.channels[channel.key] = channel

    def remove(self, channel: NcclSendChannel) -> None:
        with self.lock:
            if self.channels.get(channel.key) is channel:
                del self.channels[channel.key]

    @property
    def busy(self) -> bool:
        return bool(self.channels)

    def write(self, data: bytes) -> None:
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError as exc:
            self.die(f"send failed: {exc}")

    def die(self, reason: str) -> None:
        """Tear the pair down: fail its handoffs, abort the communicator, leave the cache."""
        # a launch holds the lock only while enqueuing; if one hangs, abort without it
        locked = self.lock.acquire(timeout=2.0)
        try:
            if self.dead:
                return
            self.dead = reason
            channels, self.channels = list(self.channels.values()), {}
        finally:
            if locked:
                self.lock.release()
        log.warning("KV pair with %s torn down: %s", self.endpoint, reason)
        self.sender._forget(self)
        for channel in channels:
            channel.fail(HandoffError(f"connection to {self.endpoint} lost: {reason}"))
        _shutdown(self.sock)
        with contextlib.suppress(nccl.NcclError):
            self.comm.abort()  # ends send kernels still waiting on the peer

    def _read_loop(self) -> None:
        reason = "receiver closed the connection"
        try:
            while (frame := read_frame(self.sock)) is not None:
                text = read_payload(self.sock, frame).decode(errors="replace")
                self._on_reply(frame, text)
        except (OSError, ConnectionError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.die(reason)
            self.sock.close()

    def _on_reply(self, frame: Frame, text: str) -> None:
        with self.lock:
            channel = self.channels.get(frame.handoff_id)
        if channel is None:
            return  # a late reply for a handoff that already ended
        if frame.kind == Kind.ACK:
            channel.acked()
        elif frame.kind == Kind.NACK:
            channel.fail(HandoffError(f"receiver rejected handoff {channel.handoff_id}: {text}"))
        else:
            raise ProtocolError(f"unexpected {frame.kind.name} frame from a receiver")


@dataclass(frozen=True)
class _Job:
    """One layer of one or more handoffs (a batch), or (reason set) an ABORT."""

    layer: int
    items: list[tuple[NcclSendChannel, torch.Tensor]]  # data: contiguous, on the device
    ready: _Event | None  # recorded on the compute stream after the gathers
    abort: str = ""


@dataclass(frozen=True)
class _Checksums:
    """Checksums of launched layers, computed on the checksum stream."""

    done: _Event
    layers: list[tuple[NcclSendChannel, int]]  # (handoff, layer) per entry of values
    values: torch.Tensor  # [len(layers)] int64, pinned host


@dataclass(frozen=True)
class _Send:
    """One layer of one handoff, about to be launched."""

    job: _Job
    channel: NcclSendChannel
    data: torch.Tensor  # [nbytes] uint8 view of the layer, on the device


class NcclSendChannel:
    """One handoff being pushed over NCCL (implements transport.KVSendChannel).

    send_layer takes the layer on the device and returns at once: the data must not be
    modified afterwards (the pusher's gather buffers never are); the sender thread keeps it
    alive until the send and checksum that read it are done.
    """

    transport = "nccl"

    def __init__(
        self, sender: NcclKVSender, peer: _Peer, handoff_id: str, num_layers: int
    ) -> None:  # fmt: skip
        self.sender, self.peer = sender, peer
        self.handoff_id, self.num_layers = handoff_id, num_layers
        self.key = handoff_id_bytes(handoff_id)
        self._done: Future[None] = Future()
        self._queued: set[int] = set()
        self._spans: dict[int, tuple[_Event, _Event]] = {}  # layer -> (start, end) of its send
        self._nbytes = 0
        self._first_send = 0.0
        self._acked_at = 0.0

    @property
    def failed(self) -> bool:
        return self._done.done() and self._done.exception() is not None

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        if send_layer_group(layer, [(self, data)]):
            self.queue(layer)  # raises the channel's error

    def queue(self, layer: int) -> None:
        """Bookkeeping of send_layer_group: HandoffError if failed, ValueError if repeated."""
        if self.failed:
            error = self._done.exception()
            assert isinstance(error, HandoffError)
            raise error
        if not 0 <= layer < self.num_layers or layer in self._queued:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers}) or repeated")
        self._queued.add(layer)
        self._first_send = self._first_send or time.perf_counter()

    def finish(self, timeout: float) -> HandoffStats:
        try:
            if len(self._queued) != self.num_layers:
                raise HandoffError(f"finish() after {len(self._queued)}/{self.num_layers} layers")
            self._done.result(timeout)
        except FutureTimeout:
            self.abort(f"sender saw no ACK within {timeout} s")
            raise HandoffError(f"handoff {self.handoff_id}: no ACK within {timeout} s") from None
        except HandoffError as exc:
            self.abort(str(exc))
            raise
        finally:
            self.peer.remove(self)
        return self._stats()

    def abort(self, reason: str) -> None:
        if _settle(self._done, HandoffError(f"aborted: {reason}")):
            self.sender._submit(_Job(0, [(self, torch.empty(0))], None, reason or "aborted"))

    # -- called from the sender's threads

    def launched(self, layer: int, nbytes: int, start: _Event, end: _Event) -> None:
        self._spans[layer] = (start, end)
        self._nbytes += nbytes

    def acked(self) -> None:
        self._acked_at = time.perf_counter()
        _settle(self._done)

    def fail(self, error: HandoffError) -> None:
        _settle(self._done, error)

    def _stats(self) -> HandoffStats:
        seconds = max(self._acked_at - self._first_send, 1e-9)
        layer_seconds = [0.0] * self.num_layers
        sharing = collections.Counter(id(span) for span in self._spans.values())
        for layer, span in self._spans.items():  # layers launched together share one span
            layer_seconds[layer] = span[0].seconds_until(span[1]) / sharing[id(span)]
        return HandoffStats(self._nbytes, seconds, self._nbytes / seconds / 1e9, layer_seconds)


def send_layer_group(
    layer: int, items: list[tuple[NcclSendChannel, torch.Tensor]]
) -> list[NcclSendChannel]:
    """Queue layer `layer` of several handoffs (one batch, one NcclKVSender): their sends are
    launched together, in one ncclGroupStart/End. Call on the stream that produced the data.
    Returns the channels that had already failed (nothing is queued for them)."""
    queued, failed = [], []
    for channel, data in items:
        try:
            channel.queue(layer)
        except HandoffError:
            failed.append(channel)
            continue
        queued.append((channel, data.detach().contiguous()))
    if queued:
        sender = queued[0][0].sender
        if any(ch.sender is not sender for ch, _ in queued):
            raise ValueError("send_layer_group takes the channels of one sender")
        ready = _Event(sender.dev.current_stream())  # after the gathers (and copies above)
        sender._submit(_Job(layer, queued, ready))
    return failed


class NcclKVSender:
    """Prefill side of the NCCL transport (implements transport.KVSender).

    Keeps one pair (control connection + communicator) per decode endpoint, created on the
    first handoff to it, in an LRU cache of `max_peers`: the least recently used idle pair is
    torn down (ncclCommAbort) to make room. One thread launches every send, in queue order.
    """

    def __init__(
        self, device: torch.device | str, fabric: Fabric | None = None, max_peers: int = 8,
        connect_timeout: float = 5.0, setup_timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.dev = _Device(torch.device(device))
        self.fabric = fabric or NcclFabric()
        self.max_peers = max_peers
        self.connect_timeout, self.setup_timeout = connect_timeout, setup_timeout
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._peers: collections.OrderedDict[str, _Peer] = collections.OrderedDict()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._checksum_stream = self.dev.stream()
        self._checksum = Checksummer(self.dev.device)  # on the checksum stream
        self._thread = threading.Thread(target=self._send_loop, name="nccl-send", daemon=True)
        self._thread.start()

    @property
    def peers(self) -> list[str]:
        """Endpoints with a live pair, least recently used first."""
        with self._lock:
            return list(self._peers)

    def open(self, endpoint: str, handoff_id: str, num_layers: int) -> NcclSendChannel:
        peer = self._peer(endpoint)
        channel = NcclSendChannel(self, peer, handoff_id, num_layers)
        peer.add(channel)
        return channel

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), collections.OrderedDict()
        for peer in peers:
            peer.die("sender closed")
        self._jobs.put(None)
        self._thread.join(_JOIN_TIMEOUT_S)

    def _peer(self, endpoint: str) -> _Peer:
        with self._setup_lock:  # one setup at a time; others reuse what it made
            with self._lock:
                peer = self._peers.get(endpoint)
                if peer is not None and not peer.dead:
                    self._peers.move_to_end(endpoint)
                    return peer
            peer = _Peer(self, endpoint)
            with self._lock:
                self._peers[endpoint] = peer
                idle = [p for p in self._peers.values() if not p.busy and p is not peer]
                evict = idle[: max(0, len(self._peers) - self.max_peers)]
            for old in evict:
                old.die("evicted from the pair cache")
            return peer

    def _forget(self, peer: _Peer) -> None:
        with self._lock:
            if self._peers.get(peer.endpoint) is peer:
                del self._peers[peer.endpoint]

    def _submit(self, job: _Job) -> None:
        self._jobs.put(job)

    # -- the sender thread

    def _send_loop(self) -> None:
        self.dev.bind_thread()
        pending: collections.deque[_Checksums] = collections.deque()
        while True:
            try:
                job = self._jobs.get(block=not pending)
            except queue.Empty:  # idle: publish the oldest checksums as soon as they are ready
                self._publish(pending, block=True)
                continue
            batch = [job]  # every layer queued by now goes out in one launch
            while batch[-1] is not None and not batch[-1].abort and len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            last = batch[-1]
            try:
                self._launch([j for j in batch if j is not None and not j.abort], pending)
                if last is not None and last.abort:
                    channel = last.items[0][0]
                    channel.peer.write(message(Kind.ABORT, channel.key, last.abort))
                self._publish(pending, block=False)
            except Exception:  # never let one batch kill the thread every handoff relies on
                log.exception("KV send failed")
            if last is None:
                return

    def _launch(self, jobs: list[_Job], pending: collections.deque[_Checksums]) -> None:
        sends = [
            _Send(job, ch, d.view(torch.uint8).reshape(-1))
            for job in jobs
            for ch, d in job.items
            if not ch.failed and not ch.peer.dead
        ]
        if not sends:
            return
        peers = list({id(s.channel.peer): s.channel.peer for s in sends}.values())
        for peer in peers:  # DATA before the sends: the receiver posts its recvs on them, so
            # a send that must first connect more NCCL channels never waits for nothing
            frames = [
                Frame(Kind.DATA, s.channel.key, s.job.layer, s.channel.num_layers, s.data.numel())
                for s in sends
                if s.channel.peer is peer
            ]
            peer.write(b"".join(f.pack() for f in frames))
        launched, spans = self._launch_sends(jobs, sends, peers)
        for s in launched:
            start, end = spans[id(s.channel.peer)]
            s.channel.launched(s.job.layer, s.data.numel(), start, end)
        if not launched:
            return
        stream = self._checksum_stream
        with self.dev.on(stream):
            for job in jobs:
                if job.ready is not None:
                    self.dev.wait(stream, job.ready)
            values = self.dev.host_int64(len(launched))
            values.copy_(torch.stack([self._checksum(s.data) for s in launched]), non_blocking=True)
            for s in launched:
                self.dev.keep(s.data, stream)
            done = _Event(stream)
        pending.append(_Checksums(done, [(s.channel, s.job.layer) for s in launched], values))

    def _launch_sends(
        self, jobs: list[_Job], sends: list[_Send], peers: list[_Peer]
    ) -> tuple[list[_Send], dict[int, tuple[_Event, _Event]]]:
        """One group of sends, each peer's on its own stream after the compute stream's events."""
        for peer in sorted(peers, key=id):
            peer.lock.acquire()
        try:
            # every layer whose DATA went out is sent, also if its handoff failed meanwhile:
            # the receiver posted a recv for it
            live = [s for s in sends if not s.channel.peer.dead]
            starts = {}
            for peer in peers:
                for job in jobs:
                    if job.ready is not None:
                        self.dev.wait(peer.stream, job.ready)
                starts[id(peer)] = _Event(peer.stream, timing=True)
            try:
                with self.fabric.group():
                    for s in live:
                        s.channel.peer.comm.send(s.data, 1, s.channel.peer.stream)
            except nccl.NcclError as exc:
                failed: list[_Peer] = peers
                error = str(exc)
            else:
                failed, error = [], ""
            spans = {id(p): (starts[id(p)], _Event(p.stream, timing=True)) for p in peers}
            for s in live:
                self.dev.keep(s.data, s.channel.peer.stream)
        finally:
            for peer in peers:
                peer.lock.release()
        for peer in failed:
            peer.die(f"NCCL send failed: {error}")
        return ([] if failed else live), spans

    def _publish(self, pending: collections.deque[_Checksums], block: bool) -> None:
        """Send CKSUM frames for launched layers whose checksums are computed."""
        while pending and (block or pending[0].done.query()):
            block = False
            sums = pending.popleft()
            sums.done.synchronize()
            frames: dict[int, tuple[_Peer, list[bytes]]] = {}
            for (channel, layer), value in zip(sums.layers, sums.values.tolist(), strict=True):
                if not channel.failed and not channel.peer.dead:
                    frame = Frame(Kind.CKSUM, channel.key, layer, value=value & MASK64)
                    frames.setdefault(id(channel.peer), (channel.peer, []))[1].append(frame.pack())
            for peer, packed in frames.values():
                peer.write(b"".join(packed))
