"""The TCP transport (CPU hosts, tests): each layer's raw bytes and its crc32 on one socket per
(sender, endpoint), handoffs multiplexed frame by frame (the wire format: `frames`)."""

from kvmesh.shared.handoff.tcp.receiver import SocketKVReceiver
from kvmesh.shared.handoff.tcp.sender import SocketKVSender

__all__ = ["SocketKVReceiver", "SocketKVSender"]
