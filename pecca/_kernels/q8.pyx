# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Matrix-vector and matrix-matrix products with int8 weights and int8-quantized activations.

Two layouts, both read in place (memory-mapped):

- ``q8g``: llama2.c version-2 checkpoints (runq.c): int8 ``wq`` (rows, n) plus float32 ``ws``,
  one scale per group of ``gs`` consecutive values of a row.
- ``q8_0``: GGUF Q8_0 (llama.cpp's block_q8_0): each row is n/32 blocks of 34 bytes, an f16
  scale then 32 int8; given as a uint8 array (rows, n/32*34).

Notes
-----
x is quantized once per call (runq.c's ``quantize`` for q8g, llama.cpp's ``quantize_row_q8_0``
for Q8_0) into a scratch buffer allocated per call on cache lines of its own (n + 4n/gs bytes
per token: small next to the weights; per call rather than module-level, so concurrent calls
from several Python threads cannot share it), then every row is an integer dot product per
group times the two scales.
q8g with gs % 32 != 0 runs the portable code on every path; its portable product is runq.c's
matmul step for step (same float operations in the same order), so a q8 checkpoint gives
runq.c's tokens. See q8_kernels.h for the SIMD paths (AVX2 sign trick; AVX512-VNNI).
Work is split as in ``f32``: one contiguous block of rows per thread (``schedule='static'``),
each a multiple of 4 rows so the SIMD kernels' 4-row blocking stays intact; products below a
few tens of thousands of multiply-adds run serially, where waking a thread team costs more
than it saves. Matvecs whose share per thread comes from memory (PECCA_STREAM_BYTES or more)
start from those shares and balance them by work stealing (simd.h): a thread done early takes
the back half of what another has left. Results are the same bits either way.
"""
from cython.parallel cimport prange
from libc.stdint cimport int8_t, uint8_t
import numpy as np
from pecca._kernels.kernels cimport (pecca_simd_reset, pecca_quad_share, pecca_alloc_lines,
                                     pecca_free_lines, pecca_span, pecca_steal_init,
                                     pecca_steal_next, pecca_steals, pecca_quads,
                                     pecca_claimed_rows, PECCA_STREAM_BYTES,
                                     quantize_q8g as c_quantize_q8g,
                                     quantize_q8_0 as c_quantize_q8_0, matvec_q8g_rows,
                                     matvec_q8_0_rows, gemm_q8g_rows, gemm_q8_0_rows,
                                     q8_uses_vnni)

# below this many multiply-adds a product runs on one thread
cdef long PARALLEL_MIN_WEIGHTS = 32768
# Q8_0: values per block, bytes per block (f16 scale + 32 int8)
cdef long QK = 32
cdef long QB = 34
# matvecs of at least this many weight bytes per thread (their shares come from memory) share
# their rows by work stealing (simd.h), claimed at least this many bytes at a time
cdef long STEAL_MIN_BYTES = PECCA_STREAM_BYTES
cdef long STEAL_CHUNK_BYTES = 65536


cdef inline int team(long rows, long work, int num_threads) noexcept nogil:
    if num_threads <= 1 or work < PARALLEL_MIN_WEIGHTS or rows < 8 * num_threads:
        return 1
    return num_threads


cdef void gemm_par(bint q80, const uint8_t *w, const float *ws, const int8_t *xq, const float *xs,
                   float *out, long rows, long n, long gs, long T, int nt) noexcept nogil:
    """out (T, rows) = the T tokens' products, rows in one contiguous share per thread."""
    cdef long b, r0, r1
    if nt <= 1:
        if q80:
            gemm_q8_0_rows(w, xq, xs, out, n, T, rows, 0, rows)
        else:
            gemm_q8g_rows(<const int8_t *>w, ws, xq, xs, out, n, gs, T, rows, 0, rows)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        r0 = pecca_quad_share(rows, b, nt)
        r1 = pecca_quad_share(rows, b + 1, nt)
        if q80:
            gemm_q8_0_rows(w, xq, xs, out, n, T, rows, r0, r1)
        else:
            gemm_q8g_rows(<const int8_t *>w, ws, xq, xs, out, n, gs, T, rows, r0, r1)


cdef inline long row_bytes(bint q80, long n) noexcept nogil:
    return n // QK * QB if q80 else n


cdef inline void mv_rows(bint q80, const uint8_t *w, const float *ws, const int8_t *xq,
                         const float *xs, float *out, long n, long gs, long r0, long r1,
                         long rows, bint stream) noexcept nogil:
    if q80:
        matvec_q8_0_rows(w, xq, xs, out, n, r0, r1, rows, stream)
    else:
        matvec_q8g_rows(<const int8_t *>w, ws, xq, xs, out, n, gs, r0, r1, rows, stream)


cdef pecca_span *steal_spans(long bytes, int nt) except? NULL:
    """Spans for work stealing when a matvec of this many weight bytes shares its rows that way
    (each thread's share from memory); NULL for static shares."""
    if not pecca_steals(bytes, nt, STEAL_MIN_BYTES):
        return NULL
    cdef pecca_span *sp = <pecca_span *>pecca_alloc_lines(nt * sizeof(pecca_span))
    if sp == NULL:
        raise MemoryError("q8: no memory for the thread spans")
    return sp


cdef void steal_part(bint q80, long nm, const uint8_t **wp, const float *ws, const int8_t *xq,
                     const float *xs, float **op, const long *nrow, long n, long gs,
                     pecca_span *sp, long chunk, int id, int nt) noexcept nogil:
    """Thread id's rows of the matvecs, claimed by work stealing; the units are quads of rows,
    matrix after matrix."""
    cdef long u0, u1, base, m, r0, r1
    while pecca_steal_next(sp, id, nt, chunk, &u0, &u1):
        base = 0
        for m in range(nm):
            if pecca_claimed_rows(u0, u1, base, nrow[m], &r0, &r1):
                mv_rows(q80, wp[m], ws, xq, xs, op[m], n, gs, r0, r1, nrow[m], True)
            base += pecca_quads(nrow[m])


cdef void matvec_par(bint q80, long nm, const uint8_t **wp, const float *ws, const int8_t *xq,
                     const float *xs, float **op, const long *nrow, long n, long gs, int nt,
                     pecca_span *sp) noexcept nogil:
    """op[m] = W_m x for nm matrices of n inputs (q8g: nm == 1, scales ws), x quantized into
    xq, xs: on one thread, in static shares of every matrix, or (sp) by work stealing."""
    cdef long rb = row_bytes(q80, n), m, b, r0, r1, units = 0
    cdef long chunk = STEAL_CHUNK_BYTES // (4 * rb)  # at least 1 (simd.h)
    cdef int id
    if sp != NULL:
        for m in range(nm):
            units += pecca_quads(nrow[m])
        pecca_steal_init(sp, units, nt)
        for id in prange(nt, schedule='static', num_threads=nt):
            steal_part(q80, nm, wp, ws, xq, xs, op, nrow, n, gs, sp, chunk, id, nt)
    elif nt <= 1:
        for m in range(nm):
            if nrow[m] > 0:
                mv_rows(q80, wp[m], ws, xq, xs, op[m], n, gs, 0, nrow[m], nrow[m],
                        nrow[m] * rb >= PECCA_STREAM_BYTES)
    else:
        for b in prange(nt, schedule='static', num_threads=nt):
            for m in range(nm):
                r0 = pecca_quad_share(nrow[m], b, nt)
                r1 = pecca_quad_share(nrow[m], b + 1, nt)
                if r1 > r0:
                    mv_rows(q80, wp[m], ws, xq, xs, op[m], n, gs, r0, r1, nrow[m],
                            (r1 - r0) * rb >= PECCA_STREAM_BYTES)


cdef void quantize_tokens(const float *x, int8_t *qx, float *sx, long T, long n, long gs,
                          int nt) noexcept nogil:
    """Quantize T rows of x; gs == 0 means Q8_0 (blocks of 32)."""
    cdef long t, G = n // (gs if gs > 0 else QK)
    if nt <= 1 or T < 2 or T * n < PARALLEL_MIN_WEIGHTS:
        for t in range(T):
            if gs > 0:
                c_quantize_q8g(x + t * n, qx + t * n, sx + t * G, n, gs)
            else:
                c_quantize_q8_0(x + t * n, qx + t * n, sx + t * G, n)
        return
    for t in prange(T, schedule='static', num_threads=nt):
        if gs > 0:
            c_quantize_q8g(x + t * n, qx + t * n, sx + t * G, n, gs)
        else:
            c_quantize_q8_0(x + t * n, qx + t * n, sx + t * G, n)


cdef int alloc_scratch(long T, long n, long G, int8_t **qx, float **sx) except -1:
    qx[0] = <int8_t *>pecca_alloc_lines(T * n if T * n > 0 else 1)
    sx[0] = <float *>pecca_alloc_lines((T * G if T * G > 0 else 1) * sizeof(float))
    if qx[0] == NULL or sx[0] == NULL:
        pecca_free_lines(qx[0])
        pecca_free_lines(sx[0])
        raise MemoryError("q8: no memory for the quantized activations")
    return 0


cdef long check_q8g(str name, const int8_t[:, ::1] wq, const float[::1] ws, int gs) except -1:
    """Validate a q8g matrix; returns n / gs."""
    cdef long rows = wq.shape[0], n = wq.shape[1]
    if gs <= 0:
        raise ValueError(f"{name}: group size must be positive, got {gs}")
    if n % gs != 0:
        raise ValueError(f"{name}: group size {gs} does not divide the row length {n}")
    if ws.shape[0] != rows * (n // gs):
        raise ValueError(f"{name}: w is {rows}x{n} with groups of {gs}, so it needs "
                         f"{rows * (n // gs)} scales; got {ws.shape[0]}")
    return n // gs


cdef long check_q8_0(str name, const uint8_t[:, ::1] w) except -1:
    """Validate a Q8_0 matrix; returns n."""
    if w.shape[1] % QB != 0:
        raise ValueError(f"{name}: a Q8_0 row is a whole number of {QB}-byte blocks; "
                         f"got {w.shape[1]} bytes")
    return w.shape[1] // QB * QK


def matvec_q8g(const int8_t[:, ::1] wq, const float[::1] ws, int gs, const float[::1] x,
               float[::1] out, int num_threads=1):
    """out = W @ x, W int8 in groups of gs (llama2.c version 2): W[r, j] = wq[r, j] * ws[(r*n + j) // gs].

    wq : IN (rows, n) int8, C-contiguous (may be a read-only memmap)
    ws : IN (rows * n / gs,) float32 scales
    gs : IN group size, divides n
    x : IN (n,) float32, quantized per group of gs as runq.c's quantize
    out : OUT (rows,) float32, must not alias x
    """
    cdef long rows = wq.shape[0], n = wq.shape[1]
    cdef long G = check_q8g("matvec_q8g", wq, ws, gs)
    if x.shape[0] != n or out.shape[0] != rows:
        raise ValueError(f"matvec_q8g: w is {rows}x{n}, x has {x.shape[0]}, out has {out.shape[0]}")
    if rows == 0:
        return
    if n == 0:
        out[:] = 0
        return
    cdef int8_t *qx
    cdef float *sx
    cdef int nt = team(rows, rows * n, num_threads)
    cdef pecca_span *sp = steal_spans(rows * n, nt)
    cdef const uint8_t *wp = <const uint8_t *>&wq[0, 0]
    cdef float *op = &out[0]
    try:
        alloc_scratch(1, n, G, &qx, &sx)
    except MemoryError:
        pecca_free_lines(sp)
        raise
    try:
        with nogil:
            c_quantize_q8g(&x[0], qx, sx, n, gs)
            matvec_par(False, 1, &wp, &ws[0], qx, sx, &op, &rows, n, gs, nt, sp)
    finally:
        pecca_free_lines(qx)
        pecca_free_lines(sx)
        pecca_free_lines(sp)


def matmul_q8g(const int8_t[:, ::1] wq, const float[::1] ws, int gs, const float[:, ::1] x,
               float[:, ::1] out, int num_threads=1):
    """out = x @ W.T, W int8 in groups of gs: the products of all T tokens of a batch.

    wq : IN (rows, n) int8, C-contiguous (may be a read-only memmap)
    ws : IN (rows * n / gs,) float32 scales
    gs : IN group size, divides n
    x : IN (T, n) float32, one token per row (each quantized as matvec_q8g does)
    out : OUT (T, rows) float32, must not alias x
    Every token is quantized first; then rows of W are split into one contiguous block per
    thread (multiples of 4), each 4-row block meeting every token while it is in cache. Each
    row of out equals matvec_q8g of that token bit for bit.
    """
    cdef long rows = wq.shape[0], n = wq.shape[1], T = x.shape[0]
    cdef long G = check_q8g("matmul_q8g", wq, ws, gs)
    if x.shape[1] != n or out.shape[0] != T or out.shape[1] != rows:
        raise ValueError(f"matmul_q8g: w is {rows}x{n}, x is {T}x{x.shape[1]}, "
                         f"out is {out.shape[0]}x{out.shape[1]}")
    if rows == 0 or T == 0:
        return
    if n == 0:
        out[:, :] = 0
        return
    cdef int8_t *qx
    cdef float *sx
    alloc_scratch(T, n, G, &qx, &sx)
    cdef int nt = team(rows, rows * n * T, num_threads)
    try:
        with nogil:
            quantize_tokens(&x[0, 0], qx, sx, T, n, gs, num_threads)
            gemm_par(False, <const uint8_t *>&wq[0, 0], &ws[0], qx, sx, &out[0, 0], rows, n, gs,
                     T, nt)
    finally:
        pecca_free_lines(qx)
        pecca_free_lines(sx)


def matvec_q8_0(const uint8_t[:, ::1] w, const float[::1] x, float[::1] out, int num_threads=1):
    """out = W @ x, W GGUF Q8_0 blocks.

    w : IN (rows, n/32*34) uint8: per row n/32 blocks of (f16 scale, 32 int8), C-contiguous
        (may be a read-only memmap)
    x : IN (n,) float32, quantized per block of 32 as llama.cpp's quantize_row_q8_0
    out : OUT (rows,) float32, must not alias x
    """
    cdef long rows = w.shape[0], n = check_q8_0("matvec_q8_0", w)
    if x.shape[0] != n or out.shape[0] != rows:
        raise ValueError(f"matvec_q8_0: w is {rows}x{n} (Q8_0), x has {x.shape[0]}, "
                         f"out has {out.shape[0]}")
    if rows == 0:
        return
    if n == 0:
        out[:] = 0
        return
    cdef const uint8_t *wp = &w[0, 0]
    cdef float *op = &out[0]
    q8_0_matvecs(1, &wp, &op, &rows, &x[0], n, rows, num_threads)


# matvec_q8_0_many: at most this many matrices per call (a layer's q, k, v)
cdef int MANY_MAX = 4


def matvec_q8_0_many(ws, const float[::1] x, outs, int num_threads=1):
    """outs[i] = ws[i] @ x for 1..4 Q8_0 matrices with the same input (a layer's q, k and v
    products, or its gate and up): x is quantized once and one thread team computes them all,
    each thread its share of every matrix. Each outs[i] equals matvec_q8_0(ws[i], x, outs[i])
    bit for bit.

    ws : sequence of (rows_i, n/32*34) uint8 Q8_0 matrices, all with rows of n = x.shape[0]
    outs : sequence of (rows_i,) float32, as many as ws, none aliasing x
    """
    cdef long nm = len(ws), n = x.shape[0], total = 0, m
    if nm < 1 or nm > MANY_MAX or len(outs) != nm:
        raise ValueError(f"matvec_q8_0_many: 1 to {MANY_MAX} matrices and as many outputs; got "
                         f"{nm} and {len(outs)}")
    cdef const uint8_t *wp[4]
    cdef float *op[4]
    cdef long rows[4]
    cdef const uint8_t[:, ::1] w
    cdef float[::1] o
    for m in range(nm):
        w, o = ws[m], outs[m]
        if check_q8_0("matvec_q8_0_many", w) != n or o.shape[0] != w.shape[0]:
            raise ValueError(f"matvec_q8_0_many: matrix {m} is {w.shape[0]}x"
                             f"{w.shape[1] // QB * QK} (Q8_0), x has {n}, out has {o.shape[0]}")
        rows[m] = w.shape[0]
        wp[m] = &w[0, 0] if rows[m] > 0 else NULL
        op[m] = &o[0] if rows[m] > 0 else NULL
        total += rows[m]
        if n == 0 and rows[m] > 0:
            o[:] = 0
    if total == 0 or n == 0:
        return
    q8_0_matvecs(nm, wp, op, rows, &x[0], n, total, num_threads)


cdef int q8_0_matvecs(long nm, const uint8_t **wp, float **op, long *rows, const float *x, long n,
                      long total, int num_threads) except -1:
    """op[m] = W_m x for nm Q8_0 matrices (validated, total rows, n > 0): x quantized once."""
    cdef int8_t *qx
    cdef float *dx
    cdef int nt = team(total, total * n, num_threads)
    cdef pecca_span *sp = steal_spans(total * row_bytes(True, n), nt)
    try:
        alloc_scratch(1, n, n // QK, &qx, &dx)
    except MemoryError:
        pecca_free_lines(sp)
        raise
    try:
        with nogil:
            c_quantize_q8_0(x, qx, dx, n)
            matvec_par(True, nm, wp, NULL, qx, dx, op, rows, n, 0, nt, sp)
    finally:
        pecca_free_lines(qx)
        pecca_free_lines(dx)
        pecca_free_lines(sp)
    return 0


def matmul_q8_0(const uint8_t[:, ::1] w, const float[:, ::1] x, float[:, ::1] out,
                int num_threads=1):
    """out = x @ W.T, W GGUF Q8_0 blocks: the products of all T tokens of a batch.

    w : IN (rows, n/32*34) uint8 Q8_0 blocks, C-contiguous (may be a read-only memmap)
    x : IN (T, n) float32, one token per row
    out : OUT (T, rows) float32, must not alias x
    Split across threads as matmul_q8g; each row of out equals matvec_q8_0 of that token.
    """
    cdef long rows = w.shape[0], n = check_q8_0("matmul_q8_0", w), T = x.shape[0]
    if x.shape[1] != n or out.shape[0] != T or out.shape[1] != rows:
        raise ValueError(f"matmul_q8_0: w is {rows}x{n} (Q8_0), x is {T}x{x.shape[1]}, "
                         f"out is {out.shape[0]}x{out.shape[1]}")
    if rows == 0 or T == 0:
        return
    if n == 0:
        out[:, :] = 0
        return
    cdef int8_t *qx
    cdef float *dx
    alloc_scratch(T, n, n // QK, &qx, &dx)
    cdef int nt = team(rows, rows * n * T, num_threads)
    try:
        with nogil:
            quantize_tokens(&x[0, 0], qx, dx, T, n, 0, num_threads)
            gemm_par(True, &w[0, 0], NULL, qx, dx, &out[0, 0], rows, n, 0, T, nt)
    finally:
        pecca_free_lines(qx)
        pecca_free_lines(dx)


def quantize_q8g(const float[::1] x, int gs):
    """runq.c's quantize: (q, scales) of x.

    x : IN (n,) float32
    gs : IN group size, divides n
    Returns q (n,) int8 and scales (n / gs,) float32: scale = max|x| / 127 per group,
    q = round(x / scale) (half away from zero), q = 0 where scale == 0.
    """
    cdef long n = x.shape[0]
    if gs <= 0 or n % gs != 0:
        raise ValueError(f"quantize_q8g: group size {gs} must be positive and divide {n}")
    q = np.zeros(n, np.int8)
    s = np.zeros(n // gs, np.float32)
    cdef int8_t[::1] qv = q
    cdef float[::1] sv = s
    if n > 0:
        c_quantize_q8g(&x[0], &qv[0], &sv[0], n, gs)
    return q, s


def quantize_q8_0(const float[::1] x):
    """llama.cpp's quantize_row_q8_0, scales kept float32: (q, d) of x.

    x : IN (n,) float32, n % 32 == 0
    Returns q (n,) int8 and d (n / 32,) float32: d = max|x| / 127 per block of 32,
    q = roundf(x * (1 / d)) (0 where d == 0).
    """
    cdef long n = x.shape[0]
    if n % QK != 0:
        raise ValueError(f"quantize_q8_0: length {n} is not a multiple of {QK}")
    q = np.zeros(n, np.int8)
    d = np.zeros(n // QK, np.float32)
    cdef int8_t[::1] qv = q
    cdef float[::1] dv = d
    if n > 0:
        c_quantize_q8_0(&x[0], &qv[0], &dv[0], n)
    return q, d


def uses_vnni():
    """True when the int8 products run on AVX512-VNNI now (CPU has it, SIMD path avx512)."""
    return bool(q8_uses_vnni())


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


def _reset_simd():
    """Re-read PECCA_SIMD in this module (each extension keeps its own choice)."""
    pecca_simd_reset()
