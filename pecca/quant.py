"""Quantized tensors outside the matrix kernels: NumPy (de)quantization for export and tests, and
the token-embedding lookup (GGUF blocks through ops.dequantize_rows; llama2.c's int8 groups in
NumPy).

Two int8 layouts:
- llama2.c version 2 ("q8"): int8 values plus one float32 scale per group of `gs` consecutive
  values (export.py's quantize_q80, runq.c's quantize): scale = max|x| / 127,
  q = round(x / scale) (half away from zero).
- GGUF Q8_0: blocks of 32 values, each an f16 scale followed by 32 int8 (llama.cpp's
  block_q8_0); the `gguf` package's quantize/dequantize are bit-exact with llama.cpp's C.

and the GGUF 4-bit blocks of 32 values, Q4_0 (f16 d, 16 bytes of nibbles; d * (q - 8)) and
Q4_1 (f16 d, f16 m, 16 bytes; d * q + m), through the same `gguf` functions.
"""
import numpy as np

from pecca._kernels import ops

Q8_0_BLOCK, Q8_0_BYTES = 32, 34
# GGUF block types pecca reads and writes: values per block and bytes per block
BLOCK_VALUES = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


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


def quantize_blocks(x: np.ndarray, kind: str) -> np.ndarray:
    """float rows (..., n), n a multiple of 32 -> GGUF `kind` ("Q8_0", "Q4_0", "Q4_1") bytes
    (..., n // 32 * BLOCK_BYTES[kind])."""
    import gguf

    return gguf.quants.quantize(np.asarray(x, np.float32), gguf.GGMLQuantizationType[kind])


def dequantize_blocks(blocks: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(np.asarray(blocks), gguf.GGMLQuantizationType[kind])


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    return quantize_blocks(x, "Q8_0")


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return dequantize_blocks(blocks, "Q8_0")


class BlockRows:
    """A GGUF block-quantized matrix (rows, n // 32 * bytes per block), read a row at a time:
    the token embedding."""

    def __init__(self, blocks: np.ndarray, kind: str = "Q8_0"):
        self.blocks, self.type = blocks, kind
        self.kind = kind.lower()
        self.shape = (blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[kind] * BLOCK_VALUES)

    def rows(self, tokens) -> np.ndarray:
        out = np.empty(np.shape(tokens) + (self.shape[1],), np.float32)
        self.rows_into(tokens, out)
        return out

    def rows_into(self, tokens, out: np.ndarray) -> None:
        """out (float32, C-contiguous, len(tokens) x n or n for one token) = those rows."""
        ops.dequantize_rows(self.blocks, tokens, self.type, out.reshape(-1))


def dequantize_rows(blocks: np.ndarray, kind: str) -> np.ndarray:
    """dequantize_blocks for a few rows (any leading shape), without the `gguf` package's
    per-call overhead (~0.1 ms: 2.5% of a SmolLM2 decode step for its one embedding row). The
    same arithmetic as gguf's numpy code (and llama.cpp's C): float32 of the f16 scales times
    float32 of the codes (ops.dequantize_rows)."""
    table = np.ascontiguousarray(blocks).reshape(-1, blocks.shape[-1])
    out = np.empty(blocks.shape[:-1] + (blocks.shape[-1] // BLOCK_BYTES[kind] * BLOCK_VALUES,), np.float32)
    ops.dequantize_rows(table, range(table.shape[0]), kind, out.reshape(-1))
    return out


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

    def rows_into(self, tokens, out: np.ndarray) -> None:
        out[...] = self.rows(tokens)
