"""GPTQ directories as an export source: each quantized Linear is repacked once, here, into
pecca's q4g layout, so loading the GGUF needs no work:

    blk.N.<linear>.gptq_qs      I32 (N, K/8)  the bytes of qs uint8 (N, K/2): row n, block b of
                                              32 (permuted) inputs = bytes 16b..16b+15, byte j
                                              holding input 32b+j (low nibble) and 32b+16+j (high)
    blk.N.<linear>.gptq_scales  F16 (N, G)    the checkpoint's scales, transposed
    blk.N.<linear>.gptq_zeros   I8  (N, G)    true zero points 0..15 (v1's minus one undone)
    blk.N.<linear>.gptq_perm    I32 (K,)      act-order only: the kernel reads x[perm[i]] as
                                              input i, and group g is inputs g*gs..(g+1)*gs-1
    W[n, perm[i]] = scales[n, i // gs] * (code(n, i) - zeros[n, i // gs])
    blk.N.ffn_down.gptq_fold    I32 (hidden,) instead of ffn_down's gptq_perm (see below)

Rows of K >= 8192 inputs (7B's ffn_down, every 70B matrix) are written in S column slices of
K/S inputs (column_slices: at most 6144, whole groups): gptq_qs I32 (S, N, K/S/8), gptq_scales
and gptq_zeros (S, N, G/S) (one group per row: (S, N, 1), the group repeated), slice j holding
inputs j K/S .. (j + 1) K/S - 1 of the permuted order. A slice's rows are then one sequential
stream of K/S inputs: read from memory the products run 15-20% faster than over whole rows,
whose strides the hardware prefetchers follow worse (docs/performance.md).

Every matrix with rows in multiples of 4 and slices of a multiple of 128 inputs (all of them in
Llama's shapes) is written in the quad layout (to_quads; metadata pecca.gptq.layout = "quads"):
a slice's rows 4 at a time, the 4 rows' 64 code bytes of each 128 inputs side by side, so that
the kernels' 4-row tiles read one stream instead of 4 (pecca._kernels.q4). Files without the
key have every matrix in rows.

Act-order: perm = argsort(g_idx, stable) puts each group's inputs together (exllama's
make_sequential). ffn_down's permutation is folded into the rows that make its input: ffn_gate
and ffn_up (quantized or not) are written with their rows in that order, so SwiGLU hands
ffn_down its inputs already permuted and no product gathers them (the gather of 11008 inputs
cost ~50 us of a ~800 us 7B-shaped ffn_down product from memory, at every token); gptq_fold
records the order (row r of ffn_gate / ffn_up is the checkpoint's row fold[r]) for re-export.
q/k rows go to Meta's order like every pecca GGUF. Metadata pecca.gptq.* records the
checkpoint's settings. Modules left in floating point, embeddings and norms are
written like any HF tensor (in --dtype, default f16 here). Memory: one module at a time.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from export.gguf import out_type, tensor_plan
from export.hf import HFSource
from pecca.errors import UnsupportedModelError
from pecca.formats.gguf import Q4G_LAYOUT, Q4G_PARTS
from pecca.formats.gptq import GPTQCheckpoint, GPTQTensors, linear_shapes, q_k_heads
from pecca.formats.hf import HF_NAMES, unpermute
from pecca.formats.tensors import RawTensor, release_pages
from pecca.weights import q4g_quads_fit

Q4G_BLOCK = 32
K_SLICE_FROM = 8192  # rows of at least this many inputs are written in column slices
K_SLICE_MAX = 6144  # of at most this many inputs
K_SLICE_MIN = 2048  # and at least this many (shorter ones lose again)


def unpack_codes(qweight: np.ndarray) -> np.ndarray:
    """uint8 (K, N) 4-bit codes of a qweight int32 (K/8, N): input 8r+k sits in bits 4k..4k+3."""
    words = qweight.view(np.uint32)
    k8, n = words.shape
    codes = np.empty((k8, 8, n), np.uint8)
    for k in range(8):  # one shift at a time: a temporary of one qweight, not eight
        codes[:, k, :] = (words >> np.uint32(4 * k)) & np.uint32(15)
    return codes.reshape(k8 * 8, n)


def unpack_zeros(qzeros: np.ndarray, zero_add: int) -> np.ndarray:
    """uint8 (G, N) true zero points. v1 stored zero - 1 by subtracting 0x11111111 from the whole
    word, so the fix is a whole-word add (borrows cross nibbles: a per-nibble +1 is wrong)."""
    words = qzeros.view(np.uint32) + np.uint32(zero_add)  # uint32 arithmetic wraps, as intended
    g, n8 = words.shape
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return ((words[:, :, None] >> shifts) & np.uint32(15)).astype(np.uint8).reshape(g, n8 * 8)


def dequantize(m: GPTQTensors) -> np.ndarray:
    """float32 (N, K), nn.Linear's layout: W[j, i] = scales[g_idx[i], j] * (code - zero), exact
    (an f16 scale times a small integer is exact in float32)."""
    codes = unpack_codes(m.qweight).astype(np.float32)
    zeros = unpack_zeros(m.qzeros, m.zero_add).astype(np.float32)
    w = m.scales.astype(np.float32)[m.g_idx] * (codes - zeros[m.g_idx])
    return np.ascontiguousarray(w.T)


@dataclass
class Q4G:
    """One Linear in pecca's q4g layout (module docstring)."""
    qs: np.ndarray  # uint8 (N, K/2), or (S, N, K/S/2) in column slices
    scales: np.ndarray  # float16 (N, G), or (S, N, G/S)
    zeros: np.ndarray  # int8 (N, G), or (S, N, G/S)
    perm: Optional[np.ndarray]  # int32 (K,), None when the groups are already contiguous

    def parts(self) -> dict:
        """The GGUF tensors by suffix (gptq_qs, ...), in their stored types (3-D for column
        slices)."""
        out = {"qs": self.qs.view(np.int32), "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            out["perm"] = self.perm
        return out


def group_order(m: GPTQTensors) -> Optional[np.ndarray]:
    """The input order that makes each group contiguous (None: already so). Raises when the
    groups are not all group-size long, which q4g cannot represent."""
    k, g = m.g_idx.shape[0], m.groups
    gs = k // g
    if np.array_equal(m.g_idx, np.arange(k, dtype=np.int32) // gs):
        return None
    counts = np.bincount(m.g_idx, minlength=g)
    if np.any(counts != gs):
        bad = int(np.argmax(counts != gs))
        raise UnsupportedModelError(f"{m.file}: {m.name}.g_idx puts {counts[bad]} inputs in group {bad}, not "
                                    f"{gs}; pecca's GGUF needs equal groups (load the directory directly)")
    return np.argsort(m.g_idx, kind="stable").astype(np.int32)


def check_exportable(m: GPTQTensors) -> Optional[np.ndarray]:
    """What export needs beyond the reader's checks; returns the group order (group_order)."""
    n, k = m.shape
    if k % Q4G_BLOCK:
        raise UnsupportedModelError(f"{m.file}: {m.name} has {k} inputs; pecca's GGUF packs blocks of 32 "
                                    "(load the directory directly)")
    if m.bias is not None:
        raise UnsupportedModelError(f"{m.file}: {m.name}.bias is not zero; pecca's GGUF has no GPTQ bias "
                                    "(load the directory directly)")
    return group_order(m)


def repack(m: GPTQTensors, heads: Optional[int] = None) -> Q4G:
    """m in the q4g layout; `heads`: q/k's head count, whose rows go to Meta's order."""
    perm = check_exportable(m)
    codes = unpack_codes(m.qweight)  # (K, N)
    if perm is not None:
        codes = codes[perm]
    k, n = codes.shape
    blocks = codes.reshape(k // Q4G_BLOCK, 2, Q4G_BLOCK // 2, n)
    packed = (blocks[:, 0] | (blocks[:, 1] << 4)).reshape(k // 2, n)
    del codes, blocks
    qs = np.ascontiguousarray(packed.T)
    scales = np.ascontiguousarray(m.scales.T)
    zeros = np.ascontiguousarray(unpack_zeros(m.qzeros, m.zero_add).T.astype(np.int8))
    if heads:
        qs, scales, zeros = (np.ascontiguousarray(unpermute(a, heads)) for a in (qs, scales, zeros))
    return Q4G(qs, scales, zeros, perm)


def column_slices(k: int, groups: int) -> int:
    """How many column slices a q4g matrix of k inputs in `groups` groups per row is written
    in (module docstring): the fewest of K_SLICE_MIN..K_SLICE_MAX inputs each, a whole number of
    blocks and of groups (a single group is repeated in every slice); 1 (none) for rows shorter
    than K_SLICE_FROM or where no such split exists."""
    if k < K_SLICE_FROM:
        return 1
    gs = k // groups
    for s in range(2, k // K_SLICE_MIN + 1):
        ks, rest = divmod(k, s)
        if not rest and ks <= K_SLICE_MAX and ks % Q4G_BLOCK == 0 and (groups == 1 or ks % gs == 0):
            return s
    return 1


def slice_groups(groups: int, s: int) -> int:
    """Groups per row of each of s column slices."""
    return 1 if groups == 1 else groups // s


def slice_columns(q: Q4G, s: int) -> Q4G:
    """q as s column slices (module docstring); q itself for s = 1."""
    if s == 1:
        return q
    n, half = q.qs.shape
    g = slice_groups(q.scales.shape[1], s)

    def split(a, width):  # (n, s * width) -> (s, n, width)
        return np.ascontiguousarray(a.reshape(n, s, width).transpose(1, 0, 2))

    if q.scales.shape[1] == 1:  # one group per row: every slice gets it
        scales, zeros = (np.ascontiguousarray(np.broadcast_to(a, (s, n, 1))) for a in (q.scales, q.zeros))
    else:
        scales, zeros = split(q.scales, g), split(q.zeros, g)
    return Q4G(split(q.qs, half // s), scales, zeros, q.perm)


def to_quads(qs: np.ndarray) -> np.ndarray:
    """q4g codes (N, K/2), or (S, N, K/S/2), from the row layout to the quad layout (module
    docstring; q4g_quads_fit)."""
    n, half = qs.shape[-2:]
    q = qs.reshape(qs.shape[:-2] + (n // 4, 4, half // 64, 64))
    return np.ascontiguousarray(np.swapaxes(q, -3, -2)).reshape(qs.shape)


def from_quads(qs: np.ndarray) -> np.ndarray:
    """to_quads undone."""
    n, half = qs.shape[-2:]
    q = qs.reshape(qs.shape[:-2] + (n // 4, half // 64, 4, 64))
    return np.ascontiguousarray(np.swapaxes(q, -3, -2)).reshape(qs.shape)


def dequantize_q4g(qs: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                   perm: Optional[np.ndarray], quads: bool = False) -> np.ndarray:
    """float32 (N, K) of a q4g Linear (2-D, or 3-D column slices; quads: qs in the quad
    layout), inputs in their original order (for tests and re-export)."""
    if quads:
        qs = from_quads(qs)
    if qs.ndim == 3:
        w_perm = np.concatenate([dequantize_q4g(*part, None) for part in zip(qs, scales, zeros)], axis=1)
        return _unpermute_inputs(w_perm, perm)
    n, half = qs.shape
    k = half * 2
    b = qs.reshape(n, k // Q4G_BLOCK, 1, Q4G_BLOCK // 2)
    codes = np.concatenate([b & 15, b >> 4], axis=2).reshape(n, k).astype(np.float32)
    gs = k // scales.shape[1]
    w_perm = (scales.astype(np.float32).repeat(gs, axis=1)
              * (codes - zeros.astype(np.float32).repeat(gs, axis=1)))
    return _unpermute_inputs(w_perm, perm)


def _unpermute_inputs(w_perm: np.ndarray, perm: Optional[np.ndarray]) -> np.ndarray:
    if perm is None:
        return w_perm
    w = np.empty_like(w_perm)
    w[:, perm] = w_perm
    return w


class GPTQSource(HFSource):
    """A GPTQ directory as an export source (see the module docstring)."""

    default_dtype = "f16"  # for what is not GPTQ: embeddings, unquantized modules (norms stay f32)

    def __init__(self, d: str, tokenizer_path: str = None):
        self.ck = ck = GPTQCheckpoint(d)
        self.dir, self.config, self.tensors = d, ck.config, ck.tensors
        self.tied, self.name = ck.tied, ck.name
        self.read_vocab(tokenizer_path)
        self.modules = self._quantized_modules()
        # layer -> ffn_down's act-order permutation, folded into ffn_gate / ffn_up's rows
        self.folds = {int(base.split(".")[1]): perm for base, (m, perm) in self.modules.items()
                      if base.endswith(".ffn_down") and perm is not None}
        self._cache = (None, None)

    def _quantized_modules(self) -> dict:
        """{GGUF base name: (GPTQTensors, group order)} of every quantized Linear, all checked
        before anything is written."""
        c, out = self.config, {}
        for i in range(c.n_layers):
            for what, shape in linear_shapes(c).items():
                prefix = f"model.layers.{i}.{HF_NAMES[what]}"
                if self.ck.is_quantized(prefix):
                    m = self.ck.module(prefix, shape)
                    out[f"blk.{i}.{what}"] = (m, check_exportable(m))
        if not self.tied and self.ck.is_quantized("lm_head"):
            m = self.ck.module("lm_head", (c.vocab_size, c.dim))
            out["output"] = (m, check_exportable(m))
        return out

    def gguf_plan(self, dtype: str):
        plan = []
        for name, shape in tensor_plan(self.config, self.tied):
            base = name[:-len(".weight")]
            if base not in self.modules:
                plan.append((name, shape, out_type(name, shape, dtype)))
                continue
            m, perm = self.modules[base]
            n, k = shape
            s = column_slices(k, m.groups)
            # the reader's description of each part (type, shape), so the two cannot drift apart
            plan += [(f"{base}.gptq_{part}", shape_of(n, k, slice_groups(m.groups, s), s), kind)
                     for part, (kind, shape_of) in Q4G_PARTS.items() if part != "perm"]
            if base.endswith(".ffn_down") and perm is not None:
                plan.append((base + ".gptq_fold", (k,), "I32"))
            elif perm is not None:
                plan.append((base + ".gptq_perm", (k,), "I32"))
        return plan

    def add_metadata(self, w) -> None:
        q = self.ck.quant
        w.add_uint32("pecca.gptq.bits", q.bits)
        w.add_int32("pecca.gptq.group_size", q.group_size)
        w.add_bool("pecca.gptq.desc_act", q.desc_act)
        w.add_bool("pecca.gptq.sym", q.sym)
        w.add_string("pecca.gptq.source_format", q.format)
        w.add_string(Q4G_LAYOUT, "quads")

    def tensor(self, name: str):
        fold = self._fold_rows(name)
        if name.endswith(".gptq_fold"):
            return self.folds[int(name.split(".")[1])]
        if ".gptq_" in name:
            base, part = name.split(".gptq_")
            return self._q4g(base).parts()[part]
        t = super().tensor(name)
        return t if fold is None else RawTensor(np.ascontiguousarray(t.data[fold]), t.dtype)

    def _fold_rows(self, name: str) -> Optional[np.ndarray]:
        """The row order of ffn_gate / ffn_up in a layer whose ffn_down permutation is folded."""
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up"):
            return self.folds.get(int(parts[1]))
        return None

    def _q4g(self, base: str) -> Q4G:
        """The module's repacked tensors; only the latest module is kept (bounded memory)."""
        if self._cache[0] != base:
            self._cache = (None, None)  # let the previous module go first
            m, _ = self.modules[base]
            what = base.split(".")[-1]
            q = repack(m, q_k_heads(self.config, what))
            fold = self._fold_rows(base)
            if fold is not None:  # ffn_gate / ffn_up: rows in ffn_down's input order
                q = Q4G(np.ascontiguousarray(q.qs[fold]), np.ascontiguousarray(q.scales[fold]),
                        np.ascontiguousarray(q.zeros[fold]), q.perm)
            elif what == "ffn_down" and q.perm is not None:  # its inputs come permuted
                q = Q4G(q.qs, q.scales, q.zeros, None)
            s = column_slices(m.shape[1], m.groups)
            q = slice_columns(q, s)
            if q4g_quads_fit(m.shape[0], m.shape[1], s):
                q = Q4G(to_quads(q.qs), q.scales, q.zeros, q.perm)
            self._cache = (base, q)
            for a in (m.qweight, m.qzeros, m.scales):  # converted: out of this process's RSS
                release_pages(a)
        return self._cache[1]
