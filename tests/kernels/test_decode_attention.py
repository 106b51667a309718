import functools

import pytest
import torch
from kernel_inputs import (
    assert_close,
    assert_codes_within_one_step,
    block_table,
    dequantized,
    fp8_kv_layer,
    fresh_seed,
    kv_layer,
    nan_at,
    poison_allocator,
    poison_unused_blocks,
)

import kvmesh.kernels.decode_attention as decode_attention_module
from kvmesh.kernels.decode_attention import (
    DecodeTuning,
    NewToken,
    decode_attention,
    decode_attention_ref,
)
from kvmesh.kernels.prefill_attention import prefill_attention_ref
from kvmesh.kernels.rope import apply_rope_ref, rope_cos_sin
from kvmesh.kernels.rope_kv import rope_write_kv


def run_case(
    ctx_lens: list[int], heads: int, kv_heads: int, head_dim: int, page: int,
    dtype: torch.dtype, device: str = "cpu", seed: int = 0, kernel=decode_attention,
) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + page - 1) // page for c in ctx_lens) + 5
    kv = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    table = block_table(gen, ctx_lens, page, num_blocks, device)
    poison_unused_blocks(kv, table)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    ref64 = decode_attention_ref(q.double(), kv[0].double(), kv[1].double(), table, lens, scale)
    poison_allocator(device)
    out = kernel(q, kv[0], kv[1], table, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref64, dtype)


def test_ref_equals_prefill_ref_with_one_token_each():
    gen = torch.Generator().manual_seed(3)
    ctx_lens, page = [1, 16, 17, 250], 16
    kv = kv_layer(gen, 30, page, 2, 64, torch.float64, "cpu")
    table = block_table(gen, ctx_lens, page, 30, "cpu")
    q = torch.randn(4, 8, 64, generator=gen, dtype=torch.float64)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    cu = torch.arange(5, dtype=torch.int32)
    want = prefill_attention_ref(q, kv[0], kv[1], table, cu, lens, 0.125)
    torch.testing.assert_close(decode_attention_ref(q, kv[0], kv[1], table, lens, 0.125), want)


def test_long_contexts():
    run_case([2000, 1, 777, 1500], heads=32, kv_heads=8, head_dim=128, page=16,
             dtype=torch.float16)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page,head_dim", [(16, 128), (32, 64)])
def test_small_batches(dtype, group, page, head_dim):
    run_case([1, 15, 64, 130, 333, 2], heads=2 * group, kv_heads=2, head_dim=head_dim, page=page,
             dtype=dtype, seed=group + page)  # fmt: skip


@pytest.mark.parametrize("waves", [1, 16, 64])
@pytest.mark.parametrize("block_n", [32, 64])
def test_split_counts(waves, block_n):
    """Few or many splits per sequence (the default finds one on the interpreter's 4 'SMs'),
    each cut on the device from the real context: empty splits, uneven ones, the merge."""
    kernel = functools.partial(decode_attention, tuning=DecodeTuning(block_n=block_n, waves=waves))
    run_case([1, 40, 700, 129], heads=8, kv_heads=2, head_dim=64, page=16, dtype=torch.float32,
             seed=waves + block_n, kernel=kernel)  # fmt: skip


def test_one_split_a_sequence_writes_the_output_without_a_merge(monkeypatch):
    """When the batch fills the card with one split a sequence, the split kernel normalises and
    writes the output itself: no partials, no merge launch."""

    class NoMerge:
        def __getitem__(self, grid):
            raise AssertionError("merge launched for one split a sequence")

    monkeypatch.setattr(decode_attention_module, "_decode_merge_kernel", NoMerge())
    kernel = functools.partial(decode_attention, tuning=DecodeTuning(waves=1))
    for dtype in (torch.float32, torch.float16):  # 4 sequences x 2 KV heads >= 4 'SMs': 1 split
        run_case([3, 40, 300, 129], heads=8, kv_heads=2, head_dim=64, page=16, dtype=dtype,
                 kernel=kernel)  # fmt: skip


def run_new_token_case(ctx_lens, heads, kv_heads, head_dim, page, dtype, tuning=None, seed=0,
                       skip_slot=None, device="cpu"):  # fmt: skip
    """The step's token of each sequence not yet in the cache (NewToken): the kernel rotates q
    and k, attends to the token from registers and writes its K/V, against RoPE + KV write +
    attention in float64; the cache slots hold NaN before (a read of the token's slot from the
    cache would show), and after hold what rope_write_kv writes, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + page - 1) // page for c in ctx_lens) + 5
    kv = kv_layer(gen, num_blocks, page, kv_heads, head_dim, dtype, device)
    table = block_table(gen, ctx_lens, page, num_blocks, device)
    poison_unused_blocks(kv, table)
    batch = len(ctx_lens)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(device=device, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(batch, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
    positions = torch.tensor(ctx_lens, device=device) - 1
    blocks = table.long()[torch.arange(batch, device=device), positions // page]
    slots = blocks * page + positions % page
    if skip_slot is not None:
        slots[skip_slot] = -1
    kv[:, blocks, positions % page] = float("nan")  # the new tokens' slots: written, never read
    cos_sin = rope_cos_sin(head_dim, 4096, 10000.0, None, torch.device(device))
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    # what rope_write_kv leaves in the cache (a slot of -1: nothing; the ref needs the value)
    want_kv = kv.clone()
    rope_write_kv(q.clone(), k.clone(), v.clone(), positions, cos_sin, want_kv[0], want_kv[1],
                  slots)  # fmt: skip
    ref_kv = want_kv.double()
    ref_kv[:, blocks, positions % page] = 0.0
    ref_new = NewToken(k.double(), v.double(), positions, cos_sin, blocks * page + positions % page)
    ref64 = decode_attention_ref(q.double(), ref_kv[0], ref_kv[1], table, lens, scale, ref_new)
    before = qkv.clone()
    new = NewToken(k, v, positions, cos_sin, slots)
    out = decode_attention(q, kv[0], kv[1], table, lens, scale, new, tuning or DecodeTuning())
    assert_close(out, ref64, dtype)
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)  # q and k left unrotated
    torch.testing.assert_close(kv, want_kv, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("page,head_dim", [(16, 128), (32, 64)])
def test_new_token_rotated_attended_and_written(dtype, group, page, head_dim):
    run_new_token_case([1, 15, 64, 130, 333, 2], heads=2 * group, kv_heads=2, head_dim=head_dim,
                       page=page, dtype=dtype, seed=group + page, skip_slot=2)  # fmt: skip


@pytest.mark.parametrize("waves", [1, 16, 64])
@pytest.mark.parametrize("block_n", [32, 64])
def test_new_token_with_any_split_owning_the_last_key(waves, block_n):
    """One split a sequence to many (empty ones, and contexts that end on a split's first key):
    only the split that ends the context takes the token."""
    tuning = DecodeTuning(block_n=block_n, waves=waves)
    run_new_token_case([1, 33, 700, 129, 65], heads=8, kv_heads=2, head_dim=64, page=16,
                       dtype=torch.float32, tuning=tuning, seed=waves + block_n)  # fmt: skip


def run_fp8_case(ctx_lens, heads, kv_heads, head_dim, page, dtype, device="cpu", seed=0,
                 tuning=None):  # fmt: skip
    """An FP8 cache, no new token: the kernel against float64 attention over the dequantized
    cache, and the reference (q's dtype) against the reference run on the cache dequantized
    beforehand with quant.dequantize_kv_fp8 (the same computation)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + page - 1) // page for c in ctx_lens) + 5
    kv, kv_scale = fp8_kv_layer(gen, num_blocks, page, kv_heads, head_dim, device)
    table = block_table(gen, ctx_lens, page, num_blocks, device)
    poison_unused_blocks(kv, table)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    values = dequantized(kv, kv_scale)  # [2, ...] fp32
    ref64 = decode_attention_ref(q.double(), *values.double(), table, lens, scale)
    got_ref = decode_attention_ref(q, kv[0], kv[1], table, lens, scale, kv_scale=kv_scale)
    want_ref = decode_attention_ref(q, *values.to(dtype), table, lens, scale)
    torch.testing.assert_close(got_ref, want_ref, rtol=0, atol=0)
    poison_allocator(device)
    out = decode_attention(q, kv[0], kv[1], table, lens, scale, tuning=tuning or DecodeTuning(),
                           kv_scale=kv_scale)  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,waves", [(1, 2), (4, 16), (3, 1)])  # 1 to many splits a sequence
def test_fp8_cache(dtype, group, waves):
    run_fp8_case([1, 15, 130, 333], heads=2 * group, kv_heads=2, head_dim=64, page=16,
                 dtype=dtype, seed=fresh_seed(), tuning=DecodeTuning(waves=waves))  # fmt: skip


def run_fp8_new_token_case(ctx_lens, heads, kv_heads, head_dim, page, dtype, device="cpu",
                           seed=0, tuning=None, skip_slot=None):  # fmt: skip
    """An FP8 cache and the step's new token: the kernel writes the codes rope_write_kv writes
    (within one rounding step; a slot of -1 keeps its NaN) and attends to the token as those
    codes: against float64 attention of the RoPE'd q over the dequantized cache. The reference
    (q's dtype) writes the same codes and computes the same attention."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + page - 1) // page for c in ctx_lens) + 5
    kv, kv_scale = fp8_kv_layer(gen, num_blocks, page, kv_heads, head_dim, device)
    table = block_table(gen, ctx_lens, page, num_blocks, device)
    poison_unused_blocks(kv, table)
    batch = len(ctx_lens)
    widths = [heads, kv_heads, kv_heads]
    amp = torch.cat([torch.ones(heads), kv_scale[0].cpu() * 300, kv_scale[1].cpu() * 300])
    qkv = torch.randn(batch, sum(widths), head_dim, generator=gen) * amp[None, :, None]
    qkv = qkv.to(device=device, dtype=dtype)
    q, k, v = qkv.split(widths, dim=1)
    positions = torch.tensor(ctx_lens, device=device) - 1
    blocks = table.long()[torch.arange(batch, device=device), positions // page]
    slots = blocks * page + positions % page
    nan_at(kv, (slice(None), blocks, positions % page))  # the new tokens' slots: never read
    skipped = slots.clone()
    if skip_slot is not None:
        skipped[skip_slot] = -1
    cos_sin = rope_cos_sin(head_dim, 4096, 10000.0, None, torch.device(device))
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    # every slot as rope_write_kv writes it (the float64 attention needs the skipped one too)
    full_kv = kv.clone()
    q_rot = q.clone()
    rope_write_kv(q_rot, k.clone(), v.clone(), positions, cos_sin, full_kv[0], full_kv[1], slots,
                  kv_scale=kv_scale)  # fmt: skip
    want_kv = kv.clone()
    rope_write_kv(q.clone(), k.clone(), v.clone(), positions, cos_sin, want_kv[0], want_kv[1],
                  skipped, kv_scale=kv_scale)  # fmt: skip
    q64 = q.double()
    apply_rope_ref(q64, k.double(), positions, cos_sin)
    ref64 = decode_attention_ref(q64, *dequantized(full_kv, kv_scale).double(), table, lens,
                                 scale)  # fmt: skip
    # the reference, in q's dtype
    ref_kv, ref_qkv = kv.clone(), qkv.clone()
    ref_q, ref_k, ref_v = ref_qkv.split(widths, dim=1)
    ref_new = NewToken(ref_k, ref_v, positions, cos_sin, skipped)
    got_ref = decode_attention_ref(ref_q, ref_kv[0], ref_kv[1], table, lens, scale, ref_new,
                                   kv_scale=kv_scale)  # fmt: skip
    assert_codes_within_one_step(ref_kv, want_kv)
    before = qkv.clone()
    new = NewToken(k, v, positions, cos_sin, skipped)
    out = decode_attention(q, kv[0], kv[1], table, lens, scale, new, tuning or DecodeTuning(),
                           kv_scale=kv_scale)  # fmt: skip
    torch.testing.assert_close(qkv, before, rtol=0, atol=0)  # q, k and v left as they were
    assert_codes_within_one_step(kv, want_kv)
    if skip_slot is None:  # the reference's output uses the cache it wrote
        assert_close(got_ref, ref64, dtype)
    assert_close(out, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,waves", [(1, 2), (4, 16), (3, 1)])
def test_fp8_new_token_quantized_attended_and_written(dtype, group, waves):
    run_fp8_new_token_case([1, 15, 64, 130, 333, 2], heads=2 * group, kv_heads=2, head_dim=64,
                           page=16, dtype=dtype, seed=fresh_seed(),
                           tuning=DecodeTuning(waves=waves), skip_slot=2)  # fmt: skip


def test_fp8_new_token_reference():
    run_fp8_new_token_case([1, 40, 129], heads=8, kv_heads=2, head_dim=128, page=16,
                           dtype=torch.float32, seed=fresh_seed())  # fmt: skip
