"""The KV data plane's interface: how a request's KV cache moves from prefill to decode.

The protocol (ARCHITECTURE.md invariants 2 and 5) is the same for every transport:

    decode                                   prefill
    ------                                   -------
    reserve blocks (Ledger)
    receiver.expect(handoff_id, ...)  ---->  (tells prefill: endpoint + handoff_id, over gRPC)
                                             channel = sender.open(endpoint, handoff_id, L)
    on_layer(l, bytes) scatters layer l <--  channel.send_layer(l, kv[l])   as each layer is done
    future -> HandoffResult(ok)       ACK->  channel.finish(timeout) -> HandoffStats
    commit (Ledger) or retry elsewhere

A layer's KV is one contiguous buffer, [2, n_blocks, block_size, kv_heads, head_dim] of any
dtype, moved as raw bytes with a checksum. Bytes for a handoff the receiver does not expect are
rejected, never written; a corrupt layer fails the whole handoff and is never decoded.
The receiver's HandoffResult is authoritative: a sender that gives up (timeout, abort) after its
last layer went out may still see the receiver complete, so decode reports the outcome.

Implementations (a module per job; the package's face exports what services use):
    wire, listener, channel     what the transports share: TCP plumbing, the receivers'
                                listener + expected handoffs, the senders' channel + connection
    tcp/                        TCP, crc32 per layer (CPU hosts, tests)
    nccl/                       NCCL, GPU to GPU: control frames over TCP (nccl/frames), a
                                pair's unique id over gRPC (nccl/link), the library's binding
                                (nccl/binding); kernels/checksum: the per-layer checksum
    timeline                    an optional per-layer diagnostic
auto picks the transport per endpoint; kv_io moves KV between the paged cache and them.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

# Called once per layer, on the receiver's thread, with the layer's bytes as a uint8 tensor
# [layer_nbytes] that is reused after the call returns: copy or scatter it synchronously.
LayerCallback = Callable[[int, torch.Tensor], None]


class HandoffError(RuntimeError):
    """A handoff failed: rejected (NACK), peer died, or timed out."""


@dataclass(frozen=True)
class HandoffResult:
    """Receiver-side outcome of one handoff."""

    ok: bool
    nbytes: int  # payload bytes delivered to on_layer
    seconds: float  # first frame arrival -> last layer delivered (0 if none arrived)
    error: str = ""  # why it failed; empty when ok


@dataclass(frozen=True)
class HandoffStats:
    """Sender-side statistics of one acknowledged handoff. The per-layer times are worked out
    when first read (on the GPU they come from CUDA events: a caller that does not read them
    does not wait for them)."""

    nbytes: int  # payload bytes sent (all layers)
    seconds: float  # first send_layer -> receiver's ACK (includes overlapped compute)
    gbps: float  # nbytes / seconds, in GB/s (1e9 bytes per second)
    layer_times: Callable[[], list[float]] = field(repr=False)

    @functools.cached_property
    def layer_seconds(self) -> list[float]:
        """Per layer (index = layer): seconds spent on the wire."""
        return self.layer_times()


def handoff_id_bytes(handoff_id: str) -> bytes:
    """The 16 wire bytes of a handoff id (a UUID string); ValueError if it is not one."""
    return uuid.UUID(handoff_id).bytes


class KVReceiver(Protocol):
    """Decode side: accepts pushed KV for handoffs it expects."""

    def start(self) -> str:
        """Start listening; returns the endpoint senders connect to (e.g. tcp://host:port)."""
        ...

    def expect(
        self, handoff_id: str, num_layers: int, layer_nbytes: int, on_layer: LayerCallback
    ) -> Future[HandoffResult]:
        """Accept this handoff: num_layers layers of layer_nbytes bytes each.

        The future completes once all layers went through on_layer (ok=True), or when the
        handoff fails, is cancelled or the receiver closes (ok=False). It never raises.
        """
        ...

    def cancel(self, handoff_id: str) -> None:
        """Stop accepting this handoff; once this returns on_layer is not called for it again."""
        ...

    def close(self) -> None:
        """Stop listening, drop connections, fail every pending handoff."""
        ...


class KVSendChannel(Protocol):
    """Prefill side: one handoff in progress."""

    def send_layer(self, layer: int, data: torch.Tensor) -> None:
        """Queue one layer's KV and return at once; raises HandoffError if already failed."""
        ...

    def finish(self, timeout: float) -> HandoffStats:
        """Wait up to `timeout` seconds for the receiver's ACK; raises HandoffError."""
        ...

    def abort(self, reason: str) -> None:
        """Give up: the receiver fails the handoff with `reason` (best effort)."""
        ...


class KVSender(Protocol):
    """Prefill side: opens handoffs to receivers, reusing connections per endpoint."""

    def open(
        self, endpoint: str, handoff_id: str, num_layers: int, decode_address: str = ""
    ) -> KVSendChannel:
        """Start a handoff to the receiver at `endpoint`; raises HandoffError if unreachable.
        `decode_address`: the decode worker's gRPC address (an NCCL pair's setup needs it)."""
        ...

    def close(self) -> None:
        """Close every connection; channels still open fail."""
        ...
