"""Gather a request's KV blocks of one layer into one contiguous buffer, and scatter it back.

    kv_layer: [2, num_blocks, block_size, Hk, D]      buffer: [2, n, block_size, Hk, D]
    buffer[kv, i] <-> kv_layer[kv, block_ids[i]]

The KV handoff sends one gathered buffer per layer and scatters it on the receiving side.
"""

import torch
import triton
import triton.language as tl


def gather_blocks_ref(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """kv_layer[:, block_ids] as a contiguous tensor, written into `out` if given."""
    gathered = kv_layer[:, block_ids.long()]
    if out is None:
        return gathered.contiguous()
    return out.copy_(gathered)


def scatter_blocks_ref(kv_layer: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
    kv_layer[:, block_ids.long()] = src


@triton.jit
def _block_copy_kernel(
    cache_ptr, buf_ptr, ids_ptr, num_ids, stride_kv, stride_blk, block_elems,
    GATHER: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    kv = tl.program_id(1)
    chunk = tl.program_id(2)
    block_id = tl.load(ids_ptr + i).to(tl.int64)  # block * stride can pass 2^31
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_elems
    cache = cache_ptr + kv * stride_kv + block_id * stride_blk + offs
    buf = buf_ptr + (kv.to(tl.int64) * num_ids + i) * block_elems + offs
    if GATHER:
        tl.store(buf, tl.load(cache, mask=mask), mask=mask)
    else:
        tl.store(cache, tl.load(buf, mask=mask), mask=mask)


def _check_layer(kv_layer: torch.Tensor, block_ids: torch.Tensor) -> int:
    assert kv_layer.dim() == 5 and kv_layer.shape[0] == 2
    _, _, block_size, num_heads, head_dim = kv_layer.shape
    assert kv_layer.stride()[2:] == (num_heads * head_dim, head_dim, 1), "blocks must be dense"
    assert block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64)
    return block_size * num_heads * head_dim


def _launch(cache: torch.Tensor, buf: torch.Tensor, ids: torch.Tensor, gather: bool) -> None:
    block_elems = _check_layer(cache, ids)
    if ids.numel() == 0:
        return
    block = min(triton.next_power_of_2(block_elems), 4096)
    grid = (ids.numel(), 2, triton.cdiv(block_elems, block))
    _block_copy_kernel[grid](
        cache, buf, ids.contiguous(), ids.numel(), cache.stride(0), cache.stride(1), block_elems,
        GATHER=gather, BLOCK=block, num_warps=4,
    )  # fmt: skip


def gather_blocks(
    kv_layer: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton version of `gather_blocks_ref`: [2, n, block_size, Hk, D], contiguous (`out`, if
    given: a contiguous tensor of that shape and kv_layer's dtype, e.g. one layer's slice of a
    request's buffer of all layers)."""
    shape = (2, block_ids.numel(), *kv_layer.shape[2:])
    if out is None:
        out = kv_layer.new_empty(shape)
    assert out.shape == shape and out.dtype == kv_layer.dtype and out.is_contiguous()
    _launch(kv_layer, out, block_ids, gather=True)
    return out


def scatter_blocks(kv_layer: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
    """Triton version of `scatter_blocks_ref`: kv_layer[:, block_ids] = src."""
    assert src.shape == (2, block_ids.numel(), *kv_layer.shape[2:]) and src.is_contiguous()
    assert src.dtype == kv_layer.dtype
    _launch(kv_layer, src, block_ids, gather=False)
