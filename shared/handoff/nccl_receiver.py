"""Decode side of the NCCL transport (control protocol: nccl_frames).

A thread per prefill connection reads control frames in bursts: one group of ncclRecvs for the
DATA frames of a burst, on the link's recv stream (recvs only: they go back to back), into
staging buffers; the check stream checksums accepted layers; a verify thread compares each with
its CKSUM frame, then hands the layer to on_layer on the scatter stream.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import torch

from shared.handoff import nccl
from shared.handoff.listener import Expected, ListeningReceiver
from shared.handoff.nccl_checksum import MASK64, Checksummer
from shared.handoff.nccl_device import Device, Event
from shared.handoff.nccl_frames import (
    SCHEME,
    Frame,
    Kind,
    message,
    read_burst,
    read_frame,
    read_payload,
)
from shared.handoff.nccl_pair import Fabric, NcclFabric, PairComm, connect_pair
from shared.handoff.transport import HandoffError
from shared.handoff.wire import JOIN_TIMEOUT_S, ProtocolError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Expected(Expected):
    """A handoff the NCCL receiver accepts: layers arrive (DATA) before they are delivered."""

    arrived: set[int] = field(default_factory=set)  # layers whose DATA came
    link: _Link | None = None  # the connection its frames arrive on

    def rejects(self, frame: Frame) -> str:
        if self.closed:
            return "handoff cancelled or failed"
        return self.mismatch(frame.layer, frame.num_layers, frame.nbytes, self.arrived)


@dataclass(eq=False)
class _Landing:
    """A layer received into a staging buffer, waiting for its CKSUM frame."""

    state: _Expected
    layer: int
    buf: torch.Tensor  # [nbytes] uint8 on the device, written by the recv stream
    checksums: torch.Tensor  # [k] int64, pinned host: the checksums of one burst of layers
    index: int  # this layer's entry in checksums
    ready: Event  # recvs + checksums of the burst done (on the check stream)


class _Link:
    """Decode side of one prefill's control connection and communicator."""

    def __init__(self, conn: socket.socket, dev: Device) -> None:
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


class NcclKVReceiver(ListeningReceiver[_Expected]):
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
        super().__init__(bind_host, port, advertise_host, _Expected, "nccl", SCHEME)
        self.dev = Device(torch.device(device))
        self.fabric = fabric or NcclFabric()
        self.setup_timeout = setup_timeout
        self.max_layer_bytes = max_layer_bytes

    @property
    def num_links(self) -> int:
        with self._lock:
            return len(self._conns)

    def _serve(self, conn: socket.socket) -> None:
        self.dev.bind_thread()
        link = _Link(conn, self.dev)
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
        self._disconnected(link.conn, lambda s: s.link is link)
        if link.comm is not None:
            with contextlib.suppress(nccl.NcclError):
                link.comm.abort()  # ends recvs still waiting on the dead peer
        link.verify.put(None)
        if verifier.is_alive():
            verifier.join(JOIN_TIMEOUT_S)
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
                state = self._get(frame.handoff_id)
                if state is not None:
                    reason = payload.decode(errors="replace")
                    self._fail(state, f"aborted by sender: {reason}")
            else:
                raise ProtocolError(f"unexpected {frame.kind.name} frame from a sender")
        self._land(link, landed, received)

    def _post_recvs(self, link: _Link, datas: list[Frame]) -> tuple[list[torch.Tensor], Event]:
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
            received = Event(link.recv_stream)
        return bufs, received

    def _accept_layer(
        self, link: _Link, frame: Frame, buf: torch.Tensor,
        landed: list[tuple[Frame, _Expected, torch.Tensor]],
    ) -> None:  # fmt: skip
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
            return  # buf is freed in stream order: the recv still lands, then is dropped
        landed.append((frame, state, buf))

    def _land(
        self, link: _Link, landed: list[tuple[Frame, _Expected, torch.Tensor]], received: Event
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
            ready = Event(link.check_stream)
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
                    error = state.deliver(landing.layer, landing.buf)
                    self.dev.keep(landing.buf, link.scatter_stream)
                    done = not error and len(state.layers) == state.num_layers
                    if done:  # the scatters must have landed before decode reads the blocks
                        Event(link.scatter_stream).synchronize()
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
