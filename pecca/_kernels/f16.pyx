# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Matrix-vector and matrix-matrix products with 16-bit weights: IEEE half (f16) or bfloat16
(bf16), given as uint16 bit patterns; activations and outputs float32.

Notes
-----
numpy has no bfloat16, so both formats arrive as uint16 arrays (an f16 array is passed as
``w.view(np.uint16)``). The weights are widened to float32 in registers and multiplied in
float32: the decode reads half the bytes of f32 for the same arithmetic.
Work is split as in ``f32``: one contiguous block of rows per thread (``schedule='static'``),
each a multiple of 4 rows so the SIMD kernels' 4-row blocking stays intact; products below
a few tens of thousands of multiply-adds run serially, where waking a thread team costs more
than it saves.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint16_t
from pecca._kernels.kernels cimport (pecca_simd_reset, pecca_quad_share, matvec_f16_rows,
                                     matvec_bf16_rows, gemm_f16_rows, gemm_bf16_rows)

# below this many multiply-adds a product runs on one thread
cdef long PARALLEL_MIN_WEIGHTS = 32768

ctypedef void (*rows_fn)(const uint16_t *w, const float *x, float *out,
                         long n, long r0, long r1) noexcept nogil
ctypedef void (*gemm_fn)(const uint16_t *w, const float *x, float *out, long n, long T,
                         long ldo, long r0, long r1) noexcept nogil


cdef void matvec_ptr(rows_fn kernel, const uint16_t *w, const float *x, float *out, long rows,
                     long n, int num_threads) noexcept nogil:
    cdef long b, r0, r1
    cdef int nt = num_threads
    if nt <= 1 or rows * n < PARALLEL_MIN_WEIGHTS or rows < 8 * nt:
        kernel(w, x, out, n, 0, rows)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        r0 = pecca_quad_share(rows, b, nt)
        r1 = pecca_quad_share(rows, b + 1, nt)
        kernel(w, x, out, n, r0, r1)


cdef void matmul_ptr(gemm_fn kernel, const uint16_t *w, const float *x, float *out, long rows,
                     long n, long T, int num_threads) noexcept nogil:
    cdef long b, r0, r1
    cdef int nt = num_threads
    if nt <= 1 or rows * n * T < PARALLEL_MIN_WEIGHTS or rows < 8 * nt:
        kernel(w, x, out, n, T, rows, 0, rows)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        r0 = pecca_quad_share(rows, b, nt)
        r1 = pecca_quad_share(rows, b + 1, nt)
        kernel(w, x, out, n, T, rows, r0, r1)


cdef _matvec(str name, rows_fn kernel, const uint16_t[:, ::1] w, const float[::1] x,
             float[::1] out, int num_threads):
    cdef long rows = w.shape[0], n = w.shape[1]
    if x.shape[0] != n or out.shape[0] != rows:
        raise ValueError(f"{name}: w is {rows}x{n}, x has {x.shape[0]}, out has {out.shape[0]}")
    if rows == 0:
        return
    if n == 0:
        out[:] = 0
        return
    with nogil:
        matvec_ptr(kernel, &w[0, 0], &x[0], &out[0], rows, n, num_threads)


cdef _matmul(str name, gemm_fn kernel, const uint16_t[:, ::1] w, const float[:, ::1] x,
             float[:, ::1] out, int num_threads):
    cdef long rows = w.shape[0], n = w.shape[1], T = x.shape[0]
    if x.shape[1] != n or out.shape[0] != T or out.shape[1] != rows:
        raise ValueError(f"{name}: w is {rows}x{n}, x is {T}x{x.shape[1]}, "
                         f"out is {out.shape[0]}x{out.shape[1]}")
    if rows == 0 or T == 0:
        return
    if n == 0:
        out[:, :] = 0
        return
    with nogil:
        matmul_ptr(kernel, &w[0, 0], &x[0, 0], &out[0, 0], rows, n, T, num_threads)


def matvec_f16(const uint16_t[:, ::1] w, const float[::1] x, float[::1] out, int num_threads=1):
    """out = w @ x, w IEEE half.

    w : IN (rows, n) uint16, f16 bit patterns (``w16.view(np.uint16)``), C-contiguous
        (may be a read-only memmap)
    x : IN (n,) float32
    out : OUT (rows,) float32, must not alias x
    """
    _matvec("matvec_f16", matvec_f16_rows, w, x, out, num_threads)


def matmul_f16(const uint16_t[:, ::1] w, const float[:, ::1] x, float[:, ::1] out,
               int num_threads=1):
    """out = x @ w.T, w IEEE half: the products of all T tokens of a batch with one matrix.

    w : IN (rows, n) uint16, f16 bit patterns, C-contiguous (may be a read-only memmap)
    x : IN (T, n) float32, one token per row
    out : OUT (T, rows) float32, must not alias x
    Rows of w are split into one contiguous block per thread (multiples of 4); each 4-row
    block is widened to float32 once and meets every token while it is in cache.
    """
    _matmul("matmul_f16", gemm_f16_rows, w, x, out, num_threads)


def matvec_bf16(const uint16_t[:, ::1] w, const float[::1] x, float[::1] out, int num_threads=1):
    """out = w @ x, w bfloat16.

    w : IN (rows, n) uint16, bf16 bit patterns (the high half of float32), C-contiguous
        (may be a read-only memmap)
    x : IN (n,) float32
    out : OUT (rows,) float32, must not alias x
    """
    _matvec("matvec_bf16", matvec_bf16_rows, w, x, out, num_threads)


def matmul_bf16(const uint16_t[:, ::1] w, const float[:, ::1] x, float[:, ::1] out,
                int num_threads=1):
    """out = x @ w.T, w bfloat16: the products of all T tokens of a batch with one matrix.

    w : IN (rows, n) uint16, bf16 bit patterns, C-contiguous (may be a read-only memmap)
    x : IN (T, n) float32, one token per row
    out : OUT (T, rows) float32, must not alias x
    Split across threads as matmul_f16.
    """
    _matmul("matmul_bf16", gemm_bf16_rows, w, x, out, num_threads)


def _reset_simd():
    """Re-read PECCA_SIMD in this module (each extension keeps its own choice)."""
    pecca_simd_reset()
