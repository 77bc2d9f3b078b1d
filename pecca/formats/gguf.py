"""Reader for GGUF model files (llama.cpp's format, and pecca's own). The container is parsed
by pecca.formats.gguf_file (its docstring says why not gguf.GGUFReader), which memory-maps the
file: tensors are numpy views, never copies.

Architecture `llama` only. Metadata keys and tensor names are llama.cpp's:
    llama.context_length, llama.embedding_length, llama.block_count, llama.feed_forward_length,
    llama.attention.head_count, llama.attention.head_count_kv, llama.rope.freq_base,
    llama.attention.layer_norm_rms_epsilon, llama.rope.scaling.{type,factor},
    tokenizer.ggml.{model,tokens,scores,token_type,bos_token_id,eos_token_id,...}
    token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,
    ffn_up,ffn_down}, output_norm, output (absent when tied to token_embd), rope_freqs.
Weights may be F32, F16, BF16, Q8_0, Q4_0 or Q4_1; q and k rows are in llama.cpp's (Meta's) order, RoPE on
adjacent pairs. Every tensor's type, shape and byte range is checked before use.
"""
import os

import numpy as np

from pecca.config import ModelConfig
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats import LoadedModel
from pecca.formats.gguf_file import GGUFFile, Undecodable, open_gguf
from pecca.formats.llama2c import LIMITS
from pecca.quant import BLOCK_BYTES, BLOCK_VALUES, BlockRows
from pecca.weights import F32Linear, LayerWeights, Weights, q4g_quads_fit

GGUF_MAGIC = b"GGUF"
INT32_MAX = (1 << 31) - 1
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down")


def open_reader(path: str) -> GGUFFile:
    """The parsed file (gguf_file.GGUFFile), or a ModelFormatError saying what is wrong."""
    return open_gguf(path)


_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def brief(v, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


class Metadata:
    """Typed access to a GGUF file's key-value fields, with errors naming the key: a value of
    the wrong type (a string where a number belongs, a list of ints for the tokens) is a
    ModelFormatError here, never a TypeError further on."""

    def __init__(self, path, reader: GGUFFile):
        self.path, self.fields = path, reader.fields

    def get(self, key, default=None):
        v = self.fields.get(key, default)
        if isinstance(v, Undecodable):  # reported only when asked for, as GGUFReader did
            raise ModelFormatError(f"{self.path}: metadata {key} cannot be read ({v.reason})")
        return v

    def require(self, key):
        v = self.get(key)
        if v is None:
            raise ModelFormatError(f"{self.path}: metadata key {key} is missing")
        return v

    def _typed(self, key, default, ok, expected):
        v = self.require(key) if default is _REQUIRED else self.get(key, default)
        if v is not None and not ok(v):
            raise ModelFormatError(f"{self.path}: metadata {key} = {brief(v)}, expected {expected}")
        return v

    def positive_int(self, key, limit, default=None):
        return self.integer(key, _REQUIRED if default is None else default, 1, limit)

    def integer(self, key, default=_REQUIRED, lo=0, hi=(1 << 63) - 1):
        v = self._typed(key, default, lambda v: _is_int(v) and lo <= v <= hi, f"an integer in {lo}..{hi}")
        return None if v is None else int(v)

    def number(self, key, default=_REQUIRED):
        v = self._typed(key, default, lambda v: _is_number(v) and np.isfinite(v), "a finite number")
        return None if v is None else float(v)

    def string(self, key, default=_REQUIRED):
        return self._typed(key, default, lambda v: isinstance(v, str), "a string")

    def flag(self, key, default=_REQUIRED):
        v = self._typed(key, default, lambda v: isinstance(v, bool) or (_is_int(v) and v in (0, 1)),
                        "a boolean")
        return None if v is None else bool(v)

    def array(self, key, item_ok, expected, default=_REQUIRED):
        return self._typed(key, default, lambda v: isinstance(v, list) and all(map(item_ok, v)), expected)

    def strings(self, key, default=_REQUIRED):
        return self.array(key, lambda x: isinstance(x, str), "an array of strings", default)

    def numbers(self, key, default=_REQUIRED):
        return self.array(key, lambda x: _is_number(x) and np.isfinite(x), "an array of finite numbers", default)

    def integers(self, key, default=_REQUIRED):
        return self.array(key, _is_int, "an array of integers", default)


def read(path: str) -> LoadedModel:
    reader = open_reader(path)
    meta = Metadata(path, reader)
    arch = meta.string("general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path}: general.architecture is {arch!r}; pecca runs 'llama'")
    tensors = {t.name: t for t in reader.tensors}  # names unique, byte ranges checked by gguf_file
    size = os.path.getsize(path)
    config = read_config(path, meta, tensors)
    weights = read_weights(path, config, tensors, q4g_quads(path, meta))
    from pecca.tokenizers.gguf_vocab import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(path, meta)
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise ModelFormatError(f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but "
                               f"token_embd has {config.vocab_size} rows")
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    extra = {"tensor_types": types, "architecture": arch, "gptq": gptq_settings(meta),
             "vocab_kind": meta.string("tokenizer.ggml.model", None), "name": meta.string("general.name", None),
             "tokenizer": tokenizer}
    return LoadedModel(config, weights, path, "gguf", size, extra=extra)


def read_config(path, meta: Metadata, tensors) -> ModelConfig:
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError(f"{path}: tensor token_embd.weight is missing")
    dim = meta.positive_int("llama.embedding_length", LIMITS["dim"])
    n_heads = meta.positive_int("llama.attention.head_count", LIMITS["n_heads"])
    n_kv = meta.positive_int("llama.attention.head_count_kv", LIMITS["n_kv_heads"], default=n_heads)
    vocab = int(emb.shape[1]) if len(emb.shape) == 2 else 0
    if not 0 < vocab <= LIMITS["vocab_size"]:
        raise ModelFormatError(f"{path}: token_embd.weight has shape {list(emb.shape)}")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ModelFormatError(f"{path}: embedding_length {dim}, head_count {n_heads}, head_count_kv "
                               f"{n_kv}: heads must divide the width, kv heads the heads, head size even")
    head_size = dim // n_heads
    rot = meta.integer("llama.rope.dimension_count", head_size)
    if rot != head_size:
        raise UnsupportedModelError(f"{path}: llama.rope.dimension_count {rot} differs from the head size "
                                    f"{head_size} (partial rotary embedding)")
    theta = meta.number("llama.rope.freq_base", 10000.0)
    eps = meta.number("llama.attention.layer_norm_rms_epsilon", 1e-5)
    if not (theta > 0 and 0 < eps < 1):
        raise ModelFormatError(f"{path}: rope.freq_base {theta} / rms epsilon {eps} out of range")
    factors = rope_factors(path, meta, tensors, head_size)
    return ModelConfig(
        dim=dim,
        hidden_dim=meta.positive_int("llama.feed_forward_length", LIMITS["hidden_dim"]),
        n_layers=meta.positive_int("llama.block_count", LIMITS["n_layers"]),
        n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        seq_len=meta.positive_int("llama.context_length", LIMITS["seq_len"]),
        norm_eps=eps, rope_theta=theta,
        bos_id=meta.integer("tokenizer.ggml.bos_token_id", 1, 0, INT32_MAX),
        eos_id=meta.integer("tokenizer.ggml.eos_token_id", 2, 0, INT32_MAX),
        rope_freq_factors=factors)


def rope_factors(path, meta: Metadata, tensors, head_size):
    """Per-pair frequency divisors: llama.cpp stores Llama 3's as the rope_freqs tensor;
    linear scaling is a key."""
    kind = meta.string("llama.rope.scaling.type", "none")
    t = tensors.get("rope_freqs.weight")
    if t is not None:
        if t.tensor_type.name != "F32" or int(t.n_elements) != head_size // 2:
            raise ModelFormatError(f"{path}: rope_freqs.weight must be F32 with {head_size // 2} values")
        factors = np.asarray(t.data, np.float32).reshape(-1)
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ModelFormatError(f"{path}: rope_freqs.weight holds values that are not finite and positive")
        return tuple(float(v) for v in factors)
    if kind in ("none", "", None):
        return None
    if kind == "linear":
        factor = meta.number("llama.rope.scaling.factor")
        if not factor > 0:
            raise ModelFormatError(f"{path}: llama.rope.scaling.factor {factor} must be > 0")
        return (factor,) * (head_size // 2)
    raise UnsupportedModelError(f"{path}: llama.rope.scaling.type {kind!r} is not supported")


def _check_shape(path, t, shape):
    """A matrix tensor's shape (GGUF lists dimensions innermost first) against the config's."""
    got = tuple(int(d) for d in reversed(t.shape))
    if got != shape:
        raise ModelFormatError(f"{path}: tensor {t.name} has shape {list(got)}, expected {list(shape)}")


def _linear(path, t, shape):
    """The Linear for tensor `t`, after checking its type and shape."""
    from pecca import weights as W

    _check_shape(path, t, shape)
    kind = t.tensor_type.name
    if kind == "F32":
        return F32Linear(t.data)
    if kind == "F16":
        return W.F16Linear(t.data)
    if kind == "BF16":
        return W.BF16Linear(t.data.view(np.uint16).reshape(shape))
    if kind in BLOCK_LINEARS:
        return getattr(W, BLOCK_LINEARS[kind])(_blocks(path, t, shape))
    raise UnsupportedModelError(f"{path}: tensor {t.name} has type {kind}; pecca runs {SUPPORTED} "
                                "GGUF weights")


# GGUF block types and the Linear class (pecca.weights) that runs each
BLOCK_LINEARS = {"Q8_0": "Q8_0Linear", "Q4_0": "Q4_0Linear", "Q4_1": "Q4_1Linear"}
SUPPORTED = "F32, F16, BF16, Q8_0, Q4_0 and Q4_1"


def _blocks(path, t, shape):
    """The (rows, n / 32 * block bytes) bytes of a block-quantized matrix, after checking they
    fit its shape."""
    rows, n = shape
    kind = t.tensor_type.name
    if (n % BLOCK_VALUES or t.data.shape != (rows, n // BLOCK_VALUES * BLOCK_BYTES[kind])
            or t.n_bytes != t.data.nbytes):
        raise ModelFormatError(f"{path}: {kind} tensor {t.name}: {t.data.nbytes} bytes do not hold "
                               f"a {rows}x{n} matrix of 32-value blocks")
    return t.data


def _vector(path, t, n):
    """A norm weight as float32 (tiny: converted when stored in f16/bf16)."""
    if tuple(int(d) for d in t.shape) != (n,):
        raise ModelFormatError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected [{n}]")
    kind = t.tensor_type.name
    if kind == "F32":
        return t.data
    if kind == "F16":
        return t.data.astype(np.float32)
    if kind == "BF16":
        return (t.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise UnsupportedModelError(f"{path}: tensor {t.name} has type {kind}")


def _embedding(path, t, shape):
    _check_shape(path, t, shape)
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return t.data
    if kind == "BF16":
        return t.data.view(np.uint16).reshape(shape)
    if kind in BLOCK_BYTES:
        return BlockRows(_blocks(path, t, shape), kind)
    raise UnsupportedModelError(f"{path}: tensor {t.name} has type {kind}; pecca runs {SUPPORTED} "
                                "GGUF weights")


def read_weights(path, c: ModelConfig, tensors, quads: bool = False) -> Weights:
    """quads: the file stores its q4g matrices that fit the quad layout in it (q4g_quads)."""
    def need(name):
        t = tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{path}: tensor {name} is missing")
        return t

    def lin(base, shape):  # pecca's GPTQ tensors, else a .weight of any type
        if base + ".gptq_qs" in tensors:
            return _q4g_linear(path, tensors, base, shape, quads)
        return _linear(path, need(base + ".weight"), shape)

    d, h, kv, V = c.dim, c.hidden_dim, c.kv_dim, c.vocab_size
    emb = _embedding(path, need("token_embd.weight"), (V, d))
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=_vector(path, need(p + "attn_norm.weight"), d),
            wq=lin(p + "attn_q", (d, d)),
            wk=lin(p + "attn_k", (kv, d)),
            wv=lin(p + "attn_v", (kv, d)),
            wo=lin(p + "attn_output", (d, d)),
            ffn_norm=_vector(path, need(p + "ffn_norm.weight"), d),
            w1=lin(p + "ffn_gate", (h, d)),
            w2=lin(p + "ffn_down", (d, h)),
            w3=lin(p + "ffn_up", (h, d))))
    shared = "output.weight" not in tensors and "output.gptq_qs" not in tensors
    output = _linear(path, need("token_embd.weight"), (V, d)) if shared else lin("output", (V, d))
    return Weights(emb, layers, _vector(path, need("output_norm.weight"), d), output, shared)


# pecca's GPTQ tensors (export.gptq): suffix -> (GGUF type, numpy shape from (N, K, G, S)); a
# matrix in S > 1 column slices has 3-D qs, scales and zeros
Q4G_PARTS = {"qs": ("I32", lambda n, k, g, s: (s, n, k // s // 8) if s > 1 else (n, k // 8)),
             "scales": ("F16", lambda n, k, g, s: (s, n, g) if s > 1 else (n, g)),
             "zeros": ("I8", lambda n, k, g, s: (s, n, g) if s > 1 else (n, g)),
             "perm": ("I32", lambda n, k, g, s: (k,))}


# how a file lays out its q4g codes (pecca._kernels.q4): "quads" (export.gptq writes every matrix
# that q4g_quads_fit in it) or "rows" (the key absent: files written before the quad layout)
Q4G_LAYOUT = "pecca.gptq.layout"


def q4g_quads(path, meta: Metadata) -> bool:
    """Whether the file's q4g matrices that fit the quad layout are stored in it."""
    layout = meta.string(Q4G_LAYOUT, "rows")
    if layout not in ("rows", "quads"):
        raise ModelFormatError(f"{path}: {Q4G_LAYOUT} is {layout!r}, expected 'rows' or 'quads'")
    return layout == "quads"


def _q4g_linear(path, tensors, base, shape, quads=False):
    """Q4GLinear over a module's gptq_qs / gptq_scales / gptq_zeros (/ gptq_perm), checked;
    quads: the file's q4g_quads."""
    from pecca.weights import Q4GLinear

    n, k = shape
    qs, sc = tensors.get(base + ".gptq_qs"), tensors.get(base + ".gptq_scales")
    s = int(qs.data.shape[0]) if qs is not None and qs.data.ndim == 3 else 1
    g = int(sc.data.shape[-1]) if sc is not None and sc.data.ndim in (2, 3) else 0
    if s < 1 or k % (32 * s) or not 0 < g <= k // s or (k // s) % g:
        raise ModelFormatError(f"{path}: {base}.gptq_scales: {g} groups do not divide the {k // max(s, 1)} "
                               f"inputs of a row{f' slice' if s > 1 else ''} (in blocks of 32)")
    parts = {}
    for part, (kind, shape_of) in Q4G_PARTS.items():
        t = tensors.get(f"{base}.gptq_{part}")
        if t is None:
            if part == "perm":
                continue
            raise ModelFormatError(f"{path}: tensor {base}.gptq_{part} is missing")
        want = shape_of(n, k, g, s)
        if t.tensor_type.name != kind or tuple(t.data.shape) != want or t.n_bytes != t.data.nbytes:
            raise ModelFormatError(f"{path}: tensor {t.name} is {t.tensor_type.name} {list(t.data.shape)}, "
                                   f"expected {kind} {list(want)}")
        parts[part] = t.data
    try:
        return Q4GLinear(parts["qs"].view(np.uint8), parts["scales"], parts["zeros"], parts.get("perm"),
                         quads=quads and q4g_quads_fit(n, k, s))
    except ValueError as e:
        raise ModelFormatError(f"{path}: {base}: {e}") from None


def gptq_settings(meta: Metadata):
    """The pecca.gptq.* metadata of a GGUF exported from a GPTQ checkpoint, or None."""
    if meta.get("pecca.gptq.bits") is None:
        return None
    return {"bits": meta.integer("pecca.gptq.bits"), "group_size": meta.integer("pecca.gptq.group_size", 0, -1),
            "desc_act": meta.flag("pecca.gptq.desc_act", False), "sym": meta.flag("pecca.gptq.sym", True),
            "format": meta.string("pecca.gptq.source_format", None)}
