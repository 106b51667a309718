"""How a new NCCL pair's unique id reaches the decode worker: over the internal gRPC control
channel (Decode.OpenKVLink), not over the pair's own TCP control connection. A link is one such
pair (a 2-rank communicator and its control connection), named by its link id from its setup on.

    prefill (NcclKVSender, rank 0)                       decode (NcclKVReceiver, rank 1)
    link id (a UUID), unique id (ncclGetUniqueId)
    Decode.OpenKVLink(link id, unique id) ---gRPC--->    Rendezvous.offer(link id, unique id)
    connect nccl://host:port, HELLO(link id) --TCP-->    Rendezvous.take(link id) -> unique id
    ncclCommInitRank(rank 0) + probe       <-------->    ncclCommInitRank(rank 1) + probe, READY

The prefill worker learns the decode worker's gRPC address from PrefillRequest.decode_address
(the gateway's directory entry). The Rendezvous matches an id with its HELLO in either arrival
order; an id no HELLO takes, or a HELLO whose id never comes, expires after the setup timeout,
and it holds at most `max_pending` links.

Prefill side: GrpcLinkOpener (a LinkOpener). Decode side: offer_link, which the decode service's
OpenKVLink calls; LinkServicer / serve_links serve only that RPC, for processes that run an NCCL
receiver without a decode service (the GPU tests, benchmarks/bench_handoff).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc

from kvmesh.protos import worker_pb2, worker_pb2_grpc
from kvmesh.shared.handoff.nccl import binding as nccl
from kvmesh.shared.handoff.transport import HandoffError
from kvmesh.shared.telemetry.rpc_tracing import inject_metadata

MAX_PENDING_LINKS = 1024


class LinkRefused(Exception):
    """OpenKVLink cannot take this id; `code` is the gRPC status the RPC ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_link_id(link_id: str) -> None:
    """ValueError unless `link_id` is a UUID string."""
    try:
        uuid.UUID(link_id)
    except (ValueError, TypeError):
        raise ValueError(f"a link id is a UUID, not {link_id[:64]!r}") from None


@dataclass(eq=False)
class _Slot:
    deadline: float  # time.monotonic(): an untaken id is dropped after it
    unique_id: bytes | None = None
    taken: bool = False  # a HELLO waits for (or got) it
    arrived: threading.Event = field(default_factory=threading.Event)


class Rendezvous:
    """Matches unique ids delivered over gRPC (offer) with the HELLOs that name their link
    (take), in either order; entries live at most `timeout` seconds, `max_pending` at once."""

    def __init__(self, timeout: float, max_pending: int = MAX_PENDING_LINKS) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    @property
    def pending(self) -> int:
        """Links with an id or a HELLO waiting for its match (expired ones dropped)."""
        with self._lock:
            self._expire()
            return len(self._slots)

    def offer(self, link_id: str, unique_id: bytes) -> None:
        """The id of `link_id`, from Decode.OpenKVLink; LinkRefused says why it was not taken."""
        try:
            check_link_id(link_id)
        except ValueError as exc:
            raise LinkRefused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if len(unique_id) != nccl.UNIQUE_ID_BYTES:
            raise LinkRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"an NCCL unique id has {nccl.UNIQUE_ID_BYTES} bytes, not {len(unique_id)}",
            )
        with self._lock:
            if self._closed:
                raise LinkRefused(grpc.StatusCode.UNAVAILABLE, "the NCCL receiver is closed")
            self._expire()
            slot = self._slots.get(link_id)
            if slot is None:
                if len(self._slots) >= self.max_pending:
                    raise LinkRefused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{self.max_pending} NCCL pair setups already pending",
                    )
                slot = self._slots[link_id] = _Slot(time.monotonic() + self.timeout)
            elif slot.unique_id is not None:
                if slot.unique_id == unique_id:
                    return  # the same call again (a retry)
                raise LinkRefused(
                    grpc.StatusCode.ALREADY_EXISTS, f"link {link_id} already has a unique id"
                )
            slot.unique_id = unique_id
            slot.arrived.set()

    def take(self, link_id: str) -> bytes:
        """The id of `link_id`, for its HELLO: waits for it up to `timeout` seconds if it has not
        come yet; HandoffError if it does not come (or the link id is bad or already taken)."""
        try:
            check_link_id(link_id)
        except ValueError as exc:
            raise HandoffError(str(exc)) from None
        with self._lock:
            self._expire()
            slot = self._slots.get(link_id)
            if slot is None:
                if len(self._slots) >= self.max_pending:
                    raise HandoffError(f"{self.max_pending} NCCL pair setups already pending")
                slot = self._slots[link_id] = _Slot(time.monotonic() + self.timeout)
            elif slot.taken:
                raise HandoffError(f"link {link_id} is already being connected")
            slot.taken = True
        try:
            slot.arrived.wait(max(0.0, slot.deadline - time.monotonic()))
        finally:
            with self._lock:
                if self._slots.get(link_id) is slot:
                    del self._slots[link_id]
        if slot.unique_id is None:
            why = "the receiver closed" if self._closed else f"none within {self.timeout} s"
            raise HandoffError(
                f"no NCCL unique id for link {link_id} came over gRPC (Decode.OpenKVLink): {why}"
            )
        return slot.unique_id

    def close(self) -> None:
        """Drop every entry; HELLOs still waiting fail at once."""
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            slot.arrived.set()

    def _expire(self) -> None:
        """Drop untaken entries past their deadline (a taken one leaves with its HELLO)."""
        now = time.monotonic()
        for link_id in [k for k, s in self._slots.items() if not s.taken and s.deadline < now]:
            del self._slots[link_id]


# -- decode side


@runtime_checkable
class LinkReceiver(Protocol):
    """A receiver that sets up NCCL pairs (NcclKVReceiver; a MultiKVReceiver holding one)."""

    def offer_link(self, link_id: str, unique_id: bytes) -> None: ...


def offer_link(receiver: object, link_id: str, unique_id: bytes) -> None:
    """Decode.OpenKVLink: hand the id to this worker's NCCL receiver; LinkRefused says why not
    (FAILED_PRECONDITION when there is none, e.g. on a CPU worker)."""
    if not isinstance(receiver, LinkReceiver):
        raise LinkRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this decode worker has no NCCL receiver (KV over TCP only)",
        )
    receiver.offer_link(link_id, unique_id)


class LinkServicer(worker_pb2_grpc.DecodeServicer):
    """A synchronous Decode service with only OpenKVLink (the rest: UNIMPLEMENTED)."""

    def __init__(self, receiver: object) -> None:
        self.receiver = receiver

    def OpenKVLink(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            offer_link(self.receiver, request.link_id, request.nccl_unique_id)
        except LinkRefused as exc:
            context.abort(exc.code, str(exc))
        return worker_pb2.OpenKVLinkResponse()


def serve_links(receiver: object, host: str = "127.0.0.1") -> tuple[grpc.Server, str]:
    """Serve LinkServicer on host:<any free port>; returns (server, "host:port")."""
    server = grpc.server(ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-links"))
    worker_pb2_grpc.add_DecodeServicer_to_server(LinkServicer(receiver), server)
    port = server.add_insecure_port(f"{host}:0")
    if port == 0:
        raise OSError(f"could not bind a gRPC server on {host}")
    server.start()
    return server, f"{host}:{port}"


# -- prefill side


class LinkOpener(Protocol):
    """Delivers a new pair's unique id to the decode worker before its HELLO; HandoffError if it
    cannot. `endpoint`: the pair's nccl:// endpoint."""

    def __call__(
        self, decode_address: str, endpoint: str, link_id: str, unique_id: bytes, timeout: float
    ) -> None: ...


class GrpcLinkOpener:
    """Decode.OpenKVLink on a channel of its own per call (a pair is set up once, then cached),
    with the caller's trace context in its metadata. `connect` makes the channel to an address
    (the service's TLS credentials, when it has them)."""

    def __init__(
        self, prefill_worker_id: str = "",
        connect: Callable[[str], grpc.Channel] = grpc.insecure_channel,
    ) -> None:  # fmt: skip
        self.prefill_worker_id = prefill_worker_id
        self.connect = connect

    def __call__(
        self, decode_address: str, endpoint: str, link_id: str, unique_id: bytes, timeout: float
    ) -> None:
        if not decode_address:
            raise HandoffError(
                f"an NCCL pair with {endpoint} needs the decode worker's gRPC address "
                "(PrefillRequest.decode_address is empty)"
            )
        request = worker_pb2.OpenKVLinkRequest(
            link_id=link_id, nccl_unique_id=unique_id, prefill_worker_id=self.prefill_worker_id
        )
        try:
            with self.connect(decode_address) as channel:
                stub = worker_pb2_grpc.DecodeStub(channel)
                stub.OpenKVLink(request, timeout=timeout, metadata=inject_metadata())
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            raise HandoffError(
                f"Decode.OpenKVLink on {decode_address} failed ({name}): {details}"
            ) from exc
