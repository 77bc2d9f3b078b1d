"""The transformer forward pass, over buffers and a KV cache allocated once.

Reads top to bottom like llama2.c's forward(): each layer is
rmsnorm -> q/k/v -> RoPE -> attention over the cache -> o -> residual ->
rmsnorm -> gate/up -> SwiGLU -> down -> residual. The linear layers are objects that know
their own kernel, so nothing here depends on the weight precision.
"""
import os

import numpy as np

from pecca._kernels import ops
from pecca.config import ModelConfig
from pecca.errors import ContextLengthError, InsufficientMemoryError, InvalidArgumentError
from pecca.threads import governor
from pecca.weights import Weights, matvec_same_input


# KV-cache element types: float32, or IEEE half (llama.cpp's default cache type: half the memory
# and half the bytes each token's attention reads, the rounding of each key and value the only
# difference) held as uint16 bit patterns, the form the kernels take (see pecca._kernels.ops)
KV_TYPES = {"f32": np.float32, "f16": np.uint16}


def kv_dtype(kv_type: str) -> np.dtype:
    if kv_type not in KV_TYPES:
        raise InvalidArgumentError(f"KV-cache type {kv_type!r} is not one of {', '.join(KV_TYPES)}")
    return np.dtype(KV_TYPES[kv_type])


def aligned_zeros(shape, dtype=np.float32) -> np.ndarray:
    """np.zeros starting on a 64-byte cache-line boundary. numpy aligns to 16 bytes, so each
    64-byte vector load of a kernel (a KV-cache row, the input vector of every matvec) touched
    two lines. A large buffer still gets lazily mapped zero pages, as with np.zeros."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


class RunState:
    """Every activation buffer and the KV cache, allocated once per model."""

    def __init__(self, c: ModelConfig, seq_len: int, kv_type: str = "f32"):
        f = np.float32
        self.x = aligned_zeros(c.dim, f)  # residual stream
        self.xb = aligned_zeros(c.dim, f)  # inside a residual branch
        self.xb2 = aligned_zeros(c.dim, f)
        self.hb = aligned_zeros(c.hidden_dim, f)  # ffn gate
        self.hb2 = aligned_zeros(c.hidden_dim, f)  # ffn up
        self.q = aligned_zeros(c.dim, f)
        self.att = aligned_zeros((c.n_heads, seq_len), f)  # attention scores
        self.logits = aligned_zeros(c.vocab_size, f)
        kv = kv_dtype(kv_type)
        self.key_cache = aligned_zeros((c.n_layers, seq_len, c.kv_dim), kv)
        self.value_cache = aligned_zeros((c.n_layers, seq_len, c.kv_dim), kv)
        self.k = aligned_zeros(c.kv_dim, f)  # this token's key and value, before an f16 cache
        self.v = aligned_zeros(c.kv_dim, f)  # stores them
        self.rope_cos = aligned_zeros(c.head_size // 2, f)
        self.rope_sin = aligned_zeros(c.head_size // 2, f)
        self.rope_freqs = rope_frequencies(c)

    def kv_targets(self, l: int, p0: int, k, v):
        """Where the keys and values of layer l at position p0 (k, v: (kv_dim,) buffers) or
        positions p0..p0+n-1 (k, v: (n, kv_dim)) are computed: straight into a float32 cache's
        rows, or into k and v for `store_kv` to round into an f16 cache."""
        if self.key_cache.dtype != np.float32:
            return k, v
        if k.ndim == 1:
            return self.key_cache[l, p0], self.value_cache[l, p0]
        return self.key_cache[l, p0:p0 + len(k)], self.value_cache[l, p0:p0 + len(k)]

    def store_kv(self, l: int, p0: int, k, v) -> None:
        """Keys (rotated) and values from `kv_targets` into the cache (nothing to do for float32:
        they were computed there)."""
        if self.key_cache.dtype == np.float32:
            return
        if k.ndim == 1:  # one token: no reshapes (a decode step calls this once a layer)
            ops.to_f16(self.key_cache[l, p0], k)
            ops.to_f16(self.value_cache[l, p0], v)
            return
        n = len(k)
        ops.to_f16(self.key_cache[l, p0:p0 + n].reshape(-1), k.reshape(-1))
        ops.to_f16(self.value_cache[l, p0:p0 + n].reshape(-1), v.reshape(-1))


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """float32 frequency of each pair of a head, with the model's rope scaling applied."""
    freqs = aligned_zeros(c.head_size // 2)
    ops.rope_freqs(c.head_size, c.rope_theta, freqs)
    if c.rope_freq_factors is not None:
        freqs /= np.asarray(c.rope_freq_factors, np.float32)
    return freqs


class BatchState:
    """Buffers for up to `batch` tokens processed together (prefill), one row per token."""

    def __init__(self, c: ModelConfig, batch: int, seq_len: int, threads: int):
        f = np.float32
        self.batch, self.threads = batch, threads
        self.x = aligned_zeros((batch, c.dim), f)
        self.xb = aligned_zeros((batch, c.dim), f)
        self.xb2 = aligned_zeros((batch, c.dim), f)
        self.q = aligned_zeros((batch, c.dim), f)
        self.hb = aligned_zeros((batch, c.hidden_dim), f)
        self.hb2 = aligned_zeros((batch, c.hidden_dim), f)
        self.att = aligned_zeros((threads, c.n_heads, seq_len), f)  # one slab per thread
        self.k = aligned_zeros((batch, c.kv_dim), f)  # keys and values before an f16 cache
        self.v = aligned_zeros((batch, c.kv_dim), f)  # stores them


def embed(table: np.ndarray, tokens, out: np.ndarray) -> None:
    """Rows `tokens` of the token embedding into float32 `out`. The table is float32,
    float16, uint16 holding bfloat16 bits (numpy has no bfloat16), or a quantized table
    with a `rows_into(tokens, out)` method (pecca.quant)."""
    if not isinstance(table, np.ndarray):
        table.rows_into(tokens, out)
        return
    rows = table[tokens]
    if table.dtype == np.uint16:
        out[...] = (rows.astype(np.uint32) << 16).view(np.float32)
    else:
        out[...] = rows


def kv_rows(c: ModelConfig, layer, x, xb, k, v, nt: int) -> None:
    """A block's start over the rows of x: their attention norm in xb, their keys and values
    (before RoPE) in k and v."""
    ops.rmsnorm_rows(xb, x, layer.attn_norm, c.norm_eps)
    layer.wk.batch(xb, k, nt)
    layer.wv.batch(xb, v, nt)


def block_rows(c: ModelConfig, layer, l: int, x, xb, xb2, q, k, v, hb, hb2, nt: int, attend) -> None:
    """One transformer block over the rows of x (T, dim), in place, every linear one
    matrix-matrix product. The rows' q, k, v land in q, k, v; `attend(l, k, v)` then applies
    RoPE, stores k and v in the KV cache and leaves the attention output in xb: the one step
    that differs between a prompt's consecutive positions (Model) and a serving batch's rows,
    each in its own cache slot (pecca.serve.batch)."""
    kv_rows(c, layer, x, xb, k, v, nt)
    layer.wq.batch(xb, q, nt)
    attend(l, k, v)
    layer.wo.batch(xb, xb2, nt)
    ops.add(x.reshape(-1), xb2.reshape(-1))
    ops.rmsnorm_rows(xb, x, layer.ffn_norm, c.norm_eps)
    layer.w1.batch(xb, hb, nt)
    layer.w3.batch(xb, hb2, nt)
    ops.swiglu(hb.reshape(-1), hb2.reshape(-1), nt)
    layer.w2.batch(hb, xb, nt)
    ops.add(x.reshape(-1), xb.reshape(-1))


def kv_cache_bytes(c: ModelConfig, seq_len: int, kv_type: str = "f32") -> int:
    return 2 * kv_dtype(kv_type).itemsize * c.n_layers * seq_len * c.kv_dim


def runtime_bytes(c: ModelConfig, seq_len: int, threads: int = 1, kv_type: str = "f32") -> int:
    """What a Model allocates besides the weights: the KV cache, and the attention scores of
    one token and of each thread's prefill slab (both grow with the context)."""
    scores = 4 * c.n_heads * seq_len * (1 + threads)
    batch = 4 * Model.PREFILL_BATCH * (4 * c.dim + 2 * c.hidden_dim + 2 * c.kv_dim)
    one = 4 * (6 * c.dim + 2 * c.hidden_dim + 2 * c.kv_dim + c.vocab_size)
    return kv_cache_bytes(c, seq_len, kv_type) + scores + batch + one


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this OS
        return 1 << 62


class Model:
    """A transformer ready to run: config, weights and its RunState.

    `seq_len` may be lowered below the model's context length to save KV-cache memory;
    `kv_type` "f16" halves it (and the bytes each token's attention reads), as llama.cpp's
    default cache does, at the cost of rounding each key and value to half.
    A prompt goes through `prefill` in batches of up to `PREFILL_BATCH` tokens: each weight
    matrix is then read once per batch instead of once per token.
    """

    # 128 rather than 64: the float GEMMs widen each block of f16 weight rows once per batch
    # (and the int8 ones prepare each panel once), so a longer batch shares that work among more
    # tokens: 7B-layer prefill of 128 tokens at 1 thread, F16 +13% (AVX2 +8%), Q8_0 / 4-bit +4-6%
    PREFILL_BATCH = 128

    def __init__(self, config: ModelConfig, weights: Weights, threads: int = 1, seq_len=None,
                 kv_type: str = "f32"):
        self.config = config
        self.kv_type = kv_type
        kv_dtype(kv_type)  # refuse an unknown type before anything is allocated
        self.weights = weights
        self.threads = max(1, int(threads))
        self.seq_len = config.seq_len if seq_len is None else int(seq_len)
        if not 0 < self.seq_len <= config.seq_len:
            raise InvalidArgumentError(
                f"context length {self.seq_len} must be in 1..{config.seq_len} (the model's seq_len)")
        self._check_memory()
        try:
            self.state = RunState(config, self.seq_len, kv_type)
        except MemoryError:  # more than the process may have (ulimit, overcommit off)
            raise self._memory_error("could not be allocated") from None
        self.batch_state = None  # allocated by the first prefill

    def _check_memory(self) -> None:
        """Refuse, before allocating, a context whose buffers exceed this machine's memory
        (the weights are memory-mapped; the KV cache is what a huge context costs)."""
        if runtime_bytes(self.config, self.seq_len, self.threads, self.kv_type) > _total_memory():
            raise self._memory_error(f"is more than this machine's {_gib(_total_memory())}")

    def _memory_error(self, what: str) -> InsufficientMemoryError:
        c, n = self.config, self.seq_len
        need = runtime_bytes(c, n, self.threads, self.kv_type)
        size = kv_dtype(self.kv_type).itemsize
        return InsufficientMemoryError(
            f"a context of {n} positions needs {_gib(need)} of buffers (the KV cache: {c.n_layers} layers x "
            f"{n} positions x {c.kv_dim} x 2 x {size} bytes = {_gib(kv_cache_bytes(c, n, self.kv_type))}), "
            f"which {what}; pass a smaller context length (ctx=... or --ctx)"
            + (" or an f16 KV cache (kv_type=\"f16\" or --kv-type f16)" if size > 2 else ""))

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Run one token at position `pos`; returns the logits buffer (overwritten by the
        next call: copy it to keep it)."""
        c, w, s = self.config, self.weights, self.state
        nt = governor.threads(self.threads)  # fewer while other processes hold cores
        if not 0 <= token < c.vocab_size:
            raise InvalidArgumentError(f"token id {token} is outside the vocabulary 0..{c.vocab_size - 1}")
        if not 0 <= pos < self.seq_len:
            raise ContextLengthError(f"position {pos} is outside the context 0..{self.seq_len - 1}")
        x = s.x
        embed(w.token_embedding, token, x)
        ops.rope_table(pos, s.rope_freqs, s.rope_cos, s.rope_sin)
        for l, layer in enumerate(w.layers):
            k, v = s.kv_targets(l, pos, s.k, s.v)
            ops.rmsnorm(s.xb, x, layer.attn_norm, c.norm_eps)
            matvec_same_input((layer.wq, layer.wk, layer.wv), s.xb, (s.q, k, v), nt)
            ops.rope(s.q, c.head_size, s.rope_cos, s.rope_sin)
            ops.rope(k, c.head_size, s.rope_cos, s.rope_sin)
            s.store_kv(l, pos, k, v)
            ops.attention(s.xb, s.q, s.key_cache[l], s.value_cache[l], s.att, pos,
                          c.n_heads, c.n_kv_heads, nt)
            layer.wo(s.xb, s.xb2, nt)
            ops.add(x, s.xb2)
            ops.rmsnorm(s.xb, x, layer.ffn_norm, c.norm_eps)
            matvec_same_input((layer.w1, layer.w3), s.xb, (s.hb, s.hb2), nt)
            ops.swiglu(s.hb, s.hb2, nt)
            layer.w2(s.hb, s.xb, nt)
            ops.add(x, s.xb)
        ops.rmsnorm(x, x, w.norm, c.norm_eps)
        w.output(x, s.logits, nt)
        return s.logits

    def _batch_state(self) -> BatchState:
        bs = self.batch_state
        if bs is None or bs.threads < self.threads:
            self._check_memory()  # the threads may have grown since
            try:
                bs = self.batch_state = BatchState(self.config, self.PREFILL_BATCH, self.seq_len,
                                                   self.threads)
            except MemoryError:
                raise self._memory_error("could not be allocated") from None
        return bs

    def prefill(self, tokens, pos0: int = 0) -> np.ndarray:
        """Feed `tokens` at positions pos0, pos0 + 1, ...; returns the logits after the last
        one (the same buffer `forward` returns)."""
        tokens = self._checked(tokens, pos0)
        if len(tokens) == 1:
            return self.forward(tokens[0], pos0)
        self._run_batches(tokens, pos0)
        return self.state.logits

    def logits_all(self, tokens, pos0: int = 0) -> np.ndarray:
        """Logits (T, vocab_size) at every position of `tokens`, fed at pos0, pos0 + 1, ...
        (perplexity needs them all; generation only the last)."""
        tokens = self._checked(tokens, pos0)
        out = np.empty((len(tokens), self.config.vocab_size), np.float32)
        self._run_batches(tokens, pos0, out)
        return out

    def _run_batches(self, tokens, pos0, all_logits=None) -> None:
        B = self.PREFILL_BATCH
        for start in range(0, len(tokens), B):
            chunk = tokens[start:start + B]
            self._forward_batch(chunk, pos0 + start,
                                None if all_logits is None else all_logits[start:start + len(chunk)],
                                logits=start + B >= len(tokens))

    def _checked(self, tokens, pos0):
        tokens = list(tokens)
        if not tokens:
            raise InvalidArgumentError("prefill needs at least one token")
        self._check_batch(tokens, pos0)
        return tokens

    def _check_batch(self, tokens, pos0):
        c = self.config
        if pos0 < 0 or pos0 + len(tokens) > self.seq_len:
            raise ContextLengthError(
                f"positions {pos0}..{pos0 + len(tokens) - 1} do not fit the context of {self.seq_len}")
        bad = [t for t in tokens if not 0 <= t < c.vocab_size]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary 0..{c.vocab_size - 1}")

    def _forward_batch(self, tokens, pos0: int, all_logits=None, logits: bool = True) -> None:
        """The forward pass for T tokens at positions pos0..pos0+T-1, all layers at once;
        leaves the last token's logits in state.logits (none with `logits` false: a chunk of
        a prompt that goes on), and every token's in `all_logits` (T, vocab_size) when given."""
        c, w = self.config, self.weights
        bs, s = self._batch_state(), self.state
        # never more threads than bs.att has slabs for; fewer while other processes hold cores
        nt = min(governor.threads(self.threads), bs.threads)
        T = len(tokens)
        rows = bs.x[:T], bs.xb[:T], bs.xb2[:T], bs.q[:T], bs.hb[:T], bs.hb2[:T]
        x, xb = rows[0], rows[1]
        embed(w.token_embedding, tokens, x)

        def block(l, layer, rows, p0):  # rows at consecutive positions p0.. of this model's cache
            x, xb, xb2, q, hb, hb2 = rows

            def attend(l, k, v):
                ops.rope_rows(q, c.head_size, p0, s.rope_freqs)
                ops.rope_rows(k, c.head_size, p0, s.rope_freqs)
                s.store_kv(l, p0, k, v)
                ops.attention_rows(xb, q, s.key_cache[l], s.value_cache[l], bs.att, p0,
                                   c.n_heads, c.n_kv_heads, nt)

            k, v = s.kv_targets(l, p0, bs.k[:len(x)], bs.v[:len(x)])
            block_rows(c, layer, l, x, xb, xb2, q, k, v, hb, hb2, nt, attend)

        # Unless every position's logits are wanted, the last layer feeds only the last
        # position's: the other positions need just their keys and values in the cache; queries,
        # attention, output projection and MLP run for the last one alone (none at all for a
        # chunk that is not the prompt's end), as llama.cpp does. A fifth of the prefill of a
        # 4-layer 7B-shaped model, 1/L of an L-layer one.
        every = all_logits is not None or not w.layers
        full = w.layers if every else w.layers[:-1]
        for l, layer in enumerate(full):
            block(l, layer, rows, pos0)
        if all_logits is not None:
            ops.rmsnorm_rows(xb, x, w.norm, c.norm_eps)
            w.output.batch(xb, all_logits, nt)
            s.logits[:] = all_logits[T - 1]
            return
        if not every:
            l, n = len(full), (T - 1 if logits else T)
            if n:
                k, v = s.kv_targets(l, pos0, bs.k[:n], bs.v[:n])
                kv_rows(c, w.layers[l], x[:n], xb[:n], k, v, nt)
                ops.rope_rows(k, c.head_size, pos0, s.rope_freqs)
                s.store_kv(l, pos0, k, v)
            if logits:
                block(l, w.layers[l], tuple(r[T - 1:] for r in rows), pos0 + T - 1)
        if not logits:
            return
        ops.rmsnorm(s.x, x[T - 1], w.norm, c.norm_eps)
        w.output(s.x, s.logits, nt)
