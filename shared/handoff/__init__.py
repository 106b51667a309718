"""The KV data plane: how a request's KV cache moves from a prefill worker to a decode worker
(ARCHITECTURE.md invariants 2 and 5; the protocol: `transport`).

What services use is here: the interface every transport implements (`transport`), the choice
of transport per endpoint (`auto`: the decode side's receiver, the prefill side's sender), the
moves between the paged KV cache and a handoff (`kv_io`), and the decode side's hook for a new
NCCL pair's unique id (Decode.OpenKVLink). Each transport's folder (`tcp`, `nccl`) is that
transport's face. A module never imports the face of a package it is inside of (it names the
module it takes from), so loading a face never runs into itself.
"""

from kvmesh.shared.handoff.auto import AutoKVSender, make_receiver
from kvmesh.shared.handoff.kv_io import KVPusher, layer_nbytes, scatter_into
from kvmesh.shared.handoff.nccl import LinkRefused, offer_link
from kvmesh.shared.handoff.transport import (
    HandoffError,
    HandoffResult,
    HandoffStats,
    KVReceiver,
    KVSendChannel,
    KVSender,
    LayerCallback,
)

__all__ = [
    "AutoKVSender",
    "HandoffError",
    "HandoffResult",
    "HandoffStats",
    "KVPusher",
    "KVReceiver",
    "KVSendChannel",
    "KVSender",
    "LayerCallback",
    "LinkRefused",
    "layer_nbytes",
    "make_receiver",
    "offer_link",
    "scatter_into",
]
