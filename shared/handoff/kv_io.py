"""Moving a request's KV between the paged cache and the data plane.

Prefill: `KVPusher` is the engine's export hook. When layer l of a completing prompt is written,
it gathers that request's blocks of layer l into one contiguous buffer and queues it on the
request's channel: at most one send per layer per request, overlapping the next layers' compute.
NCCL channels take the buffer on the GPU (layer l's slice of one buffer for all of the request's
layers, so that layers queued together go as one message), and the sends of one layer for every
request of the batch go out as one group; IPC channels (`on_device`) take the gathered layer on
its device; TCP channels get a host copy.
Decode: `scatter_into` returns the receiver callback that writes each arriving layer into the
blocks reserved for it, from host bytes (TCP) or a staging buffer on the device (NCCL); the IPC
transport reads its `block_ids` (the sender writes them itself).
"""

from __future__ import annotations

import threading

import torch

from kvmesh.shared.engine.engine import Engine
from kvmesh.shared.engine.sequence import Sequence
from kvmesh.shared.handoff.nccl import NcclSendChannel, send_layer_group
from kvmesh.shared.handoff.transport import KVSendChannel, LayerCallback


def layer_nbytes(engine: Engine, num_blocks: int) -> int:
    """Bytes of one layer's K and V over num_blocks blocks: [2, n, block_size, kv_heads, D]."""
    per_block = engine.kv_cache[0, :, 0].numel() * engine.kv_cache.element_size()
    return num_blocks * per_block


class KVPusher:
    """Engine export hook: sends each completed layer of registered requests to their channel."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._channels: dict[str, KVSendChannel] = {}
        self._ids: dict[str, torch.Tensor] = {}  # request -> its block ids on the device
        # request -> [layers, 2, blocks, block_size, kv_heads, D]: its layers, back to back
        self._bufs: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def register(self, request_id: str, channel: KVSendChannel) -> None:
        with self._lock:
            self._channels[request_id] = channel

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._channels.pop(request_id, None)
            self._ids.pop(request_id, None)
            self._bufs.pop(request_id, None)

    def __call__(self, layer: int, seqs: list[Sequence]) -> None:
        on_device: list[tuple[str, NcclSendChannel, torch.Tensor]] = []
        for seq in seqs:
            with self._lock:
                channel = self._channels.get(seq.request_id)
            if channel is None:
                continue
            ids = self._block_ids(seq, layer)
            cache = self._engine.kv_cache[layer]
            if isinstance(channel, NcclSendChannel) and not channel.failed:
                out = self._layer_buffer(seq.request_id, layer, ids.numel())
                data = self._engine.model.ops.gather_blocks(cache, ids, out=out)
                on_device.append((seq.request_id, channel, data))
                continue
            data = self._engine.model.ops.gather_blocks(cache, ids)
            if data.device.type != "cpu" and not getattr(channel, "on_device", False):
                data = data.cpu()  # TCP sends from the host; IPC copies on the device
            try:
                channel.send_layer(layer, data)
            except Exception:  # the channel failed; finish() reports it to the handler
                self.unregister(seq.request_id)
        if on_device:
            self._send_group(layer, on_device)

    def _block_ids(self, seq: Sequence, layer: int) -> torch.Tensor:
        """The sequence's block table on the device ([n] int64), copied once per export (at
        layer 0) from pinned memory without a host sync: a blocking copy at every layer would
        drain the compute stream's queue and leave the GPU idle while the next layer launches."""
        with self._lock:
            ids = self._ids.get(seq.request_id)
        if ids is None or layer == 0:
            table = torch.tensor(seq.block_table, dtype=torch.int64)
            if self._engine.device.type == "cuda":
                table = table.pin_memory()
            ids = table.to(self._engine.device, non_blocking=True)
            with self._lock:
                self._ids[seq.request_id] = ids
        return ids

    def _layer_buffer(self, request_id: str, layer: int, num_blocks: int) -> torch.Tensor:
        """Layer `layer`'s slice of the request's buffer of all layers (made at layer 0; the
        pusher lets go of it after the last layer: the sends' views keep it alive until then)."""
        cache = self._engine.kv_cache  # [L, 2, num_blocks, block_size, kv_heads, D]
        with self._lock:
            buf = self._bufs.get(request_id)
            if buf is None or layer == 0 or buf.shape[2] != num_blocks:
                buf = cache.new_empty((cache.shape[0], 2, num_blocks, *cache.shape[3:]))
                self._bufs[request_id] = buf
            if layer == cache.shape[0] - 1:
                del self._bufs[request_id]
        return buf[layer]

    def _send_group(
        self, layer: int, items: list[tuple[str, NcclSendChannel, torch.Tensor]]
    ) -> None:
        failed = send_layer_group(layer, [(channel, data) for _, channel, data in items])
        for request_id, channel, _ in items:
            if channel in failed:  # finish() reports the failure to the handler
                self.unregister(request_id)


class BlockScatter:
    """Receiver callback (a LayerCallback) writing layer bytes into `block_ids` of the engine's
    cache. A transport that writes the blocks in place (ipc) reads `block_ids` instead."""

    def __init__(self, engine: Engine, block_ids: list[int]) -> None:
        self.engine, self.block_ids = engine, list(block_ids)
        self._ids = torch.tensor(block_ids, dtype=torch.int64, device=engine.device)

    def __call__(self, layer: int, payload: torch.Tensor) -> None:
        cache = self.engine.kv_cache  # [L, 2, num_blocks, block_size, kv_heads, D]
        shape = (2, len(self.block_ids), *cache.shape[3:])
        data = payload.view(cache.dtype).view(shape).to(self.engine.device)
        self.engine.model.ops.scatter_blocks(cache[layer], self._ids, data)


def scatter_into(engine: Engine, block_ids: list[int]) -> LayerCallback:
    """Receiver callback writing layer bytes into block_ids of engine's cache."""
    return BlockScatter(engine, block_ids)
