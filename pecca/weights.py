"""Weights of a model: views into the memory-mapped file, never copies.

Each linear layer is an object that owns its weight view and knows its kernel, so the
forward pass never branches on the weight type (f32 now; q8 and GPTQ kinds join later).
"""
from dataclasses import dataclass
from functools import partial
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

    @staticmethod
    def many_plan(linears):
        """(x, outs, threads) -> outs[i] = linears[i] x in one kernel call (matvec_same_input)."""
        return partial(q8.matvec_q8_0_many, [lin.blocks for lin in linears])

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q8.matmul_q8_0(self.blocks, x, out, threads)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


# 4-bit weights (q4g, GGUF Q4_0 / Q4_1, native GPTQ); the import sits with the code that uses it
from pecca._kernels import q4  # noqa: E402


def _check_array(owner: str, what: str, a, dtype, shape) -> None:
    """ValueError unless a is a C-contiguous numpy array of dtype and shape (None: any size)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{owner}: {what} must be a {np.dtype(dtype)} array, got {got}")
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "x".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{owner}: {what} has shape {a.shape}, expected ({want})")
    if not a.flags.c_contiguous:
        raise ValueError(f"{owner}: {what} must be C-contiguous")


def _check_permutation(owner: str, what: str, p: np.ndarray, n: int) -> None:
    if p.size and (p.min() < 0 or p.max() >= n or np.bincount(p, minlength=n).max() != 1):
        raise ValueError(f"{owner}: {what} is not a permutation of 0..{n - 1}")


def q4g_quads_fit(n: int, k: int, s: int) -> bool:
    """Whether a q4g matrix of n rows, k inputs and s column slices can take the quad layout."""
    return n % 4 == 0 and (k // s) % 128 == 0


class Q4GLinear:
    """y = W x with W in pecca's 4-bit GPTQ layout (q4g): ``qs`` uint8 (out_features,
    in_features / 2), per row and block of 32 inputs 16 bytes of nibbles (low nibble of byte j:
    input 32b+j, high nibble: input 32b+16+j), ``scales`` float16 and ``zeros`` int8 (zero points
    0..15), both (out_features, G), and ``perm`` int32 (in_features,) or None (act-order: the
    kernels use x[perm[i]] as input i). W[n, perm[i]] = scales[n, i // gs] * (code(n, i) -
    zeros[n, i // gs]), gs = in_features / G. x is quantized to int8 per block of 32 for each
    product, unless ``float_act`` is set or gs % 32 != 0 (see pecca._kernels.q4).

    Column slices (long rows, see export.gptq): qs (S, out_features, in_features / S / 2),
    scales and zeros (S, out_features, G), slice j holding inputs j K/S .. (j + 1) K/S - 1 (in
    perm's order) with its own G groups; W is the slices side by side. ``quads``: each slice's
    codes in the quad layout (rows 4 at a time, their 64 bytes of each 128 inputs side by side;
    pecca._kernels.q4), which needs out_features % 4 == 0 and (in_features / S) % 128 == 0."""

    kind = "gptq4"

    def __init__(self, qs: np.ndarray, scales: np.ndarray, zeros: np.ndarray, perm=None,
                 quads: bool = False):
        name = "Q4GLinear"
        sliced = isinstance(qs, np.ndarray) and qs.ndim == 3
        lead = (qs.shape[0],) if sliced else ()
        _check_array(name, "qs", qs, np.uint8, lead + (None, None))
        s, n, ks = (qs.shape if sliced else (1,) + qs.shape)
        k = 2 * ks * s
        if s < 1:
            raise ValueError(f"{name}: qs holds no column slices (shape {qs.shape})")
        if ks % 16 != 0:
            raise ValueError(f"{name}: in_features {2 * ks} (qs rows of {ks} bytes) is not a multiple of 32")
        _check_array(name, "scales", scales, np.float16, lead + (n, None))
        g = scales.shape[-1]
        if g < 1 or 2 * ks % g != 0:
            raise ValueError(f"{name}: {g} groups per row do not divide in_features {2 * ks}")
        _check_array(name, "zeros", zeros, np.int8, lead + (n, g))
        if zeros.size and (zeros.min() < 0 or zeros.max() > 15):
            raise ValueError(f"{name}: zero points must be in 0..15, got {zeros.min()}..{zeros.max()}")
        if perm is not None:
            _check_array(name, "perm", perm, np.int32, (k,))
            _check_permutation(name, "perm", perm, k)
        if quads and not q4g_quads_fit(n, k, s):
            raise ValueError(f"{name}: the quad layout needs out_features % 4 == 0 and inputs per "
                             f"slice % 128 == 0; got {n} and {2 * ks}")
        # the kernels take a sliced matrix as its slices' rows one after another (2-D views)
        self.qs, self.scales, self.zeros, self.perm = (qs.reshape(s * n, ks), scales.reshape(s * n, g),
                                                       zeros.reshape(s * n, g), perm)
        self.slices, self.quads = s, bool(quads)
        self._scale_bits = self.scales.view(np.uint16)
        self.group_size = 2 * ks // g
        self.out_features, self.in_features = n, k
        self.float_act = False

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        q4.matvec_q4g(self.qs, self._scale_bits, self.zeros, self.perm, x, out, threads,
                      self.float_act, self.slices, self.quads)

    @staticmethod
    def many_plan(linears):
        """One kernel call for linears that share their group size (a multiple of 32: int8
        activations) and their input permutation, as a GPTQ act-order checkpoint's q, k and v
        (and gate and up) do: act-order sorts the inputs by statistics of the input that those
        products share. None otherwise (see matvec_same_input)."""
        first = linears[0]
        for lin in linears:
            if (lin.float_act or lin.group_size != first.group_size or first.group_size % 32
                    or lin.slices != first.slices or lin.quads != first.quads
                    or (lin.perm is None) != (first.perm is None)
                    or (lin.perm is not None and not np.array_equal(lin.perm, first.perm))):
                return None
        return partial(q4.matvec_q4g_many, [lin.qs for lin in linears],
                       [lin._scale_bits for lin in linears], [lin.zeros for lin in linears],
                       first.perm, slices=first.slices, quads=first.quads)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q4.matmul_q4g(self.qs, self._scale_bits, self.zeros, self.perm, x, out, threads,
                      self.float_act, self.slices, self.quads)

    @property
    def nbytes(self) -> int:
        perm = 0 if self.perm is None else self.perm.nbytes
        return self.qs.nbytes + self.scales.nbytes + self.zeros.nbytes + perm


class _Q4BlockLinear:
    """GGUF 4-bit blocks of 32 weights: uint8 (out_features, in_features / 32 * block bytes)."""

    kind = ""
    block_bytes = 0
    matvec_many = None  # the q4 kernel of several matrices of one input (many_plan)

    def __init__(self, blocks: np.ndarray):
        name = type(self).__name__
        _check_array(name, "blocks", blocks, np.uint8, (None, None))
        if blocks.shape[1] % self.block_bytes != 0:
            raise ValueError(f"{name}: a row is a whole number of {self.block_bytes}-byte blocks; "
                             f"got {blocks.shape[1]} bytes")
        self.blocks = blocks
        self.out_features = blocks.shape[0]
        self.in_features = blocks.shape[1] // self.block_bytes * 32
        self.float_act = False

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @classmethod
    def many_plan(cls, linears):
        """One kernel call for linears (int8 activations only; see matvec_same_input)."""
        if any(lin.float_act for lin in linears):
            return None
        return partial(cls.matvec_many, [lin.blocks for lin in linears])


class Q4_0Linear(_Q4BlockLinear):
    """y = W x with W in GGUF Q4_0 blocks: per 32 weights 18 bytes, a little-endian f16 d and 16
    bytes of nibbles (weight j: low nibble of byte j, weight j+16: its high nibble), w = d (q - 8).
    x is quantized to int8 per block of 32 for each product unless ``float_act`` is set."""

    kind = "q4_0"
    block_bytes = 18
    matvec_many = staticmethod(q4.matvec_q4_0_many)

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        q4.matvec_q4_0(self.blocks, x, out, threads, self.float_act)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q4.matmul_q4_0(self.blocks, x, out, threads, self.float_act)


class Q4_1Linear(_Q4BlockLinear):
    """y = W x with W in GGUF Q4_1 blocks: per 32 weights 20 bytes, f16 d, f16 m and 16 bytes of
    nibbles (Q4_0's order), w = d q + m. x is quantized to int8 per block of 32 for each product
    unless ``float_act`` is set."""

    kind = "q4_1"
    block_bytes = 20
    matvec_many = staticmethod(q4.matvec_q4_1_many)

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x, x (in_features,)"""
        q4.matvec_q4_1(self.blocks, x, out, threads, self.float_act)

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T, x (T, in_features): one token per row."""
        q4.matmul_q4_1(self.blocks, x, out, threads, self.float_act)


class GPTQLinear:
    """y = W x (+ bias) with W in the native HF GPTQ layout, read in place: ``qweight`` int32
    (in_features / 8, out_features) (code of input 8r+k, column j: bits 4k..4k+3 of qweight[r, j]),
    ``qzeros`` int32 (G, out_features / 8) (v1 checkpoints store zero - 1 per nibble as a
    whole-word subtraction; v1=False is gptq_v2, the true zeros), ``scales`` float16
    (G, out_features), ``g_idx`` int32 (in_features,) group of each input (any order),
    ``out_perm`` int32 (out_features,) or None: out[i] = y[out_perm[i]], ``bias`` float32 or None.
    W[j, i] = scales[g_idx[i], j] * (code(i, j) - zero(g_idx[i], j)). Float activations."""

    kind = "gptq4"

    def __init__(self, qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                 g_idx: np.ndarray, v1: bool, out_perm=None, bias=None):
        name = "GPTQLinear"
        _check_array(name, "qweight", qweight, np.int32, (None, None))
        k, n = 8 * qweight.shape[0], qweight.shape[1]
        if n % 8 != 0:
            raise ValueError(f"{name}: out_features {n} is not a multiple of 8")
        _check_array(name, "scales", scales, np.float16, (None, n))
        g = scales.shape[0]
        _check_array(name, "qzeros", qzeros, np.int32, (g, n // 8))
        _check_array(name, "g_idx", g_idx, np.int32, (k,))
        if k and (g_idx.min() < 0 or g_idx.max() >= g):
            raise ValueError(f"{name}: g_idx values must be in [0, {g}), got {g_idx.min()}..{g_idx.max()}")
        if out_perm is not None:
            _check_array(name, "out_perm", out_perm, np.int32, (n,))
            _check_permutation(name, "out_perm", out_perm, n)
        if bias is not None:
            _check_array(name, "bias", bias, np.float32, (n,))
        self.qweight, self.qzeros, self.scales, self.g_idx = qweight, qzeros, scales, g_idx
        self.out_perm, self.bias = out_perm, bias
        self.zero_add = 0x11111111 if v1 else 0
        self._scale_bits = scales.view(np.uint16)
        self.out_features, self.in_features = n, k
        self.float_act = True  # the only path of this layout

    def __call__(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (out_features,) = W x (+ bias), x (in_features,)"""
        q4.matvec_gptq(self.qweight, self.qzeros, self.zero_add, self._scale_bits, self.g_idx,
                       self.out_perm, x, out, threads)
        if self.bias is not None:
            out += self.bias

    def batch(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out (T, out_features) = x W^T (+ bias), x (T, in_features): one token per row."""
        q4.matmul_gptq(self.qweight, self.qzeros, self.zero_add, self._scale_bits, self.g_idx,
                       self.out_perm, x, out, threads)
        if self.bias is not None:
            out += self.bias

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.out_perm, self.bias) if a is not None)
        return self.qweight.nbytes + self.qzeros.nbytes + self.scales.nbytes + self.g_idx.nbytes + extra


def matvec_same_input(linears, x: np.ndarray, outs, threads: int = 1) -> None:
    """outs[i] = linears[i] x for products that share their input (a layer's q, k and v; its
    gate and up). Where they are all of one kind with a ``many_plan`` (Q8_0, Q4_0, Q4_1, and
    q4g with one group size and input permutation), x is prepared once and one thread team runs
    them all: on a small model (SmolLM2) each product is only a few microseconds and the calls
    around it show. Otherwise one call each. Same results either way, bit for bit."""
    plan = _many_plan(linears)
    if plan is None:
        for lin, out in zip(linears, outs):
            lin(x, out, threads)
    else:
        plan(x, outs, threads)


def _many_plan(linears):
    """The one-call product of linears, or None: worked out once per group (and float_act
    setting) and kept on the first Linear, since the per-token Python would eat the gain."""
    first = linears[0]
    make = getattr(type(first), "many_plan", None)
    if make is None:
        return None
    key = (tuple(map(id, linears)), tuple([getattr(lin, "float_act", False) for lin in linears]))
    plans = first.__dict__.setdefault("_many_plans", {})
    hit = plans.get(key)
    if hit is None:  # the linears are kept with the plan, so their ids stay theirs
        same_kind = all(type(lin) is type(first) for lin in linears)
        hit = plans[key] = (tuple(linears), make(linears) if same_kind else None)
    return hit[1]
