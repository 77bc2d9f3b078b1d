/* f32 kernels: dot product, matrix-vector product over a range of rows, softmax, SwiGLU
 * (attention, built on these, is in attention.h). Each comes in a portable version and AVX2+FMA / AVX-512 versions, picked by
 * pecca_simd_level() (simd.h). The Cython callers split work across OpenMP threads; these
 * functions are serial and touch only their own output rows.
 *
 * Summation order differs from a naive loop (several accumulators), so results match a
 * float64 reference to ~1e-6 relative, not bit-for-bit.
 */
#ifndef PECCA_F32_KERNELS_H
#define PECCA_F32_KERNELS_H

#include <math.h>
#include <string.h>
#include "simd.h"

/* ---------------- portable ---------------- */

static inline float dot_portable(const float *a, const float *b, long n) {
    /* eight independent partial sums: lets the compiler vectorise with SSE2 without
     * -ffast-math, and keeps the rounding independent of the vector width. */
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) acc[k] += a[j + k] * b[j + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

static void matvec_rows_portable(const float *w, const float *x, float *out,
                                 long n, long r0, long r1) {
    for (long i = r0; i < r1; i++) out[i] = dot_portable(w + i * n, x, n);
}

static void axpy_portable(float *y, float a, const float *x, long n) {
    for (long j = 0; j < n; j++) y[j] += a * x[j];
}

/* Blocks of four rows are read as four interleaved streams, which the hardware prefetcher
 * picks up late at each block and each 4 KiB page; fetching the next block linearly while
 * this one is computed keeps the memory busy (+3-5% at stories110M sizes, measured). Into L2
 * only (prefetcht1): on AMD Zen 4 (32 KB L1) rows fetched into L1 a few KB ahead evicted what
 * the kernel was about to read, and every matvec from memory lost to it at 1 thread (f32 21
 * against 27.6 GB/s, f16 17.5 against 24.3, the 4-bit one 60% of that; session 12). */
static inline void prefetch_lines(const char *p, int lines) {
    for (int k = 0; k < lines; k++) __builtin_prefetch(p + 64 * k, 0, 2);
}

/* How many blocks of `block_bytes` ahead the prefetches run: at least PECCA_PF_AHEAD bytes.
 * One 4-row block ahead is 64 KB at n = 4096 but 4.6 KB at n = 288 (stories15M's classifier,
 * 32000 x 288 f32), too close to hide the memory's latency: 15.7 GB/s against 26 for long rows
 * (Zen 4, 1 thread); 16 / 48 KB ahead: 19.7 / 19.5 GB/s. Shares of PECCA_STREAM_BYTES or more
 * with rows under F32_STREAM_MAX_N floats are read one row at a time instead (AVX-512: one
 * stream; 48 KB ahead 22.3 GB/s at 1 thread and 33.3 at 2 against the blocks' 19.5 / 28-30,
 * 16 KB ahead 21 / 31). */
#ifndef PECCA_PF_AHEAD
#define PECCA_PF_AHEAD 49152L
#endif
#ifndef F32_STREAM_MAX_N
#define F32_STREAM_MAX_N 1024
#endif
/* The AVX2 and AVX-512 matvecs ask for each line of the rows ahead this many times (the lines
 * and as many more beyond): Zen 4, 1 thread, from memory, 768 x 288 f32 16-18 -> 19-21 GB/s,
 * 288 x 288 14-16 -> 16-18, 32000 x 288 (row stream) 19 -> 20-21, 4096 x 4096 equal or better;
 * 2 threads within noise; stories15M F32 decode +15% at 1 thread (AVX2 path, PECCA_SIMD=avx2 on
 * the same CPU: +11%). The 4-bit (Q4_PF_EXTRA) and f16 (HALF_PF_LINES) matvecs gained the same
 * way; the cause is not pinned down (dropped or late prefetches are the guess). */
#ifndef F32_PF_LINES_PER
#define F32_PF_LINES_PER 2
#endif
/* The row stream's (dot_pf_avx512) lines per 2 lines read: 32000 x 288 (stories15M's
 * classifier) from memory, 1 thread: 4 lines 21.5-22 GB/s, 8 23-26.5, 12 25-29, 16 25-26. The
 * 4-row blocks did best at twice (8 lines a step of 8: 22.6-24.4; 16: 20-26, 32: 18-19). */
#ifndef F32_STREAM_PF_LINES
#define F32_STREAM_PF_LINES 12
#endif
static inline long pf_blocks_ahead(long block_bytes) {
    return block_bytes >= PECCA_PF_AHEAD ? 1 : (PECCA_PF_AHEAD + block_bytes - 1) / block_bytes;
}

/* A thread's share of a matrix of at least this many bytes (more than an L2 holds) comes from
 * memory at every token: the int8 and f16 matvecs then read it one row at a time, as a single
 * stream, instead of in 4-row blocks (see q8_kernels.h). */
#ifndef PECCA_STREAM_BYTES
#define PECCA_STREAM_BYTES (2L << 20)
#endif

#if PECCA_X86
/* ---------------- AVX2 + FMA ---------------- */

__attribute__((target("avx2,fma")))
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma")))
static inline __m256i tail_mask256(long r) {
    /* lanes 0..r-1 set, for r in [0, 8) */
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r), idx);
}

__attribute__((target("avx2,fma")))
static float dot_avx2(const float *a, const float *b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    if (j < n) {
        __m256i m = tail_mask256(n - j);
        s1 = _mm256_fmadd_ps(_mm256_maskload_ps(a + j, m), _mm256_maskload_ps(b + j, m), s1);
    }
    return hsum256(_mm256_add_ps(s0, s1));
}

/* Four rows at a time share each load of x; two accumulators per row hide FMA latency. */
__attribute__((target("avx2,fma")))
static void matvec_rows_avx2(const float *w, const float *x, float *out,
                             long n, long r0, long r1) {
    long i = r0;
    long n16 = n & ~15L, n8 = n & ~7L;
    __m256i m = tail_mask256(n - n8);
    const long d = pf_blocks_ahead(16 * n);
    for (; i + 4 <= r1; i += 4) {
        const float *w0 = w + i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        const char *next = (const char *)(w + (i + 4 * d) * n);  /* d blocks ahead */
        int pf = i + 4 * (d + 1) <= r1;
        long j = 0;
        for (; j < n16; j += 16) {
            if (pf) prefetch_lines(next + 16 * j, 4 * F32_PF_LINES_PER);
            __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xa, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xa, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xa, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xa, a3);
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j + 8), xb, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j + 8), xb, b1);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j + 8), xb, b2);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j + 8), xb, b3);
        }
        for (; j < n8; j += 8) {
            __m256 xa = _mm256_loadu_ps(x + j);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xa, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xa, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xa, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xa, a3);
        }
        if (j < n) {
            __m256 xa = _mm256_maskload_ps(x + j, m);
            b0 = _mm256_fmadd_ps(_mm256_maskload_ps(w0 + j, m), xa, b0);
            b1 = _mm256_fmadd_ps(_mm256_maskload_ps(w1 + j, m), xa, b1);
            b2 = _mm256_fmadd_ps(_mm256_maskload_ps(w2 + j, m), xa, b2);
            b3 = _mm256_fmadd_ps(_mm256_maskload_ps(w3 + j, m), xa, b3);
        }
        out[i] = hsum256(_mm256_add_ps(a0, b0));
        out[i + 1] = hsum256(_mm256_add_ps(a1, b1));
        out[i + 2] = hsum256(_mm256_add_ps(a2, b2));
        out[i + 3] = hsum256(_mm256_add_ps(a3, b3));
    }
    for (; i < r1; i++) out[i] = dot_avx2(w + i * n, x, n);
}

__attribute__((target("avx2,fma")))
static void axpy_avx2(float *y, float a, const float *x, long n) {
    __m256 va = _mm256_set1_ps(a);
    long j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    for (; j < n; j++) y[j] += a * x[j];
}

/* ---------------- AVX-512 ---------------- */

/* two accumulators (lanes of j % 32 < 16 and >= 16); ahead > 0: each line's bytes `ahead` on
 * are prefetched as it is read (the row-at-a-time form below) */
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline float dot_pf_avx512(const float *a, const float *b, long n, long ahead) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    long j = 0;
    for (; j + 32 <= n; j += 32) {
        if (ahead) prefetch_lines((const char *)(a + j) + ahead, F32_STREAM_PF_LINES);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), s1);
    }
    for (; j + 16 <= n; j += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static float dot_avx512(const float *a, const float *b, long n) {
    return dot_pf_avx512(a, b, n, 0);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void matvec_rows_avx512(const float *w, const float *x, float *out,
                               long n, long r0, long r1) {
    long i = r0;
    if (n < F32_STREAM_MAX_N && (r1 - r0) * n * 4 >= PECCA_STREAM_BYTES) {
        long ahead = pf_blocks_ahead(4 * n);  /* rows */
        for (; i + ahead < r1; i++) out[i] = dot_pf_avx512(w + i * n, x, n, ahead * n * 4);
        for (; i < r1; i++) out[i] = dot_avx512(w + i * n, x, n);
        return;
    }
    long n32 = n & ~31L, n16 = n & ~15L;
    __mmask16 m = (__mmask16)((1u << (n - n16)) - 1u);
    const long d = pf_blocks_ahead(16 * n);
    for (; i + 4 <= r1; i += 4) {
        const float *w0 = w + i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        __m512 b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
        const char *next = (const char *)(w + (i + 4 * d) * n);  /* d blocks ahead */
        int pf = i + 4 * (d + 1) <= r1;
        long j = 0;
        for (; j < n32; j += 32) {
            if (pf) prefetch_lines(next + 16 * j, 8 * F32_PF_LINES_PER);
            __m512 xa = _mm512_loadu_ps(x + j), xb = _mm512_loadu_ps(x + j + 16);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), xa, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), xa, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), xa, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), xa, a3);
            b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j + 16), xb, b0);
            b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j + 16), xb, b1);
            b2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j + 16), xb, b2);
            b3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j + 16), xb, b3);
        }
        for (; j < n16; j += 16) {
            __m512 xa = _mm512_loadu_ps(x + j);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), xa, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), xa, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), xa, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), xa, a3);
        }
        if (j < n) {
            __m512 xa = _mm512_maskz_loadu_ps(m, x + j);
            b0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + j), xa, b0);
            b1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + j), xa, b1);
            b2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + j), xa, b2);
            b3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + j), xa, b3);
        }
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
        out[i + 1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
        out[i + 2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
        out[i + 3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
    }
    for (; i < r1; i++) out[i] = dot_avx512(w + i * n, x, n);
}

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void axpy_avx512(float *y, float a, const float *x, long n) {
    __m512 va = _mm512_set1_ps(a);
    long j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(y + j, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j)));
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
        __m512 yv = _mm512_maskz_loadu_ps(m, y + j);
        _mm512_mask_storeu_ps(y + j, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + j), yv));
    }
}

/* exp(x) on a vector (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial in r,
 * times 2^n): within 2 ulp of expf over the range, 0 below -87.34 (expf gives subnormals
 * there), +inf above 88.72, NaN stays NaN. Attention's softmax and SwiGLU call exp once per
 * element; glibc's scalar expf costs ~10x more per value than this. */
#define PECCA_EXP_COEFFS                                                                       \
    const float c1 = 1.9875691500e-4f, c2 = 1.3981999507e-3f, c3 = 8.3334519073e-3f,           \
                c4 = 4.1665795894e-2f, c5 = 1.6666665459e-1f, c6 = 5.0000001201e-1f;

__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline __m512 exp_avx512(__m512 x) {
    PECCA_EXP_COEFFS
    __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.7228f), x);  /* NaN: min returns x */
    xc = _mm512_max_ps(_mm512_set1_ps(-87.3365f), xc);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504089f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(c1);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c6));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512 y = _mm512_scalef_ps(p, n);
    y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365f), _CMP_LT_OQ), _mm512_setzero_ps());
    return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.7228f), _CMP_GT_OQ),
                              _mm512_set1_ps(__builtin_inff()));
}

/* a[0..n) = softmax(a): max, exp(a - max), then division by the sum (the scalar path's steps) */
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void softmax_avx512(float *a, long n) {
    long j = 0, n16 = n & ~15L;
    __mmask16 m = (__mmask16)((1u << (n - n16)) - 1u);
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    for (; j < n16; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(a + j));
    if (j < n) vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, a + j));
    __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax)), sum = _mm512_setzero_ps();
    for (j = 0; j < n16; j += 16) {
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(a + j), mx));
        _mm512_storeu_ps(a + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (j < n) {
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + j), mx));
        _mm512_mask_storeu_ps(a + j, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    __m512 s = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (j = 0; j < n16; j += 16) _mm512_storeu_ps(a + j, _mm512_div_ps(_mm512_loadu_ps(a + j), s));
    if (j < n) _mm512_mask_storeu_ps(a + j, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, a + j), s));
}

__attribute__((target("avx2,fma"), always_inline))
static inline __m256 exp_avx2(__m256 x) {
    PECCA_EXP_COEFFS
    __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.7228f), x);
    xc = _mm256_max_ps(_mm256_set1_ps(-87.3365f), xc);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504089f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(c1);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c6));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n in two halves, so that n = 128 (x up to 88.72) stays a normal float */
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i h = _mm256_srai_epi32(ni, 1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.3365f), _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, _mm256_set1_ps(88.7228f), _CMP_GT_OQ));
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  /* NaN stays NaN */
}

__attribute__((target("avx2,fma")))
static void softmax_avx2(float *a, long n) {
    long j = 0, n8 = n & ~7L;
    float mx = -__builtin_inff(), tail = 0.0f;
    __m256 vmax = _mm256_set1_ps(-__builtin_inff());
    for (; j < n8; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(a + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
    for (; j < n; j++) mx = a[j] > mx ? a[j] : mx;
    __m256 vmx = _mm256_set1_ps(mx), sum = _mm256_setzero_ps();
    for (j = 0; j < n8; j += 8) {
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(a + j), vmx));
        _mm256_storeu_ps(a + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    for (; j < n; j++) {  /* the tail through the same vector exp, one lane used */
        _mm256_storeu_ps(lanes, exp_avx2(_mm256_set1_ps(a[j] - mx)));
        a[j] = lanes[0];
        tail += lanes[0];
    }
    float s = hsum256(sum) + tail;
    __m256 vs = _mm256_set1_ps(s);
    for (j = 0; j < n8; j += 8) _mm256_storeu_ps(a + j, _mm256_div_ps(_mm256_loadu_ps(a + j), vs));
    for (; j < n; j++) a[j] /= s;
}


/* SwiGLU in place: h = h * (1 / (1 + exp(-h))) * g, each element on its own (no lane mixing):
 * its bits do not depend on where a thread's range starts */
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void swiglu_avx512(float *h, const float *g, long n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (long j = 0; j < n; j += 16) {
        __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(m, h + j);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
        v = _mm512_mul_ps(v, _mm512_div_ps(one, _mm512_add_ps(one, e)));
        _mm512_mask_storeu_ps(h + j, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, g + j)));
    }
}

__attribute__((target("avx2,fma")))
static void swiglu_avx2(float *h, const float *g, long n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    long j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(h + j);
        __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v));
        v = _mm256_mul_ps(v, _mm256_div_ps(one, _mm256_add_ps(one, e)));
        _mm256_storeu_ps(h + j, _mm256_mul_ps(v, _mm256_loadu_ps(g + j)));
    }
    if (j < n) {  /* the tail through a zero-padded vector: the same arithmetic per element */
        float hv[8] = {0, 0, 0, 0, 0, 0, 0, 0}, gv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(hv, h + j, (size_t)(n - j) * sizeof(float));
        memcpy(gv, g + j, (size_t)(n - j) * sizeof(float));
        swiglu_avx2(hv, gv, 8);
        memcpy(h + j, hv, (size_t)(n - j) * sizeof(float));
    }
}
#endif /* PECCA_X86 */

/* ---------------- dispatch ---------------- */

/* run.c's softmax: max, expf, a sequential sum, division */
static void softmax_portable(float *a, long n) {
    float maxv = a[0], sum = 0.0f;
    for (long t = 1; t < n; t++) if (a[t] > maxv) maxv = a[t];
    for (long t = 0; t < n; t++) { a[t] = expf(a[t] - maxv); sum += a[t]; }
    for (long t = 0; t < n; t++) a[t] /= sum;
}


static void swiglu_portable(float *h, const float *g, long n) {
    for (long i = 0; i < n; i++) {
        float v = h[i];
        v = v * (1.0f / (1.0f + expf(-v)));
        h[i] = v * g[i];
    }
}

/* h = silu(h) * g in place: the vector paths' exp is exp_avx2/exp_avx512 (within 2 ulp of
 * expf), the portable path run.c's expf */
static void swiglu_f32(float *h, const float *g, long n) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { swiglu_avx512(h, g, n); return; }
    if (level == PECCA_SIMD_AVX2) { swiglu_avx2(h, g, n); return; }
#endif
    swiglu_portable(h, g, n);
}

/* out[r0:r1] = W[r0:r1, :] @ x, W row-major (rows, n). */
static void matvec_f32_rows(const float *w, const float *x, float *out,
                            long n, long r0, long r1) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { matvec_rows_avx512(w, x, out, n, r0, r1); return; }
    if (level == PECCA_SIMD_AVX2) { matvec_rows_avx2(w, x, out, n, r0, r1); return; }
#endif
    matvec_rows_portable(w, x, out, n, r0, r1);
}

/* ---------------- greedy pick ----------------
 * The index of the first largest entry of x (np.argmax's), or -1 when x holds a NaN or an
 * infinity. Two vector passes (the maximum and finiteness; then the first entry equal to the
 * maximum) instead of one scalar pass with a branch per entry: a 49152-entry vocabulary took
 * 36 us a token that way, a sizeable share of a serving step's per-sequence work. */
/* x[i0:n] (n > i0): the first largest entry's index, -1 if one is not finite */
static long argmax_finite_portable(const float *x, long i0, long n) {
    long best = i0;
    float m = x[i0];
    for (long i = i0; i < n; i++) {
        float v = x[i];
        if (!(v - v == 0.0f)) return -1;  /* NaN or +-inf (v - v is NaN for both) */
        if (v > m) { m = v; best = i; }
    }
    return best;
}

/* the vector part x[0:nv] had maximum m (all finite): the answer with the tail x[nv:n] */
static inline long argmax_join_tail(const float *x, long nv, long n, float m) {
    if (nv == n) return -2;  /* no tail: the first entry equal to m */
    long t = argmax_finite_portable(x, nv, n);
    if (t < 0) return -1;
    if (x[t] > m) return t;  /* a tie goes to the earlier entry */
    return -2;
}

#if PECCA_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
static long argmax_finite_avx512(const float *x, long n) {
    long nv = n / 16 * 16;
    if (nv == 0) return argmax_finite_portable(x, 0, n);
    __m512 mx = _mm512_loadu_ps(x), bad = _mm512_setzero_ps();
    for (long i = 0; i < nv; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v));  /* stays 0 while finite, NaN after */
        mx = _mm512_max_ps(mx, v);
    }
    if (_mm512_cmp_ps_mask(bad, _mm512_setzero_ps(), _CMP_NEQ_UQ)) return -1;
    float m = _mm512_reduce_max_ps(mx);
    long r = argmax_join_tail(x, nv, n, m);
    if (r != -2) return r;
    __m512 vm = _mm512_set1_ps(m);
    for (long i = 0; i < nv; i += 16) {
        __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vm, _CMP_EQ_OQ);
        if (eq) return i + __builtin_ctz(eq);
    }
    return -1;  /* not reached: m is one of the entries */
}

__attribute__((target("avx2,fma")))
static long argmax_finite_avx2(const float *x, long n) {
    long nv = n / 8 * 8;
    if (nv == 0) return argmax_finite_portable(x, 0, n);
    __m256 mx = _mm256_loadu_ps(x), bad = _mm256_setzero_ps();
    for (long i = 0; i < nv; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        bad = _mm256_or_ps(bad, _mm256_sub_ps(v, v));
        mx = _mm256_max_ps(mx, v);
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(bad, _mm256_setzero_ps(), _CMP_NEQ_UQ))) return -1;
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float m = _mm_cvtss_f32(h);
    long r = argmax_join_tail(x, nv, n, m);
    if (r != -2) return r;
    __m256 vm = _mm256_set1_ps(m);
    for (long i = 0; i < nv; i += 8) {
        int eq = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vm, _CMP_EQ_OQ));
        if (eq) return i + __builtin_ctz(eq);
    }
    return -1;
}
#endif

static long argmax_finite_f32(const float *x, long n) {
    if (n <= 0) return -1;
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) return argmax_finite_avx512(x, n);
    if (level == PECCA_SIMD_AVX2) return argmax_finite_avx2(x, n);
#endif
    return argmax_finite_portable(x, 0, n);
}

#endif
