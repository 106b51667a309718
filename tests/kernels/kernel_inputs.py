"""Random inputs shared by the kernel tests (CPU interpreter and GPU): paged caches, shuffled
block tables, poisoning, and the relative-error check against a float64 reference."""

import torch

from kvmesh.kernels import quant

# ||out - ref64|| / ||ref64|| allowed per dtype
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), "non-finite values in the output"
    return float((out64 - ref64).norm() / ref64.norm())


def assert_close(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    err = rel_err(out, ref64)
    assert err < TOLERANCE[dtype] * factor, f"relative error {err:.3g} ({dtype})"


def poison_allocator(device: str) -> None:
    """Leave NaNs in freed memory, so an output the kernel fails to write shows up."""
    junk = torch.full((1 << 22,), float("nan"), device=device)
    del junk


def kv_layer(
    gen: torch.Generator, num_blocks: int, page: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str,
) -> torch.Tensor:  # fmt: skip
    """Layer 1 of a 2-layer cache [L, 2, num_blocks, page, Hk, D]: K and V are views."""
    shape = (2, 2, num_blocks, page, kv_heads, head_dim)
    cache = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    return cache[1]


def block_table(
    gen: torch.Generator, ctx_lens: list[int], page: int, num_blocks: int, device: str
) -> torch.Tensor:
    """[B, W] int32 of distinct shuffled block ids; unused entries -1; rows padded (stride > W)."""
    need = [(c + page - 1) // page for c in ctx_lens]
    width = max(need) + 1
    ids = torch.randperm(num_blocks, generator=gen)[: sum(need)].tolist()
    padded = torch.full((len(ctx_lens), width + 3), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        padded[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return padded.to(device)[:, :width]


def poison_unused_blocks(kv: torch.Tensor, table: torch.Tensor) -> None:
    """NaN in every block no sequence owns: a kernel that reads past a context's end fails."""
    used = torch.zeros(kv.shape[1], dtype=torch.bool, device=kv.device)
    ids = table[table >= 0].long()
    used[ids] = True
    nan_at(kv, (slice(None), ~used))


FP8_NAN = 0x7F  # float8_e4m3fn's NaN code (torch fills no NaN into that dtype)


def nan_at(kv: torch.Tensor, index: tuple) -> None:
    """kv[index] = NaN, for any float dtype (FP8 through its bytes)."""
    if kv.dtype == quant.FP8_DTYPE:
        kv.view(torch.uint8)[index] = FP8_NAN
    else:
        kv[index] = float("nan")


def fresh_seed() -> int:
    """A new seed every run, printed: a failure's output shows how to replay it."""
    seed = torch.seed() % (1 << 31)
    print(f"seed {seed}")
    return seed


def fp8_kv_layer(
    gen: torch.Generator, num_blocks: int, page: int, kv_heads: int, head_dim: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 layer [2, num_blocks, page, Hk, D] (K and V as in `kv_layer`) holding the codes of
    random values whose per-head magnitudes span 2^-4..2^4, and its kv_scale [2, Hk] fp32: each
    head's amax / 448 shrunk by up to 2x, so that tokens written later also saturate."""
    magnitude = torch.pow(2.0, torch.rand(2, 1, 1, kv_heads, 1, generator=gen) * 8 - 4)
    values = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=gen) * magnitude
    amax = values.abs().amax(dim=(1, 2, 4))  # [2, Hk]
    kv_scale = amax / quant.FP8_MAX * (0.5 + 0.5 * torch.rand(2, kv_heads, generator=gen))
    codes = (values / kv_scale[:, None, None, :, None]).clamp(-448, 448).to(quant.FP8_DTYPE)
    cache = torch.empty((2, *codes.shape), dtype=quant.FP8_DTYPE)
    cache[1] = codes
    return cache.to(device)[1], kv_scale.to(device)


def dequantized(kv: torch.Tensor, kv_scale: torch.Tensor) -> torch.Tensor:
    """A layer [2, ..., Hk, D] of FP8 codes as float32 values (quant.dequantize_kv_fp8)."""
    return torch.stack([quant.dequantize_kv_fp8(kv[i], kv_scale[i]) for i in range(2)])


def assert_codes_within_one_step(got: torch.Tensor, want: torch.Tensor) -> None:
    """FP8 E4M3 codes equal, or neighbours on the grid (one rounding step apart, as a 1-ulp
    difference in the fp32 value before the cast can make them); NaN codes must match."""
    g, w = got.view(torch.uint8).long(), want.view(torch.uint8).long()
    # the grid's order: a code's magnitude bits count up with its value, the sign bit flips it
    order_g = torch.where(g >= 128, -(g - 128), g)
    order_w = torch.where(w >= 128, -(w - 128), w)
    apart = (order_g - order_w).abs()
    most = int(apart.max()) if apart.numel() else 0
    assert most <= 1, f"codes {most} steps apart"
    assert torch.equal((g & 0x7F) == 0x7F, (w & 0x7F) == 0x7F), "NaN codes differ"
    print(f"{int((apart > 0).sum())} of {g.numel()} codes one step apart")
