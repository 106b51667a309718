"""Choosing the data plane (ARCHITECTURE.md invariant 5): IPC on one host, NCCL between CUDA
devices, TCP else.

A decode worker advertises every transport it accepts as one comma-separated kv_endpoint:

    ipc://host:p0?host=..&dev=..,nccl://host:p1?host=..&dev=..,tcp://host:p2

(IPC where its KV cache can be mapped by another process: on CUDA, or on CPU in shared memory;
NCCL on a GPU with NCCL; the tags: locality). A prefill worker tries, in order, those it can
use: IPC when it runs on the decode worker's host (same host id) and on a device of the same
kind; NCCL when it runs on CUDA with NCCL and not on the decode worker's card (NCCL cannot pair
a card with itself); then TCP. A transport whose setup with a peer failed is skipped for that
peer during a back-off (backoff.SetupBackoff): a failing peer costs one setup per back-off, not
one per request. A new NCCL pair's unique id reaches the decode worker over gRPC (nccl/link):
MultiKVReceiver.offer_link passes it to its NCCL receiver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

import grpc
import torch

from kvmesh.shared.handoff.backoff import SetupBackoff
from kvmesh.shared.handoff.ipc import IpcKVReceiver, IpcKVSender
from kvmesh.shared.handoff.ipc.memory import unexportable
from kvmesh.shared.handoff.locality import Place, here, tag, untag
from kvmesh.shared.handoff.nccl import (
    GrpcLinkOpener,
    LinkReceiver,
    NcclKVReceiver,
    NcclKVSender,
    offer_link,
    unavailable_reason,
)
from kvmesh.shared.handoff.tcp import SocketKVReceiver, SocketKVSender
from kvmesh.shared.handoff.transport import (
    HandoffError,
    HandoffResult,
    KVReceiver,
    KVSendChannel,
    LayerCallback,
    handoff_id_bytes,
)

log = logging.getLogger(__name__)


# the transports whose choice depends on where the receiver is: their endpoints carry a Place
_TAGGED = ("ipc", "nccl")


def split_endpoints(kv_endpoint: str) -> dict[str, str]:
    """'nccl://a:1?host=..,tcp://a:2' -> {'nccl': 'nccl://a:1', 'tcp': 'tcp://a:2'}."""
    return {scheme: untag(part)[0] for scheme, part in _parts(kv_endpoint).items()}


def endpoint_places(kv_endpoint: str) -> dict[str, Place]:
    """Where the receiver behind each tagged endpoint is: {'ipc': Place(...), ...}."""
    places = {scheme: untag(part)[1] for scheme, part in _parts(kv_endpoint).items()}
    return {scheme: place for scheme, place in places.items() if place is not None}


def _parts(kv_endpoint: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in kv_endpoint.split(","))):
        scheme, sep, _ = part.partition("://")
        if not sep:
            raise ValueError(f"endpoint without a scheme: {part!r}")
        out.setdefault(scheme, part)
    return out


def nccl_unusable(device: torch.device) -> str:
    """'' if this device can move KV over NCCL, else why not."""
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    return unavailable_reason()


class MultiKVReceiver:
    """Accepts each handoff on any of several receivers (implements transport.KVReceiver): the
    first to finish it decides the result, and the others stop expecting it."""

    def __init__(self, receivers: list[KVReceiver], place: Place | None = None) -> None:
        self.receivers = receivers
        self.place = place  # tags the IPC and NCCL endpoints, if given

    def start(self) -> str:
        endpoints = [r.start() for r in self.receivers]
        if self.place is not None:
            endpoints = [tag(e, self.place) if e.partition("://")[0] in _TAGGED else e
                         for e in endpoints]  # fmt: skip
        return ",".join(endpoints)

    def expect(
        self, handoff_id: str, num_layers: int, layer_nbytes: int, on_layer: LayerCallback
    ) -> Future[HandoffResult]:
        combined: Future[HandoffResult] = Future()

        def decide(done: Future[HandoffResult]) -> None:
            try:
                combined.set_result(done.result())
            except InvalidStateError:
                return
            for r in self.receivers:
                r.cancel(handoff_id)

        futures = [r.expect(handoff_id, num_layers, layer_nbytes, on_layer) for r in self.receivers]
        for f in futures:
            f.add_done_callback(decide)
        return combined

    def cancel(self, handoff_id: str) -> None:
        for r in self.receivers:
            r.cancel(handoff_id)

    def offer_link(self, link_id: str, unique_id: bytes) -> None:
        """A new NCCL pair's unique id (Decode.OpenKVLink) for the NCCL receiver among these."""
        for r in self.receivers:
            if isinstance(r, LinkReceiver):
                r.offer_link(link_id, unique_id)
                return
        offer_link(None, link_id, unique_id)  # refused: no NCCL receiver

    def close(self) -> None:
        for r in self.receivers:
            r.close()


def make_receiver(
    device: torch.device, bind_host: str, advertise_host: str | None = None,
    kv_cache: torch.Tensor | None = None,
) -> KVReceiver:  # fmt: skip
    """The decode worker's receiver: IPC if another process can map `kv_cache` (the engine's),
    NCCL on a CUDA device with NCCL, and TCP."""
    receivers: list[KVReceiver] = []
    if kv_cache is not None and not (why := unexportable(kv_cache)):
        receivers.append(IpcKVReceiver(kv_cache, bind_host, advertise_host=advertise_host))
    elif kv_cache is not None:
        log.info("no KV over IPC: %s", why)
    if why := nccl_unusable(device):
        log.info("no KV over NCCL: %s", why)
    else:
        receivers.append(NcclKVReceiver(device, bind_host=bind_host, advertise_host=advertise_host))
    tcp = SocketKVReceiver(bind_host=bind_host, advertise_host=advertise_host)
    return MultiKVReceiver([*receivers, tcp], here(device)) if receivers else tcp


class AutoKVSender:
    """The prefill worker's sender (implements transport.KVSender): per endpoint, the first
    transport that it can use and that sets up (the module docstring says in what order)."""

    def __init__(
        self, device: torch.device, worker_id: str = "",
        connect: Callable[[str], grpc.Channel] = grpc.insecure_channel,
    ) -> None:  # fmt: skip
        """`connect`: the gRPC channel to a decode worker that NCCL links are opened on."""
        self.place = here(device)
        self.tcp = SocketKVSender()
        self.ipc = IpcKVSender(device)
        self.why_not_nccl = nccl_unusable(device)
        self.nccl = None
        if not self.why_not_nccl:
            self.nccl = NcclKVSender(device, links=GrpcLinkOpener(worker_id, connect))
        self.backoff = SetupBackoff()

    def transport_for(self, kv_endpoint: str) -> str:
        """'ipc', 'nccl' or 'tcp': what open() tries first for this endpoint."""
        choices, _ = self._choices(kv_endpoint)
        return choices[0][0] if choices else "tcp"

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> KVSendChannel:
        handoff_id_bytes(handoff_id)  # ValueError before any setup
        choices, skipped = self._choices(endpoint)
        for transport, address in choices:
            if transport == "tcp":
                return self.tcp.open(address, handoff_id, num_layers)
            if why := self.backoff.acquire(address):
                skipped.append(f"{transport.upper()}: {why}")
                continue
            error = "interrupted"
            try:
                channel = self._sender(transport).open(
                    address, handoff_id, num_layers, decode_address
                )
                error = ""
                return channel
            except HandoffError as exc:
                error = str(exc)
                skipped.append(f"{transport.upper()}: {exc}")
                log.warning("KV over %s to %s failed: %s", transport, address, exc)
            finally:
                # a handoff the peer rejected on a live connection is no failed setup
                self.backoff.release(address, "" if self._connected(transport, address) else error)
        raise HandoffError(f"no usable KV endpoint in {endpoint!r} ({'; '.join(skipped)})")

    def close(self) -> None:
        self.tcp.close()
        self.ipc.close()
        if self.nccl is not None:
            self.nccl.close()

    def _choices(self, kv_endpoint: str) -> tuple[list[tuple[str, str]], list[str]]:
        """(transport, endpoint) that open() tries, in order; why the others are not tried."""
        endpoints, places = split_endpoints(kv_endpoint), endpoint_places(kv_endpoint)
        choices: list[tuple[str, str]] = []
        skipped: list[str] = []
        for transport in ("ipc", "nccl", "tcp"):
            if transport not in endpoints:
                continue
            why = "" if transport == "tcp" else self._unusable(transport, places.get(transport))
            if why:
                skipped.append(f"{transport.upper()}: {why}")
            else:
                choices.append((transport, endpoints[transport]))
        return choices, skipped

    def _unusable(self, transport: str, there: Place | None) -> str:
        if transport == "nccl":
            if self.why_not_nccl:
                return self.why_not_nccl
            return "the receiver is on this card" if self.place.same_device(there) else ""
        if there is None:
            return "the endpoint does not say where the receiver is"
        if not self.place.same_host(there):
            return "the receiver is on another host"
        if (there.device == "cpu") != (self.place.device == "cpu"):
            return f"the receiver's cache is on {there.device}, this process on {self.place.device}"
        return ""

    def _sender(self, transport: str) -> IpcKVSender | NcclKVSender:
        sender = self.ipc if transport == "ipc" else self.nccl
        assert sender is not None
        return sender

    def _connected(self, transport: str, address: str) -> bool:
        if transport == "ipc":
            return self.ipc.connected(address)
        return self.nccl is not None and address in self.nccl.peers
