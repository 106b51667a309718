"""What both receivers share: a TCP listener with a thread per connection, and the table of the
handoffs they expect. A transport subclasses ListeningReceiver and defines `_serve(conn)`."""

from __future__ import annotations

import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from kvmesh.shared.handoff.transport import HandoffResult, LayerCallback, handoff_id_bytes
from kvmesh.shared.handoff.wire import JOIN_TIMEOUT_S, format_endpoint, settle, shutdown, tune


@dataclass(eq=False)
class Expected:
    """One handoff the receiver accepts. `lock` serializes on_layer against cancel/fail."""

    key: bytes  # the handoff id's 16 wire bytes
    num_layers: int
    layer_nbytes: int
    on_layer: LayerCallback
    future: Future[HandoffResult] = field(default_factory=Future)
    lock: threading.RLock = field(default_factory=threading.RLock)
    layers: set[int] = field(default_factory=set)  # layers delivered to on_layer
    nbytes: int = 0
    started: float = 0.0  # perf_counter of the first frame, 0 before
    closed: bool = False  # completed, failed or cancelled: on_layer is never called again

    def mismatch(self, layer: int, num_layers: int, nbytes: int, seen: set[int]) -> str:
        """Why a frame announcing `layer` of `num_layers`, of `nbytes`, does not fit this handoff
        ('' if it does); `seen`: the layers already taken."""
        if num_layers != self.num_layers:
            return f"num_layers {num_layers} != expected {self.num_layers}"
        if nbytes != self.layer_nbytes:
            return f"layer of {nbytes} bytes != expected {self.layer_nbytes}"
        if layer >= self.num_layers or layer in seen:
            return f"layer {layer} out of range or repeated"
        return ""

    def deliver(self, layer: int, payload: torch.Tensor) -> str:
        """Hand one layer ([layer_nbytes] uint8) to on_layer; why that failed ('' if it did not)."""
        try:
            self.on_layer(layer, payload)
        except Exception as exc:  # the consumer's bug must not kill the connection
            return f"on_layer failed on layer {layer}: {exc!r}"
        self.layers.add(layer)
        self.nbytes += payload.numel()
        return ""

    def result(self, ok: bool, error: str = "") -> HandoffResult:
        seconds = time.perf_counter() - self.started if self.started else 0.0
        return HandoffResult(ok=ok, nbytes=self.nbytes, seconds=seconds, error=error)


S = TypeVar("S", bound=Expected)


class ListeningReceiver(ABC, Generic[S]):
    """Binds `bind_host:port` (port 0: any free port); the endpoint it advertises uses
    `advertise_host` (default: the bound address), for when senders reach it by another name.

    `new_state` makes the transport's Expected entry; `name` prefixes the threads' names;
    `scheme` starts the advertised endpoint.
    """

    def __init__(
        self, bind_host: str, port: int, advertise_host: str | None,
        new_state: Callable[[bytes, int, int, LayerCallback], S], name: str, scheme: str,
    ) -> None:  # fmt: skip
        self.bind_host, self.port = bind_host, port
        self.advertise_host = advertise_host or bind_host
        self._new_state, self._name, self._scheme = new_state, name, scheme
        self._lock = threading.Lock()  # guards _expected, _conns and _closing
        self._expected: dict[bytes, S] = {}
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = False  # close() began: a connection that ends is ours going away
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    def start(self) -> str:
        family = socket.AF_INET6 if ":" in self.bind_host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.bind_host, self.port))
        listener.listen(64)
        self._listener, self.port = listener, listener.getsockname()[1]
        name = f"{self._name}-accept"
        self._acceptor = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._acceptor.start()
        return format_endpoint(self.advertise_host, self.port, self._scheme)

    def expect(
        self, handoff_id: str, num_layers: int, layer_nbytes: int, on_layer: LayerCallback
    ) -> Future[HandoffResult]:
        key = handoff_id_bytes(handoff_id)
        state = self._new_state(key, num_layers, layer_nbytes, on_layer)
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
            shutdown(self._listener)
            self._listener.close()
        with self._lock:
            self._closing = True
            conns, states = dict(self._conns), list(self._expected.values())
        for conn in conns:  # first: a sender sees the connection go, not its handoffs rejected
            shutdown(conn)
        for state in states:
            self._fail(state, "receiver closed")
        for thread in [*conns.values(), *([self._acceptor] if self._acceptor else [])]:
            thread.join(JOIN_TIMEOUT_S)

    # -- connection threads

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # listener closed
                return
            tune(conn)
            name = f"{self._name}-recv"
            thread = threading.Thread(target=self._serve, args=(conn,), name=name, daemon=True)
            with self._lock:  # started under the lock: close() never joins an unstarted thread
                self._conns[conn] = thread
                thread.start()

    @abstractmethod
    def _serve(self, conn: socket.socket) -> None:
        """Read the connection's frames until it closes (on its own thread)."""

    def _disconnected(self, conn: socket.socket, orphaned: Callable[[S], bool]) -> None:
        """Forget `conn` and fail the handoffs whose frames arrived on it (the receiver's own
        close() may be why it ended: then they fail as closed, whichever thread gets there
        first)."""
        with self._lock:
            self._conns.pop(conn, None)
            orphans = [s for s in self._expected.values() if orphaned(s)]
            why = "receiver closed" if self._closing else "sender disconnected mid-handoff"
        for state in orphans:
            self._fail(state, why)

    # -- the table of expected handoffs

    def _get(self, key: bytes) -> S | None:
        with self._lock:
            return self._expected.get(key)

    def _fail(self, state: S, error: str) -> None:
        self._close(state, ok=False, error=error)

    def _close(self, state: S, ok: bool, error: str = "") -> bool:
        """Complete or fail the handoff unless it already is; True if this call did."""
        with state.lock:
            if state.closed:
                return False
            state.closed = True
            self._forget(state)
            settle(state.future, value=state.result(ok=ok, error=error))  # its waiter may be gone
        return True

    def _forget(self, state: S) -> None:
        with self._lock:
            if self._expected.get(state.key) is state:
                del self._expected[state.key]
