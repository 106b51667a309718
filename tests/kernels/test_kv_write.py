import pytest
import torch
from kernel_inputs import kv_layer

from kvmesh.kernels.kv_write import write_kv, write_kv_ref


def run_case(tokens, kv_heads, head_dim, page, dtype, device="cpu", seed=0, kernel=write_kv):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = (tokens + page - 1) // page + 3
    layer = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    # k, v: strided views into a fused [T, (Hq + 2 Hk) * D] projection
    heads = 2 * kv_heads
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1  # padding tokens
    slots = slots.to(device)
    want = layer.clone()
    write_kv_ref(k, v, want[0], want[1], slots)
    kernel(k, v, layer[0], layer[1], slots)
    torch.testing.assert_close(layer, want, rtol=0, atol=0)
    # the reference itself: every kept token landed in its slot
    kept = slots >= 0
    flat = want[0].flatten(0, 1)
    torch.testing.assert_close(flat[slots[kept]], k[kept], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads,head_dim,page", [(1, 64, 16), (8, 128, 32), (3, 64, 32)])
def test_write_kv(dtype, kv_heads, head_dim, page):
    run_case(75, kv_heads, head_dim, page, dtype, seed=kv_heads)
