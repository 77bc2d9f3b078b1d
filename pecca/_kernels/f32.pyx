# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""f32 matrix-vector product.

Notes
-----
By far the most time of a decode step is spent here (llama2.c says the same of its matmul).
Rows are split into one contiguous block per thread (``schedule='static'``), each a multiple
of 4 rows so the SIMD kernel's 4-row blocking stays intact; each thread streams its own slab
of the weight matrix. Small products run serially: waking a thread team costs more than it
saves below a few tens of thousands of multiply-adds.
"""
from cython.parallel cimport prange
from pecca._kernels.kernels cimport (pecca_simd_reset, pecca_quad_share, matvec_f32_rows,
                                     gemm_f32_rows)

# below this many weights a product runs on one thread
cdef long PARALLEL_MIN_WEIGHTS = 32768


cdef void matvec_ptr(const float *w, const float *x, float *out, long rows, long n,
                     int num_threads) noexcept nogil:
    cdef long b, r0, r1
    cdef int nt = num_threads
    if nt <= 1 or rows * n < PARALLEL_MIN_WEIGHTS or rows < 8 * nt:
        matvec_f32_rows(w, x, out, n, 0, rows)
        return
    for b in prange(nt, schedule='static', num_threads=nt):
        r0 = pecca_quad_share(rows, b, nt)
        r1 = pecca_quad_share(rows, b + 1, nt)
        matvec_f32_rows(w, x, out, n, r0, r1)


def matvec(const float[:, ::1] w, const float[::1] x, float[::1] out, int num_threads=1):
    """out = w @ x.

    w : IN (rows, n) float32, C-contiguous (may be a read-only memmap)
    x : IN (n,) float32
    out : OUT (rows,) float32, must not alias x
    """
    cdef long rows = w.shape[0], n = w.shape[1]
    if x.shape[0] != n or out.shape[0] != rows:
        raise ValueError(f"matvec: w is {rows}x{n}, x has {x.shape[0]}, out has {out.shape[0]}")
    if rows == 0:
        return
    if n == 0:
        out[:] = 0
        return
    with nogil:
        matvec_ptr(&w[0, 0], &x[0], &out[0], rows, n, num_threads)



def matmul(const float[:, ::1] w, const float[:, ::1] x, float[:, ::1] out, int num_threads=1):
    """out = x @ w.T: the products of all T tokens of a batch with one weight matrix.

    w : IN (rows, n) float32, C-contiguous (may be a read-only memmap)
    x : IN (T, n) float32, one token per row
    out : OUT (T, rows) float32, must not alias x
    Rows of w are split into one contiguous block per thread (multiples of 4); each block
    meets every token while it is in cache.
    """
    cdef long rows = w.shape[0], n = w.shape[1], T = x.shape[0], b, r0, r1
    if x.shape[1] != n or out.shape[0] != T or out.shape[1] != rows:
        raise ValueError(f"matmul: w is {rows}x{n}, x is {T}x{x.shape[1]}, "
                         f"out is {out.shape[0]}x{out.shape[1]}")
    if rows == 0 or T == 0:
        return
    if n == 0:
        out[:, :] = 0
        return
    cdef const float *wp = &w[0, 0]
    cdef const float *xp = &x[0, 0]
    cdef float *op = &out[0, 0]
    cdef int nt = num_threads if num_threads > 1 and rows >= 8 * num_threads else 1
    with nogil:
        if nt == 1:
            gemm_f32_rows(wp, xp, op, n, T, rows, 0, rows)
        else:
            for b in prange(nt, schedule='static', num_threads=nt):
                r0 = pecca_quad_share(rows, b, nt)
                r1 = pecca_quad_share(rows, b + 1, nt)
                gemm_f32_rows(wp, xp, op, n, T, rows, r0, r1)

def _reset_simd():
    """Re-read PECCA_SIMD in this module (each extension keeps its own choice)."""
    pecca_simd_reset()
