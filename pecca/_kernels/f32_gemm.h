/* f32 matrix-matrix product for prefill: out[t, r] = sum_j w[r, j] * x[t, j] for a range of
 * weight rows [r0, r1) and all T tokens. w: (rows, n), x: (T, n), out: (T, ldo), row-major.
 *
 * Processing the prompt's tokens together turns prefill from memory-bound (every weight read
 * once per token) into compute-bound (read once per batch). A block of 4 weight rows stays in
 * L1/L2 while it meets every token; the register tile is 4 rows x 4 tokens (AVX-512, 16
 * accumulators) or 4 rows x 2 tokens (AVX2, 8 accumulators), so each loaded vector feeds
 * 2-4 multiply-adds. Leftover rows and tokens use the dot product.
 */
#ifndef PECCA_F32_GEMM_H
#define PECCA_F32_GEMM_H

#include "f32_kernels.h"

static void gemm_rows_portable(const float *w, const float *x, float *out, long n, long T,
                               long ldo, long r0, long r1) {
    for (long r = r0; r < r1; r++)
        for (long t = 0; t < T; t++) out[t * ldo + r] = dot_portable(w + r * n, x + t * n, n);
}

#if PECCA_X86
__attribute__((target("avx2,fma")))
static void gemm_rows_avx2(const float *w, const float *x, float *out, long n, long T,
                           long ldo, long r0, long r1) {
    long n8 = n & ~7L;
    __m256i m = tail_mask256(n - n8);
    long r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = w + r * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        long t = 0;
        for (; t + 2 <= T; t += 2) {
            const float *x0 = x + t * n, *x1 = x0 + n;
            __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps();
            __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps();
            __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps();
            __m256 a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
            long j = 0;
            for (; j <= n; j += 8) {
                __m256 v0, v1, b0, b1, b2, b3;
                if (j < n8) {
                    v0 = _mm256_loadu_ps(x0 + j); v1 = _mm256_loadu_ps(x1 + j);
                    b0 = _mm256_loadu_ps(w0 + j); b1 = _mm256_loadu_ps(w1 + j);
                    b2 = _mm256_loadu_ps(w2 + j); b3 = _mm256_loadu_ps(w3 + j);
                } else if (j < n) {
                    v0 = _mm256_maskload_ps(x0 + j, m); v1 = _mm256_maskload_ps(x1 + j, m);
                    b0 = _mm256_maskload_ps(w0 + j, m); b1 = _mm256_maskload_ps(w1 + j, m);
                    b2 = _mm256_maskload_ps(w2 + j, m); b3 = _mm256_maskload_ps(w3 + j, m);
                } else {
                    break;
                }
                a00 = _mm256_fmadd_ps(b0, v0, a00); a01 = _mm256_fmadd_ps(b0, v1, a01);
                a10 = _mm256_fmadd_ps(b1, v0, a10); a11 = _mm256_fmadd_ps(b1, v1, a11);
                a20 = _mm256_fmadd_ps(b2, v0, a20); a21 = _mm256_fmadd_ps(b2, v1, a21);
                a30 = _mm256_fmadd_ps(b3, v0, a30); a31 = _mm256_fmadd_ps(b3, v1, a31);
            }
            float *o0 = out + t * ldo + r, *o1 = o0 + ldo;
            o0[0] = hsum256(a00); o0[1] = hsum256(a10); o0[2] = hsum256(a20); o0[3] = hsum256(a30);
            o1[0] = hsum256(a01); o1[1] = hsum256(a11); o1[2] = hsum256(a21); o1[3] = hsum256(a31);
        }
        for (; t < T; t++) matvec_rows_avx2(w, x + t * n, out + t * ldo, n, r, r + 4);
    }
    for (; r < r1; r++)
        for (long t = 0; t < T; t++) out[t * ldo + r] = dot_avx2(w + r * n, x + t * n, n);
}

#define GEMM512_FMA4(J, LOAD)                                                                  \
    {                                                                                          \
        __m512 b0 = LOAD(w0 + J), b1 = LOAD(w1 + J), b2 = LOAD(w2 + J), b3 = LOAD(w3 + J);     \
        __m512 v;                                                                              \
        v = LOAD(x0 + J);                                                                      \
        a00 = _mm512_fmadd_ps(b0, v, a00); a10 = _mm512_fmadd_ps(b1, v, a10);                  \
        a20 = _mm512_fmadd_ps(b2, v, a20); a30 = _mm512_fmadd_ps(b3, v, a30);                  \
        v = LOAD(x1 + J);                                                                      \
        a01 = _mm512_fmadd_ps(b0, v, a01); a11 = _mm512_fmadd_ps(b1, v, a11);                  \
        a21 = _mm512_fmadd_ps(b2, v, a21); a31 = _mm512_fmadd_ps(b3, v, a31);                  \
        v = LOAD(x2 + J);                                                                      \
        a02 = _mm512_fmadd_ps(b0, v, a02); a12 = _mm512_fmadd_ps(b1, v, a12);                  \
        a22 = _mm512_fmadd_ps(b2, v, a22); a32 = _mm512_fmadd_ps(b3, v, a32);                  \
        v = LOAD(x3 + J);                                                                      \
        a03 = _mm512_fmadd_ps(b0, v, a03); a13 = _mm512_fmadd_ps(b1, v, a13);                  \
        a23 = _mm512_fmadd_ps(b2, v, a23); a33 = _mm512_fmadd_ps(b3, v, a33);                  \
    }

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void gemm_rows_avx512(const float *w, const float *x, float *out, long n, long T,
                             long ldo, long r0, long r1) {
    long n16 = n & ~15L;
    __mmask16 m = (__mmask16)((1u << (n - n16)) - 1u);
#define LOADU(p) _mm512_loadu_ps(p)
#define LOADM(p) _mm512_maskz_loadu_ps(m, p)
    long r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = w + r * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        long t = 0;
        for (; t + 4 <= T; t += 4) {
            const float *x0 = x + t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
            __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps(), a02 = _mm512_setzero_ps(), a03 = _mm512_setzero_ps();
            __m512 a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps(), a12 = _mm512_setzero_ps(), a13 = _mm512_setzero_ps();
            __m512 a20 = _mm512_setzero_ps(), a21 = _mm512_setzero_ps(), a22 = _mm512_setzero_ps(), a23 = _mm512_setzero_ps();
            __m512 a30 = _mm512_setzero_ps(), a31 = _mm512_setzero_ps(), a32 = _mm512_setzero_ps(), a33 = _mm512_setzero_ps();
            long j = 0;
            for (; j < n16; j += 16) GEMM512_FMA4(j, LOADU)
            if (j < n) GEMM512_FMA4(j, LOADM)
            float *o = out + t * ldo + r;
            o[0] = _mm512_reduce_add_ps(a00); o[1] = _mm512_reduce_add_ps(a10);
            o[2] = _mm512_reduce_add_ps(a20); o[3] = _mm512_reduce_add_ps(a30);
            o += ldo;
            o[0] = _mm512_reduce_add_ps(a01); o[1] = _mm512_reduce_add_ps(a11);
            o[2] = _mm512_reduce_add_ps(a21); o[3] = _mm512_reduce_add_ps(a31);
            o += ldo;
            o[0] = _mm512_reduce_add_ps(a02); o[1] = _mm512_reduce_add_ps(a12);
            o[2] = _mm512_reduce_add_ps(a22); o[3] = _mm512_reduce_add_ps(a32);
            o += ldo;
            o[0] = _mm512_reduce_add_ps(a03); o[1] = _mm512_reduce_add_ps(a13);
            o[2] = _mm512_reduce_add_ps(a23); o[3] = _mm512_reduce_add_ps(a33);
        }
        for (; t < T; t++) matvec_rows_avx512(w, x + t * n, out + t * ldo, n, r, r + 4);
    }
#undef LOADU
#undef LOADM
    for (; r < r1; r++)
        for (long t = 0; t < T; t++) out[t * ldo + r] = dot_avx512(w + r * n, x + t * n, n);
}
#endif /* PECCA_X86 */

static void gemm_f32_rows(const float *w, const float *x, float *out, long n, long T,
                          long ldo, long r0, long r1) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { gemm_rows_avx512(w, x, out, n, T, ldo, r0, r1); return; }
    if (level == PECCA_SIMD_AVX2) { gemm_rows_avx2(w, x, out, n, T, ldo, r0, r1); return; }
#endif
    gemm_rows_portable(w, x, out, n, T, ldo, r0, r1);
}

#endif
