"""pecca's compiled kernels (Cython + C, OpenMP).

Modules: ``f32`` (matrix-vector and matrix-matrix products), ``f16`` (the same with f16 /
bf16 weights), ``q8`` (the same with int8 weights: llama2.c q8 groups, GGUF Q8_0), ``q4``
(4-bit weights: pecca's repacked GPTQ, GGUF Q4_0/Q4_1, GPTQ's own layout), ``ops``
(rmsnorm, softmax, RoPE, SwiGLU, attention), ``runtime`` (OpenMP, SIMD and VNNI information).
"""
import os

from pecca._kernels import f16, f32, ops, q4, q8, runtime

SIMD_PATHS = runtime.SIMD_NAMES


def set_simd_path(name):
    """Force a SIMD path ('portable', 'avx2', 'avx512'; capped at what the CPU has) or
    None for the best one. Returns the path now in use."""
    if name is None:
        os.environ.pop("PECCA_SIMD", None)
    else:
        if name not in SIMD_PATHS:
            raise ValueError(f"unknown SIMD path {name!r}; expected one of {SIMD_PATHS}")
        os.environ["PECCA_SIMD"] = name
    for module in (f32, f16, q8, q4, ops):
        module._reset_simd()
    return runtime.reset_simd()
