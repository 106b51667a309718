"""Where a receiver's memory is, told in its endpoint: the host and the device.

A decode worker tags the endpoints whose choice depends on where the ends are (`ipc`, `nccl`):

    ipc://10.0.0.5:4000?host=9c1f0e22a7d4b6e1&dev=GPU-6a1e...      dev: a card's UUID, or "cpu"

Two processes have the same `host` only if they can share memory: the same running kernel
(boot_id), hostname, and IPC and PID namespaces (CUDA IPC and the shared KV file need both).
`dev` names a card by its UUID, the same in every process whatever CUDA_VISIBLE_DEVICES says.
Transports get endpoints without the tag (auto.split_endpoints drops it).
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import torch

CPU = "cpu"


@dataclass(frozen=True)
class Place:
    host: str  # host_id() of the process
    device: str  # device_id() of its KV cache's device

    def same_host(self, other: Place | None) -> bool:
        return other is not None and other.host == self.host

    def same_device(self, other: Place | None) -> bool:
        """A card's UUID names it whatever the host id says (containers of one host differ in
        hostname and namespaces); "cpu" is the same device only on the same host."""
        if other is None or other.device != self.device:
            return False
        return self.device != CPU or self.same_host(other)


@functools.cache
def host_id() -> str:
    """16 hex digits, equal for processes that can map each other's shared memory."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/ipc", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if "/ns/" in path else Path(path).read_text().strip())
        except OSError:
            parts.append(f"no {path}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def device_id(device: torch.device) -> str:
    """'cpu', or the CUDA card's UUID ('GPU-...')."""
    if device.type != "cuda":
        return CPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"GPU-{torch.cuda.get_device_properties(index).uuid}"


def here(device: torch.device) -> Place:
    return Place(host_id(), device_id(device))


def tag(endpoint: str, place: Place) -> str:
    return f"{endpoint}?{urlencode({'host': place.host, 'dev': place.device})}"


def untag(endpoint: str) -> tuple[str, Place | None]:
    """'ipc://h:1?host=..&dev=..' -> ('ipc://h:1', Place); an untagged endpoint has no Place."""
    base, sep, query = endpoint.partition("?")
    fields = parse_qs(query)
    if not sep or "host" not in fields or "dev" not in fields:
        return base, None
    return base, Place(fields["host"][0], fields["dev"][0])
