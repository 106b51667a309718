import dataclasses
import functools
import importlib

import pytest
import torch
from kernel_inputs import (
    assert_close,
    block_table,
    dequantized,
    fp8_kv_layer,
    fresh_seed,
    kv_layer,
    poison_allocator,
    poison_unused_blocks,
)
from torch import Tensor

from kvmesh.kernels.prefill_attention import (
    _CPU_TUNING,
    NARROW_TUNING,
    _prefill,
    narrow,
    prefill_attention,
    prefill_attention_ref,
)


def _inputs(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, page: int,
    dtype: torch.dtype, device: str, seed: int, fp8: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, ...], float]:  # fmt: skip
    """q, the cache layer (a poisoned block wherever no table points; fp8: E4M3 codes) and its
    kv_scale (fp8) or None, (block table, cu_seqlens_q, seq_lens) and the softmax scale."""
    gen = torch.Generator().manual_seed(seed)
    ctx_lens = [c for _, c in seqs]
    num_blocks = sum((c + page - 1) // page for c in ctx_lens) + 7
    kv_scale = None
    if fp8:
        kv, kv_scale = fp8_kv_layer(gen, num_blocks, page, kv_heads, head_dim, device)
    else:
        kv = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    table = block_table(gen, ctx_lens, page, num_blocks, device)
    poison_unused_blocks(kv, table)
    q_lens = [q for q, _ in seqs]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    args = (table, cu.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device))
    return q, kv, kv_scale, args, head_dim**-0.5


def run_case(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, page: int,
    dtype: torch.dtype, device: str = "cpu", seed: int = 0, kernel=prefill_attention,
) -> None:  # fmt: skip
    """seqs: (q_len, ctx) per sequence; the q_len new tokens are the context's last ones."""
    q, kv, _, args, scale = _inputs(seqs, heads, kv_heads, head_dim, page, dtype, device, seed)
    ref64 = prefill_attention_ref(q.double(), kv[0].double(), kv[1].double(), *args, scale)
    poison_allocator(device)
    out = kernel(q, kv[0], kv[1], *args, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref64, dtype)


def naive_attention(q, k, v, scale):  # q: [Lq, D] at the last Lq positions of k, v: [L, D]
    s = (q @ k.T) * scale
    offset = k.shape[0] - q.shape[0]
    mask = torch.arange(k.shape[0])[None, :] > offset + torch.arange(q.shape[0])[:, None]
    return s.masked_fill(mask, float("-inf")).softmax(-1) @ v


def test_ref_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    seqs, page, heads, kv_heads, dim = [(5, 40), (1, 17), (33, 33)], 16, 6, 2, 64
    kv = kv_layer(gen, 12, page, kv_heads, dim, torch.float64, "cpu")
    table = block_table(gen, [c for _, c in seqs], page, 12, "cpu")
    q = torch.randn(39, heads, dim, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 39], dtype=torch.int32)
    lens = torch.tensor([40, 17, 33], dtype=torch.int32)
    out = prefill_attention_ref(q, kv[0], kv[1], table, cu, lens, 0.3)
    for b, (_, ctx) in enumerate(seqs):
        blocks = table[b, : (ctx + page - 1) // page].long()
        k = kv[0][blocks].flatten(0, 1)[:ctx]
        v = kv[1][blocks].flatten(0, 1)[:ctx]
        for h in range(heads):
            qh = q[cu[b] : cu[b + 1], h]
            want = naive_attention(qh, k[:, h // 3], v[:, h // 3], 0.3)
            torch.testing.assert_close(out[cu[b] : cu[b + 1], h], want)


# one big mixed batch: first chunk, later chunk of a long context, decode token, reused prefix
def test_mixed_batch_long_context():
    seqs = [(300, 300), (160, 2000), (1, 1500), (37, 101)]
    run_case(seqs, heads=8, kv_heads=2, head_dim=128, page=16, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page,head_dim", [(16, 64), (32, 128)])
def test_small_mixed_batches(dtype, group, page, head_dim):
    seqs = [(1, 1), (45, 45), (7, 90), (1, 70), (33, 200)]
    run_case(seqs, heads=group, kv_heads=1, head_dim=head_dim, page=page, dtype=dtype,
             seed=group * 100 + page)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_tokens_only(dtype):
    run_case([(1, 1), (1, 31), (1, 64), (1, 129)], heads=8, kv_heads=2, head_dim=64, page=32,
             dtype=dtype)  # fmt: skip


def variant(**changes) -> functools.partial:
    """`_prefill` with the interpreter's launch config changed: an H100 tuning variant."""
    return functools.partial(_prefill, tuning=dataclasses.replace(_CPU_TUNING, **changes))


def test_k_loaded_as_rows():
    """The K_ROWS variant (K tile loaded as stored, transposed on chip): the H100 tuner's pick."""
    run_case([(40, 40), (1, 77), (19, 300)], heads=4, kv_heads=1, head_dim=64, page=16,
             dtype=torch.float16, seed=9, kernel=variant(k_rows=True))  # fmt: skip


def test_one_head_per_program():
    """PACK_GROUP off (one query head per program, rows are tokens): an autotuner candidate."""
    run_case([(40, 40), (1, 77), (19, 300)], heads=6, kv_heads=2, head_dim=64, page=32,
             dtype=torch.float16, seed=11, kernel=variant(pack_group=False))  # fmt: skip


def test_narrow_launch_config():
    """The config short prompts take on GPU (64-row programs, 32-bit offsets), on the
    interpreter; and which launches count as narrow on a 132-SM card (Llama-3-8B's 8 KV heads,
    GQA 4): one prompt of up to ~1.5k tokens, not 2k, nor sixteen 512-token prompts."""
    run_case([(70, 70), (1, 77), (45, 300), (33, 129)], heads=8, kv_heads=2, head_dim=64,
             page=16, dtype=torch.float16, seed=13,
             kernel=functools.partial(_prefill, tuning=NARROW_TUNING))  # fmt: skip
    assert narrow(512, 1, 4, 8, 132) and narrow(1024, 1, 4, 8, 132)
    assert not narrow(2048, 1, 4, 8, 132) and not narrow(16 * 512, 16, 4, 8, 132)


# the sweep's variants (benchmarks/bench_kernels.py --prefill-sweep), on the interpreter's tiles
@pytest.mark.parametrize(
    "changes",
    [
        dict(lazy_rescale=True),
        dict(lean_index=True),
        dict(lazy_rescale=True, lean_index=True, k_rows=True, block_n=32),
        dict(lazy_rescale=True, pack_group=False, block_m=32),
    ],
)
def test_tuning_variants(changes):
    seqs = [(70, 70), (1, 77), (45, 300), (33, 129)]
    run_case(seqs, heads=8, kv_heads=2, head_dim=64, page=16, dtype=torch.float16, seed=5,
             kernel=variant(**changes))  # fmt: skip


def test_lean_index_other_layouts(monkeypatch):
    """lean_index where K and V strides differ (V padded per head), and with 64-bit offsets (the
    host told the cache does not fit int32)."""
    module = importlib.import_module("kvmesh.kernels.prefill_attention")
    gen = torch.Generator().manual_seed(21)
    seqs, page, heads, kv_heads, dim = [(33, 70), (1, 40), (20, 20)], 16, 4, 2, 64
    kv = kv_layer(gen, 12, page, kv_heads, dim, torch.float16, "cpu")
    table = block_table(gen, [c for _, c in seqs], page, 12, "cpu")
    v_padded = torch.randn(12, page, kv_heads, dim + 16, generator=gen).half()[..., :dim]
    v_padded.copy_(kv[1])
    assert v_padded.stride() != kv[0].stride()
    q = torch.randn(54, heads, dim, generator=gen).half()
    cu = torch.tensor([0, 33, 34, 54], dtype=torch.int32)
    lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    ref64 = prefill_attention_ref(q.double(), kv[0].double(), kv[1].double(), table, cu, lens, 0.1)
    lean = variant(lean_index=True)
    assert_close(lean(q, kv[0], v_padded, table, cu, lens, 0.1), ref64, torch.float16)
    monkeypatch.setattr(module, "_max_offset", lambda cache: 2**31)
    for v in (v_padded, kv[1]):
        assert_close(lean(q, kv[0], v, table, cu, lens, 0.1), ref64, torch.float16)


def test_lazy_rescale_growing_scores():
    """Scores (base 2) grow along the keys by 0.05 a key, then by 1: the running max lags by up to
    the slack over the first tiles and must move on the later ones, where the sums would
    otherwise overflow fp32."""
    gen = torch.Generator().manual_seed(3)
    page, heads, dim, ctx, scale = 16, 4, 64, 448, 0.5
    kv = kv_layer(gen, 32, page, 1, dim, torch.float32, "cpu")
    table = block_table(gen, [ctx], page, 32, "cpu")
    j = torch.arange(ctx, dtype=torch.float32)
    score = torch.where(j < 192, 0.05 * j, 9.6 + (j - 192))
    # k at position j: score / (dim * scale * log2(e)) in every dim, so q = 1 scores `score`
    k_rows = score / (dim * scale * 1.4426950408889634)
    kv[0][table[0, : ctx // page].long()] = k_rows.view(-1, page, 1, 1).expand(-1, -1, 1, dim)
    q = 1 + 0.01 * torch.randn(ctx, heads, dim, generator=gen)
    cu = torch.tensor([0, ctx], dtype=torch.int32)
    lens = torch.tensor([ctx], dtype=torch.int32)
    ref64 = prefill_attention_ref(
        q.double(), kv[0].double(), kv[1].double(), table, cu, lens, scale
    )
    assert_close(variant(lazy_rescale=True)(q, kv[0], kv[1], table, cu, lens, scale), ref64,
                 torch.float32)  # fmt: skip


def run_fp8_case(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, page: int,
    dtype: torch.dtype, device: str = "cpu", seed: int = 0, kernel=prefill_attention,
) -> None:  # fmt: skip
    """An FP8 cache: the kernel against float64 attention over the dequantized cache, and the
    reference (q's dtype) against the reference run on the cache dequantized beforehand with
    quant.dequantize_kv_fp8 (the same computation)."""
    q, kv, kv_scale, args, scale = _inputs(seqs, heads, kv_heads, head_dim, page, dtype, device,
                                           seed, fp8=True)  # fmt: skip
    values = dequantized(kv, kv_scale)
    ref64 = prefill_attention_ref(q.double(), *values.double(), *args, scale)
    got_ref = prefill_attention_ref(q, kv[0], kv[1], *args, scale, kv_scale=kv_scale)
    want_ref = prefill_attention_ref(q, *values.to(dtype), *args, scale)
    torch.testing.assert_close(got_ref, want_ref, rtol=0, atol=0)
    poison_allocator(device)
    out = kernel(q, kv[0], kv[1], *args, scale, kv_scale=kv_scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_fp8_cache(dtype, group):
    seqs = [(1, 1), (45, 45), (7, 90), (1, 70), (33, 200)]
    run_fp8_case(seqs, heads=2 * group, kv_heads=2, head_dim=64, page=16, dtype=dtype,
                 seed=fresh_seed())  # fmt: skip


@pytest.mark.parametrize(
    "changes", [dict(k_rows=True), dict(pack_group=False), dict(lazy_rescale=True, lean_index=True)]
)
def test_fp8_cache_tuning_variants(changes):
    run_fp8_case([(70, 70), (1, 77), (33, 129)], heads=8, kv_heads=2, head_dim=64, page=16,
                 dtype=torch.float16, seed=fresh_seed(), kernel=variant(**changes))  # fmt: skip
