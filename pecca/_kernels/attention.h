/* Attention over the KV cache, and the cache's f16 store.
 *
 * The cache holds float32 rows, or IEEE half rows (llama.cpp's default cache type): half the
 * bytes to read at every token, half the memory. The query, the scores and the output stay
 * float32; a half key or value is widened to float32 in registers (F16C / AVX-512 vcvtph2ps)
 * and used exactly as the float32 kernels use theirs. Every half is exactly a float32, and each
 * path has one body for both element types (the macros below, given the loads), so attention
 * over a half cache gives the same bits as over the float32 cache holding the same (rounded)
 * values: the only error of the half cache is the rounding of each key and value when stored.
 *
 * Rounding float32 -> half (floats_to_f16): round to nearest even, as numpy's astype(float16)
 * and vcvtps2ph do; overflow gives inf, nan stays nan.
 */
#ifndef PECCA_ATTENTION_H
#define PECCA_ATTENTION_H

#include <stdint.h>
#include <string.h>
#include "simd.h"
#include "f32_kernels.h"
#include "f16_kernels.h"

/* ---------------- the f16 store ---------------- */

/* float32 -> IEEE half bits, round to nearest even. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t b, a;
    memcpy(&b, &f, sizeof b);
    uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
    a = b & 0x7fffffffu;
    if (a >= 0x7f800000u)  /* inf; nan keeps its top payload bits, made quiet */
        return sign | (a == 0x7f800000u ? 0x7c00u : (uint16_t)(0x7e00u | ((a >> 13) & 0x3ffu)));
    if (a >= 0x477ff000u) return sign | 0x7c00u;  /* 65520 and up round to inf */
    if (a < 0x38800000u) {
        /* below 2^-14: a half subnormal, a multiple of 2^-24. Adding 0.5 (whose float32 ulp is
         * 2^-24) rounds |f| to that multiple, to nearest even, in the float adder; the result's
         * low mantissa bits are the half's bits (0x400: the rounding reached 2^-14) */
        float fa, r;
        uint32_t rb;
        memcpy(&fa, &a, sizeof fa);
        r = fa + 0.5f;
        memcpy(&rb, &r, sizeof rb);
        return sign | (uint16_t)(rb - 0x3f000000u);
    }
    /* normal: re-bias the exponent (127 -> 15) and round off 13 mantissa bits, ties to even;
     * a carry out of the mantissa correctly bumps the exponent */
    a += 0xc8000fffu + ((a >> 13) & 1u);
    return sign | (uint16_t)(a >> 13);
}

static void floats_to_f16_portable(const float *x, uint16_t *out, long n) {
    for (long i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}

#if PECCA_X86
__attribute__((target(PECCA_F16_AVX2)))
static void floats_to_f16_avx2(const float *x, uint16_t *out, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = f32_to_f16(x[i]);
}

__attribute__((target(PECCA_F16_AVX512)))
static void floats_to_f16_avx512(const float *x, uint16_t *out, long n) {
    const int rne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    long i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), rne));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        _mm256_mask_storeu_epi16(out + i, m, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), rne));
    }
}
#endif

/* out[0:n] = x[0:n] rounded to half */
static void floats_to_f16(const float *x, uint16_t *out, long n) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { floats_to_f16_avx512(x, out, n); return; }
    if (level == PECCA_SIMD_AVX2) { floats_to_f16_avx2(x, out, n); return; }
#endif
    floats_to_f16_portable(x, out, n);
}

/* ---------------- attention ---------------- */

/* The KV cache has been pushed out of the caches by the weights streamed since the last
 * layer; cache rows are read in order, so fetch a few rows ahead. */
#define PREFETCH_ROWS 4
static inline void prefetch_bytes(const void *p, long bytes) {
    for (long i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 3);
}
/* n elements of the cache (float or half) from p */
#define PREFETCH_SPAN(p, n) prefetch_bytes((p), (long)(n) * (long)sizeof *(p))

/* Causal attention at position `pos` for query heads [h0, h1).
 * q: (n_heads * head_size,); kc, vc: this layer's caches (seq_len, kv_dim), rows 0..pos filled;
 * att: scores (n_heads, att_stride); out: (n_heads * head_size,). scale = sqrt(head_size).
 * The loops run over cache rows outermost, so each row is read once, front to back, for all
 * heads of the range (a head-outer loop would stride through the cache once per head).
 * One body, instantiated per SIMD path and cache element type so that its dot/axpy inline
 * (DOT(q, key row, n), AXPY(out, a, value row, n)). */
#define ATTENTION_SCORES(DOT, SOFTMAX)                                                         \
    long kv_lo = (h0 / kv_mul) * head_size, kv_hi = ((h1 - 1) / kv_mul + 1) * head_size;        \
    for (long t = 0; t <= pos; t++) {                                                          \
        __auto_type krow = kc + t * kv_dim;                                                    \
        if (PREFETCH_ROWS && t + PREFETCH_ROWS <= pos) PREFETCH_SPAN(krow + PREFETCH_ROWS * kv_dim + kv_lo, kv_hi - kv_lo); \
        for (long h = h0; h < h1; h++)                                                         \
            att[h * att_stride + t] = DOT(q + h * head_size, krow + (h / kv_mul) * head_size,  \
                                          head_size) / scale;                                  \
    }                                                                                          \
    for (long h = h0; h < h1; h++) {                                                           \
        SOFTMAX(att + h * att_stride, pos + 1);                                                \
        for (long i = 0; i < head_size; i++) out[h * head_size + i] = 0.0f;                    \
    }

#define ATTENTION_BODY(DOT, AXPY, SOFTMAX)                                                     \
    ATTENTION_SCORES(DOT, SOFTMAX)                                                             \
    for (long t = 0; t <= pos; t++) {                                                          \
        __auto_type vrow = vc + t * kv_dim;                                                    \
        if (PREFETCH_ROWS && t + PREFETCH_ROWS <= pos) PREFETCH_SPAN(vrow + PREFETCH_ROWS * kv_dim + kv_lo, kv_hi - kv_lo); \
        for (long h = h0; h < h1; h++)                                                         \
            AXPY(out + h * head_size, att[h * att_stride + t],                                 \
                 vrow + (h / kv_mul) * head_size, head_size);                                  \
    }

/* KT: the cache's element type, float or uint16_t (half bits) */
#define ATTENTION_ARGS(KT) const float *q, const KT *kc, const KT *vc, float *att,             \
    long att_stride, float *out, long h0, long h1, long pos, long head_size, long kv_dim,      \
    long kv_mul, float scale
#define ATTENTION_PASS q, kc, vc, att, att_stride, out, h0, h1, pos, head_size, kv_dim, kv_mul, scale

/* The portable path sums each score front to back, as llama2.c's run.c and runq.c do: with
 * int8 activations a last-bit difference can flip a quantized value, so reproducing runq.c's
 * tokens needs its exact float arithmetic (scores / sqrt(head_size), softmax by division,
 * no fused multiply-add; baseline x86-64 has none to contract into). */
static inline float dot_sequential(const float *a, const float *b, long n) {
    float s = 0.0f;
    for (long j = 0; j < n; j++) s += a[j] * b[j];
    return s;
}

/* the half cache's dot and axpy: the float32 forms' arithmetic on widened values */
static inline float dot_sequential_f16(const float *a, const uint16_t *b, long n) {
    float s = 0.0f;
    for (long j = 0; j < n; j++) s += a[j] * f16_to_f32(b[j]);
    return s;
}

static void axpy_f16_portable(float *y, float a, const uint16_t *x, long n) {
    for (long j = 0; j < n; j++) y[j] += a * f16_to_f32(x[j]);
}

static void attention_heads_portable(ATTENTION_ARGS(float)) { ATTENTION_BODY(dot_sequential, axpy_portable, softmax_portable) }
static void attention_heads_f16_portable(ATTENTION_ARGS(uint16_t)) { ATTENTION_BODY(dot_sequential_f16, axpy_f16_portable, softmax_portable) }

#if PECCA_X86
__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline float dot_f16_avx2(const float *q, const uint16_t *k, long n) { return dot_half_avx2(k, q, n, 0); }

__attribute__((target(PECCA_F16_AVX2)))
static void axpy_f16_avx2(float *y, float a, const uint16_t *x, long n) {
    __m256 va = _mm256_set1_ps(a);
    long j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, load8_half_avx2(x + j, 0), _mm256_loadu_ps(y + j)));
    for (; j < n; j++) y[j] += a * f16_to_f32(x[j]);
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline float dot_f16_avx512(const float *q, const uint16_t *k, long n) { return dot_half_avx512(k, q, n, 0); }

__attribute__((target(PECCA_F16_AVX512)))
static void axpy_f16_avx512(float *y, float a, const uint16_t *x, long n) {
    __m512 va = _mm512_set1_ps(a);
    long j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(y + j, _mm512_fmadd_ps(va, load16_half_avx512(x + j, 0), _mm512_loadu_ps(y + j)));
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
        __m512 yv = _mm512_maskz_loadu_ps(m, y + j);
        _mm512_mask_storeu_ps(y + j, m, _mm512_fmadd_ps(va, load16m_half_avx512(m, x + j, 0), yv));
    }
}

__attribute__((target("avx2,fma")))
static void attention_heads_avx2_rows(ATTENTION_ARGS(float)) { ATTENTION_BODY(dot_avx2, axpy_avx2, softmax_avx2) }
__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void attention_heads_avx512_rows(ATTENTION_ARGS(float)) { ATTENTION_BODY(dot_avx512, axpy_avx512, softmax_avx512) }
__attribute__((target(PECCA_F16_AVX2)))
static void attention_heads_f16_avx2_rows(ATTENTION_ARGS(uint16_t)) { ATTENTION_BODY(dot_f16_avx2, axpy_f16_avx2, softmax_avx2) }
__attribute__((target(PECCA_F16_AVX512)))
static void attention_heads_f16_avx512_rows(ATTENTION_ARGS(uint16_t)) { ATTENTION_BODY(dot_f16_avx512, axpy_f16_avx512, softmax_avx512) }

/* The vector paths, for head sizes that are whole vectors: ATTENTION_BODY's scores, and its
 * values with the output in registers instead of loaded and stored for every position (most of
 * the time went there). Value rows are taken in blocks of 16 (AVX-512) / 8 (AVX2) positions,
 * which stay in L1 while every head of the range uses them, so the cache is still read once,
 * front to back; per block the output of up to 4 heads sharing a kv head is loaded into
 * registers, accumulated and stored. Each output element is the same FMA chain over positions
 * 0..pos, in order, as axpy's: the same bits as ATTENTION_BODY. */

/* out of heads h .. h + NH - 1 (sharing the value rows at vh), columns [W c0, W (c0 + C)),
 * += positions [t0, t1); VLOAD widens W cache values to a vector */
#define ATT_VALUES_TILE(VEC, W, LOAD, VLOAD, STORE, SET1, FMA)                                  \
    VEC acc[4][4];                                                                             \
    for (int j = 0; j < NH; j++)                                                               \
        for (int s = 0; s < C; s++) acc[j][s] = LOAD(out + (h + j) * head_size + W * (c0 + s)); \
    for (long t = t0; t < t1; t++) {                                                           \
        __auto_type vr = vh + t * kv_dim + W * c0;                                             \
        VEC a[4];                                                                              \
        for (int j = 0; j < NH; j++) a[j] = SET1(att[(h + j) * att_stride + t]);               \
        for (int s = 0; s < C; s++) {                                                          \
            VEC v = VLOAD(vr + W * s);                                                         \
            for (int j = 0; j < NH; j++) acc[j][s] = FMA(a[j], v, acc[j][s]);                  \
        }                                                                                      \
    }                                                                                          \
    for (int j = 0; j < NH; j++)                                                               \
        for (int s = 0; s < C; s++) STORE(out + (h + j) * head_size + W * (c0 + s), acc[j][s]);

#define ATT_VALUES_TILE_ARGS(KT) const float *att, long att_stride, const KT *vh, float *out,   \
    long h, long t0, long t1, long head_size, long kv_dim, long c0, const int NH, const int C

#define LOAD16_F16(p) load16_half_avx512((p), 0)
#define LOAD8_F16(p) load8_half_avx2((p), 0)

__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline void att_values_avx512(ATT_VALUES_TILE_ARGS(float)) {
    ATT_VALUES_TILE(__m512, 16, _mm512_loadu_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps)
}

__attribute__((target("avx2,fma"), always_inline))
static inline void att_values_avx2(ATT_VALUES_TILE_ARGS(float)) {
    ATT_VALUES_TILE(__m256, 8, _mm256_loadu_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps)
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void att_values_f16_avx512(ATT_VALUES_TILE_ARGS(uint16_t)) {
    ATT_VALUES_TILE(__m512, 16, _mm512_loadu_ps, LOAD16_F16, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps)
}

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void att_values_f16_avx2(ATT_VALUES_TILE_ARGS(uint16_t)) {
    ATT_VALUES_TILE(__m256, 8, _mm256_loadu_ps, LOAD8_F16, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps)
}

/* heads h .. h + NH - 1, all S vectors of each head in tiles of at most 4 (16 accumulators) */
#define ATT_VALUES_HEADS(TILE)                                                                 \
    int c = 0;                                                                                 \
    for (; c + 4 <= S; c += 4) TILE(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, c, NH, 4); \
    if (S - c == 3) TILE(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, c, NH, 3);    \
    else if (S - c == 2) TILE(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, c, NH, 2); \
    else if (S - c == 1) TILE(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, c, NH, 1);

#define ATT_VALUES_HEADS_ARGS(KT) const float *att, long att_stride, const KT *vh, float *out,  \
    long h, long t0, long t1, long head_size, long kv_dim, const int NH, const int S

__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline void att_heads_avx512(ATT_VALUES_HEADS_ARGS(float)) { ATT_VALUES_HEADS(att_values_avx512) }

__attribute__((target("avx2,fma"), always_inline))
static inline void att_heads_avx2(ATT_VALUES_HEADS_ARGS(float)) { ATT_VALUES_HEADS(att_values_avx2) }

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void att_heads_f16_avx512(ATT_VALUES_HEADS_ARGS(uint16_t)) { ATT_VALUES_HEADS(att_values_f16_avx512) }

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void att_heads_f16_avx2(ATT_VALUES_HEADS_ARGS(uint16_t)) { ATT_VALUES_HEADS(att_values_f16_avx2) }

/* The whole product for head vectors of W floats, S of them; W-position blocks, each block's
 * heads in groups sharing a kv head (at most 4 per group), the next block's rows prefetched a
 * share after each group. */
#define ATTENTION_VEC(W, DOT, SOFTMAX, HEADS)                                                  \
    ATTENTION_SCORES(DOT, SOFTMAX)                                                             \
    for (long t = 0; t < W && t <= pos; t++) PREFETCH_SPAN(vc + t * kv_dim + kv_lo, kv_hi - kv_lo); \
    for (long t0 = 0; t0 <= pos; t0 += W) {                                                    \
        long t1 = t0 + W <= pos + 1 ? t0 + W : pos + 1;                                        \
        long nn = pos + 1 - t1 < W ? pos + 1 - t1 : W, nh = h1 - h0;                           \
        for (long h = h0; h < h1;) {                                                           \
            long end = (h / kv_mul + 1) * kv_mul, hp = h;                                      \
            long hn = (end < h1 ? end : h1) - h;                                               \
            __auto_type vh = vc + (h / kv_mul) * head_size;                                    \
            if (hn >= 4) { HEADS(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, 4, S); h += 4; } \
            else if (hn == 3) { HEADS(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, 3, S); h += 3; } \
            else if (hn == 2) { HEADS(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, 2, S); h += 2; } \
            else { HEADS(att, att_stride, vh, out, h, t0, t1, head_size, kv_dim, 1, S); h += 1; } \
            for (long t = t1 + nn * (hp - h0) / nh; t < t1 + nn * (h - h0) / nh; t++)          \
                PREFETCH_SPAN(vc + t * kv_dim + kv_lo, kv_hi - kv_lo);                         \
        }                                                                                      \
    }

__attribute__((target("avx512f,avx512bw,avx512vl,fma"), always_inline))
static inline void attention_vec_avx512(ATTENTION_ARGS(float), const int S) {
    ATTENTION_VEC(16, dot_avx512, softmax_avx512, att_heads_avx512)
}

__attribute__((target("avx2,fma"), always_inline))
static inline void attention_vec_avx2(ATTENTION_ARGS(float), const int S) {
    ATTENTION_VEC(8, dot_avx2, softmax_avx2, att_heads_avx2)
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void attention_vec_f16_avx512(ATTENTION_ARGS(uint16_t), const int S) {
    ATTENTION_VEC(16, dot_f16_avx512, softmax_avx512, att_heads_f16_avx512)
}

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void attention_vec_f16_avx2(ATTENTION_ARGS(uint16_t), const int S) {
    ATTENTION_VEC(8, dot_f16_avx2, softmax_avx2, att_heads_f16_avx2)
}

/* a constant S for each common head size; other sizes through the row-by-row body */
#define ATTENTION_SWITCH_AVX512(VEC, ROWS)                                                     \
    if (head_size % 16 || head_size > 256) { ROWS(ATTENTION_PASS); return; }                   \
    switch (head_size / 16) {                                                                  \
    case 2: VEC(ATTENTION_PASS, 2); return;                                                    \
    case 3: VEC(ATTENTION_PASS, 3); return;                                                    \
    case 4: VEC(ATTENTION_PASS, 4); return;                                                    \
    case 8: VEC(ATTENTION_PASS, 8); return;                                                    \
    default: VEC(ATTENTION_PASS, (int)(head_size / 16));                                       \
    }

#define ATTENTION_SWITCH_AVX2(VEC, ROWS)                                                       \
    if (head_size % 8 || head_size > 256) { ROWS(ATTENTION_PASS); return; }                    \
    switch (head_size / 8) {                                                                   \
    case 6: VEC(ATTENTION_PASS, 6); return;                                                    \
    case 8: VEC(ATTENTION_PASS, 8); return;                                                    \
    case 16: VEC(ATTENTION_PASS, 16); return;                                                  \
    default: VEC(ATTENTION_PASS, (int)(head_size / 8));                                        \
    }

__attribute__((target("avx512f,avx512bw,avx512vl,fma")))
static void attention_heads_avx512(ATTENTION_ARGS(float)) {
    ATTENTION_SWITCH_AVX512(attention_vec_avx512, attention_heads_avx512_rows)
}

__attribute__((target("avx2,fma")))
static void attention_heads_avx2(ATTENTION_ARGS(float)) {
    ATTENTION_SWITCH_AVX2(attention_vec_avx2, attention_heads_avx2_rows)
}

__attribute__((target(PECCA_F16_AVX512)))
static void attention_heads_f16_avx512(ATTENTION_ARGS(uint16_t)) {
    ATTENTION_SWITCH_AVX512(attention_vec_f16_avx512, attention_heads_f16_avx512_rows)
}

__attribute__((target(PECCA_F16_AVX2)))
static void attention_heads_f16_avx2(ATTENTION_ARGS(uint16_t)) {
    ATTENTION_SWITCH_AVX2(attention_vec_f16_avx2, attention_heads_f16_avx2_rows)
}
#endif

/* attention over a float32 cache */
static void attention_heads_f32(ATTENTION_ARGS(float)) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { attention_heads_avx512(ATTENTION_PASS); return; }
    if (level == PECCA_SIMD_AVX2) { attention_heads_avx2(ATTENTION_PASS); return; }
#endif
    attention_heads_portable(ATTENTION_PASS);
}

/* attention over a half cache (uint16_t bit patterns) */
static void attention_heads_f16(ATTENTION_ARGS(uint16_t)) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { attention_heads_f16_avx512(ATTENTION_PASS); return; }
    if (level == PECCA_SIMD_AVX2) { attention_heads_f16_avx2(ATTENTION_PASS); return; }
#endif
    attention_heads_f16_portable(ATTENTION_PASS);
}

#endif
