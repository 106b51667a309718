"""The skinny linear compiled for sm_90 (H100) without a GPU: every config of the H100 table, as
the model launches it (norm fused into qkv and lm_head, norm and SwiGLU into gate_up with half
the rows of each, the residual into o and down), and every autotuner candidate at 64 rows, must
compile and fit a program's shared memory; for the dot configs `pipeline_smem` must bound what
the compiler asks. A config past the limit fails only at launch, on the GPU.

The compiles run in a subprocess: under TRITON_INTERPRET=1 (the CPU suite) the kernels are not
JIT functions that triton.compile takes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"


def _compile_all() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.linear as lin

    args = list(lin._linear_jit.arg_names)
    pointers = {"x_ptr", "w_ptr", "y_ptr", "r_ptr", "g_ptr"}
    types = {**{p: "*bf16" for p in pointers}, "ws_ptr": "*fp32", "counters_ptr": "*i32",
             "eps": "fp32"}  # fmt: skip
    aligned = pointers | {"ws_ptr", "counters_ptr", "K", "stride_xm", "stride_wn", "stride_ym",
                          "stride_rm"}  # fmt: skip
    runtime = args[: args.index("M_PAD")]

    def smem(t: lin.LinearTuning, bucket: int, **variant: bool) -> int:
        consts = {"M_PAD": max(16, bucket), "BLOCK_N": t.block_n, "BLOCK_K": t.block_k,
                  "USE_DOT": t.dot, "EVEN_K": True, "DOT_PRECISION": "tf32",
                  "SPLIT_K": t.split_k, "HAS_RESIDUAL": variant.get("residual", False),
                  "NORM": variant.get("norm", False), "SWIGLU": variant.get("swiglu", False),
                  "PDL": True, "PREFETCH_LINES": 8}  # fmt: skip
        signature = {a: types.get(a, "i32") if a in runtime else "constexpr" for a in args}
        source = ASTSource(
            fn=lin._linear_jit, signature=signature,
            constexprs={(i,): consts[a] for i, a in enumerate(args) if a in consts},
            attrs={(args.index(a),): [["tt.divisibility", 16]] for a in aligned},
        )  # fmt: skip
        options = {**t.options(), "launch_pdl": True}
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        return kernel.metadata.shared

    out = []
    for key, fields in lin.read_tuned()[H100].items():
        t = lin.LinearTuning(**fields)
        n = int(key.split("x")[0])
        bucket = int(key.split()[1][1:])
        variant = {"residual": True} if n == 4096 else {"norm": t.split_k == 1}
        if n == 28672:  # gate_up: as `linear` launches a SwiGLU of this config
            if t.split_k > 1 or (t.dot and t.block_n < 32):
                continue  # the plain launch, then SiLU-and-mul
            t, variant = dataclasses.replace(t, block_n=t.block_n // 2), {**variant, "swiglu": True}
        out.append(dict(what=f"{key} {variant}", asked=smem(t, bucket, **variant), bound=None))
    for t in lin.TUNING:
        if lin.candidate(t, 4096, 14336, 64, any_split=True):
            bound = lin.pipeline_smem(t, 64) if t.dot else None
            out.append(dict(what=f"candidate {t} at 64 rows", asked=smem(t, 64), bound=bound))
    return out


def test_every_h100_config_compiles_for_sm90_within_shared_memory():
    import kernels.linear as lin

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) >= len(lin.read_tuned()[H100])
    for r in results:
        assert r["asked"] <= lin.SMEM_LIMIT, r
        if r["bound"] is not None:
            assert r["asked"] <= r["bound"], r


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
