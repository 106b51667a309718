"""The numeric formats a worker may serve in: names only (no torch), for the command line and
EngineConfig to share. The grids themselves are kernels/quant.py's."""

from __future__ import annotations

# --quantization: the decoder layers' projections as loaded, FP8 E4M3 weights with dynamic
# per-token FP8 activations (W8A8), or INT8 weight-only (W8A16)
QUANTIZATIONS = ("none", "fp8", "int8")
# --kv-cache-dtype: the model's dtype, or FP8 E4M3 with per-head scales
KV_CACHE_DTYPES = ("auto", "fp8")
