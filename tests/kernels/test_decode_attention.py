import functools

import pytest
import torch
from kernel_inputs import (
    assert_close,
    block_table,
    kv_layer,
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
from kvmesh.kernels.rope import rope_cos_sin
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
