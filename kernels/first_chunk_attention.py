"""Causal attention of first chunks on Hopper (sm_90), in Gluon: prompts whose every key is new
in this step, read straight from the qkv projection's output (RoPE already applied in place), not
through the paged cache.

    q: [T, H, D], k, v: [T, Hk, D] views of the packed sequences (cu_seqlens), heads back to back,
    rows any multiple of 16 bytes apart; query j of a sequence sees its keys 0..j

A step whose sequences all start at token 0 (no reused prefix, no earlier chunk) takes this path
on sm_90; kernels/prefill_attention serves every other step, and this kernel's reference is the
same attention in torch.

The kernel is FlashAttention-3's plan for Hopper, on sm_90's asynchronous units:
  * persistent: one program per multiprocessor walks the work items (128 query rows of one head
    of one sequence), longest rows first; rounds alternate the programs' order (snake), so a
    program that took a long item takes a short one next (a model of the items' costs: round
    robin gives the busiest program 12% more work than the mean at 4k tokens);
  * warp-specialized: a one-warp loader partition issues TMA loads (the next item's Q while the
    current one runs, and a ring of K/V tiles); two 4-warp consumer partitions own 64 query rows
    each and share the K/V tiles;
  * the consumers take turns at the tensor cores (two mbarriers), so one's softmax runs while the
    other's products do, and each issues tile j's QK^T with tile j-1's PV (async wgmma, P from
    registers) before it computes tile j's softmax;
  * the softmax folds the scale into one FMA (maxima over raw scores) and keeps each thread's
    partial row sums, reduced across threads once at the end.
Outputs are masked stores: an item's last rows may belong to the next sequence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from kvmesh.kernels.device import capability, num_sms

try:  # Gluon (Triton >= 3.5) with the Hopper modules
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover (every supported Triton has it; the path just turns off)
    gluon = None


@dataclass(frozen=True)
class FreshChunks:
    """A step whose sequences all start at token 0: their keys and values as [T, Hk, D] views of
    the qkv projection (RoPE applied), and the longest sequence's length (a host int). With an
    FP8 KV cache they hold the codes' values (rope_write_kv leaves them so), so this kernel,
    which never reads the cache and takes no kv_scale, attends over what a later read sees."""

    k: torch.Tensor
    v: torch.Tensor
    max_len: int


def first_chunk_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens, computed in fp32 (or q's
    wider dtype), returned in q's. q: [T, H, D], k, v: [T, Hk, D], cu_seqlens: [B + 1] int32,
    max_len: the longest sequence (unused here)."""
    out = torch.empty_like(q)
    wide = torch.promote_types(q.dtype, torch.float32)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:], strict=False):
        if b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1).to(wide) for x in (q, k, v))
            got = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                 enable_gqa=True)  # fmt: skip
            out[a:b] = got.transpose(0, 1).to(q.dtype)
    return out


ROWS = 64  # query rows of one consumer warpgroup; a work item is two consumers' rows
BLOCK_N = 64  # keys a tile (measured against 128 on an H100: 533 against 502 TFLOP/s at 4k)
NUM_STAGES = 4  # K/V tiles in flight
Q_BUFFERS = 2  # the next item's Q loads while the current one runs
CONSUMER_REGS = 240  # registers a consumer thread (the loader keeps 24)
SMEM_LIMIT = 232448  # bytes a program may use on sm_90


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this kernel runs these views: Gluon present, an sm_90 CUDA device, 16-bit floats,
    head dim 64 or 128, heads back to back, rows 16-byte aligned (TMA's rules)."""
    if gluon is None or q.device.type != "cuda" or capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.dtype == k.dtype == v.dtype:
        return False
    d = q.shape[2]
    if d not in (64, 128) or k.shape[2] != d or q.shape[1] % k.shape[1] != 0:
        return False
    return all(
        x.stride(2) == 1 and x.stride(1) == d and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
        for x in (q, k, v)
    )


if gluon is not None:
    # Triton 3.6 names the TMA load async_copy_global_to_shared, later versions async_load
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _item(rnd, cu_ptr, num_mb, H: gl.constexpr, BATCH_HEADS, ROWS: gl.constexpr):
        """This program's work item in round `rnd`: (valid, first row, head, sequence start,
        sequence length). Items run longest rows first, in snake order over the programs."""
        p = gl.program_id(0)
        if rnd % 2 == 1:
            p = gl.num_programs(0) - 1 - p
        w = rnd * gl.num_programs(0) + p
        valid = w < num_mb * BATCH_HEADS
        w = gl.minimum(w, num_mb * BATCH_HEADS - 1)
        m0 = (num_mb - 1 - w // BATCH_HEADS) * 2 * ROWS
        seq = w % BATCH_HEADS // H
        start = gl.load(cu_ptr + seq)
        seq_len = gl.load(cu_ptr + seq + 1) - start
        return valid & (m0 < seq_len), m0, w % H, start, seq_len

    @gluon.jit
    def _softmax(s, j, rows, m_i, l_i, r0, seq_len, qk_scale, BLOCK_N: gl.constexpr,
                 dtype: gl.constexpr, p_layout: gl.constexpr, col_s: gl.constexpr,
                 row_o: gl.constexpr):  # fmt: skip
        """Tile j's raw scores s -> P (16-bit, wgmma's register operand), the output rows'
        rescale (in the output's row layout), the running row maxima (raw) and each thread's
        partial row sums [rows, keys]."""
        if j * BLOCK_N + BLOCK_N > r0:  # the diagonal (and the sequence's end)
            keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_s)
            ok = (keys[None, :] <= rows[:, None]) & (keys[None, :] < seq_len)
            s = gl.where(ok, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))  # raw scores: the scale is positive
        p = gl.exp2(s * qk_scale - (m_new * qk_scale)[:, None])
        alpha = gl.exp2((m_i - m_new) * qk_scale)
        l_i = l_i * alpha[:, None] + p
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        return p_op, gl.convert_layout(alpha, row_o), m_new, l_i

    @gluon.jit
    def _loader(args, C: gl.constexpr, H: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                Q_BUFFERS: gl.constexpr):  # fmt: skip
        (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty,
         turns, out_ptr, stride_ot, cu_ptr, num_mb, batch_heads, qk_scale) = args  # fmt: skip
        it = 0  # K/V tiles loaded
        n = 0  # items taken
        for rnd in range(gl.cdiv(num_mb * batch_heads, gl.num_programs(0))):
            valid, m0, head, start, seq_len = _item(rnd, cu_ptr, num_mb, H, batch_heads, ROWS)
            if valid:
                qb = n % Q_BUFFERS
                # free once both consumers finished the item Q_BUFFERS before (the barriers
                # start with their previous phase complete: the first round does not wait)
                mbarrier.wait(q_empty.index(qb), ((n // Q_BUFFERS) & 1) ^ 1)
                mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)
                for c in gl.static_range(2):
                    _tma_load(q_desc, [start + m0 + c * ROWS, head * HEAD_DIM],
                              q_ready.index(qb), q_smem.index(2 * qb + c))  # fmt: skip
                kv_col = (head // GROUP) * HEAD_DIM
                for t in range(gl.cdiv(gl.minimum(m0 + 2 * ROWS, seq_len), BLOCK_N)):
                    stage = it % NUM_STAGES
                    mbarrier.wait(kv_empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
                    bar = kv_ready.index(stage)
                    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
                    _tma_load(k_desc, [start + t * BLOCK_N, kv_col], bar, k_smem.index(stage))
                    _tma_load(v_desc, [start + t * BLOCK_N, kv_col], bar, v_smem.index(stage))
                    it += 1
                n += 1

    @gluon.jit
    def _take_turn(turns, C: gl.constexpr, g):
        """Wait for this consumer's g-th turn at the tensor cores: they alternate, consumer 0
        first (its turn g follows consumer 1's turn g - 1)."""
        if C == 0:
            mbarrier.wait(turns.index(0), (g - 1) & 1, pred=g > 0)
        else:
            mbarrier.wait(turns.index(1), g & 1)

    @gluon.jit
    def _consumer(args, C: gl.constexpr, H: gl.constexpr, GROUP: gl.constexpr,
                  HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                  NUM_STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr):  # fmt: skip
        (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty,
         turns, out_ptr, stride_ot, cu_ptr, num_mb, batch_heads, qk_scale) = args  # fmt: skip
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        store: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
        it = 0  # K/V tiles consumed
        g = 0  # turns taken
        n = 0  # items taken
        for rnd in range(gl.cdiv(num_mb * batch_heads, gl.num_programs(0))):
            valid, m0, head, start, seq_len = _item(rnd, cu_ptr, num_mb, H, batch_heads, ROWS)
            if valid:
                qb = n % Q_BUFFERS
                mbarrier.wait(q_ready.index(qb), (n // Q_BUFFERS) & 1)
                q = q_smem.index(2 * qb + C)
                r0 = m0 + C * ROWS
                rows = r0 + gl.arange(0, ROWS, layout=row_s)
                m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
                l_i = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
                num_tiles = gl.cdiv(gl.minimum(m0 + 2 * ROWS, seq_len), BLOCK_N)
                # tile 0: its QK^T alone
                stage = it % NUM_STAGES
                mbarrier.wait(kv_ready.index(stage), (it // NUM_STAGES) & 1)
                _take_turn(turns, C, g)
                g += 1
                s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)  # fmt: skip
                mbarrier.arrive(turns.index(1 - C), count=1)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
                p_op, alpha, m_i, l_i = _softmax(s, 0, rows, m_i, l_i, r0, seq_len, qk_scale,
                                                 BLOCK_N, dtype, p_layout, col_s,
                                                 row_o)  # fmt: skip
                acc = warpgroup_mma_init(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout))
                for j in range(1, num_tiles):
                    prev = stage
                    stage = (it + j) % NUM_STAGES
                    mbarrier.wait(kv_ready.index(stage), ((it + j) // NUM_STAGES) & 1)
                    _take_turn(turns, C, g)
                    g += 1
                    s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero,
                                          use_acc=False, is_async=True)  # fmt: skip
                    acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
                    mbarrier.arrive(turns.index(1 - C), count=1)
                    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))  # PV may run on
                    p_op, alpha, m_i, l_i = _softmax(s, j, rows, m_i, l_i, r0, seq_len, qk_scale,
                                                     BLOCK_N, dtype, p_layout, col_s,
                                                     row_o)  # fmt: skip
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(kv_empty.index(prev), count=1)  # both done: the loader refills
                    acc = warpgroup_mma_init(acc * alpha[:, None])
                mbarrier.arrive(q_empty.index(qb), count=1)  # its last QK^T has completed
                acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(kv_empty.index(stage), count=1)
                it += num_tiles
                n += 1
                out = acc / gl.convert_layout(gl.sum(l_i, axis=1), row_o)[:, None]
                out = gl.convert_layout(out.to(dtype), store)
                r = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, store))
                c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store))
                ptrs = (out_ptr + (start + r)[:, None].to(gl.int64) * stride_ot
                        + head * HEAD_DIM + c[None, :])  # fmt: skip
                gl.store(ptrs, out, mask=(r < seq_len)[:, None])

    @gluon.jit(do_not_specialize=["num_mb", "batch_heads"])
    def _first_chunk_kernel(
        q_desc, k_desc, v_desc, out_ptr, cu_ptr, stride_ot, qk_scale, num_mb, batch_heads,
        H: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, Q_BUFFERS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
    ):  # fmt: skip
        q_smem = gl.allocate_shared_memory(
            q_desc.dtype, [2 * Q_BUFFERS] + q_desc.block_type.shape, q_desc.layout
        )
        k_smem = gl.allocate_shared_memory(
            k_desc.dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout
        )
        v_smem = gl.allocate_shared_memory(
            v_desc.dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout
        )
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], bar_layout)
        q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFFERS, 1], bar_layout)
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
        for i in gl.static_range(Q_BUFFERS):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready,
                kv_empty, turns, out_ptr, stride_ot, cu_ptr, num_mb, batch_heads,
                qk_scale)  # fmt: skip
        # (constexprs stay constexpr only as direct arguments, not inside the args tuple)
        gl.warp_specialize(
            [
                (_consumer, (args, 0, H, GROUP, HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, Q_BUFFERS)),
                (_consumer, (args, 1, H, GROUP, HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, Q_BUFFERS)),
                (_loader, (args, 0, H, GROUP, HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, Q_BUFFERS)),
            ],
            [4, 1],
            [CONSUMER_REGS, 24],
        )


@functools.cache
def _smem_layout(rows: int, head_dim: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared-memory layout of a rows x head_dim tile (built once: every layer of
    every prefill launches with the same few)."""
    element = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([rows, head_dim], element)


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """A [T, heads * D] TMA descriptor over a [T, heads, D] view, blocks of rows x D."""
    t, heads, d = x.shape
    return TensorDescriptor(x, [t, heads * d], [x.stride(0), 1], [rows, d],
                            _smem_layout(rows, d, x.dtype))  # fmt: skip


# the register cap of the whole kernel, so that the consumers are left CONSUMER_REGS a thread:
# 12 warps (two consumer warpgroups and the loader's) share the register file
LAUNCH_OPTIONS = {"num_warps": 4, "maxnreg": (CONSUMER_REGS * 2 + 24) * 128 // (3 * 128) // 8 * 8}


def first_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """Gluon version of `first_chunk_attention_ref` (same contract); needs `supported`."""
    total, num_heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    assert supported(q, k, v), "first_chunk_attention runs 16-bit q, k, v views on sm_90"
    assert k.shape == v.shape and k.shape[0] == total and scale > 0
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
    out = torch.empty_like(q)
    if total == 0 or batch == 0:
        return out
    num_mb = triton.cdiv(max_len, 2 * ROWS)
    batch_heads = num_heads * batch
    programs = min(num_sms(q.device), num_mb * batch_heads)
    _first_chunk_kernel[(programs,)](
        _descriptor(q, ROWS), _descriptor(k, BLOCK_N), _descriptor(v, BLOCK_N), out, cu_seqlens,
        out.stride(0), scale * 1.4426950408889634, num_mb, batch_heads,
        H=num_heads, GROUP=num_heads // k.shape[1], HEAD_DIM=head_dim, ROWS=ROWS,
        BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, Q_BUFFERS=Q_BUFFERS, CONSUMER_REGS=CONSUMER_REGS,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out
