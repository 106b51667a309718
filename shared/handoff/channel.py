"""What the senders share: a handoff's sender-side state (SendChannel), a connection's table of
the handoffs open on it, which the receiver's ACK/NACK replies settle (SenderConnection), and a
sender's live connection per endpoint (Connections)."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Generic, Protocol, TypeVar

from kvmesh.shared.handoff.transport import HandoffError, HandoffStats, handoff_id_bytes
from kvmesh.shared.handoff.wire import ProtocolError, settle

ChannelT = TypeVar("ChannelT", bound="SendChannel")


class Connection(Protocol):
    """What Connections keeps: a connection that says why it died (empty while alive)."""

    dead: str

    def close(self) -> None: ...


ConnectionT = TypeVar("ConnectionT", bound=Connection)


class SenderConnection(Generic[ChannelT]):
    """One connection to a receiver, shared by the handoffs to it (each a transport's ChannelT).
    `lock` guards `channels` and `dead`."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.dead = ""  # why the connection died; empty while alive
        self.lock = threading.Lock()
        self.channels: dict[bytes, ChannelT] = {}

    def add(self, channel: ChannelT) -> None:
        with self.lock:
            if self.dead:
                raise HandoffError(f"connection to {self.endpoint} lost: {self.dead}")
            if channel.key in self.channels:
                raise ValueError(f"handoff {channel.handoff_id} is already open")
            self.channels[channel.key] = channel

    def remove(self, channel: SendChannel) -> None:
        with self.lock:
            if self.channels.get(channel.key) is channel:
                del self.channels[channel.key]

    def await_reply(self, done: Future[None], timeout: float) -> None:
        """Wait until `done` (a channel's future, settled by the replies) is settled:
        FutureTimeout after `timeout` seconds, the channel's error if it failed."""
        done.result(timeout)

    def on_reply(self, handoff_id: bytes, kind: str, text: str) -> None:
        """Settle a handoff by the receiver's reply: `kind` is the frame kind's name, ACK or
        NACK (with `text` the reason); any other kind is a ProtocolError."""
        with self.lock:
            channel = self.channels.get(handoff_id)
        if channel is None:
            return  # a late reply for a handoff that already ended
        if kind == "ACK":
            channel.acked()
        elif kind == "NACK":
            channel.fail(HandoffError(f"receiver rejected handoff {channel.handoff_id}: {text}"))
        else:
            raise ProtocolError(f"unexpected {kind} frame from a receiver")


class Connections(Generic[ConnectionT]):
    """A sender's connection per endpoint: made by `connect(endpoint)` on first use, and again
    once the one it has died."""

    def __init__(self, connect: Callable[[str], ConnectionT]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._conns: dict[str, ConnectionT] = {}

    def get(self, endpoint: str) -> ConnectionT:
        with self._lock:
            conn = self._conns.get(endpoint)
            if conn is None or conn.dead:
                conn = self._conns[endpoint] = self._connect(endpoint)
            return conn

    def live(self, endpoint: str) -> bool:
        """Whether a live connection to `endpoint` exists."""
        with self._lock:
            conn = self._conns.get(endpoint)
            return conn is not None and not conn.dead

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()


class SendChannel(ABC):
    """The bookkeeping of one handoff being pushed: the layers queued, and the future the
    receiver's reply (or a failure) settles. A transport adds send_layer, finish and abort."""

    def __init__(self, handoff_id: str, num_layers: int) -> None:
        self.handoff_id, self.num_layers = handoff_id, num_layers
        self.key = handoff_id_bytes(handoff_id)
        self._done: Future[None] = Future()
        self._queued: set[int] = set()
        self._nbytes = 0
        self._first_send = 0.0
        self._acked_at = 0.0

    @property
    def failed(self) -> bool:
        return self._done.done() and self._done.exception() is not None

    def queue(self, layer: int, count: int = 1) -> None:
        """Bookkeeping of send_layer (of `count` layers from `layer`): HandoffError if failed,
        ValueError if out of range or repeated."""
        if self.failed:
            error = self._done.exception()
            assert isinstance(error, HandoffError)
            raise error
        layers = range(layer, layer + count)
        if count < 1 or layer < 0 or layer + count > self.num_layers:
            raise ValueError(f"layers {layer}..{layer + count - 1} out of [0, {self.num_layers})")
        if not self._queued.isdisjoint(layers):
            raise ValueError(f"a layer of {layer}..{layer + count - 1} repeated")
        self._queued.update(layers)
        self._first_send = self._first_send or time.perf_counter()

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Give up: the receiver fails the handoff with `reason` (best effort)."""

    def _await_ack(self, timeout: float, connection: SenderConnection[Any]) -> None:
        """Wait for the receiver's ACK (HandoffError, after aborting, if none comes), then
        leave `connection`'s table."""
        try:
            if len(self._queued) != self.num_layers:
                raise HandoffError(f"finish() after {len(self._queued)}/{self.num_layers} layers")
            connection.await_reply(self._done, timeout)
        except FutureTimeout:
            self.abort(f"sender saw no ACK within {timeout} s")
            raise HandoffError(f"handoff {self.handoff_id}: no ACK within {timeout} s") from None
        except HandoffError as exc:
            self.abort(str(exc))
            raise
        finally:
            connection.remove(self)

    def _stats(self, layer_times: Callable[[], list[float]]) -> HandoffStats:
        """The statistics of the ACKed handoff (`layer_times`: seconds per layer, on demand)."""
        seconds = max(self._acked_at - self._first_send, 1e-9)
        return HandoffStats(self._nbytes, seconds, self._nbytes / seconds / 1e9, layer_times)

    # -- called from the connection's threads

    def acked(self) -> None:
        self._acked_at = time.perf_counter()
        settle(self._done)

    def fail(self, error: HandoffError) -> None:
        settle(self._done, error)
