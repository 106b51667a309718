import dataclasses

import pytest
import torch
import torch.nn.functional as F
import triton
from kernel_inputs import assert_close, poison_allocator

from kvmesh.kernels import linear as linear_mod
from kvmesh.kernels.activation import silu_and_mul
from kvmesh.kernels.linear import MAX_M, TUNING, LinearTuning, RowSquares, linear, linear_ref
from kvmesh.kernels.rms_norm import rms_norm

DOT = [LinearTuning(16, 64, 4, 2), LinearTuning(32, 32, 4, 3)]
GEMV = LinearTuning(8, 128, 4, 2, dot=False)


def counters_all_zero() -> bool:
    """The split-K arrival counters of every device are back to zero (between launches)."""
    return not any(bool(c.any()) for c in linear_mod._COUNTERS.values())


def run_case(m, n, k, dtype, tuning=None, device="cpu", seed=0, row_pad=0):
    """x [m, k] with rows row_pad elements apart beyond k (a strided view), w [n, k]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k + row_pad, generator=gen, device=device).to(dtype)[:, :k]
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    want = linear_ref(x.double(), w.double())
    poison_allocator(device)
    y = linear(x, w, tuning)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, want, dtype)
    torch.testing.assert_close(linear(x, w, tuning), y, rtol=0, atol=0)  # reproducible
    assert counters_all_zero()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tuning", DOT, ids=["n16k64", "n32k32"])
@pytest.mark.parametrize(
    "m,n,k", [(1, 45, 200), (3, 100, 333), (16, 64, 256), (7, 1, 5), (24, 40, 96), (64, 33, 70)]
)
def test_dot_path(m, n, k, dtype, tuning):
    run_case(m, n, k, dtype, tuning, seed=m * n + k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k", [(45, 200), (64, 256), (3, 1000)])
def test_gemv_path(n, k, dtype):
    run_case(1, n, k, dtype, GEMV, seed=n + k)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_row_strides(seed):
    gen = torch.Generator().manual_seed(seed)
    m, n, k, pad = (int(torch.randint(lo, hi, (1,), generator=gen))
                    for lo, hi in ((1, MAX_M + 1), (1, 150), (1, 300), (0, 40)))  # fmt: skip
    tuning = GEMV if m == 1 and seed % 2 else DOT[seed % 2]
    for dtype in (torch.float32, torch.float16):
        run_case(m, n, k, dtype, tuning, seed=seed, row_pad=pad)


def test_default_call_runs_the_kernel_for_half_precision(monkeypatch):
    def no_torch_linear(*args, **kwargs):
        raise AssertionError("F.linear called")

    monkeypatch.setattr(F, "linear", no_torch_linear)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen).to(torch.float16)
    w = torch.randn(70, 96, generator=gen).to(torch.float16)
    assert_close(linear(x, w), x.double() @ w.double().T, torch.float16)


@pytest.mark.parametrize("m,dtype", [(4, torch.float32), (MAX_M + 1, torch.float16),
                                     (0, torch.float16)])  # fmt: skip
def test_fallback_is_torch_linear(m, dtype):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 64, generator=gen).to(dtype)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=0, atol=0)


SPLIT_SHAPES = [
    (1, 45, 200),  # K = 3 full tiles of 64 + a partial one; N not a multiple of BLOCK_N
    (5, 96, 512),  # EVEN_K: 8 tiles, 2-3 a split at split_k = 3
    (16, 64, 256),
    (33, 40, 30),  # one partial tile: every split but one gets none
    (64, 33, 130),  # 3 tiles: a split_k = 4 program gets none
    (7, 1, 5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("m,n,k", SPLIT_SHAPES)
def test_split_k(m, n, k, split_k, dtype):
    """Partials in a workspace, the column block's last program sums them: against float64, and
    twice bitwise (run_case), with the counters back to zero after each call."""
    run_case(m, n, k, dtype, LinearTuning(16, 64, 4, 1, split_k=split_k), seed=m + n + k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_other_blocks_and_row_strides(split_k, dtype):
    run_case(24, 70, 300, dtype, LinearTuning(32, 32, 4, 3, split_k=split_k), seed=1, row_pad=13)


@pytest.mark.parametrize("split_k", [2, 3, 4])
def test_split_k_with_one_working_split_is_the_one_pass_result(split_k):
    """K within one tile: one program of each column block does all the work and the others add
    exact zeros, so the sum in split order is that program's partial, bitwise the unsplit one."""
    gen = torch.Generator().manual_seed(split_k)
    x = torch.randn(9, 50, generator=gen)
    w = torch.randn(40, 50, generator=gen)
    one_pass = linear(x, w, LinearTuning(16, 64, 4, 1))
    assert torch.equal(linear(x, w, LinearTuning(16, 64, 4, 1, split_k=split_k)), one_pass)


@pytest.mark.parametrize("m", [1, 5, 16, 33, 64])
def test_split_k_is_reproducible_run_to_run(m):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 330, generator=gen).to(torch.float16)
    w = (torch.randn(50, 330, generator=gen) / 330**0.5).to(torch.float16)
    tuning = LinearTuning(16, 64, 4, 1, split_k=3)
    first = linear(x, w, tuning)
    for _ in range(3):
        assert torch.equal(linear(x, w, tuning), first)
        assert counters_all_zero()
    assert_close(first, linear_ref(x.double(), w.double()), torch.float16)


@pytest.mark.parametrize("tuning", DOT + [GEMV], ids=["n16k64", "n32k32", "gemv"])
def test_split_k_1_is_the_default_one_pass_kernel(tuning):
    """split_k = 1 is every existing config's default: same config, same bits, call after call."""
    assert tuning.split_k == 1 and tuning.meta()["SPLIT_K"] == 1
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 200, generator=gen).to(torch.float16)
    w = (torch.randn(45, 200, generator=gen) / 200**0.5).to(torch.float16)
    y = linear(x, w, tuning)
    assert torch.equal(linear(x, w, dataclasses.replace(tuning, split_k=1)), y)
    assert_close(y, linear_ref(x.double(), w.double()), torch.float16)


def test_gemv_takes_no_split_k():
    with pytest.raises(AssertionError):
        LinearTuning(8, 128, 4, 2, dot=False, split_k=2)


def test_counters_grow_and_keep_the_outgrown(monkeypatch):
    """A graph captured on an outgrown buffer still replays on it: the module keeps it alive."""
    monkeypatch.setattr(linear_mod, "_COUNTERS", {})
    monkeypatch.setattr(linear_mod, "_OUTGROWN", [])
    cpu = torch.device("cpu")
    small = linear_mod._counters(cpu, 10)
    assert small is not None and small.numel() >= 10 and not small.any()
    assert linear_mod._counters(cpu, small.numel()) is small
    big = linear_mod._counters(cpu, small.numel() + 1)
    assert big is not None and big.numel() > small.numel() and not big.any()
    assert len(linear_mod._OUTGROWN) == 1 and linear_mod._OUTGROWN[0] is small


def _surviving(n, k, bucket):
    configs = [triton.Config(t.meta(), **t.options()) for t in TUNING]
    kept = linear_mod._prune(configs, {"N": n, "K": k, "M_BUCKET": bucket})
    return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"], c.kwargs["USE_DOT"])
            for c in kept}  # fmt: skip


def test_autotuner_prunes_split_k_where_it_cannot_pay():
    splits = {(t.block_n, t.block_k, t.split_k, True) for t in TUNING if t.split_k > 1}
    assert len(splits) == 7
    # down_proj: 64 column blocks and K = 14336, two splits of >= 4096 columns; not four
    assert {s for s in splits if s[2] == 2} <= _surviving(4096, 14336, 16)
    assert {s for s in splits if s[2] == 4}.isdisjoint(_surviving(4096, 14336, 16))
    # K = 4096 (o_proj, qkv, gate_up) and shorter: no split (measured slower in the model)
    for n, k in ((4096, 4096), (6144, 4096), (28672, 4096), (4096, 2048)):
        assert not splits & _surviving(n, k, 64)
    # many column blocks already: no split, whatever K
    assert not splits & _surviving(65536, 14336, 64)
    # lm_head: no split
    assert not splits & _surviving(128256, 4096, 1)
    # the gemv configs only at M == 1; never split
    gemv_1 = {c for c in _surviving(4096, 4096, 1) if not c[3]}
    assert len(gemv_1) == 4 and all(c[2] == 1 for c in gemv_1)
    assert all(c[3] for c in _surviving(4096, 4096, 2))


def run_fused_case(m, n, k, dtype, tuning, residual, norm, device="cpu", seed=0, swiglu=False):
    """linear with a residual added, an RMSNorm on its input and/or SwiGLU of its product
    (w: n rows, n / 2 out), against linear_ref."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_out = n // 2 if swiglu else n
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    x = x * (1 + torch.arange(m, device=device)[:, None] % 4).to(dtype)  # rows of 4 scales
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    r = torch.randn(m, n_out + 3, generator=gen, device=device).to(dtype)[:, :n_out]
    r = r if residual else None
    g = (1 + torch.randn(k, generator=gen, device=device) / 4).to(dtype) if norm else None
    nrm = (g, 1e-5) if g is not None else None
    nrm64 = (g.double(), 1e-5) if g is not None else None
    r64 = r.double() if r is not None else None
    poison_allocator(device)
    y = linear(x, w, tuning, residual=r, norm=nrm, swiglu=swiglu)
    assert y.shape == (m, n_out) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, linear_ref(x.double(), w.double(), r64, nrm64, swiglu), dtype)
    again = linear(x, w, tuning, residual=r, norm=nrm, swiglu=swiglu)
    torch.testing.assert_close(again, y, rtol=0, atol=0)
    # out: into the residual itself (the model's stream in place), or a fresh tensor: same bits
    into = r.clone() if r is not None else torch.full_like(y, float("nan"))
    into_r = into if r is not None else None
    got = linear(x, w, tuning, residual=into_r, norm=nrm, swiglu=swiglu, out=into)
    assert got.data_ptr() == into.data_ptr()
    torch.testing.assert_close(into, y, rtol=0, atol=0)
    assert counters_all_zero()
    return y


FUSED_TUNINGS = [*DOT, LinearTuning(16, 64, 4, 2, split_k=2), GEMV]
FUSED_IDS = ["n16k64", "n32k32", "split2", "gemv"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tuning", FUSED_TUNINGS, ids=FUSED_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 45, 200), (7, 64, 256), (64, 33, 70)])
def test_residual_is_added_in_the_epilogue(m, n, k, dtype, tuning):
    if tuning.dot or m == 1:
        run_fused_case(m, n, k, dtype, tuning, residual=True, norm=False, seed=m + n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tuning", FUSED_TUNINGS, ids=FUSED_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 45, 200), (7, 64, 256), (64, 33, 70), (3, 10, 1000)])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "norm+residual"])
def test_norm_is_applied_to_the_input(m, n, k, dtype, tuning, residual):
    """Unsplit configs scale x by the norm weight as they load it and the rows by 1 / rms at
    the end; a split config runs the norm kernel first."""
    if tuning.dot or m == 1:
        run_fused_case(m, n, k, dtype, tuning, residual=residual, norm=True, seed=m * k)


SWIGLU_TUNINGS = [LinearTuning(32, 64, 4, 2), LinearTuning(64, 32, 4, 3), GEMV, *DOT[:1],
                  LinearTuning(32, 64, 4, 2, split_k=2)]  # fmt: skip
SWIGLU_IDS = ["n32k64", "n64k32", "gemv", "n16 (unfused)", "split2 (unfused)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tuning", SWIGLU_TUNINGS, ids=SWIGLU_IDS)
@pytest.mark.parametrize("m,n,k", [(1, 90, 200), (5, 128, 256), (33, 40, 96), (64, 66, 70)])
@pytest.mark.parametrize("norm", [False, True], ids=["swiglu", "norm+swiglu"])
def test_swiglu_writes_silu_of_gate_times_up(m, n, k, dtype, tuning, norm):
    """gate_up as the model calls it: w's first n / 2 rows are the gate, the rest the up; a
    program takes half its config's rows of each (configs whose half is no tensor-core tile,
    and split ones, run the plain launch then the SiLU-and-mul kernel)."""
    if tuning.dot or m == 1:
        run_fused_case(m, n, k, dtype, tuning, residual=False, norm=norm, swiglu=True, seed=n + k)


def run_handover_case(m, k, n, dtype, producer, consumer, swiglu, device="cpu", seed=0):
    """A residual projection (o, down) hands its rows' sums of squares to the next normalized
    one (gate_up, qkv), whose norm weight is folded into w: as the reference with the weight
    apart, and the same bits as the consumer summing x's squares itself."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_out = n // 2 if swiglu else n
    a = torch.randn(m, 3 * k // 2, generator=gen, device=device).to(dtype)
    wa = (torch.randn(k, a.shape[1], generator=gen, device=device) / k**0.5).to(dtype)
    h = torch.randn(m, k, generator=gen, device=device).to(dtype) * 3
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype)
    g = (1 + torch.randn(k, generator=gen, device=device) / 4).to(dtype)
    want_h = linear_ref(a.double(), wa.double(), residual=h.double())
    squares = RowSquares()
    poison_allocator(device)
    linear(a, wa, producer, residual=h, out=h, squares_out=squares)
    assert_close(h, want_h, dtype)
    parts = squares.parts
    if m > 1:
        assert parts is not None and parts.shape == (triton.cdiv(k, producer.block_n), m)
        torch.testing.assert_close(parts.sum(0).double(), h.double().pow(2).sum(1), rtol=1e-5,
                                   atol=0)  # fmt: skip
    else:  # one row hands nothing on (its consumer sums x's squares as it multiplies)
        assert parts is None
    folded = (w.double() * g.double()).to(dtype)
    y = linear(h, folded, consumer, norm=(None, 1e-5), swiglu=swiglu, squares=squares)
    assert y.shape == (m, n_out)
    assert_close(y, linear_ref(h.double(), w.double(), norm=(g.double(), 1e-5), swiglu=swiglu),
                 dtype, factor=2)  # fmt: skip
    if consumer.split_k == 1:  # the same sums, summed in the loop from x's tiles
        itself = linear(h, folded, consumer, norm=(None, 1e-5), swiglu=swiglu)
        assert_close(y, itself.double(), dtype)
    torch.testing.assert_close(  # reproducible
        linear(h, folded, consumer, norm=(None, 1e-5), swiglu=swiglu, squares=squares), y,
        rtol=0, atol=0,
    )  # fmt: skip
    assert counters_all_zero()


HANDOVER = [
    (DOT[0], DOT[1]),
    (LinearTuning(16, 64, 4, 2, split_k=2), LinearTuning(32, 64, 4, 2)),
    (DOT[1], LinearTuning(16, 64, 4, 2, split_k=2)),  # a split consumer takes the sums too
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pair", HANDOVER, ids=["dot", "split producer", "split consumer"])
@pytest.mark.parametrize("m,k,n", [(7, 96, 64), (64, 70, 40), (33, 130, 90)])
@pytest.mark.parametrize("swiglu", [False, True], ids=["qkv", "gate_up"])
def test_row_squares_handed_from_the_residual_projection_to_the_next_norm(
    m, k, n, dtype, pair, swiglu
):  # fmt: skip
    run_handover_case(m, k, n, dtype, *pair, swiglu=swiglu, seed=m + k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_row_neither_hands_nor_takes_row_squares(dtype):
    run_handover_case(1, 200, 45, dtype, GEMV, GEMV, swiglu=False, seed=1)
    run_handover_case(1, 200, 90, dtype, DOT[0], GEMV, swiglu=True, seed=2)


def test_row_squares_stay_empty_where_no_kernel_writes_them():
    """Above MAX_M rows (cuBLAS), or fp32 without a config, nothing is handed over, and a
    consumer given an empty RowSquares normalizes x itself."""
    gen = torch.Generator().manual_seed(4)
    big = MAX_M + 3
    x = torch.randn(big, 64, generator=gen).to(torch.float16)
    w = torch.randn(32, 64, generator=gen).to(torch.float16)
    r = torch.randn(big, 32, generator=gen).to(torch.float16)
    squares = RowSquares()
    linear(x, w, residual=r, squares_out=squares)
    assert squares.parts is None
    y = linear(r, w[:, :32].contiguous(), norm=(None, 1e-5), squares=squares)
    assert_close(y, linear_ref(r.double(), w[:, :32].double(), norm=(None, 1e-5)),
                 torch.float16)  # fmt: skip


def test_unfused_swiglu_is_the_plain_launch_then_silu_and_mul():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 96, generator=gen).to(torch.float16)
    w = torch.randn(80, 96, generator=gen).to(torch.float16)
    for tuning in (DOT[0], LinearTuning(32, 64, 4, 2, split_k=2)):
        want = silu_and_mul(linear(x, w, tuning))
        torch.testing.assert_close(linear(x, w, tuning, swiglu=True), want, rtol=0, atol=0)


def test_split_and_norm_first_configs_run_the_norm_kernel_then_the_linear():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, 130, generator=gen).to(torch.float16)
    w = torch.randn(40, 130, generator=gen).to(torch.float16)
    g = torch.randn(130, generator=gen).to(torch.float16)
    for tuning in (
        LinearTuning(16, 64, 4, 2, split_k=2),
        LinearTuning(16, 64, 4, 2, norm_first=True),
    ):
        want = linear(rms_norm(x, g, 1e-6)[0], w, tuning)
        torch.testing.assert_close(linear(x, w, tuning, norm=(g, 1e-6)), want, rtol=0, atol=0)
        fused = linear(
            x, w, dataclasses.replace(tuning, split_k=1, norm_first=False), norm=(g, 1e-6)
        )
        assert not torch.equal(fused, want)  # the fused norm rounds once: other bits


def test_fused_fallbacks_compute_what_the_reference_does():
    """fp32 (the engine's exact runs) gives the reference's bits for a residual and a SwiGLU;
    above MAX_M rows half precision runs the norm kernel, cuBLAS (residual in its epilogue)
    and the SiLU-and-mul kernel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen)
    w = torch.randn(24, 64, generator=gen)
    r = torch.randn(5, 24, generator=gen)
    torch.testing.assert_close(linear(x, w, residual=r), linear_ref(x, w, residual=r),
                               rtol=0, atol=0)  # fmt: skip
    torch.testing.assert_close(linear(x, w, swiglu=True), silu_and_mul(F.linear(x, w)),
                               rtol=0, atol=0)  # fmt: skip
    big = MAX_M + 6
    xh = torch.randn(big, 64, generator=gen).to(torch.float16)
    rh = torch.randn(big, 24, generator=gen).to(torch.float16)
    g = torch.randn(64, generator=gen).to(torch.float16)
    y = linear(xh, w.to(torch.float16), residual=rh, norm=(g, 1e-5))
    want = linear_ref(xh.double(), w.double(), residual=rh.double(), norm=(g.double(), 1e-5))
    assert_close(y, want, torch.float16)
    y = linear(xh, w.to(torch.float16), norm=(g, 1e-5), swiglu=True)
    assert_close(y, linear_ref(xh.double(), w.double(), norm=(g.double(), 1e-5), swiglu=True),
                 torch.float16)  # fmt: skip
    with pytest.raises(AssertionError):
        linear(xh, w[:23].to(torch.float16), swiglu=True)  # no even split into gate and up
    # out= on the fallbacks: the residual updated in place (cuBLAS adds into it, no copy first)
    for xi, ri, wi in ((x, r, w), (xh, rh, w.to(torch.float16))):
        want = linear(xi, wi, residual=ri)
        into = ri.clone()
        assert linear(xi, wi, residual=into, out=into).data_ptr() == into.data_ptr()
        torch.testing.assert_close(into, want, rtol=0, atol=0)
    into = torch.empty(big, 12, dtype=torch.float16)
    linear(xh, w.to(torch.float16), norm=(g, 1e-5), swiglu=True, out=into)
    torch.testing.assert_close(into, y, rtol=0, atol=0)
    want = linear_ref(x, w, residual=r)
    into = r.clone()
    assert linear_ref(x, w, residual=into, out=into).data_ptr() == into.data_ptr()
    torch.testing.assert_close(into, want, rtol=0, atol=0)


def test_tuned_configs_round_trip_per_card(tmp_path):
    """benchmarks/tune_linear.py --write merges one card's winners; `linear` looks them up by
    the card's name and the shape key; other cards' entries stay."""
    path = tmp_path / "linear_tuned.json"
    key = linear_mod.shape_key(4096, 14336, 64, torch.bfloat16)
    assert key == "4096x14336 m64 bfloat16"
    assert linear_mod.tuned_for("H100", key, path) is None  # no file yet
    split = LinearTuning(64, 128, 4, 6, split_k=2)
    linear_mod.write_tuned("H100", {key: split}, path)
    other = linear_mod.shape_key(6144, 4096, 64, torch.bfloat16)
    linear_mod.write_tuned("H200", {other: DOT[0]}, path)
    linear_mod.write_tuned("H100", {other: DOT[1]}, path)  # merges into H100's entries
    assert linear_mod.tuned_for("H100", key, path) == split
    assert linear_mod.tuned_for("H100", other, path) == DOT[1]
    assert linear_mod.tuned_for("H200", other, path) == DOT[0]
    assert linear_mod.tuned_for("H200", key, path) is None


def test_the_autotuner_prunes_to_the_candidates():
    """_prune (the autotuner's) and `candidate` (the tuner script's) agree on every shape."""
    configs = [triton.Config(t.meta(), **t.options()) for t in TUNING]
    shapes = ((4096, 14336, 16), (6144, 4096, 1), (128256, 4096, 16), (512, 9000, 2),
              (6144, 4096, 64))  # fmt: skip
    for n, k, bucket in shapes:
        kept = linear_mod._prune(configs, {"N": n, "K": k, "M_BUCKET": bucket})
        pairs = zip(configs, TUNING, strict=True)
        assert kept == [c for c, t in pairs if linear_mod.candidate(t, n, k, bucket)]
        assert kept


def test_the_tuner_times_split_k_on_any_k():
    """tune_linear (any_split) times every split config that fits, where the autotuner keeps
    them to long K; both drop configs that overflow shared memory."""
    for n, k, bucket in ((6144, 4096, 64), (4096, 4096, 16), (4096, 14336, 64)):
        tuner = {t for t in TUNING if linear_mod.candidate(t, n, k, bucket, any_split=True)}
        auto = {t for t in TUNING if linear_mod.candidate(t, n, k, bucket)}
        assert auto < tuner
        assert {t for t in tuner if t.split_k > 1} == {
            t for t in TUNING
            if t.split_k > 1 and linear_mod.pipeline_smem(t, bucket) <= linear_mod.SMEM_LIMIT
        }  # fmt: skip


def test_no_candidate_overflows_shared_memory():
    """At 64 rows the deep, wide configs would ask more shared memory than an H100 program gets
    (what Triton 3.6 asked, measured): they are no candidates."""
    asked = [(LinearTuning(64, 256, 4, 4), 262144), (LinearTuning(16, 512, 4, 4), 245760)]
    for tuning, measured in asked:
        assert linear_mod.pipeline_smem(tuning, 64) >= measured
        assert not linear_mod.candidate(tuning, 4096, 14336, 64)
    assert linear_mod.candidate(LinearTuning(16, 512, 4, 4), 6144, 4096, 16)
    assert linear_mod.candidate(LinearTuning(128, 128, 8, 4), 28672, 4096, 64)
    for bucket in (1, 2, 4, 8, 16, 32, 64):
        for t in TUNING:
            if linear_mod.candidate(t, 4096, 14336, bucket):
                assert linear_mod.pipeline_smem(t, bucket) <= linear_mod.SMEM_LIMIT


def test_one_byte_codes_take_half_the_weight_tiles_shared_memory():
    """FP8/INT8 codes stream one byte an element: a config whose bf16 pipeline overflows may
    fit with codes, and every CODE_TUNING candidate fits at one row."""
    wide = LinearTuning(16, 1024, 4, 4)
    assert linear_mod.pipeline_smem(wide, 1, 1) < linear_mod.pipeline_smem(wide, 1)
    assert not linear_mod.candidate(wide, 4096, 4096, 1)
    assert linear_mod.candidate(wide, 4096, 4096, 1, w_bytes=1)
    for t in linear_mod.CODE_TUNING:
        assert linear_mod.candidate(t, 4096, 14336, 1, any_split=True, w_bytes=1), t
