# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Matrix-vector and matrix-matrix products with 4-bit weights.

Layouts (all read in place, e.g. from memory-maps; see q4_kernels.h for the details):

- ``q4g``: pecca's repacked GPTQ: ``qs`` uint8 (N, K/2) (per 32-block 16 bytes of nibbles in
  Q4_0's order), ``scales`` f16 (N, G) passed as their uint16 bit patterns, ``zeros`` int8 (N, G)
  (true zero points 0..15), ``perm`` int32 (K,) or empty/None (act-order: input i is x[perm[i]]).
  W[n, perm[i]] = scales[n, i // gs] * (code(n, i) - zeros[n, i // gs]), gs = K / G.
  Column slices (``slices`` S > 1, for long rows): the matrix is S matrices of K / S inputs
  each, one after another: ``qs`` (S N, K/S/2), ``scales`` and ``zeros`` (S N, G), G groups per
  slice; slice j's rows read inputs j K/S .. (j + 1) K/S - 1 (after perm). Each slice's rows are
  then one sequential stream over K/S inputs instead of a stride through the whole row, which
  the hardware prefetchers follow better (K >= 8192 from memory: 15-20% faster).
  The quad layout (``quads=True``; N / S a multiple of 4, K / S of 128): each slice's rows in
  quads of 4, a quad's 4 rows interleaved per 128 inputs (64 bytes each, rows 4q .. 4q + 3 side
  by side), so that a 4-row tile reads one stream (``export.gptq.q4g_quads`` makes it). Same
  results as the row layout of the same matrix, bit for bit (the float path reads it portably).
- ``q4_0`` / ``q4_1``: GGUF Q4_0 (18-byte blocks: f16 d, 16 bytes of nibbles; w = d (q - 8)) and
  Q4_1 (20-byte blocks: f16 d, f16 m, nibbles; w = d q + m), uint8 (N, K/32*18 or 20).
- ``gptq``: the native HF layout: ``qweight`` int32 (K/8, N), ``qzeros`` int32 (G, N/8) with
  ``zero_add`` added to the whole word (0x11111111 for v1 checkpoints, 0 for gptq_v2),
  ``scales`` f16 bits (G, N), ``g_idx`` int32 (K,), ``out_perm`` int32 (N,) or empty/None
  (out[i] = y[out_perm[i]]).

Notes
-----
q4g (when gs % 32 == 0), Q4_0 and Q4_1 quantize x per 32-block to two int8 levels
(q = 256 hi + lo, d = amax / 32512: ~1/65000 of the block's largest value per activation) and
use exact integer dot products of the unsigned 4-bit codes with both (AVX2 maddubs,
AVX512-VNNI vpdpbusd); ``float_act=True`` (and q4g with gs % 32 != 0) uses float activations
instead: the codes widened to float. gptq always uses float activations. Each call allocates its
own scratch for the prepared activations (so concurrent calls cannot share it). Rows are split
as in ``q8``: one contiguous block of rows per thread (multiples of 4), int8 matvecs from memory
balanced by work stealing; gptq splits output columns instead (its packed rows run along N).
Products below a few tens of thousands of multiply-adds run serially. Each row of a matmul
equals the matvec of that token bit for bit.
"""
from cython.parallel cimport prange
from libc.stdint cimport int8_t, uint8_t, uint16_t, int32_t, uint32_t
from pecca._kernels.kernels cimport (pecca_simd_reset, pecca_quad_share, pecca_alloc_lines,
                                     pecca_free_lines, pecca_span, pecca_steal_init,
                                     pecca_steal_next, pecca_steals, pecca_quads,
                                     pecca_claimed_rows, PECCA_STREAM_BYTES,
                                     q4_act_bytes, q4_actf_floats, q4_prepare_int8, q4_prepare_f32,
                                     q4_int8_rows, q4_f32_rows, q4_thread_scratch,
                                     gptq_prepare, gptq_acc_floats, gptq_cols)

# below this many multiply-adds a product runs on one thread
cdef long PARALLEL_MIN_WEIGHTS = 32768
# work stealing (simd.h): threads claim their rows this many bytes at a time
cdef long STEAL_CHUNK_BYTES = 65536
# ... for matvecs of at least this many weight bytes per thread (their shares come from memory)
cdef long STEAL_MIN_BYTES = PECCA_STREAM_BYTES
# weight formats (q4_kernels.h)
cdef int FMT_G = 0
cdef int FMT_0 = 1
cdef int FMT_1 = 2
cdef int FMT_QUADS = 4  # added to FMT_G: q4g codes in the quad layout (q4_kernels.h)
FORMAT_NAMES = ("q4g", "Q4_0", "Q4_1")


cdef inline int team(long rows, long work, int num_threads) noexcept nogil:
    if num_threads <= 1 or work < PARALLEL_MIN_WEIGHTS or rows < 8 * num_threads:
        return 1
    return num_threads


cdef inline void prepare_one(int fmt, bint float_act, const float *x, const int32_t *perm,
                             float *work, uint8_t *act, long K, long G) noexcept nogil:
    if float_act:
        q4_prepare_f32(fmt & ~FMT_QUADS, x, perm, <float *>act, K, G)
    else:
        q4_prepare_int8(fmt & ~FMT_QUADS, x, perm, work, act, K, G)


cdef void prepare_slices(int fmt, bint float_act, const float *x, const int32_t *perm,
                         float *work, uint8_t *act, long abs_, long K, long S,
                         long G) noexcept nogil:
    """One token x (K,) as S column slices of K / S inputs, slice j's at act + j abs_ (with perm
    its inputs are x[perm[j K / S + i]])."""
    cdef long j, Ks = K // S
    for j in range(S):
        if perm != NULL:
            prepare_one(fmt, float_act, x, perm + j * Ks, work, act + j * abs_, Ks, G)
        else:
            prepare_one(fmt, float_act, x + j * Ks, NULL, work, act + j * abs_, Ks, G)


cdef void prepare_tokens(int fmt, bint float_act, const float *x, const int32_t *perm,
                         float *work, uint8_t *act, long ab, long abs_, long K, long S, long G,
                         long T, int nt) noexcept nogil:
    """Prepare T tokens of x (T, K), ab bytes each (S slices of abs_); work: nt * K floats when
    perm is given (int8 path)."""
    cdef long b, t, t0, t1
    if nt <= 1 or T < 2 or T * K < PARALLEL_MIN_WEIGHTS:
        for t in range(T):
            prepare_slices(fmt, float_act, x + t * K, perm, work, act + t * ab, abs_, K, S, G)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        t0 = T * b // nt
        t1 = T * (b + 1) // nt
        for t in range(t0, t1):
            prepare_slices(fmt, float_act, x + t * K, perm, work + b * K if work != NULL else NULL,
                           act + t * ab, abs_, K, S, G)


cdef inline void rows(int fmt, bint float_act, const uint8_t *w, const uint16_t *sc,
                      const int8_t *zp, long K, long G, const uint8_t *act, long ab, long T,
                      float *out, long N, long r0, long r1, float *scratch) noexcept nogil:
    if float_act:
        q4_f32_rows(fmt, w, sc, zp, K, G, act, ab, T, out, N, r0, r1)
    else:
        q4_int8_rows(fmt, w, sc, zp, K, G, act, ab, T, out, N, r0, r1, N, scratch)


cdef void slice_rows(int fmt, bint float_act, const uint8_t *w, const uint16_t *sc,
                     const int8_t *zp, long Ks, long G, long S, const uint8_t *act, long abs_,
                     long ab, long T, float *out, float *tmp, long N, long r0, long r1,
                     float *scratch) noexcept nogil:
    """Rows [r0, r1) of out (T, N) for a matrix of S column slices of Ks inputs (q4g: slice j's
    N rows at w + j N Ks / 2, its scales and zeros at j N G; tokens prepared by prepare_tokens):
    slice 0's products, then each next slice's computed in tmp (T, N) and added."""
    cdef long j, t, r
    rows(fmt, float_act, w, sc, zp, Ks, G, act, ab, T, out, N, r0, r1, scratch)
    for j in range(1, S):
        rows(fmt, float_act, w + j * N * (Ks // 2), sc + j * N * G, zp + j * N * G, Ks, G,
             act + j * abs_, ab, T, tmp, N, r0, r1, scratch)
        for t in range(T):
            for r in range(r0, r1):
                out[t * N + r] += tmp[t * N + r]


cdef void rows_par(int fmt, bint float_act, const uint8_t *w, const uint16_t *sc,
                   const int8_t *zp, long Ks, long G, long S, const uint8_t *act, long abs_,
                   long ab, long T, float *out, float *tmp, long N, int nt, float *scratch,
                   long sf) noexcept nogil:
    """scratch: q4_thread_scratch(nt, G, &sf), sf floats per thread (NULL on the float path)"""
    cdef long b, r0, r1
    if nt <= 1:
        slice_rows(fmt, float_act, w, sc, zp, Ks, G, S, act, abs_, ab, T, out, tmp, N, 0, N,
                   scratch)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        r0 = pecca_quad_share(N, b, nt)
        r1 = pecca_quad_share(N, b + 1, nt)
        slice_rows(fmt, float_act, w, sc, zp, Ks, G, S, act, abs_, ab, T, out, tmp, N, r0, r1,
                   scratch + b * sf if scratch != NULL else NULL)


cdef inline long row_bytes(int fmt, long K, long G) noexcept nogil:
    """Bytes of one row of K inputs (q4g: codes, f16 scales and int8 zeros of G groups)."""
    if fmt & ~FMT_QUADS == FMT_G:
        return K // 2 + 3 * G
    return K // 32 * (18 if fmt == FMT_0 else 20)


cdef void steal_part(int fmt, long nm, long S, const uint8_t **wp, const uint16_t **scp,
                     const int8_t **zpp, const long *nrow, long Ks, long G, const uint8_t *act,
                     long abs_, float **op, float *tmp, long total, const long *to,
                     pecca_span *sp, long chunk, int id, int nt, float *scratch) noexcept nogil:
    """Thread id's part of op[m] = W_m x (int8 activations, S column slices of Ks inputs), its
    rows claimed by work stealing. The units are quads of rows of one slice of one matrix, in
    the order matrix, slice, row; slice j > 0's products go to tmp + (j - 1) total + to[m]."""
    cdef long u0, u1, base, m, j, r0, r1
    while pecca_steal_next(sp, id, nt, chunk, &u0, &u1):
        base = 0
        for m in range(nm):
            for j in range(S):
                if pecca_claimed_rows(u0, u1, base, nrow[m], &r0, &r1):
                    rows(fmt, False, wp[m] + j * nrow[m] * (Ks // 2),
                         scp[m] + j * nrow[m] * G if j > 0 else scp[m],
                         zpp[m] + j * nrow[m] * G if j > 0 else zpp[m], Ks, G, act + j * abs_,
                         S * abs_, 1, op[m] if j == 0 else tmp + (j - 1) * total + to[m],
                         nrow[m], r0, r1, scratch)
                base += pecca_quads(nrow[m])


cdef void steal_par(int fmt, long nm, long S, const uint8_t **wp, const uint16_t **scp,
                    const int8_t **zpp, const long *nrow, long Ks, long G, const uint8_t *act,
                    long abs_, float **op, float *tmp, long total, const long *to,
                    pecca_span *sp, int nt, float *scratch, long sf) noexcept nogil:
    """op[m] = W_m x for nm int8 matvecs (tmp: (S - 1) total floats), nt threads stealing."""
    cdef long m, j, r, units = 0
    cdef long chunk = STEAL_CHUNK_BYTES // (4 * row_bytes(fmt, Ks, G))  # at least 1 (simd.h)
    cdef int b
    for m in range(nm):
        units += S * pecca_quads(nrow[m])
    pecca_steal_init(sp, units, nt)
    for b in prange(nt, schedule='static', num_threads=nt):
        steal_part(fmt, nm, S, wp, scp, zpp, nrow, Ks, G, act, abs_, op, tmp, total, to, sp,
                   chunk, b, nt, scratch + b * sf)
    for m in range(nm):  # slice_rows' sums, in its order
        for j in range(1, S):
            for r in range(nrow[m]):
                op[m][r] += tmp[(j - 1) * total + to[m] + r]


cdef int run(int fmt, bint float_act, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
             const int32_t *perm, const float *x, float *out, long N, long K, long G, long T,
             int num_threads, long S=1) except -1:
    """out (T, N) = x (T, K) @ W.T, W in S column slices (q4g; 1 otherwise) of G groups each;
    every shape already checked, N, K, T > 0."""
    if T == 1 and not float_act:
        int8_many(fmt, 1, &w, &sc, &zp, &N, K, G, perm, x, &out, num_threads, S)
        return 0
    cdef long Ks = K // S
    cdef long abs_ = q4_actf_floats(Ks, G) * 4 if float_act else q4_act_bytes(Ks, G)
    cdef long ab = S * abs_
    cdef int nt = team(N, N * K * T, num_threads)
    cdef int ntp = num_threads if num_threads > 1 else 1
    cdef uint8_t *act = <uint8_t *>pecca_alloc_lines(T * ab)
    cdef float *work = NULL
    cdef float *scratch = NULL
    cdef float *tmp = NULL
    cdef long sf = 0
    if perm != NULL and not float_act:
        work = <float *>pecca_alloc_lines(ntp * K * sizeof(float))
    if not float_act:
        scratch = q4_thread_scratch(nt, G, &sf)
    if S > 1:
        tmp = <float *>pecca_alloc_lines(T * N * sizeof(float))
    if (act == NULL or (perm != NULL and not float_act and work == NULL)
            or (not float_act and scratch == NULL) or (S > 1 and tmp == NULL)):
        pecca_free_lines(act)
        pecca_free_lines(work)
        pecca_free_lines(scratch)
        pecca_free_lines(tmp)
        raise MemoryError("q4: no memory for the prepared activations")
    try:
        with nogil:
            prepare_tokens(fmt, float_act, x, perm, work, act, ab, abs_, K, S, G, T, ntp)
            rows_par(fmt, float_act, w, sc, zp, Ks, G, S, act, abs_, ab, T, out, tmp, N, nt,
                     scratch, sf)
    finally:
        pecca_free_lines(act)
        pecca_free_lines(work)
        pecca_free_lines(scratch)
        pecca_free_lines(tmp)
    return 0


cdef int check_index(str name, str what, const int32_t[::1] idx, long n, long bound) except -1:
    """idx is None/empty or n values in [0, bound)."""
    cdef long i, bad = -1
    if idx is None or idx.shape[0] == 0:
        return 0
    if idx.shape[0] != n:
        raise ValueError(f"{name}: {what} has {idx.shape[0]} entries, expected {n}")
    with nogil:
        for i in range(n):
            if idx[i] < 0 or idx[i] >= bound:
                bad = i
                break
    if bad >= 0:
        raise ValueError(f"{name}: {what}[{bad}] = {idx[bad]} is outside [0, {bound})")
    return 0


cdef inline const int32_t *index_ptr(const int32_t[::1] idx) noexcept:
    if idx is None or idx.shape[0] == 0:
        return NULL
    return &idx[0]


cdef long check_q4g(str name, const uint8_t[:, ::1] qs, const uint16_t[:, ::1] scales,
                    const int8_t[:, ::1] zeros, const int32_t[::1] perm, long slices,
                    bint quads=False) except -1:
    """Validate a q4g matrix of `slices` column slices (module docstring); returns G, the
    groups of a slice's row. N = qs.shape[0] / slices, K = slices * 2 * qs.shape[1]."""
    cdef long R = qs.shape[0], Ks = 2 * qs.shape[1], G = scales.shape[1]
    if slices < 1 or R % slices != 0:
        raise ValueError(f"{name}: {R} qs rows are not {slices} column slices of equal height")
    if quads and ((R // slices) % 4 != 0 or Ks % 128 != 0):
        raise ValueError(f"{name}: the quad layout needs rows in multiples of 4 and K a multiple "
                         f"of 128 per slice; got {R // slices} rows, K = {Ks}")
    if Ks % 32 != 0:
        raise ValueError(f"{name}: qs rows are {qs.shape[1]} bytes, so K = {Ks}, which is not a "
                         f"multiple of 32")
    if scales.shape[0] != R:
        raise ValueError(f"{name}: qs has {R} rows but scales has {scales.shape[0]}")
    if zeros.shape[0] != R or zeros.shape[1] != G:
        raise ValueError(f"{name}: zeros is {zeros.shape[0]}x{zeros.shape[1]}, scales is {R}x{G}")
    if G < 1 or Ks % G != 0:
        raise ValueError(f"{name}: {G} groups per row do not divide K = {Ks}")
    check_index(name, "perm", perm, slices * Ks, slices * Ks)
    return G


cdef long check_q4_blocks(str name, const uint8_t[:, ::1] blocks, long bb) except -1:
    """Validate a Q4_0 / Q4_1 matrix; returns K."""
    if blocks.shape[1] % bb != 0:
        raise ValueError(f"{name}: a row is a whole number of {bb}-byte blocks; got "
                         f"{blocks.shape[1]} bytes")
    return blocks.shape[1] // bb * 32


def matvec_q4g(const uint8_t[:, ::1] qs, const uint16_t[:, ::1] scales_bits,
               const int8_t[:, ::1] zeros, const int32_t[::1] perm, const float[::1] x,
               float[::1] out, int num_threads=1, bint float_act=False, long slices=1,
               bint quads=False):
    """out = W @ x, W in q4g layout (module docstring).

    qs : IN (N, K/2) uint8 nibbles, K % 32 == 0 (column slices: (S N, K/S/2))
    scales_bits : IN (N, G) uint16, the f16 scales' bit patterns (``scales.view(np.uint16)``)
    zeros : IN (N, G) int8 zero points (0..15)
    perm : IN (K,) int32 input permutation, or empty / None
    x : IN (K,) float32
    out : OUT (N,) float32, must not alias x
    float_act : use float activations (always the case when (K / S / G) % 32 != 0)
    slices : S, the column slices W is stored in (module docstring)
    quads : qs in the quad layout (module docstring)
    """
    cdef long G = check_q4g("matvec_q4g", qs, scales_bits, zeros, perm, slices, quads)
    cdef long N = qs.shape[0] // slices, K = 2 * qs.shape[1] * slices
    if x.shape[0] != K or out.shape[0] != N:
        raise ValueError(f"matvec_q4g: W is {N}x{K}, x has {x.shape[0]}, out has {out.shape[0]}")
    if N == 0:
        return
    if K == 0:
        out[:] = 0
        return
    run(FMT_G | (FMT_QUADS if quads else 0), float_act or (K // slices // G) % 32 != 0, &qs[0, 0],
        &scales_bits[0, 0], &zeros[0, 0], index_ptr(perm), &x[0], &out[0], N, K, G, 1,
        num_threads, slices)


def matmul_q4g(const uint8_t[:, ::1] qs, const uint16_t[:, ::1] scales_bits,
               const int8_t[:, ::1] zeros, const int32_t[::1] perm, const float[:, ::1] x,
               float[:, ::1] out, int num_threads=1, bint float_act=False, long slices=1,
               bint quads=False):
    """out = x @ W.T, W in q4g layout: the products of all T tokens of a batch.

    x : IN (T, K) float32, one token per row; out : OUT (T, N) float32, must not alias x.
    The rest as matvec_q4g. Each row of out equals matvec_q4g of that token bit for bit.
    """
    cdef long G = check_q4g("matmul_q4g", qs, scales_bits, zeros, perm, slices, quads)
    cdef long N = qs.shape[0] // slices, K = 2 * qs.shape[1] * slices, T = x.shape[0]
    if x.shape[1] != K or out.shape[0] != T or out.shape[1] != N:
        raise ValueError(f"matmul_q4g: W is {N}x{K}, x is {T}x{x.shape[1]}, "
                         f"out is {out.shape[0]}x{out.shape[1]}")
    if N == 0 or T == 0:
        return
    if K == 0:
        out[:, :] = 0
        return
    run(FMT_G | (FMT_QUADS if quads else 0), float_act or (K // slices // G) % 32 != 0, &qs[0, 0],
        &scales_bits[0, 0], &zeros[0, 0], index_ptr(perm), &x[0, 0], &out[0, 0], N, K, G, T,
        num_threads, slices)


cdef blocks_product(str name, int fmt, const uint8_t[:, ::1] blocks, const float *x, long T,
                    long xk, float *out, long oT, long oN, int num_threads, bint float_act):
    """x (T, xk), out (oT, oN) as pointers and shapes (matvec: T = oT = 1)."""
    cdef long bb = 18 if fmt == FMT_0 else 20
    cdef long N = blocks.shape[0], K = check_q4_blocks(name, blocks, bb)
    if xk != K or oT != T or oN != N:
        raise ValueError(f"{name}: W is {N}x{K} ({FORMAT_NAMES[fmt]}), x is {T}x{xk}, "
                         f"out is {oT}x{oN}")
    if N == 0 or T == 0:
        return
    cdef long i
    if K == 0:
        for i in range(T * N):
            out[i] = 0
        return
    run(fmt, float_act, &blocks[0, 0], NULL, NULL, NULL, x, out, N, K, 1, T, num_threads)


def matvec_q4_0(const uint8_t[:, ::1] blocks, const float[::1] x, float[::1] out,
                int num_threads=1, bint float_act=False):
    """out = W @ x, W GGUF Q4_0 blocks.

    blocks : IN (N, K/32*18) uint8: per row K/32 blocks of (f16 d, 16 bytes of nibbles)
    x : IN (K,) float32; out : OUT (N,) float32, must not alias x
    float_act : float activations instead of int8-quantized ones
    """
    blocks_product("matvec_q4_0", FMT_0, blocks, &x[0], 1, x.shape[0], &out[0], 1, out.shape[0],
                   num_threads, float_act)


def matmul_q4_0(const uint8_t[:, ::1] blocks, const float[:, ::1] x, float[:, ::1] out,
                int num_threads=1, bint float_act=False):
    """out = x @ W.T, W GGUF Q4_0 blocks; x (T, K), out (T, N). Rows equal matvec_q4_0's."""
    blocks_product("matmul_q4_0", FMT_0, blocks, &x[0, 0], x.shape[0], x.shape[1], &out[0, 0],
                   out.shape[0], out.shape[1], num_threads, float_act)


def matvec_q4_1(const uint8_t[:, ::1] blocks, const float[::1] x, float[::1] out,
                int num_threads=1, bint float_act=False):
    """out = W @ x, W GGUF Q4_1 blocks.

    blocks : IN (N, K/32*20) uint8: per row K/32 blocks of (f16 d, f16 m, 16 bytes of nibbles)
    x : IN (K,) float32; out : OUT (N,) float32, must not alias x
    float_act : float activations instead of int8-quantized ones
    """
    blocks_product("matvec_q4_1", FMT_1, blocks, &x[0], 1, x.shape[0], &out[0], 1, out.shape[0],
                   num_threads, float_act)


def matmul_q4_1(const uint8_t[:, ::1] blocks, const float[:, ::1] x, float[:, ::1] out,
                int num_threads=1, bint float_act=False):
    """out = x @ W.T, W GGUF Q4_1 blocks; x (T, K), out (T, N). Rows equal matvec_q4_1's."""
    blocks_product("matmul_q4_1", FMT_1, blocks, &x[0, 0], x.shape[0], x.shape[1], &out[0, 0],
                   out.shape[0], out.shape[1], num_threads, float_act)


# the *_many matvecs: at most this many matrices per call (a layer's q, k, v)
cdef int MANY_MAX = 4


cdef int8_many(int fmt, long nm, const uint8_t **wp, const uint16_t **scp, const int8_t **zpp,
               const long *nrow, long K, long G, const int32_t *perm, const float *x,
               float **op, int num_threads, long S=1):
    """op[m] = W_m x for nm matrices of one format, K, G and S column slices (validated by the
    caller, K > 0, some rows): x prepared once (int8 activations, gathered by perm), one thread
    team, each thread its share of every matrix (the shares of rows_par: the same bits as one
    call each)."""
    cdef long Ks = K // S, abs_ = q4_act_bytes(K // S, G), sf = 0, total = 0, m, b, r0, r1
    cdef long to[4]
    for m in range(nm):
        to[m] = total
        total += nrow[m]
    cdef int nt = team(total, total * K, num_threads)
    cdef bint steal = pecca_steals(total * S * row_bytes(fmt, Ks, G), nt, STEAL_MIN_BYTES)
    cdef uint8_t *act = <uint8_t *>pecca_alloc_lines(S * abs_)
    cdef float *scratch = q4_thread_scratch(nt, G, &sf)
    cdef float *work = <float *>pecca_alloc_lines(K * sizeof(float)) if perm != NULL else NULL
    cdef float *tmp = NULL
    cdef pecca_span *sp = NULL
    if S > 1:  # stealing: every slice after the first its own row of sums
        tmp = <float *>pecca_alloc_lines((S - 1 if steal else 1) * total * sizeof(float))
    if steal:
        sp = <pecca_span *>pecca_alloc_lines(nt * sizeof(pecca_span))
    if (act == NULL or scratch == NULL or (perm != NULL and work == NULL) or (S > 1 and tmp == NULL)
            or (steal and sp == NULL)):
        pecca_free_lines(act)
        pecca_free_lines(scratch)
        pecca_free_lines(work)
        pecca_free_lines(tmp)
        pecca_free_lines(sp)
        raise MemoryError("q4: no memory for the prepared activations")
    try:
        with nogil:
            prepare_slices(fmt, False, x, perm, work, act, abs_, K, S, G)
            if steal:
                steal_par(fmt, nm, S, wp, scp, zpp, nrow, Ks, G, act, abs_, op, tmp, total, to,
                          sp, nt, scratch, sf)
            elif nt <= 1:
                for m in range(nm):
                    if nrow[m] > 0:
                        slice_rows(fmt, False, wp[m], scp[m], zpp[m], Ks, G, S, act, abs_,
                                   S * abs_, 1, op[m], tmp + to[m] if tmp != NULL else NULL,
                                   nrow[m], 0, nrow[m], scratch)
            else:
                for b in prange(nt, schedule='static', num_threads=nt):
                    for m in range(nm):
                        r0 = pecca_quad_share(nrow[m], b, nt)
                        r1 = pecca_quad_share(nrow[m], b + 1, nt)
                        if r1 > r0:
                            slice_rows(fmt, False, wp[m], scp[m], zpp[m], Ks, G, S, act, abs_,
                                       S * abs_, 1, op[m], tmp + to[m] if tmp != NULL else NULL,
                                       nrow[m], r0, r1, scratch + b * sf)
    finally:
        pecca_free_lines(act)
        pecca_free_lines(scratch)
        pecca_free_lines(work)
        pecca_free_lines(tmp)
        pecca_free_lines(sp)


cdef long check_many(str name, long nm, long nouts) except -1:
    if nm < 1 or nm > MANY_MAX or nouts != nm:
        raise ValueError(f"{name}: 1 to {MANY_MAX} matrices and as many outputs; got {nm} and "
                         f"{nouts}")
    return nm


cdef blocks_many(str name, int fmt, ws, const float[::1] x, outs, int num_threads):
    """outs[i] = ws[i] @ x, Q4_0 / Q4_1 blocks, int8 activations prepared once."""
    cdef long bb = 18 if fmt == FMT_0 else 20
    cdef long nm = check_many(name, len(ws), len(outs)), K = x.shape[0], total = 0, m
    cdef const uint8_t *wp[4]
    cdef const uint16_t *scp[4]
    cdef const int8_t *zpp[4]
    cdef float *op[4]
    cdef long nrow[4]
    cdef const uint8_t[:, ::1] w
    cdef float[::1] o
    for m in range(nm):
        w, o = ws[m], outs[m]
        if check_q4_blocks(name, w, bb) != K or o.shape[0] != w.shape[0]:
            raise ValueError(f"{name}: matrix {m} is {w.shape[0]}x{w.shape[1] // bb * 32} "
                             f"({FORMAT_NAMES[fmt]}), x has {K}, out has {o.shape[0]}")
        nrow[m] = w.shape[0]
        wp[m] = &w[0, 0] if nrow[m] > 0 else NULL
        scp[m] = NULL
        zpp[m] = NULL
        op[m] = &o[0] if nrow[m] > 0 else NULL
        total += nrow[m]
        if K == 0 and nrow[m] > 0:
            o[:] = 0
    if total == 0 or K == 0:
        return
    int8_many(fmt, nm, wp, scp, zpp, nrow, K, 1, NULL, &x[0], op, num_threads)


def matvec_q4_0_many(ws, const float[::1] x, outs, int num_threads=1):
    """outs[i] = ws[i] @ x for 1..4 Q4_0 matrices with the same input (a layer's q, k and v
    products, or its gate and up): x is prepared once (int8 activations) and one thread team
    computes them all, each thread its share of every matrix. Each outs[i] equals
    matvec_q4_0(ws[i], x, outs[i]) bit for bit."""
    blocks_many("matvec_q4_0_many", FMT_0, ws, x, outs, num_threads)


def matvec_q4_1_many(ws, const float[::1] x, outs, int num_threads=1):
    """As matvec_q4_0_many, for Q4_1 matrices."""
    blocks_many("matvec_q4_1_many", FMT_1, ws, x, outs, num_threads)


def matvec_q4g_many(qss, scales_bits, zeross, const int32_t[::1] perm, const float[::1] x, outs,
                    int num_threads=1, long slices=1, bint quads=False):
    """outs[i] = W_i @ x for 1..4 q4g matrices with the same input, the same groups per row
    (a multiple of 32 inputs each), the same perm (None / empty for none) and the same column
    slices: a layer's q, k and v, or its gate and up, of a GPTQ act-order checkpoint, whose input
    order comes from the shared input's statistics. x is prepared once (int8 activations) and one
    thread team computes them all. Each outs[i] equals matvec_q4g(qss[i], ...) bit for bit."""
    name = "matvec_q4g_many"
    cdef long nm = check_many(name, len(qss), len(outs)), K = x.shape[0], G = 0, g, total = 0, m
    if len(scales_bits) != nm or len(zeross) != nm:
        raise ValueError(f"{name}: {nm} qs, {len(scales_bits)} scales and {len(zeross)} zeros")
    cdef const uint8_t *wp[4]
    cdef const uint16_t *scp[4]
    cdef const int8_t *zpp[4]
    cdef float *op[4]
    cdef long nrow[4]
    cdef const uint8_t[:, ::1] qs
    cdef const uint16_t[:, ::1] sc
    cdef const int8_t[:, ::1] zp
    cdef float[::1] o
    for m in range(nm):
        qs, sc, zp, o = qss[m], scales_bits[m], zeross[m], outs[m]
        g = check_q4g(name, qs, sc, zp, None, slices, quads)
        if 2 * qs.shape[1] * slices != K or o.shape[0] * slices != qs.shape[0] or (m > 0 and g != G):
            raise ValueError(f"{name}: matrix {m} is {qs.shape[0] // slices}x"
                             f"{2 * qs.shape[1] * slices} with {g} groups per slice, x has {K}, "
                             f"out has {o.shape[0]}, matrix 0 has {G} groups")
        G = g
        nrow[m] = qs.shape[0] // slices
        wp[m] = &qs[0, 0] if nrow[m] > 0 else NULL
        scp[m] = &sc[0, 0] if nrow[m] > 0 else NULL
        zpp[m] = &zp[0, 0] if nrow[m] > 0 else NULL
        op[m] = &o[0] if nrow[m] > 0 else NULL
        total += nrow[m]
    if K > 0 and (K // slices // G) % 32 != 0:
        raise ValueError(f"{name}: groups of {K // slices // G} inputs; the int8 path needs "
                         f"multiples of 32")
    check_index(name, "perm", perm, K, K)
    if total == 0:
        return
    if K == 0:
        for m in range(nm):
            outs[m][:] = 0
        return
    int8_many(FMT_G | (FMT_QUADS if quads else 0), nm, wp, scp, zpp, nrow, K, G, index_ptr(perm),
              &x[0], op, num_threads, slices)


cdef gptq_product(str name, const int32_t[:, ::1] qweight, const int32_t[:, ::1] qzeros,
                  uint32_t zero_add, const uint16_t[:, ::1] scales, const int32_t[::1] g_idx,
                  const int32_t[::1] out_perm, const float *xp, long T, long xk, float *o,
                  long oT, long oN, int num_threads):
    """x (T, xk), out (oT, oN) as pointers and shapes (matvec: T = oT = 1)."""
    cdef long K = 8 * qweight.shape[0], N = qweight.shape[1], G = scales.shape[0]
    cdef long units = N // 8, accf, b, u0, u1, t, i
    if N % 8 != 0:
        raise ValueError(f"{name}: N = {N} output columns is not a multiple of 8")
    if scales.shape[1] != N:
        raise ValueError(f"{name}: qweight has {N} columns but scales has {scales.shape[1]}")
    if qzeros.shape[0] != G or qzeros.shape[1] != N // 8:
        raise ValueError(f"{name}: qzeros is {qzeros.shape[0]}x{qzeros.shape[1]}, expected "
                         f"{G}x{N // 8} (G x N/8)")
    if g_idx is None or g_idx.shape[0] != K:
        raise ValueError(f"{name}: g_idx needs {K} entries (K), got "
                         f"{'none' if g_idx is None else g_idx.shape[0]}")
    check_index(name, "g_idx", g_idx, K, G)
    check_index(name, "out_perm", out_perm, N, N)
    if xk != K or oT != T or oN != N:
        raise ValueError(f"{name}: W is {N}x{K}, x is {T}x{xk}, out is {oT}x{oN}")
    if N == 0 or T == 0:
        return
    if K == 0:
        for i in range(T * N):
            o[i] = 0
        return
    cdef const int32_t *op = index_ptr(out_perm)
    cdef int nt = num_threads
    if nt <= 1 or N * K * T < PARALLEL_MIN_WEIGHTS or units < 2 * nt:
        nt = 1
    accf = gptq_acc_floats(G)
    cdef float *xsum = <float *>pecca_alloc_lines(T * G * sizeof(float))
    cdef float *xsc = <float *>pecca_alloc_lines(T * K * sizeof(float))
    cdef float *acc = <float *>pecca_alloc_lines(nt * accf * sizeof(float))
    cdef float *y = o
    cdef float *tmp = NULL
    if op != NULL:
        tmp = <float *>pecca_alloc_lines(T * N * sizeof(float))
        y = tmp
    if xsum == NULL or xsc == NULL or acc == NULL or (op != NULL and tmp == NULL):
        pecca_free_lines(xsum)
        pecca_free_lines(xsc)
        pecca_free_lines(acc)
        pecca_free_lines(tmp)
        raise MemoryError(f"{name}: no memory for the scratch")
    cdef const uint32_t *qw = <const uint32_t *>&qweight[0, 0]
    cdef const uint32_t *qz = <const uint32_t *>&qzeros[0, 0]
    try:
        with nogil:
            for t in range(T):
                gptq_prepare(xp + t * K, &g_idx[0], xsum + t * G, xsc + t * K, K, G)
            if nt <= 1:
                gptq_cols(qw, qz, zero_add, &scales[0, 0], &g_idx[0], K, N, G, xp, xsum, xsc, T,
                          y, N, 0, units, acc)
            else:
                for b in prange(nt, schedule='static', num_threads=nt):
                    u0 = units * b // nt
                    u1 = units * (b + 1) // nt
                    gptq_cols(qw, qz, zero_add, &scales[0, 0], &g_idx[0], K, N, G, xp, xsum, xsc,
                              T, y, N, u0, u1, acc + b * accf)
            if op != NULL:
                for t in range(T):
                    for i in range(N):
                        o[t * N + i] = y[t * N + op[i]]
    finally:
        pecca_free_lines(xsum)
        pecca_free_lines(xsc)
        pecca_free_lines(acc)
        pecca_free_lines(tmp)


def matvec_gptq(const int32_t[:, ::1] qweight, const int32_t[:, ::1] qzeros, uint32_t zero_add,
                const uint16_t[:, ::1] scales_bits, const int32_t[::1] g_idx,
                const int32_t[::1] out_perm, const float[::1] x, float[::1] out,
                int num_threads=1):
    """out = W @ x, W in the native GPTQ layout (module docstring), float activations.

    qweight : IN (K/8, N) int32 packed codes
    qzeros : IN (G, N/8) int32 packed zero words; zero_add : 0x11111111 (v1) or 0 (gptq_v2)
    scales_bits : IN (G, N) uint16, the f16 scales' bit patterns
    g_idx : IN (K,) int32 group of each input, in [0, G) (any order)
    out_perm : IN (N,) int32 or empty / None: out[i] = y[out_perm[i]]
    x : IN (K,) float32; out : OUT (N,) float32, must not alias x
    """
    gptq_product("matvec_gptq", qweight, qzeros, zero_add, scales_bits, g_idx, out_perm,
                 &x[0], 1, x.shape[0], &out[0], 1, out.shape[0], num_threads)


def matmul_gptq(const int32_t[:, ::1] qweight, const int32_t[:, ::1] qzeros, uint32_t zero_add,
                const uint16_t[:, ::1] scales_bits, const int32_t[::1] g_idx,
                const int32_t[::1] out_perm, const float[:, ::1] x, float[:, ::1] out,
                int num_threads=1):
    """out = x @ W.T for x (T, K), out (T, N); the rest as matvec_gptq. Rows equal matvec's."""
    gptq_product("matmul_gptq", qweight, qzeros, zero_add, scales_bits, g_idx, out_perm,
                 &x[0, 0], x.shape[0], x.shape[1], &out[0, 0], out.shape[0], out.shape[1],
                 num_threads)


def _steal_settings(long min_bytes=-1, long chunk_bytes=-1):
    """(STEAL_MIN_BYTES, STEAL_CHUNK_BYTES) before the call; sets them where >= 0 (tests force
    work stealing on small matrices, in small chunks, with this)."""
    global STEAL_MIN_BYTES, STEAL_CHUNK_BYTES
    old = (STEAL_MIN_BYTES, STEAL_CHUNK_BYTES)
    if min_bytes >= 0:
        STEAL_MIN_BYTES = min_bytes
    if chunk_bytes >= 0:
        STEAL_CHUNK_BYTES = chunk_bytes
    return old


def _steal_claims(long units, int nt, long chunk, ids):
    """The claims (id, u0, u1) that work stealing (simd.h) hands out over `units` quads shared by
    nt threads when the threads ask one after another in the order `ids`, each until it gets
    nothing: its scheduling without threads or timing, for tests."""
    cdef pecca_span *sp = <pecca_span *>pecca_alloc_lines(nt * sizeof(pecca_span))
    cdef long u0, u1
    cdef int i
    if sp == NULL:
        raise MemoryError("q4: no memory for the thread spans")
    claims = []
    try:
        pecca_steal_init(sp, units, nt)
        for i in ids:
            if not 0 <= i < nt:
                raise ValueError(f"thread id {i} outside 0..{nt - 1}")
            while pecca_steal_next(sp, i, nt, chunk, &u0, &u1):
                claims.append((i, u0, u1))
    finally:
        pecca_free_lines(sp)
    return claims


def _reset_simd():
    """Re-read PECCA_SIMD in this module (each extension keeps its own choice)."""
    pecca_simd_reset()
