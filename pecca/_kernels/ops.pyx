# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The small ops of a transformer layer: rmsnorm, softmax, RoPE, SwiGLU, attention, and the
embedding lookup of a GGUF block-quantized table.

Notes
-----
These touch a few thousand floats per call, so they run serially, except attention, which
reads the KV cache of a layer row by row (each row once, for all heads) and splits the
heads into one contiguous block per thread. The KV cache is float32, or IEEE half given as
uint16 bit patterns (numpy's float16 has no buffer format Cython reads: pass
``cache.view(np.uint16)``); the attention functions take either (``kv_t``).
Formulas follow llama2.c's run.c (float32, ``expf``, ``powf``/``cosf``/``sinf`` for RoPE)
so that pecca reproduces its tokens; softmax sums sequentially as run.c does, because
sampling compares a random coin against cumulative probabilities.
"""
import operator

from cython.parallel cimport prange, threadid
from libc.math cimport powf, cosf, sinf, sqrt, sqrtf
from libc.stdint cimport int8_t, int32_t, uint8_t, uint16_t
from libc.string cimport memcpy
from libc.stdlib cimport qsort

cdef Py_ssize_t SWIGLU_CHUNK = 16384  # elements a thread takes at least (the vector exp: ~0.3 ns each)
from pecca._kernels.kernels cimport (pecca_simd_reset, attention_heads_f32, attention_heads_f16,
                                     floats_to_f16, softmax_portable, swiglu_f32, argmax_finite_f32,
                                     f16_to_f32)

ctypedef fused kv_t:  # a KV cache's element: float32, or half bits
    float
    uint16_t


cdef inline void attention_heads(const float *q, const kv_t *kc, const kv_t *vc, float *att,
                                 long att_stride, float *out, long h0, long h1, long pos,
                                 long head_size, long kv_dim, long kv_mul, float scale) noexcept nogil:
    if kv_t is float:
        attention_heads_f32(q, kc, vc, att, att_stride, out, h0, h1, pos, head_size, kv_dim,
                            kv_mul, scale)
    else:
        attention_heads_f16(q, kc, vc, att, att_stride, out, h0, h1, pos, head_size, kv_dim,
                            kv_mul, scale)


cdef inline void store_row(kv_t *dst, const float *src, long n) noexcept nogil:
    """n floats into a cache row: copied, or rounded to half (to nearest even)"""
    if kv_t is float:
        memcpy(dst, src, n * sizeof(float))
    else:
        floats_to_f16(src, dst, n)


def to_f16(uint16_t[::1] out, const float[::1] x):
    """out = x rounded to IEEE half (to nearest even, as numpy's astype(np.float16)), as bits:
    the store into an f16 KV cache."""
    if out.shape[0] != x.shape[0]:
        raise ValueError("to_f16: length mismatch")
    if x.shape[0] == 0:
        return
    with nogil:
        floats_to_f16(&x[0], &out[0], x.shape[0])


# GGUF block types an embedding table may hold: name -> (code, bytes per block of 32 values)
BLOCK_KINDS = {"Q8_0": (0, 34), "Q4_0": (1, 18), "Q4_1": (2, 20)}


cdef void block_row(int kind, const uint8_t *p, long nb, float *out) noexcept nogil:
    """nb GGUF blocks as float32, computed as gguf's numpy dequantizer does: an f16 scale times
    each small integer code (exact in float32); Q4_1 then adds its f16 min, rounded once (in
    double, where the product and the sum are exact, so no fused multiply-add can differ)."""
    cdef long b
    cdef int j
    cdef uint16_t h
    cdef float d
    cdef double dd, m
    for b in range(nb):
        memcpy(&h, p, 2)
        d = f16_to_f32(h)
        if kind == 0:
            for j in range(32):
                out[j] = d * <float>(<const int8_t *>p)[2 + j]
            p += 34
        elif kind == 1:
            for j in range(16):
                out[j] = d * <float>((p[2 + j] & 15) - 8)
                out[j + 16] = d * <float>((p[2 + j] >> 4) - 8)
            p += 18
        else:
            memcpy(&h, p + 2, 2)
            dd, m = d, f16_to_f32(h)
            for j in range(16):
                out[j] = <float>(dd * (p[4 + j] & 15) + m)
                out[j + 16] = <float>(dd * (p[4 + j] >> 4) + m)
            p += 20
        out += 32


def dequantize_rows(const uint8_t[:, ::1] blocks, rows, str kind, float[::1] out):
    """out = rows `rows` (an int, or a sequence of ints) of a GGUF block-quantized table, one after
    another: the embedding lookup of a Q8_0 / Q4_0 / Q4_1 token table. One call instead of a dozen
    numpy operations, which in a decode step run with cold caches (the weights streamed through
    them): 50-100 us a token before, a few now.

    blocks : IN (R, K / 32 * block bytes) uint8; kind : "Q8_0", "Q4_0" or "Q4_1"
    out : OUT (len(rows) * K,) float32
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"dequantize_rows: kind {kind!r}; expected one of {', '.join(BLOCK_KINDS)}")
    code, bb = BLOCK_KINDS[kind]
    if blocks.shape[1] % bb != 0:
        raise ValueError(f"dequantize_rows: rows of {blocks.shape[1]} bytes are not whole {kind} blocks")
    cdef long nb = blocks.shape[1] // bb, K = nb * 32, R = blocks.shape[0], n = 0, r
    try:
        picked = (operator.index(rows),)  # one token: an int or a numpy integer
    except TypeError:
        picked = rows
    if out.shape[0] != len(picked) * K:
        raise ValueError(f"dequantize_rows: {len(picked)} rows of {K} values need {len(picked) * K} "
                         f"floats, out has {out.shape[0]}")
    for row in picked:
        r = row
        if r < 0 or r >= R:
            raise IndexError(f"dequantize_rows: row {row} is outside the table's {R} rows")
        block_row(code, &blocks[r, 0], nb, &out[n * K])
        n += 1


def rmsnorm(float[::1] out, const float[::1] x, const float[::1] weight, float eps):
    """out = weight * x / sqrt(mean(x**2) + eps).

    out : OUT (n,) float32 (may alias x)
    x, weight : IN (n,) float32
    """
    cdef Py_ssize_t n = x.shape[0], i
    if out.shape[0] != n or weight.shape[0] != n or n == 0:
        raise ValueError("rmsnorm: out, x and weight must have the same non-zero length")
    cdef float ss = 0.0, one = 1.0
    with nogil:
        # float32, front to back, as run.c: the int8 paths need its exact arithmetic
        for i in range(n):
            ss = ss + x[i] * x[i]
        ss = ss / n
        ss = ss + eps
        ss = one / sqrtf(ss)
        for i in range(n):
            out[i] = weight[i] * (ss * x[i])


def softmax(float[::1] x):
    """In place: x = exp(x - max) / sum. Sequential float32 sum, as run.c.

    x : IN/OUT (n,) float32, n >= 1
    """
    cdef Py_ssize_t n = x.shape[0]
    if n == 0:
        raise ValueError("softmax of an empty vector")
    with nogil:
        softmax_portable(&x[0], n)  # attention's portable softmax: run.c's arithmetic


def argmax_finite(const float[::1] x):
    """The index of the first largest entry of x (np.argmax's), or -1 when x holds a NaN or an
    infinity (the caller then reports them): greedy sampling's one pass over the logits.

    x : IN (n,) float32, n >= 1
    """
    cdef Py_ssize_t n = x.shape[0]
    cdef long best
    if n == 0:
        raise ValueError("argmax of an empty vector")
    with nogil:
        best = argmax_finite_f32(&x[0], n)
    return best


def sample_mult(const float[::1] probs, float coin):
    """The first index whose cumulative probability (a sequential float32 sum) exceeds coin,
    the last index if none does: run.c's sample_mult.

    probs : IN (n,) float32, n >= 1
    """
    cdef Py_ssize_t n = probs.shape[0], i
    if n == 0:
        raise ValueError("sample_mult of an empty vector")
    cdef float cdf = 0.0
    cdef Py_ssize_t found = n - 1
    with nogil:
        for i in range(n):
            cdf = cdf + probs[i]
            if coin < cdf:
                found = i
                break
    return found


cdef struct ProbIndex:
    float prob
    int32_t index


cdef int prob_desc(const void *a, const void *b) noexcept nogil:
    """Larger probability first; equal ones in index order (a stable sort's result)."""
    cdef const ProbIndex *x = <const ProbIndex *>a
    cdef const ProbIndex *y = <const ProbIndex *>b
    if x.prob > y.prob:
        return -1
    if x.prob < y.prob:
        return 1
    return (x.index > y.index) - (x.index < y.index)


TOPP_SCRATCH_BYTES = sizeof(ProbIndex)  # per vocabulary entry


def sample_topp(const float[::1] probs, float top_p, float coin, unsigned char[::1] scratch):
    """Nucleus sampling, run.c's sample_topp: the tokens with probability >= (1 - top_p) /
    (n - 1), largest first, up to the first whose cumulative (sequential float32) sum exceeds
    top_p; then the first of those whose cumulative sum exceeds coin times that sum.

    probs : IN (n,) float32, n >= 1, a softmax
    scratch : (>= n * TOPP_SCRATCH_BYTES,) bytes the caller keeps between tokens, so that
        nothing is allocated per token
    """
    cdef Py_ssize_t n = probs.shape[0], i, m = 0, last, found
    if n == 0:
        raise ValueError("sample_topp of an empty vector")
    if scratch.shape[0] < n * <Py_ssize_t>sizeof(ProbIndex):
        raise ValueError(f"sample_topp: scratch holds {scratch.shape[0]} bytes, needs "
                         f"{n * sizeof(ProbIndex)}")
    if n == 1:
        return 0
    cdef ProbIndex *cand = <ProbIndex *>&scratch[0]
    cdef float one = 1.0, cutoff = (one - top_p) / <float>(n - 1), cum, r
    with nogil:
        for i in range(n):
            if probs[i] >= cutoff:
                cand[m].prob = probs[i]
                cand[m].index = <int32_t>i
                m += 1
        if m == 0:  # a near-uniform softmax and a tiny top_p: every token under the cutoff
            for i in range(n):  # the most probable one (the first if tied)
                if m == 0 or probs[i] > cand[0].prob:
                    cand[0].prob = probs[i]
                    cand[0].index = <int32_t>i
                    m = 1
        qsort(cand, m, sizeof(ProbIndex), prob_desc)
        last = m - 1
        cum = 0.0
        for i in range(m):
            cum = cum + cand[i].prob
            if cum > top_p:
                last = i
                break
        r = coin * cum
        found = last
        cum = 0.0
        for i in range(last + 1):
            cum = cum + cand[i].prob
            if cum > r:
                found = i
                break
    return cand[found].index


def rope_freqs(int head_size, float theta, float[::1] out):
    """RoPE frequency of each pair of a head: 1 / theta**(2i / head_size), computed in float32
    with powf exactly as llama2.c's run.c.

    out : OUT (head_size // 2,) float32
    """
    cdef int half = head_size // 2, i
    cdef float one = 1.0
    if out.shape[0] < half:
        raise ValueError("rope_freqs: output too short")
    with nogil:
        for i in range(half):
            out[i] = one / powf(theta, <float>(2 * i) / <float>head_size)


def rope_table(int pos, const float[::1] freqs, float[::1] cos_out, float[::1] sin_out):
    """cos/sin of the RoPE angles pos * freq at position `pos`, one per pair in a head.

    freqs : IN (half,) from rope_freqs (possibly rescaled)
    cos_out, sin_out : OUT (half,) float32
    """
    cdef Py_ssize_t half = freqs.shape[0], i
    cdef float val
    if cos_out.shape[0] < half or sin_out.shape[0] < half:
        raise ValueError("rope_table: output too short")
    with nogil:
        for i in range(half):
            val = pos * freqs[i]
            cos_out[i] = cosf(val)
            sin_out[i] = sinf(val)


cdef void rope_heads(float *vec, Py_ssize_t n, long head_size, const float *cos_t,
                     const float *sin_t) noexcept nogil:
    """Each head of vec[0:n] rotated in place, pairs adjacent (`rope`'s arithmetic)."""
    cdef Py_ssize_t h, i, j
    cdef float v0, v1, c, s
    for h in range(n // head_size):
        i = h * head_size
        for j in range(head_size // 2):
            c = cos_t[j]
            s = sin_t[j]
            v0 = vec[i + 2 * j]
            v1 = vec[i + 2 * j + 1]
            vec[i + 2 * j] = v0 * c - v1 * s
            vec[i + 2 * j + 1] = v0 * s + v1 * c


def rope(float[::1] vec, int head_size, const float[::1] cos_t, const float[::1] sin_t):
    """Rotate each head of `vec` in place; pairs are adjacent (vec[2i], vec[2i+1]),
    the layout of Meta's and llama2.c's checkpoints.

    vec : IN/OUT (n_heads * head_size,) float32
    cos_t, sin_t : IN (head_size // 2,) from rope_table
    """
    cdef Py_ssize_t n = vec.shape[0]
    cdef int half = head_size // 2
    if head_size <= 0 or head_size % 2 or n % head_size or cos_t.shape[0] < half or sin_t.shape[0] < half:
        raise ValueError("rope: bad head_size or table length")
    if n == 0:
        return
    with nogil:
        rope_heads(&vec[0], n, head_size, &cos_t[0], &sin_t[0])


def swiglu(float[::1] h, const float[::1] g, int num_threads=1):
    """In place: h = silu(h) * g.

    h : IN/OUT (n,) float32 (the gate projection, w1 x)
    g : IN (n,) float32 (the up projection, w3 x)
    num_threads : threads for a long vector (a batch's rows together): each element's
        arithmetic is the same however it is split
    """
    cdef Py_ssize_t n = h.shape[0], b, lo, hi
    if g.shape[0] != n:
        raise ValueError("swiglu: length mismatch")
    cdef int nt = max(1, min(num_threads, <int>(n // SWIGLU_CHUNK)))
    if n == 0:
        return
    if nt <= 1:
        with nogil:
            swiglu_f32(&h[0], &g[0], n)
        return
    with nogil:
        for b in prange(nt, schedule='static', num_threads=nt):
            lo = n * b // nt
            hi = n * (b + 1) // nt
            swiglu_f32(&h[0] + lo, &g[0] + lo, hi - lo)


def add(float[::1] x, const float[::1] y):
    """In place: x += y (the residual connection)."""
    cdef Py_ssize_t n = x.shape[0], i
    if y.shape[0] != n:
        raise ValueError("add: length mismatch")
    with nogil:
        for i in range(n):
            x[i] += y[i]


def attention(float[::1] out, const float[::1] q, const kv_t[:, ::1] k_cache,
              const kv_t[:, ::1] v_cache, float[:, ::1] att, int pos, int n_heads,
              int n_kv_heads, int num_threads=1):
    """Causal multi-head attention of one query over cache rows 0..pos.

    out : OUT (n_heads * head_size,) float32
    q : IN (n_heads * head_size,) float32, already rotated
    k_cache, v_cache : IN (seq_len, n_kv_heads * head_size) float32 or uint16 (half bits),
        rows 0..pos filled
    att : scratch (n_heads, >= pos + 1) float32
    Query head h reads kv head h // (n_heads // n_kv_heads) (grouped-query attention).
    """
    cdef Py_ssize_t dim = q.shape[0], kv_dim = k_cache.shape[1]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or dim % n_heads:
        raise ValueError("attention: bad head counts")
    cdef long head_size = dim // n_heads
    if (out.shape[0] != dim or kv_dim != n_kv_heads * head_size or v_cache.shape[1] != kv_dim
            or pos < 0 or pos >= k_cache.shape[0] or pos >= v_cache.shape[0]
            or att.shape[0] < n_heads or att.shape[1] <= pos):
        raise ValueError("attention: shapes disagree")
    cdef long kv_mul = n_heads // n_kv_heads, b, h0, h1
    cdef float scale = sqrtf(<float>head_size)
    cdef const float *qp = &q[0]
    cdef const kv_t *kp = &k_cache[0, 0]
    cdef const kv_t *vp = &v_cache[0, 0]
    cdef float *ap = &att[0, 0]
    cdef float *op = &out[0]
    cdef long att_stride = att.shape[1]
    # one contiguous block of heads per thread; small caches are not worth a thread team
    cdef int nt = min(num_threads, n_heads) if (pos + 1) * dim >= 16384 else 1
    if nt <= 1:
        with nogil:
            attention_heads(qp, kp, vp, ap, att_stride, op, 0, n_heads, pos, head_size,
                            kv_dim, kv_mul, scale)
        return
    with nogil:
        for b in prange(nt, schedule='static', num_threads=nt):
            h0 = n_heads * b // nt
            h1 = n_heads * (b + 1) // nt
            attention_heads(qp, kp, vp, ap, att_stride, op, h0, h1, pos, head_size,
                            kv_dim, kv_mul, scale)


# ---- batched forms, for prefill: one row per token -------------------------------------

def rmsnorm_rows(float[:, ::1] out, const float[:, ::1] x, const float[::1] weight, float eps):
    """rmsnorm of each row. out, x : (T, n) (out may alias x); weight : IN (n,)"""
    cdef Py_ssize_t T = x.shape[0], n = x.shape[1], t, i
    if out.shape[0] != T or out.shape[1] != n or weight.shape[0] != n or n == 0:
        raise ValueError("rmsnorm_rows: shapes disagree")
    cdef float ss, one = 1.0
    with nogil:
        for t in range(T):
            ss = 0.0
            for i in range(n):
                ss = ss + x[t, i] * x[t, i]
            ss = ss / n
            ss = ss + eps
            ss = one / sqrtf(ss)
            for i in range(n):
                out[t, i] = weight[i] * (ss * x[t, i])


def rope_rows(float[:, ::1] vec, int head_size, int pos0, const float[::1] freqs):
    """RoPE of row t at position pos0 + t, in place (adjacent pairs, as `rope`).

    vec : IN/OUT (T, n_heads * head_size) float32
    freqs : IN (head_size // 2,) from rope_freqs
    """
    cdef Py_ssize_t T = vec.shape[0], n = vec.shape[1], t, h, j, i
    cdef int half = head_size // 2
    cdef float val, c, s_, v0, v1
    if head_size <= 0 or head_size % 2 or n % head_size or freqs.shape[0] < half:
        raise ValueError("rope_rows: bad head_size or frequency table")
    with nogil:
        for t in range(T):
            for j in range(half):
                val = (pos0 + t) * freqs[j]
                c = cosf(val)
                s_ = sinf(val)
                for h in range(n // head_size):
                    i = h * head_size + 2 * j
                    v0 = vec[t, i]
                    v1 = vec[t, i + 1]
                    vec[t, i] = v0 * c - v1 * s_
                    vec[t, i + 1] = v0 * s_ + v1 * c


def attention_rows(float[:, ::1] out, const float[:, ::1] q, const kv_t[:, ::1] k_cache,
                   const kv_t[:, ::1] v_cache, float[:, :, ::1] att, int pos0, int n_heads,
                   int n_kv_heads, int num_threads=1):
    """Causal attention of T queries: row t sits at position pos0 + t and attends to cache
    rows 0..pos0 + t (the batch's own keys must already be in the cache).

    out : OUT (T, n_heads * head_size); q : IN (T, n_heads * head_size), rotated
    k_cache, v_cache : IN (seq_len, n_kv_heads * head_size) float32 or uint16 (half bits)
    att : scratch (>= num_threads, n_heads, >= pos0 + T), one slab per thread
    """
    cdef Py_ssize_t T = q.shape[0], dim = q.shape[1], kv_dim = k_cache.shape[1]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or dim % n_heads:
        raise ValueError("attention_rows: bad head counts")
    cdef long head_size = dim // n_heads
    cdef int nt = max(1, min(num_threads, T))
    if (out.shape[0] != T or out.shape[1] != dim or kv_dim != n_kv_heads * head_size
            or v_cache.shape[1] != kv_dim or pos0 < 0 or pos0 + T > k_cache.shape[0]
            or pos0 + T > v_cache.shape[0] or att.shape[0] < nt or att.shape[1] < n_heads
            or att.shape[2] < pos0 + T):
        raise ValueError("attention_rows: shapes disagree")
    if T == 0:
        return
    cdef long kv_mul = n_heads // n_kv_heads, t
    cdef float scale = sqrtf(<float>head_size)
    cdef const float *qp = &q[0, 0]
    cdef const kv_t *kp = &k_cache[0, 0]
    cdef const kv_t *vp = &v_cache[0, 0]
    cdef float *ap = &att[0, 0, 0]
    cdef float *op = &out[0, 0]
    cdef long att_stride = att.shape[2], slab = att.shape[1] * att.shape[2]
    with nogil:
        for t in prange(T, schedule='dynamic', num_threads=nt):
            attention_heads(qp + t * dim, kp, vp, ap + threadid() * slab, att_stride,
                            op + t * dim, 0, n_heads, pos0 + t, head_size, kv_dim,
                            kv_mul, scale)

# ---- the serving batch: one token per sequence, each in its own cache slot -------------

def attend_slots(float[:, ::1] out, float[:, ::1] q, float[:, ::1] k, const float[:, ::1] v,
                 kv_t[:, :, :, ::1] key_cache, kv_t[:, :, :, ::1] value_cache, int layer,
                 const int32_t[::1] slots, const int32_t[::1] positions,
                 const float[:, ::1] cos_t, const float[:, ::1] sin_t, float[:, :, ::1] att,
                 int n_heads, int n_kv_heads, int num_threads=1):
    """For each row b < B = len(slots): RoPE of q[b] and k[b] at position p = positions[b]
    (cos_t[p], sin_t[p] from rope_table, the arithmetic of `rope`), k[b] and v[b] stored at
    cache row p of slot slots[b], layer `layer`, then attention of q[b] over that slot's rows
    0..p into out[b] (`attention`'s arithmetic: each head the same bits however the heads
    are split between threads). Rows past B are not touched.

    out : OUT (>= B, n_heads * head_size); q, k : IN/OUT (>= B, ...), rotated in place
    v : IN (>= B, n_kv_heads * head_size)
    key_cache, value_cache : IN/OUT (slots, layers, seq_len, n_kv_heads * head_size), float32
        or uint16 (half bits: k and v are rounded to half as they are stored)
    cos_t, sin_t : IN (>= seq_len rows used, head_size // 2)
    att : scratch (>= num_threads, n_heads, > max position), one slab per thread
    """
    cdef Py_ssize_t B = slots.shape[0], dim = q.shape[1], kv_dim = k.shape[1]
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads or dim % n_heads:
        raise ValueError("attend_slots: bad head counts")
    cdef long head_size = dim // n_heads
    cdef int half = head_size // 2
    if num_threads < 1:
        num_threads = 1
    if (head_size % 2 or positions.shape[0] != B or out.shape[0] < B or q.shape[0] < B
            or k.shape[0] < B or v.shape[0] < B or out.shape[1] != dim
            or kv_dim != n_kv_heads * head_size or v.shape[1] != kv_dim
            or key_cache.shape[3] != kv_dim or value_cache.shape[3] != kv_dim
            or value_cache.shape[0] != key_cache.shape[0] or value_cache.shape[1] != key_cache.shape[1]
            or value_cache.shape[2] != key_cache.shape[2]
            or layer < 0 or layer >= key_cache.shape[1] or cos_t.shape[1] < half
            or sin_t.shape[1] < half or att.shape[0] < num_threads or att.shape[1] < n_heads):
        raise ValueError("attend_slots: shapes disagree")
    if B == 0:
        return
    cdef Py_ssize_t n_slots = key_cache.shape[0], seq = key_cache.shape[2]
    cdef long b, s, p, u, work = 0, bad = -1
    with nogil:
        for b in range(B):
            s = slots[b]
            p = positions[b]
            if (s < 0 or s >= n_slots or p < 0 or p >= seq or p >= cos_t.shape[0]
                    or p >= sin_t.shape[0] or p >= att.shape[2]):
                bad = b
                break
            work = work + (p + 1) * dim
    if bad >= 0:
        raise ValueError(f"attend_slots: row {bad}: slot {slots[bad]} or position {positions[bad]} "
                         "outside the cache")
    cdef long kv_mul = n_heads // n_kv_heads, nb, units
    cdef float scale = sqrtf(<float>head_size)
    cdef long att_stride = att.shape[2], slab = att.shape[1] * att.shape[2]
    cdef long cache_row = kv_dim, cache_layer = seq * kv_dim, cache_slot = key_cache.shape[1] * seq * kv_dim
    cdef kv_t *kcp = &key_cache[0, 0, 0, 0]
    cdef kv_t *vcp = &value_cache[0, 0, 0, 0]
    cdef float *qp = &q[0, 0]
    cdef float *op = &out[0, 0]
    cdef float *ap = &att[0, 0, 0]
    cdef float *kr
    cdef float *qr
    cdef long base
    with nogil:
        for b in range(B):  # RoPE and the cache writes: a few hundred floats a row
            p = positions[b]
            qr = &q[b, 0]
            kr = &k[b, 0]
            rope_heads(qr, dim, head_size, &cos_t[p, 0], &sin_t[p, 0])
            rope_heads(kr, kv_dim, head_size, &cos_t[p, 0], &sin_t[p, 0])
            base = slots[b] * cache_slot + layer * cache_layer + p * cache_row
            store_row(kcp + base, kr, kv_dim)
            store_row(vcp + base, &v[b, 0], kv_dim)
    # attention: units of (row, block of heads); small caches are not worth a thread team
    cdef int nt = num_threads if work >= 16384 else 1
    nb = 1
    if nt > 1 and B < nt:
        nb = min(n_heads, (nt + B - 1) // B)
    units = B * nb
    if nt > units:
        nt = <int>units
    if nt <= 1:
        with nogil:
            for b in range(B):
                base = slots[b] * cache_slot + layer * cache_layer
                attention_heads(qp + b * dim, kcp + base, vcp + base, ap, att_stride,
                                op + b * dim, 0, n_heads, positions[b], head_size, kv_dim,
                                kv_mul, scale)
        return
    with nogil:
        for u in prange(units, schedule='dynamic', num_threads=nt):
            attention_heads(qp + (u // nb) * dim,
                            kcp + slots[u // nb] * cache_slot + layer * cache_layer,
                            vcp + slots[u // nb] * cache_slot + layer * cache_layer,
                            ap + threadid() * slab, att_stride, op + (u // nb) * dim,
                            n_heads * (u % nb) // nb, n_heads * (u % nb + 1) // nb,
                            positions[u // nb], head_size, kv_dim, kv_mul, scale)


def _reset_simd():
    """Re-read PECCA_SIMD in this module (each extension keeps its own choice)."""
    pecca_simd_reset()
