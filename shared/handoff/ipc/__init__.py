"""The IPC transport (prefill and decode on one host): the prefill process maps the decode
worker's KV cache (CUDA IPC on the same card or a peer card, a shared memory file on CPU) and
writes a handoff's reserved blocks itself, layer by layer, with the same reserve / per-layer
checksum / commit protocol as the other transports; only control frames cross its TCP
connection (`frames`). `memory`: describing and mapping the cache."""

from kvmesh.shared.handoff.ipc.receiver import IpcKVReceiver
from kvmesh.shared.handoff.ipc.sender import IpcKVSender, IpcSendChannel

__all__ = ["IpcKVReceiver", "IpcKVSender", "IpcSendChannel"]
