"""Decode side of the NCCL transport (control protocol: nccl_frames).

A thread per prefill connection reads control frames in bursts and posts an ncclRecv for every
DATA frame on the link's recv stream (only recvs: they go back to back), in groups of at most
RECV_GROUP_BYTES, into staging buffers the link reuses (nccl_staging). The check stream
checksums a group's accepted layers as soon as that group landed, while the next groups are
still on the wire; a verify thread compares each layer's checksum with its CKSUM frame, hands
the layer to on_layer on the scatter stream and gives the staging buffer back:

    recv stream:     | recv g0 | recv g1 | recv g2 | ...
    check stream:              | sum g0 |  | sum g1 |  | sum g2 |
    verify thread:                      compare, scatter g0 (scatter stream), ...

Only the last group's checksum and scatter come after the last byte arrived.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from shared.handoff import nccl
from shared.handoff.listener import Expected, ListeningReceiver
from shared.handoff.nccl_device import Device, Event
from shared.handoff.nccl_frames import (
    MASK64,
    SCHEME,
    Frame,
    Kind,
    message,
    read_burst,
    read_frame,
    read_payload,
)
from shared.handoff.nccl_pair import Fabric, NcclFabric, PairComm, connect_pair
from shared.handoff.nccl_staging import StagingPool
from shared.handoff.transport import HandoffError
from shared.handoff.wire import JOIN_TIMEOUT_S, ProtocolError

log = logging.getLogger(__name__)

# The recvs of one group complete together (one NCCL kernel): small enough that the first
# layers' checksums start while later layers are on the wire, large enough that small layers
# share a launch.
RECV_GROUP_BYTES = 64 << 20


@dataclass(eq=False)
class _Expected(Expected):
    """A handoff the NCCL receiver accepts: layers arrive (DATA) before they are delivered."""

    arrived: set[int] = field(default_factory=set)  # layers whose DATA came
    link: _Link | None = None  # the connection its frames arrive on

    def rejects(self, frame: Frame) -> str:
        if self.closed:
            return "handoff cancelled or failed"
        return self.mismatch(frame.layer, frame.num_layers, frame.nbytes, self.arrived)


@dataclass(frozen=True)
class _Arrival:
    """An accepted layer whose recv is posted."""

    frame: Frame
    state: _Expected
    buf: torch.Tensor  # [nbytes] uint8 staging buffer on the device
    received: Event  # on the recv stream, after the recv group that writes buf


@dataclass(eq=False)
class _Landing:
    """A layer received into a staging buffer, waiting for its CKSUM frame."""

    state: _Expected
    layer: int
    buf: torch.Tensor  # [nbytes] uint8 on the device, written by the recv stream
    checksums: torch.Tensor  # [k] int64, pinned host: checksums of one recv group's layers
    index: int  # this layer's entry in checksums
    ready: Event  # the group's recvs and checksums done (on the check stream)


def _recv_groups(frames: list[Frame]) -> list[list[Frame]]:
    """Consecutive DATA frames in groups of at most RECV_GROUP_BYTES (a larger layer alone)."""
    groups: list[list[Frame]] = []
    size = 0
    for frame in frames:
        if not groups or size + frame.nbytes > RECV_GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(frame)
        size += frame.nbytes
    return groups


class _Link:
    """Decode side of one prefill's control connection and communicator."""

    def __init__(self, conn: socket.socket, dev: Device, staging_bytes: int) -> None:
        self.conn = conn
        self.comm: PairComm | None = None
        self.recv_stream = dev.stream()  # only recvs: they go back to back
        self.check_stream = dev.stream()  # checksums of received layers, off the recv stream
        self.scatter_stream = dev.stream()
        readers = [self.check_stream, self.scatter_stream]
        self.staging = StagingPool(dev, self.recv_stream, readers, staging_bytes)
        self.landings: dict[tuple[bytes, int], _Landing] = {}  # only the connection's thread
        self.verify: queue.SimpleQueue[tuple[_Landing, int] | None] = queue.SimpleQueue()
        self._write_lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            self.conn.sendall(data)


class NcclKVReceiver(ListeningReceiver[_Expected]):
    """Decode side of the NCCL transport (implements transport.KVReceiver).

    Listens for control connections on `bind_host:port`; advertises nccl://advertise_host:port.
    Layers land in staging buffers on the device (never in memory that was not reserved), are
    checksummed on the GPU, verified, then handed to on_layer on this receiver's scatter stream,
    with the staging buffer ([layer_nbytes] uint8 on the device) as the payload. Each link keeps
    up to `staging_bytes` of free staging buffers for the next layers.
    """

    def __init__(
        self, device: torch.device | str, bind_host: str = "127.0.0.1", port: int = 0,
        advertise_host: str | None = None, fabric: Fabric | None = None,
        setup_timeout: float = 60.0, max_layer_bytes: int = 1 << 34,
        staging_bytes: int = 2 << 30,
    ) -> None:  # fmt: skip
        super().__init__(bind_host, port, advertise_host, _Expected, "nccl", SCHEME)
        self.dev = Device(torch.device(device))
        self.fabric = fabric or NcclFabric()
        self.setup_timeout = setup_timeout
        self.max_layer_bytes = max_layer_bytes
        self.staging_bytes = staging_bytes
        self._links: set[_Link] = set()  # guarded by _lock

    @property
    def num_links(self) -> int:
        with self._lock:
            return len(self._conns)

    @property
    def staging_allocations(self) -> int:
        """Staging buffers the live links allocated so far: constant in steady state."""
        with self._lock:
            return sum(link.staging.allocated for link in self._links)

    def _serve(self, conn: socket.socket) -> None:
        self.dev.bind_thread()
        link = _Link(conn, self.dev, self.staging_bytes)
        with self._lock:
            self._links.add(link)
        verifier = threading.Thread(target=self._verify_loop, args=(link,), name="nccl-verify")
        verifier.daemon = True
        try:
            self._handshake(link)
            verifier.start()
            while burst := read_burst(conn):
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
            link.comm = connect_pair(self.fabric, self.dev, unique_id, 1, self.setup_timeout)
        except HandoffError as exc:
            link.send(message(Kind.NACK, text=str(exc)))
            raise
        link.send(message(Kind.READY))

    def _drop(self, link: _Link, verifier: threading.Thread) -> None:
        with self._lock:
            self._links.discard(link)
        self._disconnected(link.conn, lambda s: s.link is link)
        if link.comm is not None:
            with contextlib.suppress(nccl.NcclError):
                link.comm.abort()  # ends recvs still waiting on the dead peer
        link.verify.put(None)
        if verifier.is_alive():
            verifier.join(JOIN_TIMEOUT_S)
        link.landings.clear()
        link.staging.clear()
        link.conn.close()

    # -- the connection's thread

    def _on_burst(self, link: _Link, burst: list[tuple[Frame, bytes]]) -> None:
        """Frames that arrived together: recvs for all their DATA first, then each in order."""
        posted = iter(self._post_recvs(link, [f for f, _ in burst if f.kind == Kind.DATA]))
        arrivals: list[_Arrival] = []
        for frame, payload in burst:
            if frame.kind == Kind.DATA:
                buf, received = next(posted)
                state = self._accept_layer(link, frame)
                if state is None:  # the recv still lands (NCCL's order must hold), then frees
                    link.staging.give(buf, received)
                else:
                    arrivals.append(_Arrival(frame, state, buf, received))
            elif frame.kind == Kind.CKSUM:
                self._checksum(link, arrivals)
                arrivals = []
                landing = link.landings.pop((frame.handoff_id, frame.layer), None)
                if landing is not None:
                    link.verify.put((landing, frame.value))
            elif frame.kind == Kind.ABORT:
                state = self._get(frame.handoff_id)
                if state is not None:
                    reason = payload.decode(errors="replace")
                    self._fail(state, f"aborted by sender: {reason}")
            else:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")
        self._checksum(link, arrivals)
        self._sweep(link)

    def _post_recvs(self, link: _Link, datas: list[Frame]) -> list[tuple[torch.Tensor, Event]]:
        """A recv for every DATA frame (also rejected ones: NCCL's order must hold), in groups
        of at most RECV_GROUP_BYTES: (staging buffer, event after its group) per frame."""
        if any(f.nbytes > self.max_layer_bytes for f in datas):
            raise ProtocolError(f"a layer of more than {self.max_layer_bytes} bytes")
        assert link.comm is not None
        posted: list[tuple[torch.Tensor, Event]] = []
        for group in _recv_groups(datas):
            bufs = [link.staging.take(f.nbytes) for f in group]
            with self.fabric.group():
                for buf in bufs:
                    link.comm.recv(buf, 0, link.recv_stream)
            received = Event(link.recv_stream)
            posted += [(buf, received) for buf in bufs]
        return posted

    def _accept_layer(self, link: _Link, frame: Frame) -> _Expected | None:
        """The handoff a DATA frame's layer belongs to, or None (rejected: NACKed)."""
        state = self._get(frame.handoff_id)
        error = "handoff not expected (reserve first)"
        if state is not None:
            with state.lock:
                state.started = state.started or time.perf_counter()
                error = state.rejects(frame)
                state.arrived.add(frame.layer)
                state.link = link
        if state is None or error:
            self._reject(link, frame.handoff_id, state, error)
            return None
        return state

    def _checksum(self, link: _Link, arrivals: list[_Arrival]) -> None:
        """Checksum accepted layers on the check stream, each recv group's once it landed (the
        recv stream goes on receiving); they wait for their CKSUM frames."""
        for received, grouped in itertools.groupby(arrivals, key=lambda a: a.received):
            group = list(grouped)
            with self.dev.on(link.check_stream):
                self.dev.wait(link.check_stream, received)
                sums = self.dev.checksums([a.buf for a in group])
                ready = Event(link.check_stream)
            for i, a in enumerate(group):
                landing = _Landing(a.state, a.frame.layer, a.buf, sums, i, ready)
                link.landings[(a.frame.handoff_id, a.frame.layer)] = landing

    def _sweep(self, link: _Link) -> None:
        """Give back the buffers of layers whose handoff closed before their CKSUM came (the
        sender stops checksumming a handoff once it failed)."""
        for key in [key for key, landing in link.landings.items() if landing.state.closed]:
            landing = link.landings.pop(key)
            link.staging.give(landing.buf, landing.ready)

    # -- the verify thread

    def _verify_loop(self, link: _Link) -> None:
        self.dev.bind_thread()
        while (item := link.verify.get()) is not None:
            landing, expected = item
            landing.ready.synchronize()
            self._verify(link, landing, expected)

    def _verify(self, link: _Link, landing: _Landing, expected: int) -> None:
        """Deliver a landed layer if its checksum is `expected`. Its staging buffer goes back to
        the pool (after its last reader) before the handoff is settled."""
        state = landing.state
        if int(landing.checksums[landing.index]) & MASK64 != expected:
            link.staging.give(landing.buf, landing.ready)
            self._reject(link, state.key, state, f"checksum mismatch on layer {landing.layer}")
            return
        with state.lock:
            if state.closed:
                link.staging.give(landing.buf, landing.ready)
                return
            with self.dev.on(link.scatter_stream):
                error = state.deliver(landing.layer, landing.buf)
                released = Event(link.scatter_stream)
            link.staging.give(landing.buf, released)
            done = not error and len(state.layers) == state.num_layers
            if done:  # the scatters must have landed before decode reads the blocks
                released.synchronize()
        if error:
            self._reject(link, state.key, state, error)
        elif done:
            self._complete(link, state)

    def _complete(self, link: _Link, state: _Expected) -> None:
        if self._close(state, ok=True):
            link.send(message(Kind.ACK, state.key))

    def _reject(self, link: _Link, key: bytes, state: _Expected | None, error: str) -> None:
        if state is not None:
            self._fail(state, error)
        link.send(message(Kind.NACK, key, error))
