"""Causal prefill attention over a paged KV cache, for packed variable-length batches.

One kernel serves first chunks, later chunks and reused prefixes: the new tokens' K/V are
already in the cache, so every key is read through the block table.

    sequence b, q_len = cu[b+1] - cu[b], ctx = seq_lens[b] (context incl. the new tokens)

    keys:    0 ............................................ ctx-1
    queries:                           ctx-q_len ........... ctx-1
    query j sits at position ctx - q_len + j and sees keys 0..ctx-q_len+j

GQA: query head h reads kv head h // (num_heads // num_kv_heads). With PACK_GROUP a program
serves all the query heads of one kv head, so each K/V tile is loaded once for the group.

FP8 cache (kv_scale [2, Hk] fp32; the rule in kernels/kv_write): K and V codes are converted to
q's dtype (exact) and the head's scales folded out of the products: scores = (q . K codes) *
K scale, out = (P @ V codes) * V scale / l, in fp32 (the dequantized cache's attention, up to
fp32 rounding). First chunks (`fresh`) attend over the same quantized values: with an FP8 cache
rope_write_kv leaves k and v holding the codes' values, and the reference reads the cache.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvmesh.kernels.device import num_sms
from kvmesh.kernels.first_chunk_attention import FreshChunks, first_chunk_attention, supported
from kvmesh.kernels.kv_write import kv_fp8
from kvmesh.kernels.quant import dequantize_kv_fp8

# lazy rescaling lets a row's running max lag its true max by up to this much (base 2): p <= 2^8,
# far from overflow in bf16 P and in the fp32 sums
RESCALE_SLACK = tl.constexpr(8.0)


def _gather_context(
    cache: torch.Tensor, blocks: torch.Tensor, ctx: int, scale: torch.Tensor | None
) -> torch.Tensor:
    # cache: [num_blocks, block_size, Hk, D] -> [Hk, ctx, D]; scale [Hk]: FP8 codes dequantized
    rows = cache[blocks].flatten(0, 1)[:ctx]
    if scale is not None:
        rows = dequantize_kv_fp8(rows, scale)
    return rows.transpose(0, 1)


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fresh: FreshChunks | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    # q: [total_q, H, D]; caches: [num_blocks, block_size, Hk, D]; block_table: [B, max_blocks]
    # fresh: the same keys and values outside the cache (the kernel's fast path); unused here
    # kv_scale: [2, Hk] fp32 with an FP8 cache (read as code * scale, in fp32)
    kv_fp8(k_cache, v_cache, kv_scale)  # checks the pairing
    k_scale, v_scale = (None, None) if kv_scale is None else (kv_scale[0], kv_scale[1])
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        blocks = block_table[b, : (ctx + block_size - 1) // block_size].long()
        k = _gather_context(k_cache, blocks, ctx, k_scale).to(q.dtype)  # [Hk, ctx, D]
        v = _gather_context(v_cache, blocks, ctx, v_scale).to(q.dtype)
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
    DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr, K_ROWS: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, INDEX_32: tl.constexpr, SAME_KV_ROWS: tl.constexpr,
):  # fmt: skip
    # Online softmax over keys [key_lo, key_hi), BLOCK_N at a time, in base 2:
    #   m = running row max of s * qk_scale, l = running row sum of 2^(s * qk_scale - m),
    #   acc = running sum of p @ V.
    # DIAGONAL: the tiles a causal boundary or the context's end crosses (masks); else none.
    # LAZY_RESCALE (unmasked tiles only): m moves, and acc and l are rescaled, only when some
    # row's max grows by more than RESCALE_SLACK; any m works as long as acc and l share it.
    dims = tl.arange(0, HEAD_DIM)
    for start in range(key_lo, key_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        # each key's page, from the block table. (One lookup per page, through a reshape, stops
        # Triton 3.6 from pipelining the K/V loads.)
        if DIAGONAL:  # past the context's end: page 0 (in bounds; masked below)
            page = tl.load(table_row + keys // PAGE, mask=keys < ctx, other=0)
        else:
            page = tl.load(table_row + keys // PAGE)
        # element offset of each key's row; int64 unless the host checked the cache fits int32
        if INDEX_32:
            k_rows = page * stride_k_blk + (keys % PAGE) * stride_k_off
        else:
            k_rows = page.to(tl.int64) * stride_k_blk + (keys % PAGE) * stride_k_off
        if SAME_KV_ROWS:  # K and V strides match: one set of offsets from two bases
            v_rows = k_rows
        elif INDEX_32:
            v_rows = page * stride_v_blk + (keys % PAGE) * stride_v_off
        else:
            v_rows = page.to(tl.int64) * stride_v_blk + (keys % PAGE) * stride_v_off
        if K_ROWS:  # load K as stored ([BLOCK_N, HEAD_DIM] rows) and transpose on chip
            k = tl.trans(tl.load(k_base + k_rows[:, None] + dims[None, :]))
        else:
            k = tl.load(k_base + k_rows[None, :] + dims[:, None])  # [HEAD_DIM, BLOCK_N]
        k = k.to(q.dtype)  # FP8 codes: exact; else no-op
        s = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], unscaled
        if DIAGONAL:
            # q_pos < ctx, so the causal mask also hides keys past the context's end
            s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
        # qk_scale > 0: max(s) * qk_scale = max(s * qk_scale); one FMA per score below
        m_tile = tl.max(s, axis=1) * qk_scale
        if LAZY_RESCALE and not DIAGONAL:
            # one decision for the whole program (acc is spread over all its warps); the first
            # tile always takes it (m = -inf)
            if tl.max(m_tile - m_i, axis=0) > RESCALE_SLACK:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(s * qk_scale - m_i[:, None])
            l_i += tl.sum(p, axis=1)
        else:
            m_new = tl.maximum(m_i, m_tile)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
        if DIAGONAL:  # past the context's end the rows are block 0's: keep stale NaNs out
            v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=(keys < ctx)[:, None],
                        other=0.0)  # fmt: skip
        else:
            v = tl.load(v_base + v_rows[:, None] + dims[None, :])  # [BLOCK_N, HEAD_DIM]
        v = v.to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


# the table's width changes from step to step: not a specialization (one compile for all)
@triton.jit(do_not_specialize=["stride_table"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, cu_ptr, lens_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
    stride_k_blk, stride_k_off, stride_k_h, stride_v_blk, stride_v_off, stride_v_h,
    kv_scale_ptr, num_kv_heads,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    K_ROWS: tl.constexpr, PACK_GROUP: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    LEAN_INDEX: tl.constexpr, FITS_INT32: tl.constexpr, SAME_KV_STRIDES: tl.constexpr,
    KV_FP8: tl.constexpr,
):  # fmt: skip
    # PACK_GROUP: one program serves a KV head's whole GQA group, each K/V tile loaded once for
    # GROUP query heads; its BLOCK_M rows are (new token, query head) pairs, token-major: row r
    # is token (m_start + r) // GROUP, head (m_start + r) % GROUP of the group. Otherwise one
    # query head per program, and rows are tokens.
    seq = tl.program_id(1)
    HEADS: tl.constexpr = GROUP if PACK_GROUP else 1
    if PACK_GROUP:
        kv_head = tl.program_id(0)
        head0 = kv_head * GROUP
    else:
        head0 = tl.program_id(0)
        kv_head = head0 // GROUP
    # heaviest tiles (latest queries, most keys) first, over all heads and sequences (the tile
    # is the slowest grid axis): less of a tail at the end of the grid
    tile = tl.num_programs(2) - 1 - tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    m_start = tile * BLOCK_M
    if m_start >= q_len * HEADS:  # the grid is sized for the longest sequence
        return
    ctx = tl.load(lens_ptr + seq)
    first_pos = ctx - q_len  # position of this sequence's first new token
    rows = m_start + tl.arange(0, BLOCK_M)
    token = rows // HEADS
    head = head0 + rows % HEADS
    dims = tl.arange(0, HEAD_DIM)
    row_ok = token < q_len
    t64 = (q_start + token).to(tl.int64)
    q_off = t64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :]
    # load q once: it stays on chip for the whole key loop
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    # rows past q_len (not stored) see the whole context: no key past its end
    q_pos = tl.minimum(first_pos + token, ctx - 1)

    k_base = k_ptr + kv_head * stride_k_h
    v_base = v_ptr + kv_head * stride_v_h
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    if KV_FP8:  # the head's K scale folded into the softmax's (positive, so maxima commute)
        qk_scale = qk_scale * tl.load(kv_scale_ptr + kv_head)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # LEAN_INDEX: 32-bit key offsets where the cache allows, shared by K and V where it can
    INDEX_32: tl.constexpr = LEAN_INDEX and FITS_INT32
    SAME_KV_ROWS: tl.constexpr = LEAN_INDEX and SAME_KV_STRIDES
    # keys below the tile's first position are visible to every row: no mask needed there
    pos_lo = first_pos + m_start // HEADS
    diag_lo = pos_lo // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, 0, diag_lo, ctx,
        stride_k_blk, stride_k_off, stride_v_blk, stride_v_off, qk_scale,
        PAGE, BLOCK_N, HEAD_DIM, False, DOT_PRECISION, K_ROWS, LAZY_RESCALE, INDEX_32, SAME_KV_ROWS,
    )  # fmt: skip
    # the diagonal band, up to the tile's last position: causal and end-of-context masks
    diag_hi = tl.minimum(first_pos + (m_start + BLOCK_M - 1) // HEADS + 1, ctx)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, k_base, v_base, table_row, q_pos, diag_lo, diag_hi, ctx,
        stride_k_blk, stride_k_off, stride_v_blk, stride_v_off, qk_scale,
        PAGE, BLOCK_N, HEAD_DIM, True, DOT_PRECISION, K_ROWS, False, INDEX_32, SAME_KV_ROWS,
    )  # fmt: skip
    if KV_FP8:
        acc = acc * tl.load(kv_scale_ptr + num_kv_heads + kv_head)
    out = acc / l_i[:, None]
    o_off = t64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass(frozen=True)
class PrefillTuning:
    """One launch config of the prefill kernel: an autotuner candidate or a benchmark variant."""

    block_m: int  # rows per program: tokens, or (token, query head) pairs with pack_group
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    pack_group: bool = True  # one program per KV head serves its whole GQA group
    k_rows: bool = True  # load K as stored and transpose on chip (else load it transposed)
    maxnreg: int | None = None  # register cap a thread (128: two 8-warp programs an SM)
    lazy_rescale: bool = False  # rescale only when a row max grows by > 2^RESCALE_SLACK times
    lean_index: bool = False  # 32-bit key offsets where the cache fits, one set for K and V

    def meta(self) -> dict:
        """The kernel's tuning constexprs."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, K_ROWS=self.k_rows,
                    PACK_GROUP=self.pack_group, LAZY_RESCALE=self.lazy_rescale,
                    LEAN_INDEX=self.lean_index)  # fmt: skip

    def options(self) -> dict:
        """Compiler options: warps, stages and the register cap."""
        opts: dict = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        return opts if self.maxnreg is None else {**opts, "maxnreg": self.maxnreg}

    def label(self) -> str:
        flags = [("pack", self.pack_group), ("k_rows", self.k_rows), ("lazy", self.lazy_rescale),
                 ("lean", self.lean_index)]  # fmt: skip
        cap = f" maxnreg {self.maxnreg}" if self.maxnreg else ""
        return (f"M{self.block_m} N{self.block_n} {self.num_warps}w {self.num_stages}s{cap} "
                + "+".join(name for name, on in flags if on))  # fmt: skip


# The H100 autotuner's candidates. A cap of 128 registers a thread (a few spills) lets two 8-warp
# programs share an SM, one's softmax overlapping the other's matrix products: 415-421 TFLOP/s on
# the H100 benchmark shape against 338 for the best one-program-per-SM config (BLOCK_N 128, 2
# stages); benchmarks/bench_kernels.py --prefill-sweep times the variants.
TUNING: list[PrefillTuning] = [
    PrefillTuning(128, 64, 8, 2, maxnreg=128),
    PrefillTuning(128, 64, 8, 3, pack_group=False, maxnreg=128),
]
_prefill_tuned = triton.autotune(
    configs=[triton.Config(t.meta(), **t.options()) for t in TUNING], key=["HEAD_DIM", "GROUP"]
)(_prefill_kernel)
# Launches with too few 128-row programs to keep every SM busy (fewer than NARROW_PROGRAMS an SM:
# short prompts) take 64-row, one-warpgroup programs instead, twice as many: faster up to about
# 1,024 tokens, slower from 2,048 (benchmarks/RESULTS.md, "Constants the code cites").
NARROW_TUNING = PrefillTuning(64, 64, 4, 2, lean_index=True)
NARROW_PROGRAMS = 3


def narrow(total_q: int, batch: int, group: int, num_kv_heads: int, sms: int) -> bool:
    """Whether a launch has fewer 128-row programs with work than NARROW_PROGRAMS for each of the
    card's `sms` multiprocessors. Rows are (token, query head) pairs, and each sequence may end
    in a partial tile."""
    programs = num_kv_heads * (triton.cdiv(total_q * group, 128) + batch)
    return programs < NARROW_PROGRAMS * sms


# no tuning for the interpreter (CPU tests) nor fp32 (exactness runs, not speed)
_CPU_TUNING = PrefillTuning(64, 64, 4, 2, k_rows=False)
_FP32_GPU_TUNING = PrefillTuning(64, 32, 4, 2, k_rows=False)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    fresh: FreshChunks | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `prefill_attention_ref` (same contract). FlashAttention-2 style. With
    `fresh` (a step of first chunks only) on an sm_90 GPU, kernels/first_chunk_attention's Gluon
    kernel runs instead, on the keys and values outside the cache (with an FP8 cache, the codes'
    values rope_write_kv left there: kv_scale is not needed for them)."""
    if fresh is not None and supported(q, fresh.k, fresh.v):
        return first_chunk_attention(q, fresh.k, fresh.v, cu_seqlens_q, fresh.max_len, scale)
    return _prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale,
                    kv_scale=kv_scale)  # fmt: skip


def _max_offset(cache: torch.Tensor) -> int:
    """The largest element offset from cache's first element to any of its elements."""
    return sum((n - 1) * st for n, st in zip(cache.shape, cache.stride(), strict=True))


def _prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    tuning: PrefillTuning | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`prefill_attention`, with an explicit launch config (benchmarks, tests of the variants)."""
    total_q, num_heads, head_dim = q.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0 and head_dim in (64, 128)
    assert scale > 0  # the kernel takes row maxima before scaling (kv_scale's are positive)
    fp8 = kv_fp8(k_cache, v_cache, kv_scale)
    assert fp8 or q.dtype == k_cache.dtype
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
    tuned = tuning is None and not on_cpu and q.dtype != torch.float32
    group = num_heads // num_kv_heads
    if tuned and narrow(total_q, batch, group, num_kv_heads, num_sms(q.device)):
        tuned, tuning = False, NARROW_TUNING
    if tuning is None:
        tuning = _CPU_TUNING if on_cpu else _FP32_GPU_TUNING
    kernel = _prefill_tuned if tuned else _prefill_kernel
    extra: dict = {} if tuned else {**tuning.meta(), **({} if on_cpu else tuning.options())}

    def grid(meta: dict) -> tuple[int, int, int]:
        heads, rows = (num_kv_heads, group) if meta["PACK_GROUP"] else (num_heads, 1)
        tiles = triton.cdiv(max(max_q, 1) * rows, meta["BLOCK_M"])
        assert on_cpu or tiles < 65536, "too many new tokens for one launch"
        return (heads, batch, tiles)

    kernel[grid](
        q, k_cache, v_cache, out, block_table, cu_seqlens_q, seq_lens,
        scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), kv_scale, num_kv_heads,
        GROUP=group, PAGE=page, HEAD_DIM=head_dim,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FITS_INT32=max(_max_offset(k_cache), _max_offset(v_cache)) < 2**31,
        SAME_KV_STRIDES=k_cache.stride() == v_cache.stride(), KV_FP8=fp8,
        **extra,
    )  # fmt: skip
    return out
