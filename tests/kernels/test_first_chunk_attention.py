"""The first-chunk attention (kernels/first_chunk_attention): its reference against the paged
prefill reference, and the dispatch that sends fresh steps to it. The Gluon kernel itself has no
interpreter: its sm_90 compile is tests/kernels/test_sm90_compile's, its results tests/gpu's."""

import pytest
import torch
from kernel_inputs import assert_close, block_table, poison_allocator

from kvmesh.kernels.first_chunk_attention import FreshChunks, first_chunk_attention_ref, supported
from kvmesh.kernels.kv_write import write_kv_ref
from kvmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref


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
