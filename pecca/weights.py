"""Weights of a model: views into the memory-mapped file, never copies.

Each linear layer is an object that owns its weight view and knows its kernel, so the
forward pass never branches on the weight type (f32 now; q8 and GPTQ kinds join later).
"""
from dataclasses import dataclass
from typing import List

import numpy as np

from pecca._kernels import f32
from pecca._kernels import f16


class F32Linear:
    """y = W x with W float32, shape (out_features, in_features), row-major."""

    kind = "f32"

    def __init__(self, w: np.ndarray):
        if w.dtype != np.float32 or w.ndim != 2 or not w.flags.c_contiguous:
            raise ValueError("F32Linear needs a C-contiguous 2-D float32 array")
        self.w = w
        self.out_features, self.in_features = w.shape

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        f32.matvec(self.w, x, out, threads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        f32.matmul(self.w, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


class F16Linear:
    """y = W x with W IEEE half, shape (out_features, in_features), row-major; x and y float32.

    The kernel takes the bits as uint16 (``bits``, a view of ``w``, not a copy)."""

    kind = "f16"

    def __init__(self, w: np.ndarray):
        if w.dtype != np.float16 or w.ndim != 2 or not w.flags.c_contiguous:
            raise ValueError("F16Linear needs a C-contiguous 2-D float16 array")
        self.w = w
        self.bits = w.view(np.uint16)
        self.out_features, self.in_features = w.shape

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        f16.matvec_f16(self.bits, x, out, threads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        f16.matmul_f16(self.bits, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


class BF16Linear:
    """y = W x with W bfloat16, given as uint16 bit patterns (numpy has no bfloat16), shape
    (out_features, in_features), row-major; x and y float32."""

    kind = "bf16"

    def __init__(self, w: np.ndarray):
        if w.dtype != np.uint16 or w.ndim != 2 or not w.flags.c_contiguous:
            raise ValueError("BF16Linear needs a C-contiguous 2-D uint16 array of bf16 bits")
        self.w = w
        self.out_features, self.in_features = w.shape

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        f16.matvec_bf16(self.w, x, out, threads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        f16.matmul_bf16(self.w, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,)
    wq: F32Linear  # (n_heads * head_size, dim)
    wk: F32Linear  # (n_kv_heads * head_size, dim)
    wv: F32Linear  # (n_kv_heads * head_size, dim)
    wo: F32Linear  # (dim, n_heads * head_size)
    ffn_norm: np.ndarray  # (dim,)
    w1: F32Linear  # gate (hidden_dim, dim)
    w2: F32Linear  # down (dim, hidden_dim)
    w3: F32Linear  # up (hidden_dim, dim)


@dataclass
class Weights:
    token_embedding: np.ndarray  # (vocab_size, dim)
    layers: List[LayerWeights]
    norm: np.ndarray  # (dim,)
    output: F32Linear  # classifier (vocab_size, dim); may share token_embedding's memory
    shared_classifier: bool

    @property
    def precision(self) -> str:
        return self.layers[0].wq.kind if self.layers else self.output.kind

    @property
    def nbytes(self) -> int:
        """Bytes read per token by the linear layers (the decode's memory traffic)."""
        total = self.output.nbytes
        for layer in self.layers:
            total += sum(getattr(layer, n).nbytes for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
        return total


# int8 weights (added after the classes above; the import sits with the code that uses it)
from pecca._kernels import q8  # noqa: E402


class Q8GroupLinear:
    """y = W x with W int8 in groups (llama2.c version-2 checkpoints, runq.c): ``q`` int8
    (out_features, in_features) row-major and ``s`` float32 scales, one per group of
    ``group_size`` consecutive values of a row, W[r, j] = q[r, j] * s[(r * in_features + j) //
    group_size]. x is quantized to int8 per group for each product (see pecca._kernels.q8)."""

    kind = "q8"

    def __init__(self, q: np.ndarray, s: np.ndarray, group_size: int):
        if q.dtype != np.int8 or q.ndim != 2 or not q.flags.c_contiguous:
            raise ValueError("Q8GroupLinear needs a C-contiguous 2-D int8 array of quantized values")
        rows, n = q.shape
        gs = int(group_size)
        if gs <= 0 or n % gs != 0:
            raise ValueError(f"Q8GroupLinear: group size {group_size} must be positive and divide "
                             f"the row length {n}")
        if s.dtype != np.float32 or not s.flags.c_contiguous or s.ndim not in (1, 2):
            raise ValueError("Q8GroupLinear needs C-contiguous float32 scales, 1-D or (rows, n / gs)")
        if (s.ndim == 1 and s.shape[0] != rows * (n // gs)) or (s.ndim == 2 and s.shape != (rows, n // gs)):
            raise ValueError(f"Q8GroupLinear: {rows}x{n} in groups of {gs} needs {rows * (n // gs)} "
                             f"scales, got shape {s.shape}")
        self.q = q
        self.s = s.reshape(-1)  # a view: s is C-contiguous
        self.group_size = gs
        self.out_features, self.in_features = rows, n

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        q8.matvec_q8g(self.q, self.s, self.group_size, x, out, threads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q8.matmul_q8g(self.q, self.s, self.group_size, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.s.nbytes


class Q8_0Linear:
    """y = W x with W in GGUF Q8_0 blocks: ``blocks`` uint8 (out_features, in_features / 32 * 34),
    each row in_features / 32 blocks of a little-endian f16 scale d and 32 int8 q (W = d * q).
    x is quantized to int8 per block of 32 for each product (see pecca._kernels.q8)."""

    kind = "q8_0"

    def __init__(self, blocks: np.ndarray):
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or not blocks.flags.c_contiguous:
            raise ValueError("Q8_0Linear needs a C-contiguous 2-D uint8 array of Q8_0 blocks")
        if blocks.shape[1] % 34 != 0:
            raise ValueError(f"Q8_0Linear: a row is a whole number of 34-byte blocks; got "
                             f"{blocks.shape[1]} bytes")
        self.blocks = blocks
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // 34 * 32

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        q8.matvec_q8_0(self.blocks, x, out, threads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q8.matmul_q8_0(self.blocks, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes
