"""The decode step's kernels compiled for sm_90 (H100) without a GPU, as the GPU launches them
(programmatic dependent launch on). The skinny linear: every config of the H100 table, as the
model launches it (norm fused into qkv and lm_head, norm and SwiGLU into gate_up with half the
rows of each, the residual into o and down), and every autotuner candidate at 64 rows, must
compile and fit a program's shared memory, and for the dot configs `pipeline_smem` must bound
what the compiler asks (a config past the limit fails only at launch, on the GPU). Decode
attention (with and without the step's new token, one split and several), its merge, the norm,
SiLU-and-mul, RoPE + KV write and per-token FP8 activation kernels must compile, and with an
FP8 KV cache decode attention, RoPE + KV write and the prefill attention's GPU configs; and the
linear's quantized forms (FP8 and INT8 codes) for a few configs.

The compiles run in a subprocess: under TRITON_INTERPRET=1 (the CPU suite) the kernels are not
JIT functions that triton.compile takes."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"


_ASKED: dict[str, int] = {}  # one compile per distinct kernel (table entries share configs)


def _sm90(fn, types: dict, consts: dict, options: dict, aligned: set = frozenset()) -> int:
    """Shared memory (bytes) the sm_90 compile of `fn` asks. types: the runtime arguments' that
    are not i32; consts: the constexprs; aligned: arguments divisible by 16 (as the launcher
    specializes them)."""
    key = repr((fn.fn.__qualname__, sorted(types.items()), sorted(consts.items(), key=str),
                sorted(options.items()), sorted(aligned)))  # fmt: skip
    if key not in _ASKED:
        _ASKED[key] = _compile_sm90(fn, types, consts, options, aligned)
    return _ASKED[key]


def _compile_sm90(fn, types: dict, consts: dict, options: dict, aligned: set) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = list(fn.arg_names)
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in args}
    source = ASTSource(
        fn=fn, signature=signature,
        constexprs={(i,): consts[a] for i, a in enumerate(args) if a in consts},
        attrs={(args.index(a),): [["tt.divisibility", 16]] for a in aligned},
    )  # fmt: skip
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={**options, "launch_pdl": True})  # fmt: skip
    return kernel.metadata.shared


def _compile_linear() -> list[dict]:
    import kvmesh.kernels.linear as lin

    args = list(lin._linear_jit.arg_names)
    pointers = {"x_ptr", "w_ptr", "y_ptr", "r_ptr", "g_ptr"}
    types = {**{p: "*bf16" for p in pointers}, "ws_ptr": "*fp32", "counters_ptr": "*i32",
             "sq_in_ptr": "*fp32", "sq_out_ptr": "*fp32", "eps": "fp32"}  # fmt: skip
    aligned = pointers | {"ws_ptr", "counters_ptr", "K", "stride_xm", "stride_wn", "stride_ym",
                          "stride_rm"}  # fmt: skip
    assert "M_PAD" in args

    def smem(t: lin.LinearTuning, bucket: int, tma: bool = False, **variant: bool) -> int:
        has = {name: variant.get(name, False)
               for name in ("residual", "norm", "sq_in", "sq_out", "swiglu")}  # fmt: skip
        m_pad = max(16, bucket)
        descs = {"x_desc": f"tensordesc<bf16[{m_pad},{t.block_k}]>",
                 "w_desc": f"tensordesc<bf16[{t.block_n},{t.block_k}]>"}  # fmt: skip
        consts = {"M_PAD": m_pad, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "TMA": tma,
                  "USE_DOT": t.dot, "EVEN_K": True, "DOT_PRECISION": "tf32",
                  "SPLIT_K": t.split_k, "HAS_RESIDUAL": has["residual"], "NORM": has["norm"],
                  "GAIN": False, "SQ_IN": has["sq_in"], "SQ_BLOCKS": 64 if has["sq_in"] else 1,
                  "SQ_OUT": has["sq_out"], "SWIGLU": has["swiglu"], "PDL": True,
                  "PREFETCH_LINES": 8, "SCALED": False, "LINE_COLS": 64}  # fmt: skip
        # the pointers the wrapper passes as None (Triton makes them constexpr None); the
        # norm's weight is folded into w (Llama-3-8B is untied)
        absent = {"r_ptr": not has["residual"], "g_ptr": True, "s_ptr": True,
                  "sq_in_ptr": not has["sq_in"],
                  "sq_out_ptr": not has["sq_out"], "ws_ptr": t.split_k == 1,
                  "counters_ptr": t.split_k == 1, "x_desc": not tma,
                  "w_desc": not tma}  # fmt: skip
        consts.update({name: None for name, none in absent.items() if none})
        return _sm90(lin._linear_jit, {**types, **descs}, consts, t.options(), aligned)

    out = []
    for key, fields in lin.read_tuned()[H100].items():
        t = lin.LinearTuning(**fields)
        n = int(key.split("x")[0])
        bucket = int(key.split()[1][1:])
        in_kernel_norm = t.split_k == 1 and not t.norm_first  # else the norm kernel runs first
        # as the model launches each (shared/model/llama.py): o and down hand their rows'
        # squares on, qkv and gate_up take them (the first qkv and lm_head sum x's themselves)
        variants: list[dict] = {
            4096: [{"residual": True, "sq_out": True}],
            6144: [{"norm": True, "sq_in": True}, {"norm": in_kernel_norm}],
            28672: [{"norm": True, "sq_in": True}],
            128256: [{"norm": in_kernel_norm}],
        }[n]
        if bucket == 1:  # one row: no squares handed over, the norm summed in the loop
            variants = [{"residual": True} if n == 4096 else {"norm": True}]
        k = int(key.split("x")[1].split()[0])
        for variant in variants:
            tv, n_out = t, n
            if n == 28672 and not (t.split_k > 1 or (t.dot and t.block_n < 32)):
                # gate_up as `linear` launches a SwiGLU of this config (else the plain launch,
                # then SiLU-and-mul)
                tv, n_out, variant = (
                    dataclasses.replace(t, block_n=t.block_n // 2),
                    n // 2,
                    {**variant, "swiglu": True},
                )
            # a tma config's tiles arrive by TMA where they fit (the GPU launch)
            tma = tv.tma and lin.tma_fits(tv, n_out, k)
            asked = smem(tv, bucket, tma, **variant)
            out.append(dict(what=f"{key} {variant} {tma=}", asked=asked, bound=None))
    for base in lin.TUNING:  # as tune_linear times them: each with pointer loads and by TMA
        for t in (base, dataclasses.replace(base, tma=True)):
            if lin.candidate(t, 4096, 14336, 64, any_split=True) and (
                not t.tma or lin.tma_fits(t, 4096, 14336)
            ):
                bound = lin.pipeline_smem(t, 64) if t.dot else None
                asked = smem(t, 64, t.tma)
                out.append(dict(what=f"candidate {t} at 64 rows", asked=asked, bound=bound))
    return out + _compile_quantized_linear(types, aligned)


def _compile_quantized_linear(types: dict, aligned: set) -> list[dict]:
    """The quantized forms (FP8 and INT8 codes, bf16 x) of a few configs as the model launches
    them: codes by pointer loads, the gain on w's tiles (dot) or x (gemv), scales after."""
    import kvmesh.kernels.linear as lin

    configs = [(lin.LinearTuning(64, 128, 4, 6), 64), (lin.LinearTuning(128, 128, 8, 4), 16),
               (lin.LinearTuning(64, 128, 4, 6, split_k=2), 64),
               (lin.LinearTuning(16, 512, 4, 3, dot=False), 1)]  # fmt: skip
    out = []
    for codes in ("*fp8e4nv", "*i8"):
        for t, bucket in configs:
            tv = t if t.split_k > 1 else dataclasses.replace(t, block_n=t.block_n // 2)
            swiglu = t.split_k == 1  # gate_up, fused; a split config as qkv with squares in
            sq_in = t.dot and bucket > 1
            consts = {"M_PAD": max(16, bucket), "BLOCK_N": tv.block_n, "BLOCK_K": tv.block_k,
                      "TMA": False, "USE_DOT": tv.dot, "EVEN_K": True, "DOT_PRECISION": "tf32",
                      "SPLIT_K": tv.split_k, "HAS_RESIDUAL": False, "NORM": True, "GAIN": True,
                      "SQ_IN": sq_in, "SQ_BLOCKS": 64 if sq_in else 1, "SQ_OUT": False,
                      "SWIGLU": swiglu, "PDL": True, "PREFETCH_LINES": 8, "SCALED": True,
                      "LINE_COLS": 128, "r_ptr": None, "sq_out_ptr": None, "x_desc": None,
                      "w_desc": None}  # fmt: skip
            consts.update({"ws_ptr": None, "counters_ptr": None} if tv.split_k == 1 else {})
            consts.update({} if sq_in else {"sq_in_ptr": None})
            asked = _sm90(lin._linear_jit, {**types, "w_ptr": codes, "s_ptr": "*fp32"}, consts,
                          tv.options(), aligned)  # fmt: skip
            bound = lin.pipeline_smem(tv, bucket) if tv.dot else None
            out.append(dict(what=f"{codes} {tv} m{bucket} {swiglu=}", asked=asked, bound=bound))
    return out


def _compile_others() -> list[dict]:
    import kvmesh.kernels.act_quant as act_quant
    import kvmesh.kernels.activation as act
    import kvmesh.kernels.argmax as argmax
    import kvmesh.kernels.decode_attention as dec
    import kvmesh.kernels.prefill_attention as pre
    import kvmesh.kernels.rms_norm as norm
    import kvmesh.kernels.rope_kv as rope_kv

    bf16 = "*bf16"
    attention = {"q_ptr": bf16, "k_ptr": bf16, "v_ptr": bf16, "table_ptr": "*i32",
                 "lens_ptr": "*i32", "o_part_ptr": "*fp32", "ml_part_ptr": "*fp32",
                 "out_ptr": bf16, "qk_scale": "fp32", "kn_ptr": bf16, "vn_ptr": bf16,
                 "pos_ptr": "*i64", "cs_ptr": "*fp32", "slot_ptr": "*i64"}  # fmt: skip
    t = dec.DecodeTuning()
    out = []
    fp8_cache = {"k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "kv_scale_ptr": "*fp32"}
    variants = [(1, False, False), (1, True, False), (3, False, False), (3, True, False),
                (1, True, True), (3, False, True)]  # (splits, new token, FP8 cache)  # fmt: skip
    for splits, new_token, kv_fp8 in variants:
        consts = dict(NUM_HEADS=32, NUM_SPLITS=splits, GROUP=4, GROUP_PAD=16, PAGE=16,
                      HEAD_DIM=128, BLOCK_N=t.block_n, DOT_PRECISION="tf32",
                      NEW_TOKEN=new_token, PDL=True, KV_FP8=kv_fp8,
                      ROUND_IN_FP32=False)  # fmt: skip
        # the pointers the wrapper passes as None (Triton makes them constexpr None)
        if splits == 1:
            consts.update(o_part_ptr=None, ml_part_ptr=None)
        if not new_token:
            consts.update(kn_ptr=None, vn_ptr=None, pos_ptr=None, cs_ptr=None, slot_ptr=None)
        if not kv_fp8:
            consts.update(kv_scale_ptr=None)
        asked = _sm90(dec._decode_split_kernel, {**attention, **(fp8_cache if kv_fp8 else {})},
                      consts, dict(num_warps=t.num_warps, num_stages=t.num_stages))  # fmt: skip
        out.append(dict(what=f"decode attention {splits} splits {new_token=} {kv_fp8=}",
                        asked=asked))  # fmt: skip
    kernels = [
        (act_quant._quantize_rows_kernel, {"x_ptr": bf16, "g_ptr": bf16, "codes_ptr": "*fp8e4nv",
                                           "scale_ptr": "*fp32", "eps": "fp32"},
         dict(NORM=True, GAIN=True, BLOCK=16384, PDL=True)),
        (dec._decode_merge_kernel, {"o_part_ptr": "*fp32", "ml_part_ptr": "*fp32", "out_ptr": bf16},
         dict(NUM_HEADS=32, NUM_SPLITS=3, SPLITS_PAD=4, HEAD_DIM=128, PDL=True)),
        (norm._rms_norm_kernel, {"x_ptr": bf16, "res_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16,
                                 "new_res_ptr": bf16, "eps": "fp32"},
         dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, BLOCK=4096, PDL=True)),
        (act._silu_and_mul_kernel, {"x_ptr": bf16, "out_ptr": bf16}, dict(BLOCK=2048, PDL=True)),
        (rope_kv._rope_write_kv_kernel, {"q_ptr": bf16, "k_ptr": bf16, "v_ptr": bf16,
                                         "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
                                         "k_cache_ptr": bf16, "v_cache_ptr": bf16,
                                         "slot_ptr": "*i64"},
         dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, PDL=True, KV_FP8=False, ROUND_IN_FP32=False,
              kv_scale_ptr=None)),
        (rope_kv._rope_write_kv_kernel, {"q_ptr": bf16, "k_ptr": bf16, "v_ptr": bf16,
                                         "pos_ptr": "*i64", "cos_sin_ptr": "*fp32",
                                         "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
                                         "slot_ptr": "*i64", "kv_scale_ptr": "*fp32"},
         dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, PDL=True, KV_FP8=True, ROUND_IN_FP32=False)),
    ]  # fmt: skip
    for fn, types, consts in kernels:
        out.append(dict(what=fn.__name__, asked=_sm90(fn, types, consts, dict(num_warps=4))))
    asked = _sm90(argmax._argmax_chunk_kernel, {"x_ptr": bf16, "val_ptr": "*fp32",
                                                "idx_ptr": "*i32"},
                  dict(BLOCK=argmax.BLOCK, PDL=True), dict(num_warps=4))  # fmt: skip
    out.append(dict(what="greedy argmax, chunks", asked=asked))
    asked = _sm90(argmax._argmax_merge_kernel, {"val_ptr": "*fp32", "idx_ptr": "*i32",
                                                "out_ptr": "*i64"},
                  dict(CHUNKS=argmax.MAX_CHUNKS, PDL=True), dict(num_warps=1))  # fmt: skip
    out.append(dict(what="greedy argmax, merge", asked=asked))
    prefill = {"q_ptr": bf16, "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "out_ptr": bf16,
               "table_ptr": "*i32", "cu_ptr": "*i32", "lens_ptr": "*i32", "qk_scale": "fp32",
               "kv_scale_ptr": "*fp32"}  # fmt: skip
    for tuning in [*pre.TUNING, pre.NARROW_TUNING]:  # an FP8 cache (bf16 caches: tests/gpu)
        consts = dict(GROUP=4, PAGE=16, HEAD_DIM=128, DOT_PRECISION="tf32", FITS_INT32=True,
                      SAME_KV_STRIDES=True, KV_FP8=True, **tuning.meta())  # fmt: skip
        asked = _sm90(pre._prefill_kernel, prefill, consts, tuning.options())
        out.append(dict(what=f"prefill attention {tuning.label()} FP8 cache", asked=asked))
    return out


def _compile_first_chunk() -> list[dict]:
    """The Gluon first-chunk attention (prefill's path on sm_90) for head dims 128 and 64, bf16
    and fp16, with the launch's register cap: shared memory asked, and the registers and stack
    (spills) of its heaviest partition."""
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    import kvmesh.kernels.first_chunk_attention as fc

    out = []
    for head_dim, dtype in ((128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)):
        tokens, heads, kv_heads = 300, 32, 8
        qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
        k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, -1)
        descs = {"q_desc": fc._descriptor(q, fc.ROWS), "k_desc": fc._descriptor(k, fc.BLOCK_N),
                 "v_desc": fc._descriptor(k, fc.BLOCK_N)}  # fmt: skip
        types = {n: native_specialize_impl(BaseBackend, d, False, True, True)[0]
                 for n, d in descs.items()}  # fmt: skip
        types |= {"out_ptr": "*bf16" if dtype == torch.bfloat16 else "*fp16", "cu_ptr": "*i32",
                  "qk_scale": "fp32"}  # fmt: skip
        consts = dict(H=heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, ROWS=fc.ROWS,
                      BLOCK_N=fc.BLOCK_N, NUM_STAGES=fc.NUM_STAGES, Q_BUFFERS=fc.Q_BUFFERS,
                      CONSUMER_REGS=fc.CONSUMER_REGS)  # fmt: skip
        args = list(fc._first_chunk_kernel.arg_names)
        signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in args}
        source = GluonASTSource(fc._first_chunk_kernel, signature,
                                {(args.index(a),): v for a, v in consts.items()})  # fmt: skip
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                options=fc.LAUNCH_OPTIONS)  # fmt: skip
        ptx = kernel.asm["ptx"]
        out.append(dict(what=f"first-chunk attention d{head_dim} {dtype}",
                        asked=kernel.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                        setmaxnreg=ptx.count("setmaxnreg"),
                        stack=_stack_bytes(kernel.asm["cubin"])))  # fmt: skip
    return out


def _stack_bytes(cubin: bytes) -> int:
    """The kernel's stack frame (spilled registers) in the cubin, read by Triton's cuobjdump."""
    import re
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def _compile_all() -> dict:
    return {"linear": _compile_linear(), "others": _compile_others(),
            "first_chunk": _compile_first_chunk()}  # fmt: skip


@functools.cache
def _compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_decode_kernels_compile_for_sm90():
    import kvmesh.kernels.linear as lin

    compiled = _compiled()
    assert len(compiled["linear"]) >= len(lin.read_tuned()[H100])
    for r in compiled["linear"]:
        assert r["asked"] <= lin.SMEM_LIMIT, r
        if r["bound"] is not None:
            assert r["asked"] <= r["bound"], r
    assert len(compiled["others"]) == 17
    for r in compiled["others"]:
        assert r["asked"] <= lin.SMEM_LIMIT, r


def test_the_first_chunk_attention_compiles_for_sm90():
    """The Gluon kernel has no interpreter: on CPU only its sm_90 compile is checked (its results
    against the reference are tests/gpu's). It must fit a program's shared memory, issue async
    wgmma, hand registers between its partitions and spill nothing to local memory."""
    import kvmesh.kernels.first_chunk_attention as fc

    compiled = _compiled()["first_chunk"]
    assert len(compiled) == 3
    for r in compiled:
        assert r["asked"] <= fc.SMEM_LIMIT, r
        assert r["wgmma"] > 0 and r["setmaxnreg"] > 0 and r["stack"] == 0, r


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
