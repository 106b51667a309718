"""Choosing the data plane (ARCHITECTURE.md invariant 5): NCCL when both ends are CUDA devices,
TCP else.

A decode worker advertises every transport it accepts as one comma-separated kv_endpoint,
`nccl://host:p1,tcp://host:p2` on a GPU with NCCL, `tcp://host:p2` otherwise. A prefill worker
takes the NCCL endpoint when it runs on CUDA and NCCL loads, the TCP endpoint otherwise (also
when the NCCL pair cannot be set up and the decode worker offers TCP too). A new NCCL pair's
unique id reaches the decode worker over gRPC (nccl/link): MultiKVReceiver.offer_link passes it
to its NCCL receiver.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, InvalidStateError

import torch

from kvmesh.shared.handoff.nccl import (
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
)

log = logging.getLogger(__name__)


def split_endpoints(kv_endpoint: str) -> dict[str, str]:
    """'nccl://a:1,tcp://a:2' -> {'nccl': 'nccl://a:1', 'tcp': 'tcp://a:2'}."""
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

    def __init__(self, receivers: list[KVReceiver]) -> None:
        self.receivers = receivers

    def start(self) -> str:
        return ",".join(r.start() for r in self.receivers)

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
    device: torch.device, bind_host: str, advertise_host: str | None = None
) -> KVReceiver:
    """The decode worker's receiver: NCCL and TCP on a CUDA device with NCCL, else TCP."""
    tcp = SocketKVReceiver(bind_host=bind_host, advertise_host=advertise_host)
    if why := nccl_unusable(device):
        log.info("KV over TCP only: %s", why)
        return tcp
    rx = NcclKVReceiver(device, bind_host=bind_host, advertise_host=advertise_host)
    return MultiKVReceiver([rx, tcp])


class AutoKVSender:
    """The prefill worker's sender (implements transport.KVSender): NCCL to endpoints that
    offer it when this worker can use it, TCP otherwise."""

    def __init__(self, device: torch.device, worker_id: str = "") -> None:
        self.tcp = SocketKVSender()
        self.why_not_nccl = nccl_unusable(device)
        self.nccl = None
        if not self.why_not_nccl:
            self.nccl = NcclKVSender(device, worker_id=worker_id)

    def transport_for(self, kv_endpoint: str) -> str:
        """'nccl' or 'tcp': what open() tries first for this endpoint."""
        return "nccl" if self.nccl is not None and "nccl" in split_endpoints(kv_endpoint) else "tcp"

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> KVSendChannel:
        endpoints = split_endpoints(endpoint)
        if self.nccl is not None and "nccl" in endpoints:
            try:
                return self.nccl.open(endpoints["nccl"], handoff_id, num_layers, decode_address)
            except HandoffError as exc:
                if "tcp" not in endpoints:
                    raise
                log.warning("NCCL to %s failed (%s); using TCP", endpoints["nccl"], exc)
        if "tcp" not in endpoints:
            why = self.why_not_nccl or "no NCCL endpoint"
            raise HandoffError(f"no usable KV endpoint in {endpoint!r} (NCCL: {why})")
        return self.tcp.open(endpoints["tcp"], handoff_id, num_layers)

    def close(self) -> None:
        self.tcp.close()
        if self.nccl is not None:
            self.nccl.close()
