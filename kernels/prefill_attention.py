"""Causal prefill attention over a paged KV cache, for packed variable-length batches.

One kernel serves first chunks, later chunks and reused prefixes: the new tokens' K/V are
already in the cache, so every key is read through the block table.

    sequence b, q_len = cu[b+1] - cu[b], ctx = seq_lens[b] (context incl. the new tokens)

    keys:    0 ............................................ ctx-1
    queries:                           ctx-q_len ........... ctx-1
    query j sits at position ctx - q_len + j and sees keys 0..ctx-q_len+j

GQA: query head h reads kv head h // (num_heads // num_kv_heads).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _gather_context(cache: torch.Tensor, blocks: torch.Tensor, ctx: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, Hk, D] -> [Hk, ctx, D]
    return cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # q: [total_q, H, D]; caches: [num_blocks, block_size, Hk, D]; block_table: [B, max_blocks]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        blocks = block_table[b, : (ctx + block_size - 1) // block_size].long()
        k = _gather_context(k_cache, blocks, ctx).to(q.dtype)  # [Hk, ctx, D]
        v = _gather_context(v_cache, blocks, ctx).to(q.dtype)
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, ctx]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[start:end] = o.transpose(0, 1)
    return out


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, k_base, v_base, table_row, q_pos,
    key_lo, key_hi, ctx, stride_k_blk, stride_k_off, stride_v_blk, stride_v_off, qk_scale,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, K_ROWS: tl.constexpr,
):  # fmt: skip
    # Online softmax over keys [key_lo, key_hi), BLOCK_N at a time, in base 2:
    #   m = running row max, l = running row sum of 2^(s - m), acc = running sum of p @ V.
    dims = tl.arange(0, HEAD_DIM)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        # each key's page, from the block table; int64 so page * stride never wraps
        page = tl.load(table_row + keys // PAGE, mask=keys < ctx, other=0).to(tl.int64)
        k_rows = page * stride_k_blk + (keys % PAGE) * stride_k_off
        v_rows = page * stride_v_blk + (keys % PAGE) * stride_v_off
        if K_ROWS:  # load K as stored ([BLOCK_N, HEAD_DIM] rows) and transpose in shared memory
            k = tl.trans(tl.load(k_base + k_rows[:, None] + dims[None, :]))
        else:
            k = tl.load(k_base + k_rows[None, :] + dims[:, None])  # [HEAD_DIM, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL_MASK:
            visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < ctx)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if CAUSAL_MASK:  # past the context's end the rows are block 0's: keep stale NaNs out
            v_ok = (keys < ctx)[:, None]
            v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=v_ok, other=0.0)
        else:
            v = tl.load(v_base + v_rows[:, None] + dims[None, :])  # [BLOCK_N, HEAD_DIM]
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, cu_ptr, lens_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
    stride_k_blk, stride_k_off, stride_k_h, stride_v_blk, stride_v_off, stride_v_h,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    K_ROWS: tl.constexpr,
):  # fmt: skip
    # heaviest tiles (latest queries, most keys) first: less of a tail at the end of the grid
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq, head = tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    m_start = tile * BLOCK_M
    if m_start >= q_len:  # the grid is sized for the longest sequence
        return
    ctx = tl.load(lens_ptr + seq)
    first_pos = ctx - q_len  # position of this sequence's first new token
    rows = m_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    q_off = (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    # load q once: it stays on chip for the whole key loop
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    q_pos = first_pos + rows

    kv_head = head // GROUP
    k_base = k_ptr + kv_head * stride_k_h
    v_base = v_ptr + kv_head * stride_v_h
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys below the tile's first position are visible to every row: no mask needed there
    diag_lo = (first_pos + m_start) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, 0, diag_lo, ctx,
        stride_k_blk, stride_k_off, stride_v_blk, stride_v_off, qk_scale,
        PAGE, BLOCK_N, HEAD_DIM, False, DOT_PRECISION, K_ROWS,
    )  # fmt: skip
    # the diagonal band: causal and end-of-context masks
    diag_hi = tl.minimum(first_pos + m_start + BLOCK_M, ctx)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, diag_lo, diag_hi, ctx,
        stride_k_blk, stride_k_off, stride_v_blk, stride_v_off, qk_scale,
        PAGE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION, K_ROWS,
    )  # fmt: skip
    out = acc / l_i[:, None]
    o_off = (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _tuning_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "K_ROWS": k_rows}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
        ]
        for k_rows in (False, True)
    ]


_prefill_tuned = triton.autotune(configs=_tuning_configs(), key=["HEAD_DIM"])(_prefill_kernel)
# no tuning for the interpreter (CPU tests) nor fp32 (exactness runs, not speed)
_FIXED_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "K_ROWS": False}
_FIXED_FP32_GPU = {"BLOCK_M": 64, "BLOCK_N": 32, "K_ROWS": False, "num_warps": 4, "num_stages": 2}


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton version of `prefill_attention_ref` (same contract). FlashAttention-2 style."""
    total_q, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0 and head_dim in (64, 128)
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert block_table.dim() == 2 and block_table.shape[0] == batch
    assert block_table.dtype == torch.int32 and block_table.stride(1) == 1
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.dtype == torch.int32
    assert seq_lens.dtype == torch.int32
    cu_seqlens_q, seq_lens = cu_seqlens_q.contiguous(), seq_lens.contiguous()
    out = torch.empty_like(q)
    if total_q == 0 or batch == 0:
        return out
    on_cpu = q.device.type == "cpu"
    # no host sync on GPU: a sequence has at most total_q - (batch - 1) new tokens
    max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if on_cpu else total_q - batch + 1
    tuned = not on_cpu and q.dtype != torch.float32
    kernel = _prefill_tuned if tuned else _prefill_kernel
    extra: dict = {} if tuned else _FIXED_CONFIG if on_cpu else _FIXED_FP32_GPU

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(max(max_q, 1), meta["BLOCK_M"]), batch, num_heads)

    kernel[grid](
        q, k_cache, v_cache, out, block_table, cu_seqlens_q, seq_lens,
        scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=num_heads // num_kv_heads, PAGE=page, HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **extra,
    )  # fmt: skip
    return out
