import math

import pytest
import torch
from kernel_inputs import assert_close

from kvmesh.kernels.rope import Llama3RopeScaling, apply_rope, apply_rope_ref, rope_cos_sin

LLAMA31 = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192)  # fmt: skip


def fused_qkv(gen, tokens, heads, kv_heads, head_dim, dtype, device):
    """q, k as strided views of one fused projection output [T, (H + 2 Hk) * D]."""
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=gen).to(device=device, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


def run_case(tokens, heads, kv_heads, head_dim, dtype, scaling, device="cpu", seed=0,
             kernel=apply_rope):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    cos_sin = rope_cos_sin(head_dim, 4096, 500000.0, scaling, device)
    qkv, q, k = fused_qkv(gen, tokens, heads, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    q64, k64 = (t.double() for t in (q, k))
    apply_rope_ref(q64, k64, positions, cos_sin)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    kernel(q, k, positions, cos_sin)
    assert_close(q, q64, dtype)
    assert_close(k, k64, dtype)
    torch.testing.assert_close(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # V untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 8, 64), (24, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("scaling", [None, LLAMA31])
def test_apply_rope(dtype, heads, kv_heads, head_dim, scaling):
    run_case(29, heads, kv_heads, head_dim, dtype, scaling, seed=heads)


def hf_llama3_inv_freq(head_dim, theta, s):
    """transformers' _compute_llama3_parameters, written out scalar by scalar."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < s.original_max_position / s.high_freq_factor:
            out.append(f)
        elif wavelen > s.original_max_position / s.low_freq_factor:
            out.append(f / s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scaling", [None, LLAMA31])
def test_cos_sin_table(scaling):
    table = rope_cos_sin(128, 300, 500000.0, scaling, "cpu")
    assert table.shape == (300, 128) and table.dtype == torch.float32
    inv = hf_llama3_inv_freq(128, 500000.0, scaling) if scaling else (
        1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))  # fmt: skip
    angles = torch.arange(300, dtype=torch.float64)[:, None] * inv[None, :]
    torch.testing.assert_close(table.double(), torch.cat([angles.cos(), angles.sin()], -1),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_reference_is_rotate_half():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(6, 1, 8, generator=gen, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 3, 3])
    cos_sin = rope_cos_sin(8, 8, 10000.0, None, "cpu").double()
    cos = torch.cat([cos_sin[positions, :4]] * 2, -1)[:, None]
    sin = torch.cat([cos_sin[positions, 4:]] * 2, -1)[:, None]

    def rotate_half(x):
        return torch.cat([-x[..., 4:], x[..., :4]], -1)

    want_q, want_k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    apply_rope_ref(q, k, positions, cos_sin)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
