"""The NCCL transport (GPU to GPU): a 2-rank communicator per (prefill, decode) pair, its control
frames over TCP (`frames`), a new pair's unique id over gRPC (`link`).

Its face: the sender and receiver; the channel of a handoff, and the calls that queue the layers
of several handoffs at once (what KVPusher batches); the decode side's hook for a new pair's id
(`offer_link`, from Decode.OpenKVLink, or `serve_links` without a decode service) and the
prefill side's opener of that call (`GrpcLinkOpener`); and why NCCL
cannot be used in this process (`unavailable_reason`).
"""

from kvmesh.shared.handoff.nccl.binding import unavailable_reason
from kvmesh.shared.handoff.nccl.channel import NcclSendChannel, send_layer_group, send_layer_runs
from kvmesh.shared.handoff.nccl.link import (
    GrpcLinkOpener,
    LinkReceiver,
    LinkRefused,
    offer_link,
    serve_links,
)
from kvmesh.shared.handoff.nccl.receiver import NcclKVReceiver
from kvmesh.shared.handoff.nccl.sender import NcclKVSender

__all__ = [
    "GrpcLinkOpener",
    "LinkReceiver",
    "LinkRefused",
    "NcclKVReceiver",
    "NcclKVSender",
    "NcclSendChannel",
    "offer_link",
    "send_layer_group",
    "send_layer_runs",
    "serve_links",
    "unavailable_reason",
]
