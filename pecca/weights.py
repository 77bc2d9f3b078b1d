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
