"""The first-chunk attention (kernels/first_chunk_attention): its reference against the paged
prefill reference, and the dispatch that sends fresh steps to it. The Gluon kernel itself has no
interpreter: its sm_90 compile is tests/kernels/test_sm90_compile's, its results tests/gpu's."""

import pytest
import torch
from kernel_inputs import assert_close, block_table, dequantized, fresh_seed, poison_allocator

from kvmesh.kernels.first_chunk_attention import FreshChunks, first_chunk_attention_ref, supported
from kvmesh.kernels.kv_write import write_kv_ref
from kvmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kvmesh.kernels.quant import FP8_DTYPE, kv_head_scales
from kvmesh.kernels.rope import rope_cos_sin
from kvmesh.kernels.rope_kv import rope_write_kv


def packed_qkv(
    lengths: list[int], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
    device: str = "cpu", seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """q, k, v as views of one fused projection output (as the model has them), and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(sum(lengths), q_size + 2 * kv_size, generator=gen)
    qkv = qkv.to(device=device, dtype=dtype)
    q = qkv[:, :q_size].view(-1, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(-1, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(-1, kv_heads, head_dim)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu.to(device)


def paged(k: torch.Tensor, v: torch.Tensor, lengths: list[int], page: int, seed: int = 0):
    """k, v written into a paged cache through a shuffled block table: (k_cache, v_cache, table,
    seq_lens) as the engine's prefill step has them."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + page - 1) // page for n in lengths) + 5
    shape = (num_blocks, page, k.shape[1], k.shape[2])
    k_cache = torch.zeros(shape, dtype=k.dtype, device=k.device)
    v_cache = torch.zeros_like(k_cache)
    table = block_table(gen, lengths, page, num_blocks, "cpu")
    slots = torch.cat([table[b, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for b, n in enumerate(lengths)])  # fmt: skip
    table = table.to(k.device)
    write_kv_ref(k, v, k_cache, v_cache, slots.to(k.device))
    return k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32, device=k.device)


LENGTHS = [300, 1, 177, 64, 16, 129, 2]


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("head_dim,page", [(64, 16), (128, 32)])
def test_reference_matches_the_paged_reference(group, head_dim, page):
    q, k, v, cu = packed_qkv(LENGTHS, 2 * group, 2, head_dim, torch.float64, seed=group)
    k_cache, v_cache, table, lens = paged(k, v, LENGTHS, page, seed=group)
    scale = head_dim**-0.5
    want = prefill_attention_ref(q, k_cache, v_cache, table, cu, lens, scale)
    got = first_chunk_attention_ref(q, k, v, cu, max(LENGTHS), scale)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fresh_steps_fall_back_to_the_paged_kernel_off_sm90(dtype):
    """On CPU (the interpreter) `supported` is false, and prefill_attention given the fresh views
    runs its Triton kernel over the cache: the same result as without them."""
    q, k, v, cu = packed_qkv(LENGTHS, 8, 2, 64, dtype)
    k_cache, v_cache, table, lens = paged(k, v, LENGTHS, 16)
    assert not supported(q, k, v)
    scale = 64**-0.5
    plain = prefill_attention(q, k_cache, v_cache, table, cu, lens, scale)
    poison_allocator("cpu")
    fresh = prefill_attention(q, k_cache, v_cache, table, cu, lens, scale,
                              FreshChunks(k, v, max(LENGTHS)))  # fmt: skip
    torch.testing.assert_close(fresh, plain, rtol=0, atol=0)
    ref64 = first_chunk_attention_ref(q.double(), k.double(), v.double(), cu, 300, scale)
    assert_close(fresh, ref64, dtype)


def fresh_fp8_step(lengths, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    """A step of first chunks with an FP8 cache, as the model runs it: rope_write_kv rotates q
    and k and writes the codes (kv_scale: each head's amax over the step, shrunk, so some
    values saturate), leaving k and v holding the codes' values. Returns (q, fresh, cu, k_cache,
    v_cache, table, seq_lens, kv_scale)."""
    q, k, v, cu = packed_qkv(lengths, heads, kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed)
    kv_scale = torch.stack([kv_head_scales(k.float()), kv_head_scales(v.float())]) * 0.8
    page = 16
    num_blocks = sum((n + page - 1) // page for n in lengths) + 5
    k_cache = torch.zeros((num_blocks, page, kv_heads, head_dim), dtype=FP8_DTYPE, device=device)
    v_cache = torch.zeros_like(k_cache)
    table = block_table(gen, lengths, page, num_blocks, "cpu")
    slots = torch.cat([table[b, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for b, n in enumerate(lengths)])  # fmt: skip
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cos_sin = rope_cos_sin(head_dim, 4096, 10000.0, None, device)
    rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots.to(device),
                  kv_scale=kv_scale)  # fmt: skip
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    fresh = FreshChunks(k, v, max(lengths))
    return q, fresh, cu, k_cache, v_cache, table.to(device), lens, kv_scale


def check_fresh_fp8_step(dtype, device="cpu", seed=0, lengths=LENGTHS):
    """The fresh-chunk rule with an FP8 cache: a first chunk attends over the quantized values
    of its own tokens, as every later read of them does. prefill_attention given the fresh views
    (the Gluon kernel on sm_90, the paged kernel elsewhere), the first-chunk reference on those
    views and the paged reference reading the cache all match float64 attention over the
    dequantized cache."""
    q, fresh, cu, k_cache, v_cache, table, lens, kv_scale = fresh_fp8_step(
        lengths, 8, 2, 64, dtype, device, seed
    )
    scale = 64**-0.5
    values = dequantized(torch.stack([k_cache, v_cache]), kv_scale).double()
    ref64 = prefill_attention_ref(q.double(), *values, table, cu, lens, scale)
    from_cache = prefill_attention_ref(q, k_cache, v_cache, table, cu, lens, scale,
                                       kv_scale=kv_scale)  # fmt: skip
    from_views = first_chunk_attention_ref(q, fresh.k, fresh.v, cu, fresh.max_len, scale)
    poison_allocator(device)
    out = prefill_attention(q, k_cache, v_cache, table, cu, lens, scale, fresh,
                            kv_scale=kv_scale)  # fmt: skip
    for got in (from_cache, from_views, out):
        assert_close(got, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fresh_chunks_attend_over_the_quantized_values(dtype):
    check_fresh_fp8_step(dtype, seed=fresh_seed(), lengths=[70, 1, 33, 16])
