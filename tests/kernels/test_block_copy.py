import pytest
import torch
from kernel_inputs import kv_layer, poison_allocator

from kvmesh.kernels.block_copy import (
    gather_blocks,
    gather_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
)


def run_case(num_blocks, picked, page, kv_heads, head_dim, dtype, id_dtype, device="cpu", seed=0,
             gather=gather_blocks, scatter=scatter_blocks):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    layer = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    # shuffled ids, read through a strided view (every other element of a longer tensor)
    ids = torch.randperm(num_blocks, generator=gen)[: 2 * picked].to(id_dtype)
    ids = ids.to(device)[::2]
    poison_allocator(device)
    buf = gather(layer, ids)
    assert buf.shape == (2, ids.numel(), page, kv_heads, head_dim) and buf.is_contiguous()
    torch.testing.assert_close(buf, gather_blocks_ref(layer, ids), rtol=0, atol=0)
    for i, b in enumerate(ids.tolist()):
        torch.testing.assert_close(buf[:, i], layer[:, b], rtol=0, atol=0)

    src = torch.randn(buf.shape, generator=gen).to(device=device, dtype=dtype)
    want = layer.clone()
    scatter_blocks_ref(want, ids, src)
    scatter(layer, ids, src)
    torch.testing.assert_close(layer, want, rtol=0, atol=0)
    torch.testing.assert_close(gather_blocks_ref(layer, ids), src, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("page,kv_heads,head_dim", [(16, 2, 64), (32, 8, 128)])
def test_gather_scatter(dtype, id_dtype, page, kv_heads, head_dim):
    run_case(40, 9, page, kv_heads, head_dim, dtype, id_dtype)


def test_empty_ids():
    layer = torch.randn(2, 4, 16, 2, 64)
    ids = torch.empty(0, dtype=torch.int64)
    assert gather_blocks(layer, ids).shape == (2, 0, 16, 2, 64)
    scatter_blocks(layer, ids, torch.empty(2, 0, 16, 2, 64))


@pytest.mark.parametrize("gather", [gather_blocks, gather_blocks_ref])
def test_gather_into_one_layer_of_a_request_buffer(gather):
    """Layers gathered into their slices of one buffer lie back to back (the NCCL sender sends
    such runs as one message); the neighbouring slices are untouched."""
    gen = torch.Generator().manual_seed(3)
    layers = [kv_layer(gen, 12, 16, 2, 64, torch.float16, "cpu") for _ in range(3)]
    ids = torch.randperm(12, generator=gen)[:5]
    buf = torch.full((3, 2, 5, 16, 2, 64), -7.0, dtype=torch.float16)
    out = gather(layers[1], ids, out=buf[1])
    assert out.data_ptr() == buf[1].data_ptr()
    torch.testing.assert_close(buf[1], gather_blocks_ref(layers[1], ids), rtol=0, atol=0)
    assert bool((buf[0] == -7).all()) and bool((buf[2] == -7).all())
