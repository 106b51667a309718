"""Random inputs shared by the kernel tests (CPU interpreter and GPU): paged caches, shuffled
block tables, poisoning, and the relative-error check against a float64 reference."""

import torch

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
    kv[:, ~used] = float("nan")
