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

/* ---------------- tokens in lanes ("broadcast" form) ----------------
 * For prompts of 16+ tokens the dot-product tiles above are bound by cache traffic: every
 * 4-row block re-reads all T token rows (T x n floats: 1-3 MB for a 7B layer) from L3. Here
 * the tokens are transposed once per call into panels of 32 (AVX-512) / 16 (AVX2) tokens,
 * xt[panel][k][token] (zero-padded), and a register tile holds MR weight rows x 32 (AVX-512) or 16 (AVX2) tokens: each step of k
 * broadcasts one weight of each row and multiplies it into the tokens' vectors, so one load of
 * xt feeds MR multiply-adds and no horizontal sums are needed. Each output is one sequential
 * fused multiply-add chain over k: the same bits for a token whatever T, the tile it lands in
 * or the thread split.
 * f16/bf16 rows are widened (`widen`) MR rows at a time into a scratch block (in L2 while every
 * token block meets it) whose rows are an odd number of cache lines apart; f32 rows are read in
 * place, or copied there when n is a multiple of 512: rows 2 or 4 KB apart (mod 4 KB) fall
 * into one or two sets of the 8-way L1 and evict each other (Zen 4: K = 4096 at 92-96 GFLOP/s
 * in place, 99-101 copied, against 105-108 in place for K = 4080 or 4112, where a copy cost
 * 5%). While the first token block meets a tile, the next tile's rows are prefetched a slice
 * per step of k, so that copying them reads L2, not memory (f16 ran 7% below f32 when its
 * widening read memory without it). */
typedef void (*pecca_widen_rows_fn)(const void *w, long first, float *dst, long count);

/* Token panels of P tokens: xt[(p * n + k) * P + t'] = x[(p * P + t') * n + k], zero past T,
 * so a tile reads its tokens' values for each k from one contiguous stream. */
static void transpose_tokens(const float *x, float *xt, long n, long T, long P) {
    for (long p = 0; p * P < T; p++) {
        float *d = xt + p * n * P;
        long m = T - p * P < P ? T - p * P : P;
        for (long k = 0; k < n; k++, d += P) {
            for (long t = 0; t < m; t++) d[t] = x[(p * P + t) * n + k];
            for (long t = m; t < P; t++) d[t] = 0.0f;
        }
    }
}

/* out[t * ldo + r + i] = acc row i, lane t - t0, for the tokens t < T of this tile */
static inline void store_token_lanes(const float *lanes, long width, float *out, long ldo,
                                     long r, long i, long t0, long T) {
    long m = T - t0 < width ? T - t0 : width;
    for (long t = 0; t < m; t++) out[(t0 + t) * ldo + r + i] = lanes[t];
}

#if PECCA_X86
#define LANES512_MR 12
__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline void lanes_tile_avx512(const int mr, const int nv, const float *w, long ldw,
                                     long n, const float *xt, float *out, long ldo, long r,
                                     long t0, long T, const int dopf, const char *pf, long pfs) {
    __m512 acc[LANES512_MR][2];
    const float *wr[LANES512_MR];
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {
        acc[i][0] = _mm512_setzero_ps(); acc[i][1] = _mm512_setzero_ps();
        wr[i] = w + i * ldw;
    }
    const float *xk = xt;
    for (long k = 0; k < n; k++, xk += 32) {
        if (dopf) __builtin_prefetch(pf + k * pfs, 0, 2);  /* pfs <= 64: no line skipped */
        __m512 x0 = _mm512_loadu_ps(xk);
        __m512 x1 = nv > 1 ? _mm512_loadu_ps(xk + 16) : x0;
#pragma GCC unroll 12
        for (int i = 0; i < mr; i++) {
            __m512 b = _mm512_set1_ps(wr[i][k]);
            acc[i][0] = _mm512_fmadd_ps(b, x0, acc[i][0]);
            if (nv > 1) acc[i][1] = _mm512_fmadd_ps(b, x1, acc[i][1]);
        }
    }
    float lanes[32];
#pragma GCC unroll 12
    for (int i = 0; i < mr; i++) {  /* unrolled: acc must stay registers, never an array */
        _mm512_storeu_ps(lanes, acc[i][0]);
        if (nv > 1) _mm512_storeu_ps(lanes + 16, acc[i][1]);
        store_token_lanes(lanes, 16 * nv, out, ldo, r, i, t0, T);
    }
}

#define LANES512_CASE(MR)                                                                  \
    case MR:                                                                               \
        if (p) lanes_tile_avx512(MR, nv, w, ldw, n, xp, out, ldo, r, t0, T, 1, p, pfs);    \
        else if (nv > 1) lanes_tile_avx512(MR, 2, w, ldw, n, xp, out, ldo, r, t0, T, 0, p, pfs); \
        else lanes_tile_avx512(MR, 1, w, ldw, n, xp, out, ldo, r, t0, T, 0, p, pfs);       \
        break;

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void lanes_tiles_avx512(int mr, const float *w, long ldw, long n, const float *xt,
                               long tp, float *out, long ldo, long r, long T, const char *pf,
                               long pfs) {
    for (long t0 = 0; t0 < tp; t0 += 32) {
        int nv = tp - t0 >= 32 ? 2 : 1;
        const float *xp = xt + t0 * n;
        const char *p = t0 == 0 ? pf : NULL;
        switch (mr) {
            LANES512_CASE(1) LANES512_CASE(2) LANES512_CASE(3) LANES512_CASE(4)
            LANES512_CASE(5) LANES512_CASE(6) LANES512_CASE(7) LANES512_CASE(8)
            LANES512_CASE(9) LANES512_CASE(10) LANES512_CASE(11) LANES512_CASE(12)
        }
    }
}

#define LANES256_MR 6
__attribute__((target("avx2,fma"), always_inline))
static inline void lanes_tile_avx2(const int mr, const int nv, const float *w, long ldw,
                                   long n, const float *xt, float *out, long ldo, long r,
                                   long t0, long T, const int dopf, const char *pf, long pfs) {
    __m256 acc[LANES256_MR][2];
    const float *wr[LANES256_MR];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        acc[i][0] = _mm256_setzero_ps(); acc[i][1] = _mm256_setzero_ps();
        wr[i] = w + i * ldw;
    }
    const float *xk = xt;
    for (long k = 0; k < n; k++, xk += 16) {
        if (dopf) __builtin_prefetch(pf + k * pfs, 0, 2);
        __m256 x0 = _mm256_loadu_ps(xk);
        __m256 x1 = nv > 1 ? _mm256_loadu_ps(xk + 8) : x0;
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m256 b = _mm256_broadcast_ss(wr[i] + k);
            acc[i][0] = _mm256_fmadd_ps(b, x0, acc[i][0]);
            if (nv > 1) acc[i][1] = _mm256_fmadd_ps(b, x1, acc[i][1]);
        }
    }
    float lanes[16];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        _mm256_storeu_ps(lanes, acc[i][0]);
        if (nv > 1) _mm256_storeu_ps(lanes + 8, acc[i][1]);
        store_token_lanes(lanes, 8 * nv, out, ldo, r, i, t0, T);
    }
}

#define LANES256_CASE(MR)                                                                  \
    case MR:                                                                               \
        if (p) lanes_tile_avx2(MR, nv, w, ldw, n, xp, out, ldo, r, t0, T, 1, p, pfs);      \
        else if (nv > 1) lanes_tile_avx2(MR, 2, w, ldw, n, xp, out, ldo, r, t0, T, 0, p, pfs); \
        else lanes_tile_avx2(MR, 1, w, ldw, n, xp, out, ldo, r, t0, T, 0, p, pfs);         \
        break;

__attribute__((target("avx2,fma")))
static void lanes_tiles_avx2(int mr, const float *w, long ldw, long n, const float *xt,
                             long tp, float *out, long ldo, long r, long T, const char *pf,
                             long pfs) {
    for (long t0 = 0; t0 < tp; t0 += 16) {
        int nv = tp - t0 >= 16 ? 2 : 1;
        const float *xp = xt + t0 * n;
        const char *p = t0 == 0 ? pf : NULL;
        switch (mr) {
            LANES256_CASE(1) LANES256_CASE(2) LANES256_CASE(3)
            LANES256_CASE(4) LANES256_CASE(5) LANES256_CASE(6)
        }
    }
}
#endif /* PECCA_X86 */

/* The tokens-in-lanes GEMM over rows [r0, r1): w is float32 rows (read in place or copied MR
 * at a time) when `widen` is NULL, else 16-bit rows widened MR at a time. Returns 0 (nothing
 * done) when this CPU has no vector path or the scratch cannot be allocated: the caller then
 * runs its dot-product tiles. */
static int gemm_lanes_rows(const void *w, pecca_widen_rows_fn widen, const float *x, float *out,
                           long n, long T, long ldo, long r0, long r1) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level != PECCA_SIMD_AVX512 && level != PECCA_SIMD_AVX2) return 0;
    int avx512 = level == PECCA_SIMD_AVX512;
    long width = avx512 ? 16 : 8, MR = avx512 ? LANES512_MR : LANES256_MR;
    long tp = (T + width - 1) / width * width, P = 2 * width;
    long es = widen ? 2 : 4;  /* bytes of a weight as stored */
    long ldw = (n + 15) / 16 * 16;  /* scratch rows: whole lines, an odd number of them */
    if ((ldw / 16) % 2 == 0) ldw += 16;
    /* on whole lines: every vector load of the tiles reads one line, not two */
    float *xt = (float *)pecca_alloc_lines((size_t)(n * ((T + P - 1) / P * P)) * sizeof(float));
    int copy = widen != NULL || n % 512 == 0;
    float *wbuf = copy ? (float *)pecca_alloc_lines((size_t)(MR * ldw) * sizeof(float)) : NULL;
    if (xt == NULL || (copy && wbuf == NULL)) { pecca_free_lines(xt); pecca_free_lines(wbuf); return 0; }
    transpose_tokens(x, xt, n, T, P);
    for (long r = r0; r < r1; r += MR) {
        int mr = (int)(r1 - r < MR ? r1 - r : MR);
        const float *wr = copy ? wbuf : (const float *)w + r * n;
        long ld = copy ? ldw : n;
        if (copy)
            for (int i = 0; i < mr; i++) {
                if (widen) widen(w, (r + i) * n, wbuf + i * ldw, n);
                else memcpy(wbuf + i * ldw, (const float *)w + (r + i) * n, (size_t)n * sizeof(float));
            }
        /* the next tile's rows (nr x n weights, contiguous), nr * es bytes per step of k */
        long nr = r1 - r - mr < MR ? r1 - r - mr : MR;
        const char *pf = nr > 0 && copy ? (const char *)w + (r + mr) * n * es : NULL;
        if (avx512) lanes_tiles_avx512(mr, wr, ld, n, xt, tp, out, ldo, r, T, pf, nr * es);
        else lanes_tiles_avx2(mr, wr, ld, n, xt, tp, out, ldo, r, T, pf, nr * es);
    }
    pecca_free_lines(xt); pecca_free_lines(wbuf);
    return 1;
#else
    (void)w; (void)widen; (void)x; (void)out; (void)n; (void)T; (void)ldo; (void)r0; (void)r1;
    return 0;
#endif
}

/* from this many tokens on, the tokens-in-lanes form wins */
#define PECCA_LANES_MIN_T 8

static void gemm_f32_rows(const float *w, const float *x, float *out, long n, long T,
                          long ldo, long r0, long r1) {
    if (T >= PECCA_LANES_MIN_T && gemm_lanes_rows(w, NULL, x, out, n, T, ldo, r0, r1)) return;
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { gemm_rows_avx512(w, x, out, n, T, ldo, r0, r1); return; }
    if (level == PECCA_SIMD_AVX2) { gemm_rows_avx2(w, x, out, n, T, ldo, r0, r1); return; }
#endif
    gemm_rows_portable(w, x, out, n, T, ldo, r0, r1);
}

#endif
