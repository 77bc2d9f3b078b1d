/* int8 weights with int8-quantized activations: integer dot products, float scales.
 *
 * Two on-disk layouts, both read in place from the memory-mapped file:
 *
 *  q8 groups (llama2.c version-2 checkpoints, runq.c): W (rows, n) is int8 `wq` row-major plus
 *    float32 `ws`, one scale per group of `gs` consecutive values of a row (gs divides n, so no
 *    group straddles two rows; gs can be anything, e.g. 4 in stories260K, 64 by default).
 *  Q8_0 (GGUF, llama.cpp's block_q8_0): each row is n/32 blocks of 34 bytes, a little-endian
 *    IEEE half scale d followed by 32 int8 q; the value is d * q.
 *
 * The activation x is quantized once per product (quantize_q8g / quantize_q8_0) into int8 plus
 * float scales, then each row is sum over groups of (float)(int32 dot of the group) * w_scale *
 * x_scale. A decode step reads every weight once, so speed is memory bandwidth: 1 byte per
 * weight (+4/gs, or +2/32 for Q8_0) instead of 4 for f32.
 *
 * Quantization rules (all paths give the same bytes and scales, bit for bit):
 *  q8g  (runq.c quantize): wmax = max |x| over the group; scale = wmax / 127.0f;
 *       q = round(x / scale) with C round() (half away from zero) and a true division. runq.c
 *       divides by zero when the group is all zeros; here scale == 0 gives q = 0.
 *  Q8_0 (llama.cpp quantize_row_q8_0): amax over the block; d = amax / 127; id = d ? 1/d : 0;
 *       q = roundf(x * id). d is kept as float32 (llama.cpp rounds it to f16).
 *  Both clamp to [-127, 127] before rounding (no-op for finite input; it only keeps pathological
 *  input, e.g. a denormal scale, defined) and map NaN to 0. The SIMD kernels rely on |xq| <= 127.
 *
 * Products:
 *  portable: q8g is runq.c's matmul exactly: val = 0.0f; per group val += ((float)ival * ws) *
 *    xs, in order, so pecca reproduces runq.c's tokens (given the same x). Q8_0 is llama.cpp's
 *    scalar vec_dot: val += (float)ival * (dw * dx). Used for q8g when gs % 32 != 0 on every path.
 *  AVX2 (also the AVX-512 path when the CPU lacks AVX512-VNNI): steps of two 32-blocks b, b+1
 *    as two vectors [16 bytes of b | the same 16 of b+1], the sign trick on the weights:
 *    maddubs(|w| as unsigned, x with w's sign). |w| <= 128 (int8 -128 as unsigned 128, so any
 *    int8 weight works), |x| <= 127, so each int16 pair sum is at most 2 * 128 * 127 = 32512 <
 *    32767: maddubs never saturates. madd with ones widens to int32: the low 128 bits hold block
 *    b's lanes, the high ones b+1's. Two (row, token) products share the float work: lanes l and
 *    l + 2 of both are added in integers (unpacklo/hi_epi64) into [p p q q | p p q q], converted
 *    and multiplied by the matching [w_scale * x_scale] halves in one FMA (q8g: the scales of the
 *    blocks' groups, per step). matvec pairs two rows of its token (x laid out on the fly);
 *    matmul lays every pair of tokens out once per product and runs tiles of 1 row x 8 token
 *    pairs (each weight vector loaded and made absolute once for 16 tokens) over chunks of 16
 *    steps (that x stays in L1) and panels of 32 rows (in L2 while every group of tokens passes).
 *    A (row, token) gets the same lanes and float operations either way; its result is
 *    (lane 0 + lane 4) + (lane 1 + lane 5) of its pair.
 *  AVX-512 + VNNI: 64 pairs (two 32-blocks) per vpdpbusd on zmm. vpdpbusd wants unsigned x
 *    signed; x + 128 (x ^ 0x80) is unsigned, and the surplus 128 * sum(w) is taken off by starting
 *    the accumulator at -vpdpbusd(128, w), computed once per row and chunk and shared by every
 *    token of a matmul. Every 64-byte chunk is converted and multiplied by a [s0 x8 | s1 x8]
 *    scale vector (the scales of its two 32-blocks), so one code serves Q8_0 and q8g with any
 *    gs % 32 == 0. Integer sums are exact; only the float accumulation rounds (~1e-6 relative,
 *    as the f32 kernels).
 * matvec and matmul of one path run the same per-(row, token) operations in the same order, so
 * matmul's rows equal matvec's bit for bit.
 *
 * matvec processes rows 4 at a time sharing each load of the quantized x (matmul: VNNI tiles of
 * 4 rows x 4 tokens; AVX2 tiles as above), and the next 4-row block is prefetched linearly, as in
 * f32_kernels.h.
 */
#ifndef PECCA_Q8_KERNELS_H
#define PECCA_Q8_KERNELS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "simd.h"
#include "f32_kernels.h"
#include "f16_kernels.h"

#define Q8_0_BLOCK 32
#define Q8_0_BYTES 34

/* ---------------- portable ---------------- */

/* round half away from zero (C round / roundf) of v clamped to [-127, 127]; NaN -> 0.
 * v - trunc(v) is exact for |v| < 2^23, so the half-way test is exact. */
static inline int8_t q8_round(float v) {
    if (v != v) return 0;
    if (v > 127.0f) v = 127.0f;
    if (v < -127.0f) v = -127.0f;
    float t = (float)(int)v, d = v - t;
    if (d >= 0.5f) t += 1.0f;
    else if (d <= -0.5f) t -= 1.0f;
    return (int8_t)(int)t;
}

static void quantize_q8g_portable(const float *x, int8_t *qx, float *sx, long n, long gs) {
    for (long g = 0; g < n / gs; g++) {
        const float *xg = x + g * gs;
        int8_t *qg = qx + g * gs;
        float wmax = 0.0f;
        for (long i = 0; i < gs; i++) {
            float v = fabsf(xg[i]);
            if (v > wmax) wmax = v;
        }
        float scale = wmax / 127.0f;
        sx[g] = scale;
        if (scale == 0.0f) {
            memset(qg, 0, (size_t)gs);
            continue;
        }
        for (long i = 0; i < gs; i++) qg[i] = q8_round(xg[i] / scale);
    }
}

static void quantize_q8_0_portable(const float *x, int8_t *qx, float *dx, long n) {
    for (long b = 0; b < n / Q8_0_BLOCK; b++) {
        const float *xb = x + b * Q8_0_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < Q8_0_BLOCK; i++) {
            float v = fabsf(xb[i]);
            if (v > amax) amax = v;
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        dx[b] = d;
        for (int i = 0; i < Q8_0_BLOCK; i++) qx[b * Q8_0_BLOCK + i] = q8_round(xb[i] * id);
    }
}

/* runq.c's matmul, one row at a time. The product is split over two statements so that no
 * compiler contracts it into an FMA with the sum (the x86 baseline build has no FMA anyway). */
static void matvec_q8g_rows_portable(const int8_t *wq, const float *ws, const int8_t *xq,
                                     const float *xs, float *out, long n, long gs,
                                     long r0, long r1) {
    long G = n / gs;
    for (long i = r0; i < r1; i++) {
        const int8_t *wr = wq + i * n;
        const float *wsr = ws + i * G;
        float val = 0.0f;
        for (long g = 0; g < G; g++) {
            int32_t ival = 0;
            for (long k = 0; k < gs; k++)
                ival += (int32_t)xq[g * gs + k] * (int32_t)wr[g * gs + k];
            float p = (float)ival * wsr[g];
            p = p * xs[g];
            val += p;
        }
        out[i] = val;
    }
}

static inline float q8_0_scale_portable(const uint8_t *blk) {
    return f16_to_f32((uint16_t)(blk[0] | (blk[1] << 8)));
}

static void matvec_q8_0_rows_portable(const uint8_t *w, const int8_t *xq, const float *xd,
                                      float *out, long n, long r0, long r1) {
    long nb = n / Q8_0_BLOCK, rb = nb * Q8_0_BYTES;
    for (long i = r0; i < r1; i++) {
        const uint8_t *row = w + i * rb;
        float val = 0.0f;
        for (long b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * Q8_0_BYTES;
            const int8_t *q = (const int8_t *)(blk + 2);
            const int8_t *xb = xq + b * Q8_0_BLOCK;
            int32_t ival = 0;
            for (int k = 0; k < Q8_0_BLOCK; k++) ival += (int32_t)q[k] * (int32_t)xb[k];
            float s = q8_0_scale_portable(blk) * xd[b];
            float p = (float)ival * s;
            val += p;
        }
        out[i] = val;
    }
}

/* matmul: each block of 4 rows meets every token while it is in cache. */
static void gemm_q8g_rows_portable(const int8_t *wq, const float *ws, const int8_t *xq,
                                   const float *xs, float *out, long n, long gs, long T,
                                   long ldo, long r0, long r1) {
    long G = n / gs;
    for (long r = r0; r < r1; r += 4) {
        long re = r + 4 < r1 ? r + 4 : r1;
        for (long t = 0; t < T; t++)
            matvec_q8g_rows_portable(wq, ws, xq + t * n, xs + t * G, out + t * ldo, n, gs, r, re);
    }
}

static void gemm_q8_0_rows_portable(const uint8_t *w, const int8_t *xq, const float *xd,
                                    float *out, long n, long T, long ldo, long r0, long r1) {
    long nb = n / Q8_0_BLOCK;
    for (long r = r0; r < r1; r += 4) {
        long re = r + 4 < r1 ? r + 4 : r1;
        for (long t = 0; t < T; t++)
            matvec_q8_0_rows_portable(w, xq + t * n, xd + t * nb, out + t * ldo, n, r, re);
    }
}

#if PECCA_X86
/* ---------------- AVX2 + FMA + F16C ---------------- */
#define PECCA_Q8_AVX2 "avx2,fma,f16c"

/* q8_round on 8 lanes, exactly (same steps: NaN -> 0, clamp, truncate, half-way test). */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline __m256i q8_round_avx2(__m256 v) {
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 d = _mm256_sub_ps(v, t), one = _mm256_set1_ps(1.0f);
    __m256 up = _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(0.5f), _CMP_GE_OQ), one);
    __m256 dn = _mm256_and_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-0.5f), _CMP_LE_OQ), one);
    return _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(t, up), dn));
}

/* 32 rounded values -> 32 int8 (all in [-127, 127], so the packs never saturate). */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_store32_avx2(int8_t *q, __m256 v0, __m256 v1, __m256 v2, __m256 v3) {
    __m256i a = _mm256_packs_epi32(q8_round_avx2(v0), q8_round_avx2(v1));
    __m256i b = _mm256_packs_epi32(q8_round_avx2(v2), q8_round_avx2(v3));
    __m256i c = _mm256_packs_epi16(a, b);  /* dwords: v0 lo, v1 lo, v2 lo, v3 lo | the highs */
    c = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, c);
}

/* max |x| over len (a multiple of 8) values; NaN is skipped as the scalar `v > wmax` does
 * (maxps returns its second operand, the running max, when either is NaN). */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline float q8_absmax_avx2(const float *x, long len) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    for (long j = 0; j < len; j += 8) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), absmask), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* gs % 32 == 0 */
__attribute__((target(PECCA_Q8_AVX2)))
static void quantize_q8g_avx2(const float *x, int8_t *qx, float *sx, long n, long gs) {
    for (long g = 0; g < n / gs; g++) {
        const float *xg = x + g * gs;
        int8_t *qg = qx + g * gs;
        float scale = q8_absmax_avx2(xg, gs) / 127.0f;
        sx[g] = scale;
        if (scale == 0.0f) {
            memset(qg, 0, (size_t)gs);
            continue;
        }
        __m256 vs = _mm256_set1_ps(scale);
        for (long j = 0; j < gs; j += 32)
            q8_store32_avx2(qg + j, _mm256_div_ps(_mm256_loadu_ps(xg + j), vs),
                            _mm256_div_ps(_mm256_loadu_ps(xg + j + 8), vs),
                            _mm256_div_ps(_mm256_loadu_ps(xg + j + 16), vs),
                            _mm256_div_ps(_mm256_loadu_ps(xg + j + 24), vs));
    }
}

__attribute__((target(PECCA_Q8_AVX2)))
static void quantize_q8_0_avx2(const float *x, int8_t *qx, float *dx, long n) {
    for (long b = 0; b < n / Q8_0_BLOCK; b++) {
        const float *xb = x + b * Q8_0_BLOCK;
        float d = q8_absmax_avx2(xb, Q8_0_BLOCK) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        dx[b] = d;
        __m256 vid = _mm256_set1_ps(id);
        q8_store32_avx2(qx + b * Q8_0_BLOCK, _mm256_mul_ps(_mm256_loadu_ps(xb), vid),
                        _mm256_mul_ps(_mm256_loadu_ps(xb + 8), vid),
                        _mm256_mul_ps(_mm256_loadu_ps(xb + 16), vid),
                        _mm256_mul_ps(_mm256_loadu_ps(xb + 24), vid));
    }
}

__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline float q8_0_scale_f16c(const uint8_t *blk) {
    uint16_t h;
    memcpy(&h, blk, sizeof h);
    return _cvtsh_ss(h);
}

__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline uint16_t q8_u16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

/* AVX2 products. Every step takes two blocks b = 2s, b+1 (64 inputs) as two vectors, each
 * [16 bytes of block b | the same 16 of block b+1] (bytes 0..15, then 16..31), so that the int32
 * lanes of the low 128 bits belong to block b and the high ones to b+1; a missing block b+1 (n/32
 * odd) is zeros. Per (row, token): the sign trick maddubs(|w|, sign(x, w)) (|w| <= 128 as
 * unsigned, |x| <= 127: no saturation) on both vectors, madd with ones, add: lane l of each half
 * sums the block's elements 4l..4l+3 and 16+4l..16+4l+3. The float work is shared by two (row,
 * token) pairs: lanes l and l + 2 of both are added in integers (unpacklo/hi_epi64, exact) into
 * one vector [p p q q | p p q q], converted and multiplied by [sw sx of p x2, of q x2 | the same
 * for b+1] in one FMA (q8g: the scales of the blocks' groups). matvec pairs two rows against its
 * token, matmul one row against two tokens; a (row, token)'s lanes get the same values and
 * operations either way, and its result is (lane 0 + lane 4) + (lane 1 + lane 5) of its pair, so
 * matmul rows equal matvec bit for bit. */

__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline __m128i q8_ld128(const void *p) { return _mm_loadu_si128((const __m128i *)p); }

/* the groups of blocks 2s and 2s+1 as the steps go: g, k: group and place in it of block 2s */
static inline void q8_groups_next(long bpg, long *g, long *k, long *ga, long *gb) {
    *ga = *g;
    if (++*k == bpg) { *k = 0; ++*g; }
    *gb = *g;
    if (++*k == bpg) { *k = 0; ++*g; }
}

/* step s of one token: its two vectors and scales [sx_b x4 | sx_b+1 x4] from xq, xs (scales per
 * group; ga, gb: the groups of blocks 2s, 2s+1) */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_xstep_avx2(const int8_t *xq, const float *xs, long ga, long gb, long s,
                                 int two, __m256i *x0, __m256i *x1, __m256 *sx) {
    const int8_t *p = xq + 2 * Q8_0_BLOCK * s;
    __m128i c0 = _mm_setzero_si128(), c1 = _mm_setzero_si128();
    __m128 s1 = _mm_setzero_ps();
    if (two) {
        c0 = q8_ld128(p + 32);
        c1 = q8_ld128(p + 48);
        s1 = _mm_broadcast_ss(xs + gb);
    }
    *x0 = _mm256_set_m128i(c0, q8_ld128(p));
    *x1 = _mm256_set_m128i(c1, q8_ld128(p + 16));
    *sx = _mm256_set_m128(s1, _mm_broadcast_ss(xs + ga));
}

/* step s of a row (row: its start; wsr: its q8g scales): the two weight vectors, their absolute
 * values and the scales [sw_b x4 | sw_b+1 x4] */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_wstep_avx2(const uint8_t *row, const float *wsr, long s, long ga, long gb,
                                 int q80, int two, __m256i w[2], __m256i a[2], __m256 *sw) {
    const long bb = q80 ? Q8_0_BYTES : Q8_0_BLOCK;
    const uint8_t *p = row + 2 * bb * s, *q = p + (q80 ? 2 : 0);
    __m128i c0 = _mm_setzero_si128(), c1 = _mm_setzero_si128();
    if (two) {
        c0 = q8_ld128(q + bb);
        c1 = q8_ld128(q + bb + 16);
    }
    w[0] = _mm256_set_m128i(c0, q8_ld128(q));
    w[1] = _mm256_set_m128i(c1, q8_ld128(q + 16));
    a[0] = _mm256_abs_epi8(w[0]);
    a[1] = _mm256_abs_epi8(w[1]);
    if (q80) {
        uint32_t h = (uint32_t)q8_u16(p) | (two ? (uint32_t)q8_u16(p + bb) << 16 : 0);
        __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h));
        *sw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    } else {
        *sw = _mm256_set_m128(two ? _mm_broadcast_ss(wsr + gb) : _mm_setzero_ps(), _mm_broadcast_ss(wsr + ga));
    }
}

/* the int32 lanes of one (row, token) step */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline __m256i q8_dot_avx2(const __m256i w[2], const __m256i a[2], __m256i x0, __m256i x1) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i d0 = _mm256_maddubs_epi16(a[0], _mm256_sign_epi8(x0, w[0]));
    __m256i d1 = _mm256_maddubs_epi16(a[1], _mm256_sign_epi8(x1, w[1]));
    return _mm256_add_epi32(_mm256_madd_epi16(d0, ones), _mm256_madd_epi16(d1, ones));
}

/* (row, token) pairs: the integer lanes of p and q -> [p p q q | p p q q] */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline __m256i q8_pair_avx2(__m256i p, __m256i q) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(p, q), _mm256_unpackhi_epi64(p, q));
}

/* [lanes 0..1 of a | lanes 0..1 of b] in each half */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline __m256 q8_pairps_avx2(__m256 a, __m256 b) {
    return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
}

/* the two results of a pair accumulator: (l0 + l4) + (l1 + l5) and (l2 + l6) + (l3 + l7) */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_pairsum_avx2(__m256 acc, float *p, float *q) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    *p = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    __m128 g = _mm_movehl_ps(h, h);
    *q = _mm_cvtss_f32(_mm_add_ss(g, _mm_movehdup_ps(g)));
}

/* matvec: rows i..i+NR-1 (NR = 4, 2 or 1; a lone row is paired with nothing) in pairs, against one
 * token; prefetching the NR rows after the next NR when pf */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_mv_avx2(const uint8_t *w, const float *ws, const int8_t *xq, const float *xs,
                              float *out, long n, long bpg, long i, int NR, int q80, int pf) {
    long nb = n / Q8_0_BLOCK, G = nb / bpg, bb = q80 ? Q8_0_BYTES : Q8_0_BLOCK, rb = nb * bb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    /* the rows after the next NR, a line more per step than is read: measured as fast from DRAM as
     * the first AVX2 kernel (the next NR rows: 5-8% slower) */
    const char *next = (const char *)(w + (i + 2 * NR) * rb);
    const int lines = (int)((NR * 2 * bb + 63) / 64) + 1;  /* a little ahead of the reads */
    long g = 0, k = 0, ga, gb;
    for (long s = 0; 2 * s < nb; s++) {
        const int two = 2 * s + 1 < nb;
        if (pf) prefetch_lines(next + NR * 2 * bb * s, lines);
        q8_groups_next(bpg, &g, &k, &ga, &gb);
        __m256i x0, x1, wv[2], av[2];
        __m256 sx, swa, swb = _mm256_setzero_ps();
        q8_xstep_avx2(xq, xs, ga, gb, s, two, &x0, &x1, &sx);
        for (int j = 0; j < (NR + 1) / 2; j++) {
            long ra = i + 2 * j;
            q8_wstep_avx2(w + ra * rb, ws ? ws + ra * G : NULL, s, ga, gb, q80, two, wv, av, &swa);
            __m256i ia = q8_dot_avx2(wv, av, x0, x1), ib = _mm256_setzero_si256();
            if (NR >= 2) {
                q8_wstep_avx2(w + (ra + 1) * rb, ws ? ws + (ra + 1) * G : NULL, s, ga, gb, q80, two, wv, av, &swb);
                ib = q8_dot_avx2(wv, av, x0, x1);
            }
            __m256 f = _mm256_cvtepi32_ps(q8_pair_avx2(ia, ib));
            __m256 sc = _mm256_mul_ps(q8_pairps_avx2(swa, swb), sx);
            if (j == 0) acc0 = _mm256_fmadd_ps(f, sc, acc0);
            else acc1 = _mm256_fmadd_ps(f, sc, acc1);
        }
    }
    float v[4];
    q8_pairsum_avx2(acc0, &v[0], &v[1]);
    if (NR == 4) q8_pairsum_avx2(acc1, &v[2], &v[3]);
    for (int r = 0; r < NR; r++) out[i + r] = v[r];
}

/* matmul: prepared tokens, per pair of tokens (the second zeros when T is odd) per step Q8_XP
 * bytes: both vectors of the first, of the second, [sx of the first x2, of the second x2 | b+1] */
#define Q8_XP 160
#ifndef Q8_AVX2_TP
#define Q8_AVX2_TP 8      /* matmul tile: pairs of tokens (at most 8) against one row */
#endif
#define Q8_MIN_TP(n) ((n) < Q8_AVX2_TP ? (n) : Q8_AVX2_TP)
#ifndef Q8_AVX2_KC
#define Q8_AVX2_KC 16     /* matmul: steps per chunk of n (the tile's x stays in L1) */
#endif
#ifndef Q8_AVX2_PANEL
#define Q8_AVX2_PANEL 32  /* matmul: rows kept in L2 while every group of tokens passes */
#endif

__attribute__((target(PECCA_Q8_AVX2)))
static void q8_prep_pair_avx2(const int8_t *xa, const float *sa, const int8_t *xb, const float *sb,
                              long n, long bpg, uint8_t *o) {
    long nb = n / Q8_0_BLOCK, g = 0, k = 0, ga, gb;
    for (long s = 0; 2 * s < nb; s++, o += Q8_XP) {
        const int two = 2 * s + 1 < nb;
        __m256i a0, a1, b0 = _mm256_setzero_si256(), b1 = _mm256_setzero_si256();
        __m256 fa, fb = _mm256_setzero_ps();
        q8_groups_next(bpg, &g, &k, &ga, &gb);
        q8_xstep_avx2(xa, sa, ga, gb, s, two, &a0, &a1, &fa);
        if (xb) q8_xstep_avx2(xb, sb, ga, gb, s, two, &b0, &b1, &fb);
        _mm256_storeu_si256((__m256i *)o, a0);
        _mm256_storeu_si256((__m256i *)(o + 32), a1);
        _mm256_storeu_si256((__m256i *)(o + 64), b0);
        _mm256_storeu_si256((__m256i *)(o + 96), b1);
        _mm256_storeu_ps((float *)(o + 128), q8_pairps_avx2(fa, fb));
    }
}

/* steps [s0, s1) of row i against token pairs 0..NP-1 (at xb, pair stride xstride), the
 * accumulators in accb (8 floats per pair, kept across chunks) */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_tile_avx2(const uint8_t *w, const float *ws, const uint8_t *xb, long xstride,
                                float *accb, long n, long bpg, long i, long s0, long s1, int NP,
                                int q80) {
    long nb = n / Q8_0_BLOCK, G = nb / bpg, bb = q80 ? Q8_0_BYTES : Q8_0_BLOCK, rb = nb * bb;
    const uint8_t *row = w + i * rb;
    const float *wsr = ws ? ws + i * G : NULL;
    __m256 acc[Q8_AVX2_TP];
    for (int j = 0; j < NP; j++) acc[j] = _mm256_loadu_ps(accb + 8 * j);
    long g = s0 * 2 / bpg, k = s0 * 2 % bpg, ga, gb;
    for (long s = s0; s < s1; s++) {
        const int two = 2 * s + 1 < nb;
        __m256i wv[2], av[2];
        __m256 sw;
        q8_groups_next(bpg, &g, &k, &ga, &gb);
        q8_wstep_avx2(row, wsr, s, ga, gb, q80, two, wv, av, &sw);
        for (int j = 0; j < NP; j++) {
            const uint8_t *xp = xb + j * xstride + Q8_XP * s;
            __m256i ia = q8_dot_avx2(wv, av, _mm256_loadu_si256((const __m256i *)xp), _mm256_loadu_si256((const __m256i *)(xp + 32)));
            __m256i ib = q8_dot_avx2(wv, av, _mm256_loadu_si256((const __m256i *)(xp + 64)), _mm256_loadu_si256((const __m256i *)(xp + 96)));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_pair_avx2(ia, ib)),
                                     _mm256_mul_ps(sw, _mm256_loadu_ps((const float *)(xp + 128))), acc[j]);
        }
    }
    for (int j = 0; j < NP; j++) _mm256_storeu_ps(accb + 8 * j, acc[j]);
}

/* T tokens (T = 1: matvec) of rows [r0, r1). matvec, and matmul when its prepared tokens cannot
 * be allocated: q8_mv_avx2 token by token (the same bits); matmul: tiles of 1 row x Q8_AVX2_TP
 * pairs of tokens over chunks of Q8_AVX2_KC steps (that x stays in L1 while the panel's rows pass)
 * and panels of Q8_AVX2_PANEL rows (in L2 while every group of tokens passes). */
__attribute__((target(PECCA_Q8_AVX2), always_inline))
static inline void q8_gemm_avx2(const uint8_t *w, const float *ws, const int8_t *xq,
                                const float *xs, float *out, long n, long bpg, long T, long ldo,
                                long r0, long r1, long pf1, int q80) {
    long nb = n / Q8_0_BLOCK, G = nb / bpg, ns = (nb + 1) / 2, xstride = ns * Q8_XP;
    long npairs = (T + 1) / 2;
    uint8_t *xb = T > 1 ? (uint8_t *)pecca_alloc_lines((size_t)(npairs * xstride)) : NULL;
    if (xb == NULL) {
        for (long t = 0; t < T; t++) {
            long i = r0;
            for (; i + 4 <= r1; i += 4)
                q8_mv_avx2(w, ws, xq + t * n, xs + t * G, out + t * ldo, n, bpg, i, 4, q80, i + 12 <= pf1);
            for (; i + 2 <= r1; i += 2) q8_mv_avx2(w, ws, xq + t * n, xs + t * G, out + t * ldo, n, bpg, i, 2, q80, 0);
            for (; i < r1; i++) q8_mv_avx2(w, ws, xq + t * n, xs + t * G, out + t * ldo, n, bpg, i, 1, q80, 0);
        }
        return;
    }
    for (long p = 0; p < npairs; p++) {
        long ta = 2 * p, tb = 2 * p + 1;
        q8_prep_pair_avx2(xq + ta * n, xs + ta * G, tb < T ? xq + tb * n : NULL, tb < T ? xs + tb * G : NULL,
                          n, bpg, xb + p * xstride);
    }
    float accb[Q8_AVX2_PANEL][Q8_AVX2_TP * 8];
    for (long p0 = r0; p0 < r1; p0 += Q8_AVX2_PANEL) {
        long p1 = p0 + Q8_AVX2_PANEL < r1 ? p0 + Q8_AVX2_PANEL : r1;
        for (long j0 = 0; j0 < npairs; j0 += Q8_AVX2_TP) {
            int NP = (int)(npairs - j0 < Q8_AVX2_TP ? npairs - j0 : Q8_AVX2_TP);
            memset(accb, 0, sizeof accb);
            const uint8_t *xt = xb + j0 * xstride;
            for (long c0 = 0; c0 < ns; c0 += Q8_AVX2_KC) {
                long c1 = c0 + Q8_AVX2_KC < ns ? c0 + Q8_AVX2_KC : ns;
                for (long i = p0; i < p1; i++) {
#define Q8_TILE(N) q8_tile_avx2(w, ws, xt, xstride, accb[i - p0], n, bpg, i, c0, c1, N, q80)
                    switch (NP) {
                    case 8: Q8_TILE(Q8_MIN_TP(8)); break;
                    case 7: Q8_TILE(Q8_MIN_TP(7)); break;
                    case 6: Q8_TILE(Q8_MIN_TP(6)); break;
                    case 5: Q8_TILE(Q8_MIN_TP(5)); break;
                    case 4: Q8_TILE(Q8_MIN_TP(4)); break;
                    case 3: Q8_TILE(3); break;
                    case 2: Q8_TILE(2); break;
                    default: Q8_TILE(1);
                    }
#undef Q8_TILE
                }
            }
            for (long i = p0; i < p1; i++)
                for (int j = 0; j < NP; j++) {
                    float v[2];
                    long t = 2 * (j0 + j);
                    q8_pairsum_avx2(_mm256_loadu_ps(accb[i - p0] + 8 * j), &v[0], &v[1]);
                    out[t * ldo + i] = v[0];
                    if (t + 1 < T) out[(t + 1) * ldo + i] = v[1];
                }
        }
    }
    pecca_free_lines(xb);
}

__attribute__((target(PECCA_Q8_AVX2)))
static void matvec_q8g_rows_avx2(const int8_t *wq, const float *ws, const int8_t *xq,
                                 const float *xs, float *out, long n, long gs, long r0, long r1,
                                 long pf1) {
    q8_gemm_avx2((const uint8_t *)wq, ws, xq, xs, out, n, gs / Q8_0_BLOCK, 1, 0, r0, r1, pf1, 0);
}

__attribute__((target(PECCA_Q8_AVX2)))
static void matvec_q8_0_rows_avx2(const uint8_t *w, const int8_t *xq, const float *xd,
                                  float *out, long n, long r0, long r1, long pf1) {
    q8_gemm_avx2(w, NULL, xq, xd, out, n, 1, 1, 0, r0, r1, pf1, 1);
}

__attribute__((target(PECCA_Q8_AVX2)))
static void gemm_q8g_rows_avx2(const int8_t *wq, const float *ws, const int8_t *xq,
                               const float *xs, float *out, long n, long gs, long T, long ldo,
                               long r0, long r1) {
    q8_gemm_avx2((const uint8_t *)wq, ws, xq, xs, out, n, gs / Q8_0_BLOCK, T, ldo, r0, r1, r1, 0);
}

__attribute__((target(PECCA_Q8_AVX2)))
static void gemm_q8_0_rows_avx2(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                                long n, long T, long ldo, long r0, long r1) {
    q8_gemm_avx2(w, NULL, xq, xd, out, n, 1, T, ldo, r0, r1, r1, 1);
}

/* ---------------- AVX-512 + VNNI ---------------- */
#define PECCA_Q8_VNNI "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"

/* [a x8 | b x8] */
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline __m512 q8_halves_ps(float a, float b) {
    __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a)));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}

/* Two 32-byte blocks at p and p + stride (just one, upper half zero, when !two). */
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline __m512i q8_load_pair(const void *p, long stride, int two) {
    const char *c = (const char *)p;
    if (two && stride == 32) return _mm512_loadu_si512(p);
    __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)c));
    __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(c + stride)) : _mm256_setzero_si256();
    return _mm512_inserti64x4(lo, hi, 1);
}

/* Layouts for the VNNI kernels: Q8_0; q8g in general (gs % 32 == 0); q8g whose groups are whole
 * 64-byte chunks (gs % 64 == 0: one scale per chunk, a broadcast instead of two halves; the
 * same values, so the same results). */
#define Q8_FMT_G 0
#define Q8_FMT_0 1
#define Q8_FMT_GW 2

/* a single row (q8_rows_vnni's memory form) prefetches the row this many ahead */
#ifndef Q8_PF_ROWS
#define Q8_PF_ROWS 2
#endif

/* One 64-byte chunk (blocks b, b+1; only b when !two) of rows i..i+NR-1 against tokens
 * t = 0..NT-1 (xr[t], sr[t]: their quantized values and scales). ga, gb: the groups of blocks
 * b and b+1 (for Q8_0, b and b+1). */
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline void q8_chunk_vnni(__m512 acc[4][4], const uint8_t *const wr[4],
                                 const float *ws, const int8_t *const xr[4],
                                 const float *const sr[4], long b, long ga, long gb, long i,
                                 long G, int NR, int NT, int fmt, int two) {
    const int q80 = fmt == Q8_FMT_0, wide = fmt == Q8_FMT_GW && two;
    const __m512i c80 = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    long bb = q80 ? Q8_0_BYTES : Q8_0_BLOCK;
    __m512i wv[4], nc[4];
    __m512 sw[4];
    for (int r = 0; r < NR; r++) {
        const uint8_t *p = wr[r] + bb * b;
        wv[r] = q8_load_pair(p + (q80 ? 2 : 0), bb, two);
        /* -128 * (sum of w) per lane: cancels the +128 carried by x ^ 0x80 below */
        nc[r] = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c80, wv[r]));
        if (wide) {
            sw[r] = _mm512_set1_ps(ws[(i + r) * G + ga]);
        } else if (q80 && two) {
            /* both f16 scales in one conversion, then spread to the halves */
            uint16_t h0, h1;
            memcpy(&h0, p, sizeof h0);
            memcpy(&h1, p + bb, sizeof h1);
            __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16))));
            sw[r] = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                          _mm512_castps128_ps512(f));
        } else {
            float s0 = q80 ? q8_0_scale_f16c(p) : ws[(i + r) * G + ga];
            float s1 = two ? (q80 ? q8_0_scale_f16c(p + bb) : ws[(i + r) * G + gb]) : 0.0f;
            sw[r] = q8_halves_ps(s0, s1);
        }
    }
    for (int t = 0; t < NT; t++) {
        __m512i xu = _mm512_xor_si512(q8_load_pair(xr[t] + Q8_0_BLOCK * b, Q8_0_BLOCK, two), c80);
        __m512 sx = wide ? _mm512_set1_ps(sr[t][ga]) : q8_halves_ps(sr[t][ga], two ? sr[t][gb] : 0.0f);
        for (int r = 0; r < NR; r++) {
            __m512i is = _mm512_dpbusd_epi32(nc[r], xu, wv[r]);
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(sw[r], sx), acc[r][t]);
        }
    }
}

/* out[(t0 + t) * ldo + i + r] for r < NR, t < NT. */
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline void q8_tile_vnni(const uint8_t *w, const float *ws, const int8_t *xq,
                                const float *xs, float *out, long n, long bpg, long ldo, long i,
                                long t0, int NR, int NT, int fmt, long pfr) {
    const int q80 = fmt == Q8_FMT_0;
    long nb = n / Q8_0_BLOCK, G = nb / bpg;
    long bb = q80 ? Q8_0_BYTES : Q8_0_BLOCK, rb = nb * bb;
    const uint8_t *wr[4];
    const int8_t *xr[4];
    const float *sr[4];
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++) wr[r] = w + (i + r) * rb;
    for (int t = 0; t < NT; t++) {
        xr[t] = xq + (t0 + t) * n;
        sr[t] = xs + (t0 + t) * G;
        for (int r = 0; r < NR; r++) acc[r][t] = _mm512_setzero_ps();
    }
    /* the rows pfr ahead (0: none), fetched meanwhile */
    const int pf = pfr > 0;
    const char *next = (const char *)(w + (i + pfr) * rb);
    long g = 0, k = 0, b = 0;  /* group of block b, b's place in it */
    for (; b + 2 <= nb; b += 2) {
        if (pf) prefetch_lines(next + NR * bb * b, q80 ? 5 : 4);
        long ga = g;
        if (++k == bpg) { k = 0; g++; }
        long gb = g;
        if (++k == bpg) { k = 0; g++; }
        q8_chunk_vnni(acc, wr, ws, xr, sr, b, ga, gb, i, G, NR, NT, fmt, 1);
    }
    if (b < nb) q8_chunk_vnni(acc, wr, ws, xr, sr, b, g, g, i, G, NR, NT, fmt, 0);
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < NR; r++) out[(t0 + t) * ldo + i + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* matvec. Rows that come from memory (stream: the caller's word that a thread's share is at
 * least PECCA_STREAM_BYTES, more than an L2 holds, so the matrix is not in cache between
 * tokens) are taken one at a time, the row Q8_PF_ROWS ahead prefetched meanwhile: the thread
 * then reads its rows front to back as a single stream. Two rows ahead rather than the next
 * (session 11; ~8.5 KB ahead for 7B's 4096 inputs): 7B-layer Q8_0 decode +4.5% at 1 thread
 * (97% of the read bandwidth), 30 Q8_0 matrices of 4000 x 4096 at 2 threads in the VM's fast
 * state +8.7% (8 gated pairs; 95-100% of the bandwidth), within noise (-2%) in its slow state.
 * f16 rows (8 KB) lost 5% at 1 thread two rows ahead, so they keep the next row.
 * 4-row tiles share each load of x, but their 4 interleaved streams drew only ~80% of the read
 * bandwidth at 1 thread and at 2 threads in this VM's fast state; single rows drew 97-99% (a
 * 570 MB Q8_0 matrix, Zen 5; 7B-layer Q8_0 decode 29.7 -> 35.5 tok/s at 1 thread, 58 -> 67 at
 * 2). In cache the tiles compute faster (73-81 against 49-55 GB/s on one core), so smaller
 * shares keep them. Short rows keep them too (below Q8_STREAM_MIN_ROW bytes): a row's fixed
 * cost (its reduction, a separate pass over x) then outweighs the single stream; 256 MB Q8_0
 * from memory at K = 576 (SmolLM2's classifier): tiles 26.7 / 54.3 GB/s at 1 / 2 threads
 * against rows 22.0 / 41.9; at K = 1024 rows were ahead again (31.3 / 63.7 against 28.7 /
 * 56.3). A row's arithmetic is the same in both forms (and in matmul's tiles). The tiles
 * prefetch the rows at least PECCA_PF_AHEAD bytes ahead (pf_blocks_ahead): the next tile was
 * 2.4 KB ahead at K = 576, and SmolLM2 Q8_0 decode at 1 thread ran at 0.75x llama.cpp's speed
 * on a Zen 4 (in-process A/B: 71.4 -> 109.7 tok/s at 1 thread, +5% at 2; 7B layers equal). */
#ifndef Q8_STREAM_MIN_ROW
#define Q8_STREAM_MIN_ROW 1024
#endif
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline void q8_rows_vnni(const uint8_t *w, const float *ws, const int8_t *xq,
                                const float *xs, float *out, long n, long bpg, long r0, long r1,
                                long pf1, int stream, int fmt) {
    long rb = (n / Q8_0_BLOCK) * (fmt == Q8_FMT_0 ? Q8_0_BYTES : Q8_0_BLOCK);
    long i = r0;
    if (rb >= Q8_STREAM_MIN_ROW && stream) {
        for (; i < r1; i++)
            q8_tile_vnni(w, ws, xq, xs, out, n, bpg, 0, i, 0, 1, 1, fmt, i + 1 + Q8_PF_ROWS <= pf1 ? Q8_PF_ROWS : 0);
        return;
    }
    const long d = 4 * pf_blocks_ahead(4 * rb);  /* rows: short rows' next tile is too close */
    for (; i + 4 <= r1; i += 4) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, 0, i, 0, 4, 1, fmt, i + 4 + d <= pf1 ? d : 0);
    for (; i < r1; i++) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, 0, i, 0, 1, 1, fmt, 0);
}

/* Tiles of 4 rows x 4 tokens (the last 1-3 tokens: 4 rows x that many): each loaded chunk of
 * weights serves every token of the tile, each chunk of x 4 rows; the correction and scales of
 * a row are computed once per chunk for all of them. */
__attribute__((target(PECCA_Q8_VNNI), always_inline))
static inline void q8_gemm_vnni(const uint8_t *w, const float *ws, const int8_t *xq,
                                const float *xs, float *out, long n, long bpg, long T, long ldo,
                                long r0, long r1, int fmt) {
    long i = r0;
    for (; i + 4 <= r1; i += 4) {
        long t = 0;
        for (; t + 4 <= T; t += 4)
            q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 4, 4, fmt, t == 0 && i + 8 <= r1 ? 4 : 0);
        /* the last 1-3 tokens in one tile (prefetching when they are all there is) */
        long pf = t == 0 && i + 8 <= r1 ? 4 : 0;
        if (T - t == 3) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 4, 3, fmt, pf);
        else if (T - t == 2) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 4, 2, fmt, pf);
        else if (T - t == 1) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 4, 1, fmt, pf);
    }
    for (; i < r1; i++) {
        long t = 0;
        for (; t + 4 <= T; t += 4) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 1, 4, fmt, 0);
        for (; t < T; t++) q8_tile_vnni(w, ws, xq, xs, out, n, bpg, ldo, i, t, 1, 1, fmt, 0);
    }
}

__attribute__((target(PECCA_Q8_VNNI)))
static void matvec_q8g_rows_vnni(const int8_t *wq, const float *ws, const int8_t *xq,
                                 const float *xs, float *out, long n, long gs, long r0, long r1,
                                 long pf1, int stream) {
    long bpg = gs / Q8_0_BLOCK;
    if (bpg % 2 == 0) q8_rows_vnni((const uint8_t *)wq, ws, xq, xs, out, n, bpg, r0, r1, pf1, stream, Q8_FMT_GW);
    else q8_rows_vnni((const uint8_t *)wq, ws, xq, xs, out, n, bpg, r0, r1, pf1, stream, Q8_FMT_G);
}

__attribute__((target(PECCA_Q8_VNNI)))
static void matvec_q8_0_rows_vnni(const uint8_t *w, const int8_t *xq, const float *xd,
                                  float *out, long n, long r0, long r1, long pf1, int stream) {
    q8_rows_vnni(w, NULL, xq, xd, out, n, 1, r0, r1, pf1, stream, Q8_FMT_0);
}

__attribute__((target(PECCA_Q8_VNNI)))
static void gemm_q8g_rows_vnni(const int8_t *wq, const float *ws, const int8_t *xq,
                               const float *xs, float *out, long n, long gs, long T, long ldo,
                               long r0, long r1) {
    long bpg = gs / Q8_0_BLOCK;
    if (bpg % 2 == 0) q8_gemm_vnni((const uint8_t *)wq, ws, xq, xs, out, n, bpg, T, ldo, r0, r1, Q8_FMT_GW);
    else q8_gemm_vnni((const uint8_t *)wq, ws, xq, xs, out, n, bpg, T, ldo, r0, r1, Q8_FMT_G);
}

__attribute__((target(PECCA_Q8_VNNI)))
static void gemm_q8_0_rows_vnni(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                                long n, long T, long ldo, long r0, long r1) {
    q8_gemm_vnni(w, NULL, xq, xd, out, n, 1, T, ldo, r0, r1, Q8_FMT_0);
}
#endif /* PECCA_X86 */

/* ---------------- dispatch ---------------- */

/* 2: AVX-512 + VNNI kernels, 1: AVX2 kernels, 0: portable. The AVX-512 level without VNNI
 * runs the AVX2 code. */
static int q8_kernel_level(void) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512 && pecca_vnni_supported()) return 2;
    if (level >= PECCA_SIMD_AVX2) return 1;
#endif
    return 0;
}

/* 1 when the int8 products run on AVX512-VNNI now. */
static int q8_uses_vnni(void) { return q8_kernel_level() == 2; }

/* x (n,) -> qx (n,) int8, sx (n / gs,) float; gs divides n. */
static void quantize_q8g(const float *x, int8_t *qx, float *sx, long n, long gs) {
#if PECCA_X86
    if (gs % 32 == 0 && q8_kernel_level() >= 1) { quantize_q8g_avx2(x, qx, sx, n, gs); return; }
#endif
    quantize_q8g_portable(x, qx, sx, n, gs);
}

/* x (n,) -> qx (n,) int8, dx (n / 32,) float; n % 32 == 0. */
static void quantize_q8_0(const float *x, int8_t *qx, float *dx, long n) {
#if PECCA_X86
    if (q8_kernel_level() >= 1) { quantize_q8_0_avx2(x, qx, dx, n); return; }
#endif
    quantize_q8_0_portable(x, qx, dx, n);
}

/* out[r0:r1] = W[r0:r1] @ x, W q8 groups (wq (rows, n), ws (rows * n / gs)), x quantized by
 * quantize_q8g into xq, xs. pf1 >= r1: rows up to pf1 may be prefetched (the matrix's rows: a
 * thread's next call, work stealing's next claim, then finds its first rows on the way).
 * stream: the rows come from memory (a thread's share of PECCA_STREAM_BYTES or more), so the
 * VNNI kernel reads them one at a time (q8_rows_vnni). */
static void matvec_q8g_rows(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs,
                            float *out, long n, long gs, long r0, long r1, long pf1, int stream) {
#if PECCA_X86
    if (gs % 32 == 0) {
        int level = q8_kernel_level();
        if (level == 2) { matvec_q8g_rows_vnni(wq, ws, xq, xs, out, n, gs, r0, r1, pf1, stream); return; }
        if (level == 1) { matvec_q8g_rows_avx2(wq, ws, xq, xs, out, n, gs, r0, r1, pf1); return; }
    }
#endif
    matvec_q8g_rows_portable(wq, ws, xq, xs, out, n, gs, r0, r1);
}

/* out[r0:r1] = W[r0:r1] @ x, W Q8_0 blocks (row stride n / 32 * 34 bytes), x quantized by
 * quantize_q8_0 into xq, xd; pf1 and stream as matvec_q8g_rows. */
static void matvec_q8_0_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                             long n, long r0, long r1, long pf1, int stream) {
#if PECCA_X86
    int level = q8_kernel_level();
    if (level == 2) { matvec_q8_0_rows_vnni(w, xq, xd, out, n, r0, r1, pf1, stream); return; }
    if (level == 1) { matvec_q8_0_rows_avx2(w, xq, xd, out, n, r0, r1, pf1); return; }
#endif
    matvec_q8_0_rows_portable(w, xq, xd, out, n, r0, r1);
}

/* out[t, r] = W[r] . x[t] for rows [r0, r1) and all T tokens; out (T, ldo). xq (T, n) and
 * xs (T, n / gs): every token quantized by quantize_q8g. */
static void gemm_q8g_rows(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs,
                          float *out, long n, long gs, long T, long ldo, long r0, long r1) {
#if PECCA_X86
    if (gs % 32 == 0) {
        int level = q8_kernel_level();
        if (level == 2) { gemm_q8g_rows_vnni(wq, ws, xq, xs, out, n, gs, T, ldo, r0, r1); return; }
        if (level == 1) { gemm_q8g_rows_avx2(wq, ws, xq, xs, out, n, gs, T, ldo, r0, r1); return; }
    }
#endif
    gemm_q8g_rows_portable(wq, ws, xq, xs, out, n, gs, T, ldo, r0, r1);
}

/* As gemm_q8g_rows for Q8_0 weights; xq (T, n), xd (T, n / 32). */
static void gemm_q8_0_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                           long n, long T, long ldo, long r0, long r1) {
#if PECCA_X86
    int level = q8_kernel_level();
    if (level == 2) { gemm_q8_0_rows_vnni(w, xq, xd, out, n, T, ldo, r0, r1); return; }
    if (level == 1) { gemm_q8_0_rows_avx2(w, xq, xd, out, n, T, ldo, r0, r1); return; }
#endif
    gemm_q8_0_rows_portable(w, xq, xd, out, n, T, ldo, r0, r1);
}

#endif
