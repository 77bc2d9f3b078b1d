"""Quantized tensors outside the kernels: NumPy (de)quantization for export, tests and the
token-embedding lookup (one row per token, so NumPy is fast enough).

Two int8 layouts:
- llama2.c version 2 ("q8"): int8 values plus one float32 scale per group of `gs` consecutive
  values (export.py's quantize_q80, runq.c's quantize): scale = max|x| / 127,
  q = round(x / scale) (half away from zero).
- GGUF Q8_0: blocks of 32 values, each an f16 scale followed by 32 int8 (llama.cpp's
  block_q8_0); the `gguf` package's quantize/dequantize are bit-exact with llama.cpp's C.
"""
import numpy as np

Q8_0_BLOCK, Q8_0_BYTES = 32, 34


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's round(): halves away from zero (NumPy's rint rounds them to even)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def quantize_q8_groups(x: np.ndarray, gs: int):
    """(q int8 like x, scales float32 of x.size // gs): llama2.c's quantize_q80."""
    g = np.asarray(x, np.float32).reshape(-1, gs)
    scale = (np.abs(g).max(axis=1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[:, None] > 0, round_half_away(g / scale[:, None]), 0)
    return q.astype(np.int8).reshape(np.shape(x)), scale


def dequantize_q8_groups(q: np.ndarray, scales: np.ndarray, gs: int) -> np.ndarray:
    """float32 values of llama2.c int8 groups, computed as runq.c's dequantize (q * s)."""
    s = np.asarray(scales, np.float32).reshape(-1)
    return (q.reshape(-1, gs).astype(np.float32) * s[:, None]).reshape(q.shape)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float rows (..., n), n a multiple of 32 -> Q8_0 bytes (..., n // 32 * 34)."""
    import gguf

    return gguf.quants.quantize(np.asarray(x, np.float32), gguf.GGMLQuantizationType.Q8_0)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.asarray(blocks), gguf.GGMLQuantizationType.Q8_0)


class Q8_0Rows:
    """A Q8_0 matrix (rows, n // 32 * 34 bytes) read a row at a time: the token embedding."""

    kind = "q8_0"

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks
        self.shape = (blocks.shape[0], blocks.shape[1] // Q8_0_BYTES * Q8_0_BLOCK)

    def rows(self, tokens) -> np.ndarray:
        return dequantize_q8_0(self.blocks[tokens])


class Q8GroupRows:
    """A llama2.c int8 matrix (q (rows, n), scales (rows * n // gs,)) read a row at a time."""

    kind = "q8"

    def __init__(self, q: np.ndarray, scales: np.ndarray, gs: int):
        self.q, self.gs = q, gs
        self.scales = scales.reshape(q.shape[0], q.shape[1] // gs)
        self.shape = q.shape

    def rows(self, tokens) -> np.ndarray:
        q, s = self.q[tokens], self.scales[tokens]
        return dequantize_q8_groups(q, s, self.gs)
