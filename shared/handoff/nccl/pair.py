"""The pairs of the NCCL transport: a 2-rank communicator per (prefill, decode) pair, made by a
Fabric (NCCL on GPUs, an in-process loopback in CPU tests) and connected by `connect_pair`; the
prefill side of a pair (Peer: unique id over gRPC (link), control connection +
communicator + send stream); and the sender's LRU cache of them (PairCache)."""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import torch

from kvmesh.shared.handoff.channel import SendChannel, SenderConnection
from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.nccl.frames import (
    Frame,
    NcclFrameKind,
    message,
    parse_nccl_endpoint,
    read_frame,
    read_payload,
)
from kvmesh.shared.handoff.nccl.link import LinkOpener
from kvmesh.shared.handoff.nccl.streams import HIGH_PRIORITY, DeviceStreams
from kvmesh.shared.handoff.transport import HandoffError
from kvmesh.shared.handoff.wire import ProtocolError, connect, settle, shutdown

log = logging.getLogger(__name__)

# A thread that reads replies in await_reply polls the control connection for up to this long
# before it sleeps in select(): one that wakes from select() settles its handoff later after the
# receiver's ACK, by a good share of a small handoff's time (benchmarks/RESULTS.md, "Constants
# the code cites"). Bounded: finish() usually comes shortly before the ACK (after the prefill's
# last layer, or a bulk handoff's sends), and one thread a pair polls.
REPLY_POLL_S = 0.002


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


def connect_pair(
    fabric: Fabric, dev: DeviceStreams, unique_id: bytes, rank: int, timeout: float,
    peer_gave_up: Future[Any] | None = None,
) -> PairComm:  # fmt: skip
    """Init rank `rank` of the pair's communicator and connect rank 0 -> 1 with a 1-byte probe
    (NCCL connects lazily: afterwards a send only enqueues). Gives it up (aborted once its init
    returned: nccl.Communicator) on failure or timeout, or as soon as `peer_gave_up` (the peer's
    answer, if given) fails: then the other rank will never join, and waiting out the timeout
    would only hold the caller."""
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
            settle(done)
        except BaseException as exc:  # reported to the caller through `done`
            settle(done, exc)

    threading.Thread(target=run, name="nccl-setup", daemon=True).start()
    if peer_gave_up is not None:
        wait([done, peer_gave_up], timeout, return_when=FIRST_COMPLETED)
        if not done.done() and peer_gave_up.done() and peer_gave_up.exception() is not None:
            comm.abort()  # the init waiting for the peer's rank is left to itself
            raise HandoffError(str(peer_gave_up.exception()))
    try:
        done.result(timeout)
    except FutureTimeout:
        comm.abort()
        raise HandoffError(f"NCCL pair setup timed out after {timeout} s") from None
    except Exception as exc:
        comm.abort()
        raise HandoffError(f"NCCL pair setup failed: {exc}") from exc
    return comm


class PairOwner(Protocol):
    """What a pair needs of the sender that owns it (NcclKVSender): how to set it up, and the
    cache it leaves when it is torn down."""

    @property
    def dev(self) -> DeviceStreams: ...
    @property
    def fabric(self) -> Fabric: ...
    @property
    def links(self) -> LinkOpener: ...
    @property
    def pairs(self) -> PairCache: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def setup_timeout(self) -> float: ...


class Peer(SenderConnection[SendChannel]):  # its channels: NcclSendChannel (which imports this)
    """Prefill side of one decode receiver: control connection + communicator + send stream.
    `lock` also guards comm: launches vs abort; `dead` says why the pair was torn down.

    The receiver's replies are read by one thread at a time: the pair's reader thread, unless
    threads wait in await_reply (finish()). Then one of those reads, so that its own ACK wakes
    it directly, without a hand-over between threads on the way; the reader thread takes its
    turn back once none waits, and notices a receiver that dies while none does."""

    def __init__(self, sender: PairOwner, endpoint: str, decode_address: str) -> None:
        super().__init__(endpoint)
        self.sender = sender
        self._write_lock = threading.Lock()
        address = parse_nccl_endpoint(endpoint)
        # the unique id goes over gRPC first (link); the HELLO names only its link
        self.link_id = str(uuid.uuid4())
        unique_id = sender.fabric.unique_id()
        sender.links(decode_address, endpoint, self.link_id, unique_id, sender.connect_timeout)
        self.sock = connect(endpoint, address, sender.connect_timeout)
        try:
            self.comm = self._handshake(unique_id)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self.stream = sender.dev.stream(HIGH_PRIORITY)
        # only the sender thread: messages sent since the last SUMS frame (their checksums follow
        # in a later round), and their bytes
        self.unsummed: list[Any] = []
        self.unsummed_bytes = 0
        # the reading turn: `_reading` while a thread reads, `_wanted` threads in await_reply,
        # `_next` the events of those not reading, in arrival order (the turn goes to the
        # first); a byte on `_wake` makes the reader thread give its turn up
        self._turn = threading.Condition()
        self._reading = False
        self._wanted = 0
        self._next: collections.deque[threading.Event] = collections.deque()
        self._woken, self._wake = socket.socketpair()
        self._reader = threading.Thread(target=self._read_loop, name="nccl-ack", daemon=True)
        self._reader.start()

    def _handshake(self, unique_id: bytes) -> PairComm:
        sender = self.sender
        self.sock.sendall(message(NcclFrameKind.HELLO, text=self.link_id))
        reply: Future[Frame] = Future()

        def read_reply() -> None:
            try:
                self.sock.settimeout(sender.setup_timeout)
                frame = read_frame(self.sock)
                if frame is None or frame.kind not in (NcclFrameKind.READY, NcclFrameKind.NACK):
                    raise ProtocolError("receiver closed or answered HELLO with no READY")
                if frame.kind == NcclFrameKind.NACK:
                    why = read_payload(self.sock, frame).decode(errors="replace")
                    raise HandoffError(f"receiver could not set up NCCL: {why}")
                settle(reply, value=frame)
            except BaseException as exc:
                settle(reply, exc)
                shutdown(self.sock)  # the peer is gone: do not wait for its rank

        threading.Thread(target=read_reply, name="nccl-hello", daemon=True).start()
        try:
            comm = connect_pair(
                sender.fabric, sender.dev, unique_id, 0, sender.setup_timeout, peer_gave_up=reply
            )
        except HandoffError as exc:
            raise HandoffError(f"NCCL setup with {self.endpoint} failed: {exc}") from exc
        try:
            reply.result(sender.setup_timeout)
        except Exception as exc:
            comm.abort()
            raise HandoffError(f"NCCL setup with {self.endpoint} failed: {exc}") from exc
        return comm

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
        self.sender.pairs.forget(self)
        for channel in channels:
            channel.fail(HandoffError(f"connection to {self.endpoint} lost: {reason}"))
        shutdown(self.sock)
        with contextlib.suppress(nccl.NcclError):
            self.comm.abort()  # ends send kernels still waiting on the peer

    def await_reply(self, done: Future[None], timeout: float) -> None:
        if done.done():  # its reply came already
            return done.result(0)
        deadline = time.monotonic() + timeout
        woken = threading.Event()  # by its reply, or when the reading turn is passed to it
        done.add_done_callback(lambda _: woken.set())
        with self._turn:
            self._wanted += 1
            self._next.append(woken)
        with contextlib.suppress(OSError):  # closed: the reader thread has ended
            self._wake.send(b"\0")
        try:
            while not done.done():
                with self._turn:
                    mine = not self._reading
                    if mine:
                        self._reading = True
                        self._next.remove(woken)
                if not mine:  # another thread reads: it may read this reply too
                    left = deadline - time.monotonic()
                    if left <= 0 or not woken.wait(left):
                        raise FutureTimeout
                    woken.clear()
                    continue
                try:
                    self._read_until(done, deadline)
                finally:
                    self._end_turn()
                if self.dead and not done.done():  # not this link's handoff any more
                    raise HandoffError(f"connection to {self.endpoint} lost: {self.dead}")
        finally:
            with self._turn:
                self._wanted -= 1
                if woken in self._next:
                    self._next.remove(woken)
                self._pass_turn()
        done.result(0)  # the channel's error, if it failed

    def _read_until(self, done: Future[None], deadline: float) -> None:
        """Read replies (in this thread's turn) until `done` is settled or the connection ended:
        FutureTimeout at the deadline. Polls for REPLY_POLL_S, then sleeps between replies."""
        poll_until = time.monotonic() + REPLY_POLL_S
        while not done.done():
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise FutureTimeout
            try:
                readable = select.select([self.sock], [], [], 0 if now < poll_until else left)[0]
            except (OSError, ValueError):  # closed: the pair is torn down
                return
            if readable and not self._read_reply():
                return

    def _end_turn(self) -> None:
        with self._turn:
            self._reading = False
            self._pass_turn()

    def _pass_turn(self) -> None:
        """If no thread reads: wake the first waiter in await_reply to read, else (none waits)
        the reader thread; under `_turn`. One thread is woken, not every waiter."""
        if self._reading:
            return
        if self._next:
            self._next[0].set()
        elif not self._wanted:
            self._turn.notify_all()

    def _read_reply(self) -> bool:
        """Read one reply and settle its handoff; False once the connection ended (the pair is
        torn down)."""
        try:
            frame = read_frame(self.sock)
            if frame is not None:
                text = read_payload(self.sock, frame).decode(errors="replace")
                self.on_reply(frame.handoff_id, frame.kind.name, text)
                return True
            reason = "receiver closed the connection"
        except (OSError, ConnectionError) as exc:
            reason = str(exc) or type(exc).__name__
        self.die(reason)
        return False

    def _read_loop(self) -> None:
        """The reader thread: reads replies whenever no thread waits in await_reply."""
        try:
            alive = True
            while alive:
                with self._turn:
                    while self._wanted or self._reading:
                        self._turn.wait()
                    self._reading = True
                try:
                    readable = select.select([self.sock, self._woken], [], [])[0]
                    if self._woken in readable:
                        self._woken.recv(4096)
                    if self.sock in readable:
                        alive = self._read_reply()
                finally:
                    self._end_turn()
        except (OSError, ValueError) as exc:  # the socket was closed under it
            self.die(str(exc) or type(exc).__name__)
        finally:
            self.sock.close()
            self._woken.close()
            self._wake.close()


class PairCache:
    """The sender's pairs, one per decode endpoint, least recently used first: making a pair
    tears down (ncclCommAbort) the least recently used idle ones beyond `max_peers`."""

    def __init__(self, max_peers: int) -> None:
        self.max_peers = max_peers
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._peers: collections.OrderedDict[str, Peer] = collections.OrderedDict()

    @property
    def endpoints(self) -> list[str]:
        """Endpoints with a live pair, least recently used first."""
        with self._lock:
            return list(self._peers)

    def get(self, endpoint: str, make: Callable[[str], Peer]) -> Peer:
        """The live pair with `endpoint`, made by `make` if there is none."""
        with self._setup_lock:  # one setup at a time; others reuse what it made
            with self._lock:
                peer = self._peers.get(endpoint)
                if peer is not None and not peer.dead:
                    self._peers.move_to_end(endpoint)
                    return peer
            peer = make(endpoint)
            with self._lock:
                self._peers[endpoint] = peer
                idle = [p for p in self._peers.values() if not p.busy and p is not peer]
                evict = idle[: max(0, len(self._peers) - self.max_peers)]
            for old in evict:
                old.die("evicted from the pair cache")
            return peer

    def forget(self, peer: Peer) -> None:
        with self._lock:
            if self._peers.get(peer.endpoint) is peer:
                del self._peers[peer.endpoint]

    def clear(self, reason: str) -> None:
        """Tear every pair down."""
        with self._lock:
            peers, self._peers = list(self._peers.values()), collections.OrderedDict()
        for peer in peers:
            peer.die(reason)
