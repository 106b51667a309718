import pytest
import torch
from kernel_inputs import (
    assert_close,
    assert_codes_within_one_step,
    dequantized,
    fp8_kv_layer,
    fresh_seed,
    kv_layer,
)
from test_rope import LLAMA31

from kvmesh.kernels.kv_write import write_kv
from kvmesh.kernels.rope import apply_rope, rope_cos_sin
from kvmesh.kernels.rope_kv import rope_write_kv, rope_write_kv_ref


def run_case(tokens, heads, kv_heads, head_dim, page, dtype, scaling=None, device="cpu", seed=0,
             kernel=rope_write_kv):  # fmt: skip
    """q, k, v as strided views of one fused projection output; shuffled slots, some padding."""
    gen = torch.Generator().manual_seed(seed)
    cos_sin = rope_cos_sin(head_dim, 4096, 500000.0, scaling, device)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device, dtype)

    def views(t):
        q = t[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = t[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = t[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        return q, k, v

    num_blocks = (tokens + page - 1) // page + 3
    layer = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1  # padding tokens
    slots = slots.to(device)

    # float64 reference: the rotation and the cache contents
    ref_qkv, ref_layer = qkv.double(), layer.double()
    q64, k64, v64 = views(ref_qkv)
    rope_write_kv_ref(q64, k64, v64, positions, cos_sin, ref_layer[0], ref_layer[1], slots)
    # the two kernels it fuses, in the same dtype: the same bits
    two_qkv, two_layer = qkv.clone(), layer.clone()
    q2, k2, v2 = views(two_qkv)
    apply_rope(q2, k2, positions, cos_sin)
    write_kv(k2, v2, two_layer[0], two_layer[1], slots)

    q, k, v = views(qkv)
    kernel(q, k, v, positions, cos_sin, layer[0], layer[1], slots)
    if tokens:
        assert_close(qkv, ref_qkv, dtype)
    assert_close(layer, ref_layer, dtype)
    torch.testing.assert_close(qkv, two_qkv, rtol=0, atol=0)
    torch.testing.assert_close(layer, two_layer, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(8, 8, 64), (9, 3, 64), (32, 8, 128), (8, 1, 128)]
)  # GQA ratios 1, 3, 4, 8
@pytest.mark.parametrize("page", [16, 32])
def test_rope_write_kv(dtype, heads, kv_heads, head_dim, page):
    run_case(37, heads, kv_heads, head_dim, page, dtype, seed=heads + page)


def test_llama3_scaling_and_no_tokens():
    run_case(11, 8, 2, 64, 16, torch.float16, LLAMA31, seed=3)
    run_case(0, 8, 2, 64, 16, torch.float32)


def run_fp8_case(tokens, heads, kv_heads, head_dim, page, dtype, device="cpu", seed=0):
    """An FP8 cache: the kernel's codes against the reference's (within one rounding step), q
    rotated as without FP8, and k and v left holding the codes' values (those of padding tokens
    too), which is what a first chunk attends over."""
    gen = torch.Generator().manual_seed(seed)
    cos_sin = rope_cos_sin(head_dim, 4096, 500000.0, None, device)
    num_blocks = (tokens + page - 1) // page + 3
    layer, kv_scale = fp8_kv_layer(gen, num_blocks, page, kv_heads, head_dim, device)
    widths = [heads, kv_heads, kv_heads]
    amp = torch.cat([torch.ones(heads), kv_scale[0].cpu() * 300, kv_scale[1].cpu() * 300])
    qkv = torch.randn(tokens, sum(widths), head_dim, generator=gen) * amp[None, :, None]
    qkv = qkv.flatten(1).to(device, dtype)  # the fused projection [T, (Hq + 2 Hk) * D]
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1
    slots = slots.to(device)

    def views(t):
        return t.view(tokens, sum(widths), head_dim).split(widths, dim=1)

    ref_qkv, ref_layer = qkv.clone(), layer.clone()
    # q as the kernel rotates it without FP8 (the same bits: the cache's format is not q's)
    plain_qkv, plain_layer = qkv.clone(), torch.zeros_like(layer, dtype=dtype)
    plain_q, plain_k, plain_v = views(plain_qkv)
    rope_write_kv(plain_q, plain_k, plain_v, positions, cos_sin, plain_layer[0], plain_layer[1],
                  slots)  # fmt: skip
    rope_write_kv_ref(*views(ref_qkv), positions, cos_sin, ref_layer[0], ref_layer[1], slots,
                      kv_scale=kv_scale)  # fmt: skip
    q, k, v = views(qkv)
    rope_write_kv(q, k, v, positions, cos_sin, layer[0], layer[1], slots, kv_scale=kv_scale)
    assert_codes_within_one_step(layer, ref_layer)
    ref_q, ref_k, ref_v = views(ref_qkv)
    torch.testing.assert_close(q, plain_q, rtol=0, atol=0)
    assert_close(q, ref_q.double(), dtype)
    # k and v in place: the codes' values (rounded to their dtype) of every token
    for i, (x, ref_x) in enumerate(((k, ref_k), (v, ref_v))):
        assert_close(x, ref_x.double(), dtype, factor=20)  # a code one step apart shows here
        kept = slots >= 0
        in_cache = dequantized(layer.flatten(1, 2)[:, slots[kept]], kv_scale)[i]
        torch.testing.assert_close(x[kept], in_cache.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(8, 8, 64, 16), (32, 8, 128, 32)])
def test_rope_write_kv_fp8(dtype, heads, kv_heads, head_dim, page):
    run_fp8_case(37, heads, kv_heads, head_dim, page, dtype, seed=fresh_seed())
