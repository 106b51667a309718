"""The kernel tests of tests/kernels in bf16 on CUDA, plus a cache past 2^31 elements.

Run on a GPU machine, without TRITON_INTERPRET: `python -m pytest tests/gpu/test_kernels_gpu.py`.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (run on a GPU machine)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

import test_activation as activation_cases  # noqa: E402
import test_argmax as argmax_cases  # noqa: E402
import test_block_copy as block_copy_cases  # noqa: E402
import test_checksum as checksum_cases  # noqa: E402
import test_decode_attention as decode_attention_cases  # noqa: E402
import test_first_chunk_attention as first_chunk_cases  # noqa: E402
import test_kv_write as kv_write_cases  # noqa: E402
import test_linear as linear_cases  # noqa: E402
import test_prefill_attention as prefill_attention_cases  # noqa: E402
import test_rms_norm as rms_norm_cases  # noqa: E402
import test_rope as rope_cases  # noqa: E402
import test_rope_kv as rope_kv_cases  # noqa: E402
from kernel_inputs import assert_close  # noqa: E402

import kvmesh.kernels.decode_attention as decode_attention_module  # noqa: E402
import kvmesh.kernels.linear as linear_module  # noqa: E402
import kvmesh.kernels.pdl as pdl_module  # noqa: E402
from kvmesh.kernels.block_copy import gather_blocks, scatter_blocks  # noqa: E402
from kvmesh.kernels.checksum import layer_checksum, layer_checksum_ref  # noqa: E402
from kvmesh.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from kvmesh.kernels.first_chunk_attention import (  # noqa: E402
    FreshChunks,
    first_chunk_attention,
    first_chunk_attention_ref,
    supported,
)
from kvmesh.kernels.kv_write import write_kv  # noqa: E402
from kvmesh.kernels.linear import _CAPTURE_TUNING, TUNING, LinearTuning, linear  # noqa: E402
from kvmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from kvmesh.kernels.rms_norm import rms_norm  # noqa: E402

BF16 = torch.bfloat16


# bf16 throughout; fp16 and fp32 (the engine's exactness runs) once each
CASES = [(BF16, g, p, d) for g in (1, 3, 4, 8) for p, d in ((16, 128), (32, 64))]
CASES += [(torch.float16, 4, 16, 128), (torch.float32, 4, 16, 128), (torch.float32, 3, 32, 64)]


@pytest.mark.parametrize("dtype,group,page,head_dim", CASES)
def test_prefill(dtype, group, page, head_dim):
    seqs = [(300, 300), (160, 2000), (1, 1500), (37, 101), (1, 1), (129, 129 + 64)]
    prefill_attention_cases.run_case(seqs, heads=2 * group, kv_heads=2, head_dim=head_dim,
                                    page=page, dtype=dtype, device="cuda", seed=group)  # fmt: skip


def test_prefill_benchmark_shape():
    prefill_attention_cases.run_case([(4096, 4096)], 32, 8, 128, 16, BF16, "cuda")


def _first_chunk_case(lengths, heads, kv_heads, head_dim, dtype, seed=0, check=None):
    """The Gluon first-chunk attention against its reference in fp64 (sequences `check` only,
    when given)."""
    q, k, v, cu = first_chunk_cases.packed_qkv(lengths, heads, kv_heads, head_dim, dtype, "cuda",
                                               seed)  # fmt: skip
    assert supported(q, k, v)
    out = first_chunk_attention(q, k, v, cu, max(lengths), head_dim**-0.5)
    assert out.shape == q.shape and out.dtype == dtype
    bounds = cu.tolist()
    for b in check if check is not None else [None]:
        rows = slice(None) if b is None else slice(bounds[b], bounds[b + 1])
        sub = cu if b is None else torch.tensor([0, bounds[b + 1] - bounds[b]], device="cuda",
                                                 dtype=torch.int32)  # fmt: skip
        ref64 = first_chunk_attention_ref(q[rows].double(), k[rows].double(), v[rows].double(),
                                          sub, max(lengths), head_dim**-0.5)  # fmt: skip
        assert_close(out[rows], ref64, dtype)


FIRST_CHUNK_CASES = [(BF16, g, d) for g in (1, 3, 4, 8) for d in (128, 64)]
FIRST_CHUNK_CASES += [(torch.float16, 4, 128), (torch.float16, 3, 64)]


@pytest.mark.parametrize("dtype,group,head_dim", FIRST_CHUNK_CASES)
def test_first_chunk_attention(dtype, group, head_dim):
    lengths = [300, 1, 177, 64, 16, 129, 2, 2000, 255, 33]
    _first_chunk_case(lengths, 2 * group, 2, head_dim, dtype, seed=group)


def test_first_chunk_attention_benchmark_shape():
    _first_chunk_case([4096], 32, 8, 128, BF16)


def test_first_chunk_attention_past_int32_offsets():
    """520 sequences of 1,024 tokens, 32 heads of 128: output offsets pass 2^31 elements from
    sequence 512 on (checked there and at the start)."""
    _first_chunk_case([1024] * 520, 32, 8, 128, BF16, check=[0, 511, 512, 519])


def test_prefill_attention_takes_the_first_chunk_kernel_for_fresh_steps():
    lengths = [300, 1, 177, 2000]
    q, k, v, cu = first_chunk_cases.packed_qkv(lengths, 32, 8, 128, BF16, "cuda")
    k_cache, v_cache, table, lens = first_chunk_cases.paged(k, v, lengths, 16)
    scale = 128**-0.5
    fresh = prefill_attention(q, k_cache, v_cache, table, cu, lens, scale,
                              FreshChunks(k, v, max(lengths)))  # fmt: skip
    direct = first_chunk_attention(q, k, v, cu, max(lengths), scale)
    torch.testing.assert_close(fresh, direct, rtol=0, atol=0)
    paged = prefill_attention(q, k_cache, v_cache, table, cu, lens, scale)
    assert_close(fresh, paged.double(), BF16, factor=2.0)


@pytest.mark.parametrize("dtype,group,page,head_dim", CASES)
def test_decode(dtype, group, page, head_dim):
    ctx = [1, 15, 64, 130, 333, 2000, 4096, 2]
    decode_attention_cases.run_case(ctx, heads=2 * group, kv_heads=2, head_dim=head_dim, page=page,
                                   dtype=dtype, device="cuda", seed=group)  # fmt: skip


@pytest.mark.parametrize("waves", [1, 2, 16])
@pytest.mark.parametrize("group,head_dim", [(4, 128), (3, 64)])
def test_decode_with_the_new_token(waves, group, head_dim):
    """RoPE, the KV write and attention in one launch (NewToken), bf16: one split a sequence
    (batch 64 on an H100) and several."""
    tuning = decode_attention_module.DecodeTuning(waves=waves)
    decode_attention_cases.run_new_token_case(
        [1, 17, 577, 2000, 64, 129] * 4, heads=2 * group, kv_heads=2, head_dim=head_dim, page=16,
        dtype=BF16, tuning=tuning, seed=waves, skip_slot=3, device="cuda",
    )  # fmt: skip


def test_decode_benchmark_shape():
    ctx = torch.randint(1, 4097, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    decode_attention_cases.run_case(ctx, 32, 8, 128, 16, BF16, "cuda")


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm(with_residual, hidden):
    rms_norm_cases.run_case(8192 if hidden == 4096 else 37, hidden, BF16, with_residual, "cuda")


@pytest.mark.parametrize("rows,inter", [(1, 64), (19, 1536), (8192, 4096)])
def test_silu_and_mul(rows, inter):
    activation_cases.run_case(rows, inter, BF16, "cuda")


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (64, 128256), (256, 49152), (7, 4097)])
def test_argmax(rows, vocab):
    argmax_cases.run_case(rows, vocab, BF16, "cuda", seed=rows)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("scaling", [None, rope_cases.LLAMA31])
def test_rope_bf16(heads, kv_heads, head_dim, scaling):
    rope_cases.run_case(1000, heads, kv_heads, head_dim, BF16, scaling, "cuda")


@pytest.mark.parametrize("kv_heads,head_dim,page", [(1, 64, 16), (8, 128, 32)])
def test_write_kv(kv_heads, head_dim, page):
    kv_write_cases.run_case(300, kv_heads, head_dim, page, BF16, "cuda")


@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(32, 8, 128, 16), (9, 3, 64, 32)])
def test_rope_write_kv(heads, kv_heads, head_dim, page):
    """The fused RoPE + KV write against float64 and, bit for bit, the two kernels it fuses."""
    rope_kv_cases.run_case(300, heads, kv_heads, head_dim, page, BF16, device="cuda")


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_scatter(id_dtype):
    block_copy_cases.run_case(200, 50, 16, 8, 128, BF16, id_dtype, "cuda")


@pytest.mark.parametrize("offset", [0, 8, 3])  # 3: not 8-aligned (the byte path)
@pytest.mark.parametrize("nbytes", [0, 1, 7, 9, 4096 * 8 + 5, (5 << 20) + 7, (256 << 20) + 3])
def test_checksum(nbytes, offset):
    exact = nbytes < 1 << 20  # the Python definition too; larger ones against the reference
    checksum_cases.run_case(nbytes, offset, "cuda", seed=nbytes, exact=exact)


@pytest.mark.parametrize("offset", [0, 3])
def test_checksum_past_int32_offsets(offset):
    """A 2 GiB + 43 byte layer, zero but for random bytes at known places (some past 2^31 and
    in the tail): the value is a short sum in Python integers."""
    nbytes = (1 << 31) + 8 * 5 + 3
    data = torch.zeros(offset + nbytes, dtype=torch.uint8, device="cuda")[offset:]
    gen = torch.Generator().manual_seed(offset)
    places = torch.cat([torch.randint(0, nbytes, (200,), generator=gen),
                        torch.arange(nbytes - 50, nbytes)]).unique()  # fmt: skip
    values = torch.randint(1, 256, (places.numel(),), generator=gen, dtype=torch.uint8)
    data[places.cuda()] = values.cuda()
    n8 = nbytes // 8 * 8
    want = 0
    for j, b in zip(places.tolist(), values.tolist(), strict=True):
        want += b * ((2 * (j // 8) + 1) << (8 * (j % 8)) if j < n8 else 2 * (j - 7 * n8 // 8) + 1)
    assert checksum_cases.value(layer_checksum(data)) == want & checksum_cases.MASK64


@pytest.mark.parametrize("programs", [32, 7])
def test_checksum_of_a_list_of_layers_in_one_launch(programs):
    """Sizes, alignments (16, 8, 1 bytes) and an empty layer in one table, one launch."""
    checksum_cases.run_batch_case("cuda", programs)


def test_checksum_partials_into_pinned_host_memory():
    checksum_cases.run_out_case("cuda")


def test_the_receivers_group_sums_take_more_programs_for_a_larger_group():
    """DeviceStreams.group_sums (the NCCL receiver's checksums): each group's partial sums have
    sum_programs-of-its-bytes columns (32 for a small group, more past 128 MiB), fold to every
    layer's checksum, and a group's copies down arrive with them."""
    from kvmesh.shared.handoff.nccl.streams import DeviceStreams

    dev = DeviceStreams(torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    small = torch.randint(0, 256, (3, 1 << 20), generator=gen, dtype=torch.uint8, device="cuda")
    large = torch.randint(0, 256, (2, 96 << 20), generator=gen, dtype=torch.uint8, device="cuda")
    sums = torch.arange(5, dtype=torch.int64, device="cuda")
    done = dev.group_sums([([(small, 3)], None, []), ([(large, 2)], None, [sums])])
    for _, _, event in done:
        event.synchronize()
    (few, _, _), (many, downs, _) = done
    assert few is not None and many is not None
    assert few.shape == (3, 32) and many.shape == (2, dev.sum_programs(large.nbytes))
    assert many.shape[1] > 32
    want = [checksum_cases.value(layer_checksum_ref(x)) for x in (*small, *large)]
    assert dev.checksums(few) + dev.checksums(many) == want
    assert len(downs) == 1 and torch.equal(downs[0], sums.cpu())


def test_cache_past_int32_indexing():
    """A layer of 2 x 140k blocks x 16 x 8 x 128 bf16 (4.6e9 elements, 9 GB): for the top blocks
    block * stride passes 2^31, and V's offset alone (2.3e9 elements) does too."""
    page, kv_heads, dim, num_blocks = 16, 8, 128, 140_000
    layer = torch.full((2, num_blocks, page, kv_heads, dim), float("nan"), dtype=BF16,
                       device="cuda")  # fmt: skip
    assert layer[0].stride(0) * (num_blocks - 1) > 2**31 and layer.stride(0) > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    ctx_lens = [3000, 1, 500]
    need = [(c + page - 1) // page for c in ctx_lens]
    top = num_blocks - 1 - torch.randperm(sum(need), generator=gen, device="cuda")
    table = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32, device="cuda")
    used = torch.split(top, need)
    for b, ids in enumerate(used):
        table[b, : ids.numel()] = ids.int()
    ids = top.long()
    layer[:, ids] = torch.randn((2, ids.numel(), page, kv_heads, dim), generator=gen,
                                device="cuda").to(BF16)  # fmt: skip
    # the same context in a small cache: block i of `ids` becomes block i
    small = layer[:, ids].double()
    remap = torch.empty(num_blocks, dtype=torch.int32, device="cuda")
    remap[ids] = torch.arange(ids.numel(), dtype=torch.int32, device="cuda")
    small_table = remap[table.long()]
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")

    q = torch.randn(3, 32, dim, generator=gen, device="cuda").to(BF16)
    out = decode_attention(q, layer[0], layer[1], table, lens, 0.088)
    want = decode_attention_ref(q.double(), small[0], small[1], small_table, lens, 0.088)
    assert_close(out, want, BF16)

    q = torch.randn(64 + 1 + 20, 32, dim, generator=gen, device="cuda").to(BF16)
    cu = torch.tensor([0, 64, 65, 85], dtype=torch.int32, device="cuda")
    out = prefill_attention(q, layer[0], layer[1], table, cu, lens, 0.088)
    want = prefill_attention_ref(q.double(), small[0], small[1], small_table, cu, lens, 0.088)
    assert_close(out, want, BF16)

    gathered = gather_blocks(layer, ids)
    torch.testing.assert_close(gathered.double(), small, rtol=0, atol=0)
    scatter_blocks(layer, ids.flip(0), gathered)
    torch.testing.assert_close(layer[:, ids.flip(0)].double(), small, rtol=0, atol=0)

    k = torch.randn(50, kv_heads, dim, generator=gen, device="cuda").to(BF16)
    slots = ids[:50] * page + 5
    write_kv(k, -k, layer[0], layer[1], slots)
    torch.testing.assert_close(layer[0, ids[:50], 5], k, rtol=0, atol=0)
    torch.testing.assert_close(layer[1, ids[:50], 5], -k, rtol=0, atol=0)


# Llama-3-8B's projections (N, K): qkv, o, gate_up, down, lm_head
LLAMA3_8B_LINEAR = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.parametrize("m", [1, 4, 16, 24, 64])
@pytest.mark.parametrize("n,k", LLAMA3_8B_LINEAR)
def test_linear(n, k, m):
    """The autotuned default path (the first call tunes) against a float64 reference."""
    linear_cases.run_case(m, n, k, BF16, device="cuda", seed=n + m)


@pytest.mark.parametrize("m,n,k", [(3, 1000, 1000), (1, 77, 4100), (16, 300, 130), (40, 300, 130)])
def test_linear_odd_shapes(m, n, k):
    """N and K not multiples of any candidate's blocks, rows of x strided."""
    linear_cases.run_case(m, n, k, BF16, device="cuda", seed=k, row_pad=24)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize(
    "tuning",
    [None, LinearTuning(128, 128, 8, 4), LinearTuning(64, 128, 4, 6),
     LinearTuning(16, 512, 4, 3, dot=False), LinearTuning(64, 128, 4, 6, split_k=2)],
    ids=["tuned-or-unfused", "n128k128", "n64k128", "gemv", "split2-unfused"],
)  # fmt: skip
def test_linear_swiglu_gate_up(tuning, m):
    """Llama-3-8B's gate_up as the model calls it (norm on the input, silu(gate) * up of the
    product, [M, 14336] out) in bf16 against float64."""
    if tuning is None or tuning.dot or m == 1:
        linear_cases.run_fused_case(m, 2 * 14336, 4096, BF16, tuning, residual=False, norm=True,
                                    device="cuda", seed=m, swiglu=True)  # fmt: skip


SPLIT_TUNINGS = [t for t in TUNING if t.split_k > 1]


@pytest.mark.parametrize(
    "tuning", SPLIT_TUNINGS, ids=[f"n{t.block_n}k{t.block_k}s{t.split_k}" for t in SPLIT_TUNINGS]
)
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 4100)])
def test_linear_split_k(n, k, m, tuning):
    """Every split-K candidate on the narrow Llama-3-8B shapes (and an odd one): float64
    reference, bitwise repeat, counters back to zero (run_case)."""
    linear_cases.run_case(m, n, k, BF16, tuning, device="cuda", seed=n + m, row_pad=8)


# (producer, consumer) configs of the H100 table at 64 rows: down (split 2) -> qkv, o (split 2)
# -> gate_up; a split consumer; gemv -> gemv at one row (nothing handed over)
HANDOVER_GPU = [
    (LinearTuning(64, 128, 4, 6, split_k=2), LinearTuning(64, 128, 4, 6), 6144, False, 64),
    (LinearTuning(64, 128, 4, 6, split_k=2), LinearTuning(128, 128, 8, 4), 28672, True, 64),
    (LinearTuning(64, 128, 4, 6), LinearTuning(64, 128, 4, 6, split_k=2), 6144, False, 16),
    (LinearTuning(16, 512, 4, 3, dot=False), LinearTuning(8, 1024, 4, 3, dot=False), 6144, False,
     1),
]  # fmt: skip


@pytest.mark.parametrize("producer,consumer,n,swiglu,m", HANDOVER_GPU,
                         ids=["down-qkv", "o-gate_up", "split-consumer", "gemv"])  # fmt: skip
def test_linear_row_squares_handed_over(producer, consumer, n, swiglu, m):
    """A residual projection's rows' sums of squares feed the next projection's norm (its
    weight folded into w), as in the model, in bf16 against float64."""
    linear_cases.run_handover_case(m, 4096, n, BF16, producer, consumer, swiglu, device="cuda",
                                   seed=m + n)  # fmt: skip


@pytest.mark.parametrize(
    "tuning",
    [LinearTuning(64, 128, 4, 6), LinearTuning(64, 128, 4, 6, split_k=2),
     LinearTuning(16, 512, 4, 3, dot=False)],
    ids=["unsplit", "split2", "gemv"],
)  # fmt: skip
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("norm", [False, True], ids=["residual", "norm+residual"])
def test_linear_norm_and_residual(tuning, m, norm):
    """The decode layer's fused forms in bf16: RMSNorm on the input (in the kernel unsplit, the
    norm kernel first when split) and the residual added in the epilogue."""
    if tuning.dot or m == 1:
        linear_cases.run_fused_case(m, 4096, 4096, BF16, tuning, residual=True, norm=norm,
                                    device="cuda", seed=m)  # fmt: skip


TMA_TUNINGS = [
    LinearTuning(64, 128, 4, 6, tma=True),
    LinearTuning(128, 128, 4, 3, tma=True),
    LinearTuning(64, 256, 4, 3, tma=True),
    LinearTuning(64, 128, 4, 6, split_k=2, tma=True),
]


@pytest.mark.parametrize(
    "tuning", TMA_TUNINGS,
    ids=[f"n{t.block_n}k{t.block_k}s{t.split_k}" for t in TMA_TUNINGS],
)  # fmt: skip
@pytest.mark.parametrize("m", [1, 7, 33, 64])
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 4100)])
def test_linear_tma(n, k, m, tuning):
    """Tiles by TMA (sm_90: the last shape's do not fit and take pointer loads): float64
    reference with x's rows strided, bitwise repeat, and the bits of the same config with pointer
    loads (the same tiles into the same dots)."""
    assert linear_module.tma_fits(tuning, n, k) == (n != 1000)
    y = linear_cases.run_case(m, n, k, BF16, tuning, device="cuda", seed=n + m, row_pad=8)
    gen = torch.Generator(device="cuda").manual_seed(n + m)
    x = torch.randn(m, k + 8, generator=gen, device="cuda").to(BF16)[:, :k]
    w = (torch.randn(n, k, generator=gen, device="cuda") / k**0.5).to(BF16)
    # the launch really takes the TMA path where it fits (not a silent fallback)
    descs = linear_module._tma_descriptors(x, w, tuning, n, 1 << (m - 1).bit_length())
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    assert (descs[0] is not None) == (sm90 and n != 1000)
    pointers = linear(x, w, dataclasses.replace(tuning, tma=False))
    torch.testing.assert_close(y, pointers, rtol=0, atol=0)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_linear_tma_fused_forms(m):
    """The decode layer's fused forms with TMA tiles: gate_up's norm and SwiGLU (gate and up
    tiles from one descriptor), o's norm and residual, and squares handed from a TMA producer to
    a TMA consumer."""
    linear_cases.run_fused_case(m, 2 * 14336, 4096, BF16, LinearTuning(128, 128, 8, 4, tma=True),
                                residual=False, norm=True, device="cuda", seed=m,
                                swiglu=True)  # fmt: skip
    linear_cases.run_fused_case(m, 4096, 4096, BF16, LinearTuning(64, 128, 4, 6, tma=True),
                                residual=True, norm=True, device="cuda", seed=m)  # fmt: skip
    if m > 1:
        linear_cases.run_handover_case(
            m, 4096, 28672, BF16, LinearTuning(64, 128, 4, 6, split_k=2, tma=True),
            LinearTuning(128, 128, 8, 4, tma=True), True, device="cuda", seed=m,
        )  # fmt: skip


def test_linear_split_k_graph_replay():
    """A split-K launch replays in a CUDA graph on the counters it was captured with: same bits
    as an eager call, replay after replay."""
    tuning = LinearTuning(64, 128, 4, 6, split_k=4)  # 256 programs for o_proj
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(16, 4096, generator=gen, device="cuda").to(BF16)
    w = torch.randn(4096, 4096, generator=gen, device="cuda").to(BF16)
    linear(x, w, tuning)  # compiles, sizes the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, w, tuning)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        graph.replay()
        torch.testing.assert_close(y, linear(x, w, tuning), rtol=0, atol=0)
        assert not linear_module._COUNTERS[x.device].any()
    assert_close(y, x.double() @ w.double().T, BF16)


def test_linear_split_k_capture_without_counters_runs_unsplit(monkeypatch):
    """Counters are never allocated inside a capture: a split config met there before its
    device's counters exist (or big enough) runs split_k = 1."""
    monkeypatch.setattr(linear_module, "_COUNTERS", {})
    monkeypatch.setattr(linear_module, "_OUTGROWN", [])
    tuning = LinearTuning(64, 128, 4, 6, split_k=2)
    unsplit = dataclasses.replace(tuning, split_k=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(8, 4096, generator=gen, device="cuda").to(BF16)
    w = torch.randn(4096, 4096, generator=gen, device="cuda").to(BF16)
    linear(x, w, unsplit)  # compiles the fallback
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, w, tuning)
    assert not linear_module._COUNTERS
    graph.replay()
    torch.testing.assert_close(y, linear(x, w, unsplit), rtol=0, atol=0)


def test_linear_graph_capture():
    """A tuned shape replays in a CUDA graph; an untuned one met in a capture runs the fallback
    config (benchmarking there would break the capture)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4, 4096, generator=gen, device="cuda").to(BF16)
    w = torch.randn(4096, 4096, generator=gen, device="cuda").to(BF16)
    x2 = torch.randn(2, 1040, generator=gen, device="cuda").to(BF16)
    w2 = torch.randn(272, 1040, generator=gen, device="cuda").to(BF16)
    linear(x, w)  # tunes (4096, 4096, bucket 4)
    linear(x2, w2, _CAPTURE_TUNING)  # compiles the capture config; tunes nothing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, w)
        y2 = linear(x2, w2)
    x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
    x2.copy_(torch.randn(x2.shape, generator=gen, device="cuda"))
    graph.replay()
    torch.testing.assert_close(y, linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(y2, linear(x2, w2, _CAPTURE_TUNING), rtol=0, atol=0)
    assert_close(y, x.double() @ w.double().T, BF16)
    assert_close(y2, x2.double() @ w2.double().T, BF16)


def _pdl_chain(x, layers):
    """A decode step's kernel chain on [M, 1024]: each kernel reads what the one before wrote."""
    residual = x
    for norm_w, w_up, w_down in layers:
        h, residual = rms_norm(x, norm_w, 1e-5, residual)  # the norm kernel, its residual add
        act = linear(residual, w_up, LinearTuning(64, 128, 4, 6), norm=(norm_w, 1e-5),
                     swiglu=True)  # the norm and SwiGLU fused  # fmt: skip
        x = linear(act, w_down, LinearTuning(64, 128, 4, 6, split_k=2), residual=h)
    return x, residual


def test_pdl_chain_in_a_graph_gives_the_plain_launch_bits(monkeypatch):
    """Kernels launched with programmatic dependent launch start before their predecessor ends
    and wait on chip (kernels/pdl.py): a chain of them, eager and replayed in a CUDA graph, gives
    the bits of the same chain launched without PDL. A missing wait would read half-written
    inputs here (every kernel consumes the previous one's output at once)."""
    device = torch.device("cuda")
    assert pdl_module.pdl_enabled(device) == (torch.cuda.get_device_capability() >= (9, 0))
    gen = torch.Generator(device="cuda").manual_seed(3)
    layers = [(1 + torch.randn(1024, generator=gen, device="cuda").to(BF16) / 4,
               torch.randn(2 * 4096, 1024, generator=gen, device="cuda").to(BF16) / 32,
               torch.randn(1024, 4096, generator=gen, device="cuda").to(BF16) / 64)
              for _ in range(8)]  # fmt: skip
    x = torch.randn(16, 1024, generator=gen, device="cuda").to(BF16)
    eager = _pdl_chain(x, layers)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = _pdl_chain(x, layers)
    graph.replay()
    monkeypatch.setenv("KVMESH_PDL", "0")
    pdl_module.pdl_enabled.cache_clear()
    try:
        assert not pdl_module.pdl_enabled(device)
        plain = _pdl_chain(x, layers)
    finally:
        monkeypatch.delenv("KVMESH_PDL")
        pdl_module.pdl_enabled.cache_clear()
    for got in (eager, replayed):
        for a, b in zip(got, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert plain[0].abs().max() > 0


# FP8 KV cache (float8_e4m3fn codes, per-head kv_scale): bf16 q against the references
@pytest.mark.parametrize("kv_heads,head_dim,page", [(1, 64, 16), (8, 128, 32)])
def test_write_kv_fp8(kv_heads, head_dim, page):
    kv_write_cases.run_fp8_case(300, kv_heads, head_dim, page, BF16, "cuda", seed=kv_heads)


def test_write_kv_fp8_rounds_ties_to_even_and_saturates():
    kv_write_cases.test_write_kv_fp8_rounds_ties_to_even_and_saturates(device="cuda")


@pytest.mark.parametrize("heads,kv_heads,head_dim,page", [(32, 8, 128, 16), (9, 3, 64, 32)])
def test_rope_write_kv_fp8(heads, kv_heads, head_dim, page):
    rope_kv_cases.run_fp8_case(300, heads, kv_heads, head_dim, page, BF16, device="cuda")


@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 128), (3, 64)])
def test_prefill_fp8_cache(group, head_dim):
    seqs = [(300, 300), (160, 2000), (1, 1500), (37, 101), (1, 1), (129, 129 + 64)]
    prefill_attention_cases.run_fp8_case(
        seqs, heads=2 * group, kv_heads=2, head_dim=head_dim, page=16, dtype=BF16, device="cuda",
        seed=group,
    )  # fmt: skip


def test_prefill_fp8_cache_benchmark_shape():
    prefill_attention_cases.run_fp8_case([(4096, 4096)], 32, 8, 128, 16, BF16, "cuda")


def test_first_chunks_attend_over_the_quantized_values():
    """With an FP8 cache the Gluon first-chunk kernel reads k and v as rope_write_kv left them
    (the codes' values): it matches attention over the dequantized cache."""
    first_chunk_cases.check_fresh_fp8_step(BF16, device="cuda")
    q, fresh, *_ = first_chunk_cases.fresh_fp8_step([300, 1, 177], 8, 2, 64, BF16, "cuda")
    assert supported(q, fresh.k, fresh.v), "the step does take the Gluon kernel"


@pytest.mark.parametrize("group,waves", [(4, 1), (4, 16), (3, 2)])
def test_decode_fp8_cache(group, waves):
    ctx = [1, 15, 64, 130, 333, 2000, 4096, 2]
    decode_attention_cases.run_fp8_case(
        ctx, heads=2 * group, kv_heads=2, head_dim=128, page=16, dtype=BF16, device="cuda",
        seed=group, tuning=decode_attention_module.DecodeTuning(waves=waves),
    )  # fmt: skip


@pytest.mark.parametrize("waves", [1, 2, 16])
def test_decode_fp8_cache_with_the_new_token(waves):
    """RoPE, the FP8 KV write and attention in one launch: the codes rope_write_kv writes."""
    decode_attention_cases.run_fp8_new_token_case(
        [1, 17, 577, 2000, 64, 129] * 4, heads=8, kv_heads=2, head_dim=128, page=16, dtype=BF16,
        device="cuda", seed=waves, tuning=decode_attention_module.DecodeTuning(waves=waves),
        skip_slot=3,
    )  # fmt: skip


def test_gather_scatter_and_checksum_of_an_fp8_cache():
    """The handoff's block copy and checksum move FP8 caches as bytes: both as for any dtype."""
    layer = torch.randn(2, 50, 16, 8, 128, device="cuda").to(torch.float8_e4m3fn)
    ids = torch.tensor([7, 3, 41], device="cuda")
    buf = gather_blocks(layer, ids)
    assert torch.equal(buf.view(torch.uint8), layer[:, ids.long()].view(torch.uint8))
    other = torch.zeros_like(layer)
    scatter_blocks(other, ids, buf)
    assert torch.equal(other[:, ids.long()].view(torch.uint8), buf.view(torch.uint8))
    assert int(layer_checksum(buf)) == int(layer_checksum_ref(buf))
