import pytest
import torch
from kernel_inputs import assert_codes_within_one_step, fp8_kv_layer, fresh_seed, kv_layer

from kvmesh.kernels.kv_write import write_kv, write_kv_ref
from kvmesh.kernels.quant import quantize_kv_fp8


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


def run_fp8_case(tokens, kv_heads, head_dim, page, dtype, device="cpu", seed=0, kernel=write_kv):
    """An FP8 cache: the kernel's codes against the reference's (quant.quantize_kv_fp8 under the
    per-head scales, saturating); blocks no token writes keep their bytes."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = (tokens + page - 1) // page + 3
    layer, kv_scale = fp8_kv_layer(gen, num_blocks, page, kv_heads, head_dim, device)
    kv = (
        torch.randn(2, tokens, kv_heads, head_dim, generator=gen) * kv_scale.cpu()[:, None, :, None]
    )
    k, v = (x.mul(448 * 1.5).to(device, dtype) for x in kv)  # some values past the scale's range
    slots = torch.randperm(num_blocks * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1
    slots = slots.to(device)
    want = layer.clone()
    write_kv_ref(k, v, want[0], want[1], slots, kv_scale=kv_scale)
    kernel(k, v, layer[0], layer[1], slots, kv_scale=kv_scale)
    assert_codes_within_one_step(layer, want)
    kept = slots >= 0
    flat = want.flatten(1, 2)  # [2, slots, Hk, D]
    for i, x in enumerate((k, v)):
        got = flat[i, slots[kept]].view(torch.uint8)
        assert torch.equal(got, quantize_kv_fp8(x[kept], kv_scale[i]).view(torch.uint8))
    assert (want.float().abs() == 448).any(), "no value saturated"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_heads,head_dim,page", [(1, 64, 16), (8, 128, 32), (3, 64, 32)])
def test_write_kv_fp8(dtype, kv_heads, head_dim, page):
    run_fp8_case(75, kv_heads, head_dim, page, dtype, seed=fresh_seed())


def test_fp8_cache_and_kv_scale_go_together():
    layer, kv_scale = fp8_kv_layer(torch.Generator().manual_seed(0), 4, 16, 2, 64, "cpu")
    k = torch.randn(3, 2, 64)
    slots = torch.arange(3)
    with pytest.raises(AssertionError, match="needs its kv_scale"):
        write_kv(k, k, layer[0], layer[1], slots)
    half = layer.to(torch.float16)
    with pytest.raises(AssertionError, match="float8_e4m3fn"):
        write_kv(k, k, half[0], half[1], slots, kv_scale=kv_scale)


def test_write_kv_fp8_rounds_ties_to_even_and_saturates(device="cpu"):
    """Every E4M3 value, every midpoint between neighbours (ties: to the even code), values past
    448 and below the smallest subnormal, under power-of-two scales (x / scale exact)."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    extra = torch.tensor([449.0, 464.0, 465.0, 1e4, 2.0**-10, 2.0**-11, 3 * 2.0**-11])
    values = torch.cat([grid, mids, extra])
    values = torch.cat([values, -values])  # [2 * 260]
    kv_heads, head_dim = 2, 64
    tokens = values.numel() // head_dim + 1
    flat = torch.cat([values, torch.zeros(tokens * head_dim - values.numel())])
    k = flat.view(tokens, 1, head_dim).expand(tokens, kv_heads, head_dim).contiguous()
    kv_scale = torch.tensor([[1.0, 0.25], [4.0, 2.0**-3]])
    k, v = k * kv_scale[0].view(1, -1, 1), k * kv_scale[1].view(1, -1, 1)
    cache = torch.zeros(2, tokens, 1, kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=device)
    k, v, slots, kv_scale = (x.to(device) for x in (k, v, torch.arange(tokens), kv_scale))
    write_kv(k, v, cache[0], cache[1], slots, kv_scale=kv_scale)
    got = _unsigned_zero(cache.cpu())
    want = _unsigned_zero(flat.view(tokens, 1, head_dim).clamp(-448, 448).to(torch.float8_e4m3fn))
    for i in range(2):
        for h in range(kv_heads):
            assert torch.equal(got[i, :, 0, h], want[:, 0])


def _unsigned_zero(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 codes as bytes with -0 (0x80) as +0: both read as zero, and Triton 3.7's interpreter
    casts -0.0 to +0 where the GPU and torch keep the sign."""
    raw = codes.view(torch.uint8)
    return torch.where(raw == 0x80, torch.zeros_like(raw), raw)
