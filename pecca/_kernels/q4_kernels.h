/* 4-bit weights: products y = W x with W (N, K) stored as 4-bit codes, read in place.
 *
 * Layouts (see /tmp/q4_spec.md, "pecca 4-bit design"):
 *  q4g (pecca's repacked GPTQ): qs uint8 (N, K/2): row n, block b of 32 (permuted) inputs is
 *    bytes [16b, 16b+16): byte j's low nibble is the code of input 32b+j, its high nibble the code
 *    of input 32b+16+j (Q4_0's order). scales f16 (N, G), zeros int8 (N, G) (true zero points
 *    0..15), optional perm int32 (K,): input i of the product is x[perm[i]]. gs = K / G;
 *    W[n, perm[i]] = scales[n, i/gs] * (code(n, i) - zeros[n, i/gs]).
 *    Or in the quad layout (fmt | Q4_FMT_QUADS; N % 4 == 0, K % 128 == 0): the same bytes with
 *    each quad of rows' 64 bytes of step s side by side (q4g_row, q4g_block_off below).
 *  Q4_0 (GGUF): per 32-block 18 bytes: f16 d, 16 bytes of nibbles (same order); w = d * (q - 8).
 *  Q4_1 (GGUF): per 32-block 20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m.
 *  gptq (native HF): qweight int32 (K/8, N): code of input 8r+k, column j is
 *    (qweight[r, j] >> 4k) & 15; qzeros int32 (G, N/8): zero of (g, 8c+k) is
 *    ((qzeros[g, c] + zero_add) >> 4k) & 15 (whole-word add: v1's stored words borrow);
 *    scales f16 (G, N); g_idx int32 (K,) (any order); optional out_perm: out[i] = y[out_perm[i]].
 *
 * int8-activation path (q4g with gs % 32 == 0, Q4_0, Q4_1): integer dot products with x
 * quantized per 32-block to TWO int8 levels. Why two: one level (llama.cpp's Q8_0 scheme,
 * d = amax/127) errs by up to amax/254 per activation, ~1% of a product's scale, and 1-5% of
 * the logit scale through a 30-layer model (SmolLM2: as far from fp32 as llama.cpp, sometimes
 * farther, by chance). Here d = amax / 32512 (float32), q = round(x / d) (half away from zero,
 * NaN -> 0, clamped: |q| <= 32512 = 127 * 256), split q = 256 hi + lo with lo the signed low
 * byte (-128..127) and hi = (q - lo) / 256 (-127..127): the error is amax/65024 per activation,
 * ~2e-5 of a product's scale (tests/kernels/test_q4_kernels.py), 1e-4 .. 3e-4 of the logit scale
 * on SmolLM2, and every dot stays integer: dot = 256 sum(w hi) + sum(w lo), the same nibble
 * codes (unsigned 0..15: the unsigned operand of maddubs / vpdpbusd as they are) against both
 * levels. Cost: twice the integer multiply-adds and twice the activation bytes. Measured on a
 * 2-core AVX-512 VNNI machine against the one-level kernels (7B shapes 11008x4096, 4096x11008;
 * q4g gs 128 act-order and Q4_0): matvec from DRAM as fast at 2 threads (bandwidth-bound,
 * -2..+4%), at 1 thread 15-30% faster except q4g with K = 11008 (8-10% slower); with the matrix
 * in L2 (compute) 1-9% slower; matmul T=64 -11..+5%. (The AVX2 matvec, measured then, 7-22%
 * slower at 1 thread.)
 * Each token is prepared once per product (q4_prepare_int8, vectorised: 4 blocks' scales from
 * one division): hi and lo, each rearranged per step of 4 blocks (128 inputs) as [elements 0..15
 * of blocks 0,1,2,3 | elements 16..31 of blocks 0,1,2,3], so that the low nibbles of 64
 * contiguous code bytes meet the first 64 bytes and the high nibbles the next 64 without any
 * shuffle of the weights. Alongside: d_b repeated 4x (per int32 lane of a block), the block sums
 * xs_b = d_b * sum(q) (exact integer sum, one rounding), -8 sum(q_b) (Q4_0: the zero point 8 as
 * an integer; also per lane for AVX2), xs_b / 4 per lane (AVX2 Q4_1), the group sums X_g = sum of
 * xs_b over the group (q4g). Int32 lane l of a block covers its elements 4l..4l+3 and
 * 16+4l..16+4l+3. Bounds: each int16 of AVX2's maddubs(lo nibbles) + maddubs(hi nibbles) is at
 * most 4 * 15 * 128 = 7680 < 32767 (no saturation); a lane's 256 * 15240 + 15360 + 8 * 8 *
 * 32512 < 2^23 and a block's 32 * 15 * 32640 < 2^24: exact in int32 and in float. Per row:
 *   q4g:  sum_b (d_b s_g(b)) * dot_b  -  sum_g s_g z_g X_g   (the second sum once per row and
 *         token, 16 groups per vector)
 *   Q4_0: sum_b (d_b d_w) * (dot_b - 8 sum q_b)                (integer, exact)
 *   Q4_1: sum_b (d_b d_w) * dot_b + m_b xs_b
 *  AVX2: 2 blocks (64 inputs) per step on ymm (low 128 bits block b, high b+1). matvec: per
 *  row 4 maddubs, then madd by 256 (hi) and by 1 (lo). matmul: the activations put back
 *  together as int16 q = 256 hi + lo once per product, the codes widened to int16 in place (per
 *  16-bit word: & 15, >> 8 & 15, >> 4 & 15, >> 12; Q4_0 minus 8) against the same selections of
 *  q: 4 madds per (row, token) step instead of 4 maddubs + 2 madds (the AVX2 bottleneck: madd,
 *  maddubs and FMA share two pipes), the same int32 lanes as the matvec's (Q4_0: with its -8
 *  sum q lane terms). Two (row, token) products share the float work: lanes l and l + 2 of both
 *  are added in integers (unpacklo/hi_epi64) into [p p q q | p p q q], converted, scaled by the
 *  matching d_b d_w halves in one FMA (Q4_1: plus m * xs / 2 per lane); matvec pairs two rows,
 *  matmul one row with two tokens, in tiles of 1 row x 8 token pairs (each row's codes widened
 *  once for 16 tokens) over chunks of 16 steps (that x in L1) and panels of 32 rows (in L2);
 *  a (row, token)'s result is (lane 0 + lane 4) + (lane 1 + lane 5) of its pair (q4g: minus
 *  sum_g s_g z_g X_g, 8 groups per vector). AVX-512 + VNNI: 4 blocks per step on zmm, 4 vpdpbusd per (row, token)
 *  (hi's two, shifted left 8, start lo's two); the 4 lane sums of a block are added in integers
 *  across 4 rows (a "quad": lane 4 blk + j = row j's block blk, 6 unpacks + 3 adds), so the
 *  float work (convert, scale d_b d_w, fma; Q4_1 also m xs) is one vector per 4 rows; Q4_0 /
 *  Q4_1's 18 / 20-byte blocks are gathered with one vpermt2w per row (the code bytes of 4
 *  blocks) and, per quad, two vpermt2w + a blend (the 4 rows' f16 scales); q4g's group scales
 *  are laid out per quad once per tile (scratch from the caller). Tiles of 4 rows x up to 4
 *  tokens (each row's codes loaded once for all of them); matvec prefetches the rows 6 quads
 *  ahead into L2 (Zen 5, into L1: 1 quad ahead lost 10-25% at 1 thread, 5 no better than 3;
 *  Zen 4, into L2: 6 quads 1.0-1.2x 3 quads; 8-row tiles lost ~8% at 2 threads), q4g's scales and
 *  zero points one quad ahead; for K >= 8192 the matvec instead takes panels of 2 quads through
 *  K in chunks of 4 steps, so that the token's activations stay in L1 (q4_mv_chunked_vnni);
 *  matmul runs panels of 64 rows (in L2) against each group of 4 tokens. The AVX-512 level
 *  without VNNI runs the AVX2 code, like q8. Integer sums are exact;
 *  only the float accumulation rounds (~1e-6 relative). A (row, token) gets the same operations
 *  in the same order in matvec and in matmul (any tile): bit-identical rows.
 *
 * float-activation path (q4g with any gs dividing K, Q4_0, Q4_1; also forced by float_act):
 *  codes widened to float and multiplied with float x (x gathered by perm first). q4g sums per
 *  group, then s * gsum, and subtracts sum_g s_g z_g X_g (X_g: sums of x); Q4_0 widens q - 8;
 *  Q4_1 adds m_b * (sum of x over the block). AVX-512 for whole-block groups (Q4_0, Q4_1, q4g
 *  with gs % 32 == 0); AVX2 for those on the AVX2 level and for the other gs % 8 == 0 on both
 *  levels; portable otherwise.
 *
 * gptq (float activations): threads own ranges of output columns; each chunk of columns walks
 *  the packed rows (contiguous along N), keeping per-group partial sums acc[g][col] of x_i * code
 *  (in registers while g_idx stays the same, added to acc[g] when it changes, so act-order
 *  works), then y = sum_g s * (acc[g] - z * xsum_g), xsum_g the sum of x over the group's inputs.
 *  Each column is computed lane-wise, so chunk widths and token tiles do not change its bits.
 *  Nibble k of a word is masked in place (code * 16^k converts exactly) and multiplied by
 *  x * 16^-k (exact power-of-two scaling, prepared per token), saving a shift. AVX2 (8 columns
 *  per vector) and AVX-512 (16; any AVX-512 CPU, VNNI not needed). Packed rows are 4N bytes
 *  apart, so the next rows are prefetched in software.
 *
 * Portable code is plain scalar C over the same layouts (its own summation order, no FMA: the
 * baseline x86-64 build has none), used for PECCA_SIMD=portable and non-x86 CPUs.
 */
#ifndef PECCA_Q4_KERNELS_H
#define PECCA_Q4_KERNELS_H

#include <stdint.h>
#include <string.h>
#include <math.h>
#include "simd.h"
#include "f32_kernels.h"
#include "f16_kernels.h"
#include "q8_kernels.h"

#define Q4_QK 32
#define Q4_0_BYTES 18
#define Q4_1_BYTES 20
#define Q4_STEP 128

/* matvec, shares of PECCA_STREAM_BYTES or more: each step's prefetch of the rows ahead takes
 * this many lines more than the step reads, so that each line is asked for several times and
 * the leading edge runs a few lines further. Why it helps is not pinned down (dropped or late
 * prefetches are the guess); measured on Zen 4, as HALF_PF_LINES for f16 (f16_kernels.h):
 * harness, q4g 4096 x 11008 +9-17% at 1 thread, +4-7% at 2; Q4_0 4096 x 4096 +0-10% / +0-22%;
 * 7B-layer GPTQ decode +5% at 2 threads, equal at 1 (in-process A/B). Smaller shares keep
 * the exact lines: SmolLM2's GPTQ products lost 3% with the extra ones. */
#ifndef Q4_PF_EXTRA
#define Q4_PF_EXTRA 4
#endif
#define Q4_MV_PQ 2   /* chunked VNNI matvec: quads per panel (q4_mv_chunked_vnni) */
#define Q4_MV_CS 4   /* chunked VNNI matvec: steps per chunk of K (1.3 KB of activations) */

#define Q4_FMT_G 0
#define Q4_FMT_0 1
#define Q4_FMT_1 2
/* added to Q4_FMT_G by the callers of q4_int8_rows / q4_f32_rows: the quad layout (below) */
#define Q4_FMT_QUADS 4

/* q4g scales within a SIMD step: one group for the whole step (W), one group per block (1),
 * anything else (X, looked up block by block). */
#define Q4_SF_W 0
#define Q4_SF_1 1
#define Q4_SF_X 2

static inline long q4_block_bytes(int fmt) {
    return fmt == Q4_FMT_G ? 16 : (fmt == Q4_FMT_0 ? Q4_0_BYTES : Q4_1_BYTES);
}

static inline long q4_row_bytes(int fmt, long K) { return K / Q4_QK * q4_block_bytes(fmt); }

/* offset of the codes inside a block */
static inline long q4_code_offset(int fmt) { return fmt == Q4_FMT_G ? 0 : (fmt == Q4_FMT_0 ? 2 : 4); }

static inline long q4_padded(long K) { return (K + Q4_STEP - 1) / Q4_STEP * Q4_STEP; }

/* q4g's two layouts of the codes. rows: row r's bytes at r rb (rb = K / 2). quads (N % 4 == 0,
 * K % 128 == 0): the rows 4 at a time, and within a quad its 4 rows' 64 code bytes of step s
 * (inputs 128 s .. 128 s + 127) side by side at 256 s: a 4-row tile then reads one contiguous
 * stream instead of 4 rows 2 KB apart (harness, Zen 4, q4g 4096 x 4096 from DRAM: +7-9% at 1
 * thread, +4-14% at 2). Either way a row's step s is at q4g_row(...) + s * q4g_step_stride(quad)
 * and its block b at q4g_row(...) + q4g_block_off(quad, b). */
static inline long q4g_step_stride(int quad) { return quad ? 256 : 64; }

static inline const uint8_t *q4g_row(const uint8_t *w, long r, long rb, int quad) {
    return quad ? w + (r & ~3L) * rb + (r & 3) * 64 : w + r * rb;
}

static inline long q4g_block_off(int quad, long b) { return (b >> 2) * q4g_step_stride(quad) + (b & 3) * 16; }

/* the dispatchers' call of the product (their Q4_GEMM) for either layout, the layout a
 * constant in each (the inlined kernels then have no layout test in their loops) */
#define Q4_GEMM_LAYOUTS(F, SF) do { if (quad) Q4_GEMM(F, SF, 1); else Q4_GEMM(F, SF, 0); } while (0)

static inline uint16_t q4_u16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

static inline uint32_t q4_u32(const uint8_t *p) {
    uint32_t h;
    memcpy(&h, p, sizeof h);
    return h;
}

/* ---------------- prepared activations ----------------
 * int8 path, one token, Kp = K rounded up to 128 (the padding is zeros). Each block of 32 inputs
 * is quantized to q = round(x / d), d = amax / Q4_QMAX, |q| <= Q4_QMAX, split q = 256 hi + lo
 * (lo the signed low byte, hi in [-127, 127]):
 *   [0, 2 Kp)            int8 codes, per step of 4 blocks (128 inputs) 256 bytes: hi then lo,
 *                        each rearranged as [elements 0..15 of blocks 0..3 | elements 16..31]
 *   [2 Kp, 2.5 Kp)       float sx4[Kp/8]: d_b repeated 4 times
 *   [2.5 Kp, 3 Kp)       Q4_0: int32 [Kp/8], -8 * the lane sums of q; Q4_1: float xs_b / 4 per lane
 *   [3 Kp, 3.125 Kp)     float xsb[Kp/32]: d_b * sum(q_b)
 *   [3.125 Kp, 3.25 Kp)  int32 nqb[Kp/32] (Q4_0): -8 * sum(q_b)
 *   then                 float X[G] (q4g): sums of xsb over each group
 */
#define Q4_QMAX 32512  /* 127 * 256: hi stays in [-127, 127] */
#define Q4_ASTEP 256   /* activation code bytes per step of 128 inputs */
#define Q4_A_SX(Kp) (2 * (Kp))
#define Q4_A_EXT(Kp) (2 * (Kp) + (Kp) / 2)
#define Q4_A_XSB(Kp) (3 * (Kp))
#define Q4_A_NQB(Kp) (3 * (Kp) + (Kp) / 8)
#define Q4_A_XG(Kp) (3 * (Kp) + (Kp) / 4)

static inline long q4_act_bytes(long K, long G) {
    long Kp = q4_padded(K);
    long n = Q4_A_XG(Kp) + 4 * G;
    return (n + 63) / 64 * 64;
}

/* float path, one token: x (gathered by perm) then the sums (G for q4g, K/32 for Q4_1) */
static inline long q4_actf_floats(long K, long G) {
    long s = G > K / Q4_QK ? G : K / Q4_QK;
    return (K + s + 15) / 16 * 16;
}

/* round half away from zero of v clamped to [-Q4_QMAX, Q4_QMAX]; NaN -> 0 (q8_round's steps:
 * v - trunc(v) is exact for |v| < 2^23, so the half-way test is exact) */
static inline int32_t q4_round16(float v) {
    if (v != v) return 0;
    if (v > (float)Q4_QMAX) v = (float)Q4_QMAX;
    if (v < -(float)Q4_QMAX) v = -(float)Q4_QMAX;
    float t = (float)(int32_t)v, d = v - t;
    if (d >= 0.5f) t += 1.0f;
    else if (d <= -0.5f) t -= 1.0f;
    return (int32_t)t;
}

/* the per-block values next to the codes: sx4, the Q4_0 / Q4_1 lane values, xsb */
static inline void q4_block_sums(int fmt, uint8_t *act, long Kp, long b, float d,
                                 const int32_t lanes[4]) {
    float *sx4 = (float *)(act + Q4_A_SX(Kp)), *xsb = (float *)(act + Q4_A_XSB(Kp));
    int32_t *nc = (int32_t *)(act + Q4_A_EXT(Kp));
    float *xs4 = (float *)(act + Q4_A_EXT(Kp));
    int32_t isum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    float xs = d * (float)isum;  /* |isum| <= 32 * Q4_QMAX < 2^24: exact */
    xsb[b] = xs;
    ((int32_t *)(act + Q4_A_NQB(Kp)))[b] = -8 * isum;
    for (int l = 0; l < 4; l++) {
        sx4[4 * b + l] = d;
        if (fmt == Q4_FMT_0) nc[4 * b + l] = -8 * lanes[l];
        if (fmt == Q4_FMT_1) xs4[4 * b + l] = xs * 0.25f;
    }
}

/* blocks [0, nb) of x -> act (codes and per-block values), scalar */
static void q4_quantize_portable(int fmt, const float *x, uint8_t *act, long Kp, long nb) {
    int8_t *codes = (int8_t *)act;
    for (long b = 0; b < nb; b++) {
        const float *xb = x + Q4_QK * b;
        float amax = 0.0f;
        for (int j = 0; j < Q4_QK; j++) {
            float v = fabsf(xb[j]);
            if (v > amax) amax = v;
        }
        float d = amax / (float)Q4_QMAX;
        int32_t lanes[4] = {0, 0, 0, 0};
        int8_t *st = codes + Q4_ASTEP * (b >> 2) + 16 * (b & 3);
        for (int j = 0; j < Q4_QK; j++) {
            int32_t q = d != 0.0f ? q4_round16(xb[j] / d) : 0;
            int32_t hi = (q + 128) >> 8;  /* floor((q + 128) / 256): lo = q - 256 hi in [-128, 127] */
            int o = j < 16 ? j : 64 + j - 16;
            st[o] = (int8_t)hi;
            st[128 + o] = (int8_t)(q - 256 * hi);
            lanes[(j & 15) >> 2] += q;
        }
        q4_block_sums(fmt, act, Kp, b, d, lanes);
    }
}

#if PECCA_X86
#define PECCA_Q4_AVX2 "avx2,fma,f16c"

/* q4_round16 on 8 lanes: NaN -> 0, clamp, then |v| + nextafter(0.5, 0) rounded to float and
 * truncated, which is round half away from zero exactly for every float |v| <= 32512.5 (checked
 * over all of them; the float sum rounds up to the next integer only from v >= k + 0.5) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256i q4_round16_avx2(__m256 v) {
    const __m256 lim = _mm256_set1_ps((float)Q4_QMAX);
    v = _mm256_and_ps(v, _mm256_cmp_ps(v, v, _CMP_ORD_Q));
    v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    __m256 h = _mm256_or_ps(_mm256_and_ps(v, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(0.49999997f));
    return _mm256_cvttps_epi32(_mm256_add_ps(v, h));
}

/* block b of x (at xb) with its scale d in every lane of vd -> codes, sx4, ext, xsb */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_qblock_avx2(int fmt, const float *xb, __m256 vd, uint8_t *act, long Kp, long b) {
    int8_t *codes = (int8_t *)act;
    float *sx4 = (float *)(act + Q4_A_SX(Kp)), *xsb = (float *)(act + Q4_A_XSB(Kp));
    uint8_t *ext = act + Q4_A_EXT(Kp);
    const __m256i r128 = _mm256_set1_epi16(128);
    /* d = 0: x / d is NaN or +-inf (x = 0 or subnormal); q must be 0 */
    __m256 ok = _mm256_cmp_ps(vd, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    __m256i r0 = q4_round16_avx2(_mm256_and_ps(_mm256_div_ps(_mm256_loadu_ps(xb), vd), ok));
    __m256i r1 = q4_round16_avx2(_mm256_and_ps(_mm256_div_ps(_mm256_loadu_ps(xb + 8), vd), ok));
    __m256i r2 = q4_round16_avx2(_mm256_and_ps(_mm256_div_ps(_mm256_loadu_ps(xb + 16), vd), ok));
    __m256i r3 = q4_round16_avx2(_mm256_and_ps(_mm256_div_ps(_mm256_loadu_ps(xb + 24), vd), ok));
    /* int16 q of elements 0..15 and 16..31 (packs interleave the 128-bit halves) */
    __m256i qa = _mm256_permute4x64_epi64(_mm256_packs_epi32(r0, r1), 0xD8);
    __m256i qb = _mm256_permute4x64_epi64(_mm256_packs_epi32(r2, r3), 0xD8);
    __m256i ha = _mm256_srai_epi16(_mm256_add_epi16(qa, r128), 8);
    __m256i hb = _mm256_srai_epi16(_mm256_add_epi16(qb, r128), 8);
    __m256i la = _mm256_sub_epi16(qa, _mm256_slli_epi16(ha, 8));
    __m256i lb = _mm256_sub_epi16(qb, _mm256_slli_epi16(hb, 8));
    __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi16(ha, hb), 0xD8);
    __m256i l = _mm256_permute4x64_epi64(_mm256_packs_epi16(la, lb), 0xD8);
    int8_t *st = codes + Q4_ASTEP * (b >> 2) + 16 * (b & 3);
    _mm_storeu_si128((__m128i *)st, _mm256_castsi256_si128(h));
    _mm_storeu_si128((__m128i *)(st + 64), _mm256_extracti128_si256(h, 1));
    _mm_storeu_si128((__m128i *)(st + 128), _mm256_castsi256_si128(l));
    _mm_storeu_si128((__m128i *)(st + 192), _mm256_extracti128_si256(l, 1));
    /* lane l: elements 4l..4l+3 and 16+4l..16+4l+3 */
    __m256i a = _mm256_add_epi32(r0, r2), c = _mm256_add_epi32(r1, r3);
    __m256i s1 = _mm256_hadd_epi32(a, c);  /* [a01 a23 c01 c23 | a45 a67 c45 c67] */
    __m256i s2 = _mm256_hadd_epi32(s1, s1);  /* [a0123 c0123 . . | a4567 c4567 . .] */
    __m128i lanes = _mm_unpacklo_epi32(_mm256_castsi256_si128(s2), _mm256_extracti128_si256(s2, 1));
    /* the block sum in floats (integers below 2^24: exact in any order), kept in vectors */
    __m128 fl = _mm_cvtepi32_ps(lanes);
    fl = _mm_add_ps(fl, _mm_shuffle_ps(fl, fl, 0x4E));
    fl = _mm_add_ps(fl, _mm_shuffle_ps(fl, fl, 0xB1));  /* the sum in every lane */
    __m128 xs = _mm_mul_ps(_mm256_castps256_ps128(vd), fl);
    _mm_store_ss(xsb + b, xs);
    _mm_storeu_ps(sx4 + 4 * b, _mm256_castps256_ps128(vd));
    if (fmt == Q4_FMT_0) {
        __m128i nl = _mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(lanes, 3));
        _mm_storeu_si128((__m128i *)(ext + 16 * b), nl);
        nl = _mm_add_epi32(nl, _mm_shuffle_epi32(nl, 0x4E));
        nl = _mm_add_epi32(nl, _mm_shuffle_epi32(nl, 0xB1));
        ((int32_t *)(act + Q4_A_NQB(Kp)))[b] = _mm_cvtsi128_si32(nl);
    } else if (fmt == Q4_FMT_1) {
        _mm_storeu_ps((float *)(ext + 16 * b), _mm_mul_ps(xs, _mm_set1_ps(0.25f)));
    }
}

/* |x| maxima of 32 values in 8 lanes (NaN skipped: maxps returns its second operand) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256 q4_absmax8_avx2(const float *xb) {
    const __m256 am = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 a = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb), am), _mm256_setzero_ps());
    __m256 c = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 8), am), _mm256_setzero_ps());
    a = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 16), am), a);
    c = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 24), am), c);
    return _mm256_max_ps(a, c);
}

/* q4_quantize_portable, a step of 4 blocks at a time (the same q: amax skips NaN as `v > amax`
 * does; the 4 scales come from one division) */
__attribute__((target(PECCA_Q4_AVX2)))
static void q4_quantize_avx2(int fmt, const float *x, uint8_t *act, long Kp, long nb) {
    const __m256 qmax = _mm256_set1_ps((float)Q4_QMAX);
    long b = 0;
    for (; b + 4 <= nb; b += 4) {
        const float *xb = x + Q4_QK * b;
        __m256 m0 = q4_absmax8_avx2(xb), m1 = q4_absmax8_avx2(xb + 32);
        __m256 m2 = q4_absmax8_avx2(xb + 64), m3 = q4_absmax8_avx2(xb + 96);
        /* [m0 m1 m2 m3] reduced across lanes: max is exact, so any order */
        __m256 t01 = _mm256_max_ps(_mm256_unpacklo_ps(m0, m1), _mm256_unpackhi_ps(m0, m1));
        __m256 t23 = _mm256_max_ps(_mm256_unpacklo_ps(m2, m3), _mm256_unpackhi_ps(m2, m3));
        /* t01 = [m0 m1 m0 m1 | m0 m1 m0 m1] partial maxima, t23 likewise with m2, m3 */
        __m256 u = _mm256_max_ps(_mm256_shuffle_ps(t01, t23, 0x44), _mm256_shuffle_ps(t01, t23, 0xEE));
        /* u = [m0 m1 m2 m3 | m0 m1 m2 m3] (each over half the lanes) */
        u = _mm256_max_ps(u, _mm256_permute2f128_ps(u, u, 0x01));
        __m256 d4 = _mm256_div_ps(u, qmax);
        for (int L = 0; L < 4; L++)
            q4_qblock_avx2(fmt, xb + Q4_QK * L, _mm256_permutevar8x32_ps(d4, _mm256_set1_epi32(L)), act, Kp, b + L);
    }
    for (; b < nb; b++) {
        const float *xb = x + Q4_QK * b;
        q4_qblock_avx2(fmt, xb, _mm256_set1_ps(q8_absmax_avx2(xb, Q4_QK) / (float)Q4_QMAX), act, Kp, b);
    }
}
#endif

/* x (K,) -> act. perm (K) or NULL; work: K floats (used with perm). For q4g, K / G % 32 == 0. */
static void q4_prepare_int8(int fmt, const float *x, const int32_t *perm, float *work,
                            uint8_t *act, long K, long G) {
    long Kp = q4_padded(K), nb = K / Q4_QK, nbp = Kp / Q4_QK;
    if (perm) {
        for (long i = 0; i < K; i++) work[i] = x[perm[i]];
        x = work;
    }
#if PECCA_X86
    if (q8_kernel_level() >= 1) q4_quantize_avx2(fmt, x, act, Kp, nb);
    else
#endif
    q4_quantize_portable(fmt, x, act, Kp, nb);
    const int32_t zero[4] = {0, 0, 0, 0};
    for (long b = nb; b < nbp; b++) {  /* padding: zero codes, d = 0 */
        int8_t *st = (int8_t *)act + Q4_ASTEP * (b >> 2) + 16 * (b & 3);
        for (int o = 0; o < Q4_ASTEP; o += 64) memset(st + o, 0, 16);
        q4_block_sums(fmt, act, Kp, b, 0.0f, zero);
    }
    if (fmt == Q4_FMT_G) {
        const float *xsb = (const float *)(act + Q4_A_XSB(Kp));
        float *xg = (float *)(act + Q4_A_XG(Kp));
        long bpg = nb / G;
        for (long g = 0; g < G; g++) {
            float t = 0.0f;
            for (long b = g * bpg; b < (g + 1) * bpg; b++) t += xsb[b];
            xg[g] = t;
        }
    }
}

/* x (K,) -> act (q4_actf_floats(K, G) floats): x gathered by perm, then the sums. */
static void q4_prepare_f32(int fmt, const float *x, const int32_t *perm, float *act, long K,
                           long G) {
    float *sums = act + K;
    if (perm) {
        for (long i = 0; i < K; i++) act[i] = x[perm[i]];
    } else {
        memcpy(act, x, (size_t)K * sizeof(float));
    }
    if (fmt == Q4_FMT_G) {
        long gs = K / G;
        for (long g = 0; g < G; g++) {
            float t = 0.0f;
            for (long i = g * gs; i < (g + 1) * gs; i++) t += act[i];
            sums[g] = t;
        }
    } else if (fmt == Q4_FMT_1) {
        for (long b = 0; b < K / Q4_QK; b++) {
            float t = 0.0f;
            for (int j = 0; j < Q4_QK; j++) t += act[Q4_QK * b + j];
            sums[b] = t;
        }
    }
}

/* 16^-k for input 8r+k (1 for k = 7): the SIMD gptq kernels mask nibble k in place, which
 * converts to code * 16^k exactly (below 2^31; k = 7 is shifted down instead), and multiply it by
 * x * 16^-k: the same product, one shift fewer. */
static const float gptq_kscale[8] = {1.0f, 0.0625f, 0.00390625f, 0.000244140625f,
                                     1.52587890625e-05f, 9.5367431640625e-07f,
                                     5.9604644775390625e-08f, 1.0f};

/* xsum[g] = sum of x[i] over g_idx[i] == g, in input order; xk[i] = x[i] * gptq_kscale[i % 8] */
static void gptq_prepare(const float *x, const int32_t *gidx, float *xsum, float *xk, long K,
                         long G) {
    for (long g = 0; g < G; g++) xsum[g] = 0.0f;
    for (long i = 0; i < K; i++) {
        xsum[gidx[i]] += x[i];
        xk[i] = x[i] * gptq_kscale[i % 8];
    }
}

/* ---------------- portable ---------------- */

/* code j (0..31) of a 16-byte block of nibbles */
static inline int q4_nib(const uint8_t *qs, int j) {
    return j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
}

/* q of element j of block b from the activation codes: 256 hi + lo */
static inline int32_t q4_xa(const int8_t *qa, long b, int j) {
    const int8_t *s = qa + Q4_ASTEP * (b >> 2) + 16 * (b & 3) + (j < 16 ? j : 64 + j - 16);
    return 256 * (int32_t)s[0] + (int32_t)s[128];
}

static float q4_int8_dot_portable(int fmt, int quad, const uint8_t *wr, const uint16_t *sr,
                                  const int8_t *zr, long K, long G, const uint8_t *act) {
    long Kp = q4_padded(K), nb = K / Q4_QK;
    const int8_t *qa = (const int8_t *)act;
    const float *sx4 = (const float *)(act + Q4_A_SX(Kp)), *xsb = (const float *)(act + Q4_A_XSB(Kp));
    const float *xg = (const float *)(act + Q4_A_XG(Kp));
    float val = 0.0f;
    if (fmt == Q4_FMT_G) {
        long bpg = nb / G;
        for (long g = 0; g < G; g++) {
            float gsum = 0.0f;
            for (long b = g * bpg; b < (g + 1) * bpg; b++) {
                int32_t dot = 0;
                for (int j = 0; j < Q4_QK; j++) dot += q4_nib(wr + q4g_block_off(quad, b), j) * q4_xa(qa, b, j);
                float p = (float)dot * sx4[4 * b];
                gsum += p;
            }
            float c = (float)zr[g] * xg[g];
            float p = f16_to_f32(sr[g]) * (gsum - c);
            val += p;
        }
        return val;
    }
    long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt);
    for (long b = 0; b < nb; b++) {
        const uint8_t *blk = wr + bb * b;
        int32_t dot = 0, isum = 0;
        for (int j = 0; j < Q4_QK; j++) {
            int32_t q = q4_xa(qa, b, j);
            dot += q4_nib(blk + off, j) * q;
            isum += q;
        }
        float s = f16_to_f32(q4_u16(blk)) * sx4[4 * b];
        if (fmt == Q4_FMT_0) {
            float p = (float)(dot - 8 * isum) * s;
            val += p;
        } else {
            float p = (float)dot * s;
            val += p;
            p = f16_to_f32(q4_u16(blk + 2)) * xsb[b];
            val += p;
        }
    }
    return val;
}

static float q4_f32_dot_portable(int fmt, int quad, const uint8_t *wr, const uint16_t *sr,
                                 const int8_t *zr, long K, long G, const float *act) {
    const float *x = act, *sums = act + K;
    float val = 0.0f;
    if (fmt == Q4_FMT_G) {
        long gs = K / G;
        for (long g = 0; g < G; g++) {
            float gsum = 0.0f;
            for (long i = g * gs; i < (g + 1) * gs; i++) {
                float p = (float)q4_nib(wr + q4g_block_off(quad, i / Q4_QK), (int)(i % Q4_QK)) * x[i];
                gsum += p;
            }
            float c = (float)zr[g] * sums[g];
            float p = f16_to_f32(sr[g]) * (gsum - c);
            val += p;
        }
        return val;
    }
    long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt);
    for (long b = 0; b < K / Q4_QK; b++) {
        const uint8_t *blk = wr + bb * b;
        float bsum = 0.0f;
        for (int j = 0; j < Q4_QK; j++) {
            int c = q4_nib(blk + off, j) - (fmt == Q4_FMT_0 ? 8 : 0);
            float p = (float)c * x[Q4_QK * b + j];
            bsum += p;
        }
        float p = f16_to_f32(q4_u16(blk)) * bsum;
        val += p;
        if (fmt == Q4_FMT_1) {
            p = f16_to_f32(q4_u16(blk + 2)) * sums[b];
            val += p;
        }
    }
    return val;
}

/* Rows [r0, r1) against T prepared tokens (act + t * ab); out (T, ldo). Blocks of 4 rows meet
 * every token in turn, as the SIMD paths do. */
static void q4_rows_portable(int fmt, int quad, int float_act, const uint8_t *w, const uint16_t *sc,
                             const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                             long T, float *out, long ldo, long r0, long r1) {
    long rb = q4_row_bytes(fmt, K);
    for (long r = r0; r < r1; r += 4) {
        long re = r + 4 < r1 ? r + 4 : r1;
        for (long t = 0; t < T; t++)
            for (long i = r; i < re; i++) {
                const uint16_t *sr = fmt == Q4_FMT_G ? sc + i * G : NULL;
                const int8_t *zr = fmt == Q4_FMT_G ? zp + i * G : NULL;
                const uint8_t *wr = fmt == Q4_FMT_G ? q4g_row(w, i, rb, quad) : w + i * rb;
                out[t * ldo + i] = float_act
                    ? q4_f32_dot_portable(fmt, quad, wr, sr, zr, K, G, (const float *)(act + t * ab))
                    : q4_int8_dot_portable(fmt, quad, wr, sr, zr, K, G, act + t * ab);
            }
    }
}

/* gptq, portable: 8 columns (unit u) at a time, token by token, the AVX2 lane arithmetic in
 * scalar form. acc: G * 8 floats. */
static void gptq_cols_portable(const uint32_t *qw, const uint32_t *qz, uint32_t zadd,
                               const uint16_t *sc, const int32_t *gidx, long K, long N, long G,
                               const float *x, const float *xsum, long T, float *out, long ldo,
                               long u0, long u1, float *acc) {
    for (long u = u0; u < u1; u++) {
        long c = 8 * u;
        for (long t = 0; t < T; t++) {
            const float *xt = x + t * K;
            float reg[8] = {0};
            memset(acc, 0, (size_t)(G * 8) * sizeof(float));
            long cur = K > 0 ? gidx[0] : 0;
            for (long i = 0; i < K; i++) {
                long g = gidx[i];
                if (g != cur) {
                    for (int l = 0; l < 8; l++) {
                        acc[cur * 8 + l] += reg[l];
                        reg[l] = 0.0f;
                    }
                    cur = g;
                }
                const uint32_t *wrow = qw + (i / 8) * N + c;
                int sh = 4 * (int)(i % 8);
                for (int l = 0; l < 8; l++) {
                    float p = (float)((wrow[l] >> sh) & 15u) * xt[i];
                    reg[l] += p;
                }
            }
            for (int l = 0; l < 8; l++) acc[cur * 8 + l] += reg[l];
            for (int l = 0; l < 8; l++) {
                float y = 0.0f;
                for (long g = 0; g < G; g++) {
                    uint32_t zw = qz[g * (N / 8) + u] + zadd;
                    float z = (float)((zw >> (4 * l)) & 15u);
                    float d = acc[g * 8 + l] - z * xsum[t * G + g];
                    float p = f16_to_f32(sc[g * N + c + l]) * d;
                    y += p;
                }
                out[t * ldo + c + l] = y;
            }
        }
    }
}

#if PECCA_X86
#ifndef GPTQ_PF_ROWS
#define GPTQ_PF_ROWS 32  /* how many packed rows ahead the gptq kernels prefetch */
#endif
/* ---------------- AVX2 + FMA + F16C ---------------- */

/* int8 path, AVX2. Per step of two blocks b = 2s, b+1 (64 inputs) a row's int32 lanes: lane l of
 * the low (high) 128 bits sums code * q over block b's (b+1's) elements 4l..4l+3 and
 * 16+4l..16+4l+3 (Q4_0: with -8 sum q, the zero point). Two ways to the same integers:
 *  matvec: maddubs of the code nibbles (unsigned) with both levels as they are prepared (hi,
 *   lo), madd by 256 and 1 (q4_dot_avx2);
 *  matmul: the activations put back together once per product as int16 q = 256 hi + lo and the
 *   codes widened to int16 in place: per 16-bit word of the 32 code bytes [block b | block b+1]
 *   (byte j: codes j and 16 + j), & 15 (code 2i), >> 8 & 15 (2i + 1), >> 4 & 15 (16 + 2i), >> 12
 *   (17 + 2i) (Q4_0: minus 8) against the same selections of q: 4 madds, 3 adds (fewer multiplies
 *   than 4 maddubs + 2 madds; a lane sums 8 products |code| |q| <= 15 * 32512: < 2^22).
 * The float work is shared by two (row, token) pairs: lanes l and l + 2 of both are added in
 * integers (unpacklo/hi_epi64, exact) into one vector [p p q q | p p q q] (halves: blocks b and
 * b+1), converted and multiplied by [sw sx of p x2, of q x2 | the same for b+1] in one FMA (Q4_1:
 * plus m * xs / 2 per lane). matvec pairs two rows against its token, matmul one row against two
 * tokens; a (row, token)'s lanes get the same values and operations either way, and its result
 * is (lane 0 + lane 4) + (lane 1 + lane 5) of its pair (q4g: minus sum_g s_g z_g X_g, 8 groups
 * per vector), so matmul rows equal matvec bit for bit. */

/* (row, token) pairs: q8_pair_avx2, q8_pairps_avx2 and q8_pairsum_avx2 (q8_kernels.h) */

/* q4g: sum_g s_g z_g X_g of one row and token (groups 8 to a vector, then the rest) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline float q4g_zsum_avx2(const uint16_t *sr, const int8_t *zr, const float *xg, long G) {
    __m256 acc = _mm256_setzero_ps();
    long g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g)));
        __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g))));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(xg + g), acc);
    }
    float t = hsum256(acc);
    for (; g < G; g++) t += _cvtsh_ss(sr[g]) * (float)zr[g] * xg[g];
    return t;
}

/* [f16 h0 x4 | f16 h1 x4] as floats */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256 q4_halves2_avx2(uint32_t h0, uint32_t h1) {
    __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(h0 | (h1 << 16))));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* step s of a row (its blocks at p): the 32 code bytes [block b | block b+1] (zeros for a
 * missing b+1), the weight scales [sw_b x4 | sw_b+1 x4] and (Q4_1) mins likewise */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256i q4_wstep_avx2(int fmt, int sf, const uint8_t *p, const uint16_t *sr, long ga,
                                    long gb, int two, __m256 *sw, __m256 *sm) {
    const long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt);
    __m256i v;
    if (fmt == Q4_FMT_G && two) {
        v = _mm256_loadu_si256((const __m256i *)p);
    } else {
        __m128i hi = two ? _mm_loadu_si128((const __m128i *)(p + bb + off)) : _mm_setzero_si128();
        v = _mm256_set_m128i(hi, _mm_loadu_si128((const __m128i *)(p + off)));
    }
    if (fmt == Q4_FMT_G) {
        *sw = sf == Q4_SF_W ? _mm256_cvtph_ps(_mm_set1_epi16((short)sr[ga]))
                            : q4_halves2_avx2(sr[ga], two ? sr[gb] : 0);
    } else {
        *sw = q4_halves2_avx2(q4_u16(p), two ? q4_u16(p + bb) : 0);
        if (fmt == Q4_FMT_1) *sm = q4_halves2_avx2(q4_u16(p + 2), two ? q4_u16(p + bb + 2) : 0);
    }
    return v;
}

/* ---- matvec ---- */

/* a row's int32 lanes of step s against the prepared token (qa: its codes, ext: Q4_0's -8 sums) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256i q4_dot_avx2(int fmt, __m256i v, const int8_t *qa, const uint8_t *ext, long s,
                                  int withnc) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
    const int8_t *xp = qa + Q4_ASTEP * (s >> 1) + 32 * (s & 1);
    __m256i lo4 = _mm256_and_si256(v, m4), hi4 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(lo4, _mm256_loadu_si256((const __m256i *)xp)),
                                  _mm256_maddubs_epi16(hi4, _mm256_loadu_si256((const __m256i *)(xp + 64))));
    __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(lo4, _mm256_loadu_si256((const __m256i *)(xp + 128))),
                                  _mm256_maddubs_epi16(hi4, _mm256_loadu_si256((const __m256i *)(xp + 192))));
    __m256i is = _mm256_add_epi32(_mm256_madd_epi16(ph, c256), _mm256_madd_epi16(pl, ones));
    if (fmt == Q4_FMT_0 && withnc) is = _mm256_add_epi32(is, _mm256_loadu_si256((const __m256i *)(ext + 32 * s)));
    return is;
}

/* step s of rows a and b (b absent: !hasb) against one prepared token into the pair accumulator;
 * q4g with whole steps per group (SF_W) takes the pair's scales from swp (set once per group) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256 q4_mv_pair_avx2(__m256 acc, int fmt, int sf, const uint8_t *pa, const uint8_t *pb,
                                     const uint16_t *sa, const uint16_t *sb, const int8_t *qa,
                                     const uint8_t *ext, __m256 sx, __m256 xs2, __m256 swp,
                                     __m256i ncp, __m256i ncp1, long s, long ga, long gb, int two,
                                     int hasb) {
    __m256 swa, swb = _mm256_setzero_ps(), sma = _mm256_setzero_ps(), smb = _mm256_setzero_ps();
    __m256i ia = q4_dot_avx2(fmt, q4_wstep_avx2(fmt, sf, pa, sa, ga, gb, two, &swa, &sma), qa, ext, s, 0);
    __m256i ib = _mm256_setzero_si256();
    if (hasb) ib = q4_dot_avx2(fmt, q4_wstep_avx2(fmt, sf, pb, sb, ga, gb, two, &swb, &smb), qa, ext, s, 0);
    if (!(fmt == Q4_FMT_G && sf == Q4_SF_W)) swp = q8_pairps_avx2(swa, swb);
    __m256i u = q8_pair_avx2(ia, ib);
    /* Q4_0: the -8 sum q lane terms of both rows, paired once per step (the same integers) */
    if (fmt == Q4_FMT_0) u = _mm256_add_epi32(u, hasb ? ncp : ncp1);
    __m256 f = _mm256_cvtepi32_ps(u);
    acc = _mm256_fmadd_ps(f, _mm256_mul_ps(swp, sx), acc);
    if (fmt == Q4_FMT_1) acc = _mm256_fmadd_ps(q8_pairps_avx2(sma, smb), xs2, acc);
    return acc;
}

/* [f16 a x2, f16 b x2 | the same] as floats (b absent: zeros) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256 q4_pairh_avx2(uint16_t a, uint16_t b) {
    uint64_t h = (uint64_t)a * 0x10001u | ((uint64_t)b * 0x10001u) << 32;
    return _mm256_cvtph_ps(_mm_set1_epi64x((long long)h));
}

/* rows i..i+NR-1 (NR = 4, 2 or 1; a lone row is paired with nothing) against one prepared token,
 * prefetching the next NR rows when pf */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_mv_avx2(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc,
                              const int8_t *zp, long K, long G, const uint8_t *act, float *out,
                              long i, int NR, int pf) {
    long nb = K / Q4_QK, Kp = q4_padded(K), bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), rb = nb * bb;
    const int8_t *qa = (const int8_t *)act;
    const float *sx4 = (const float *)(act + Q4_A_SX(Kp)), *xs4 = (const float *)(act + Q4_A_EXT(Kp));
    const uint8_t *ext = act + Q4_A_EXT(Kp);
    const long rs = quad ? 64 : rb;  /* row i + 1 from row i (i % 4 == 0 in quads) */
    const uint8_t *w0 = w + i * rb, *w1 = w0 + rs, *w2 = w1 + rs, *w3 = w2 + rs;
    const uint16_t *s0 = NULL, *s1 = NULL, *s2 = NULL, *s3 = NULL;
    if (fmt == Q4_FMT_G) {
        s0 = sc + i * G;
        s1 = s0 + G;
        s2 = s1 + G;
        s3 = s2 + G;
    }
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const char *next = (const char *)(w + (i + NR) * rb);
    const int lines = (int)((NR * 2 * bb + 63) / 64);
    long g = 0, k = 0, ga = 0, gb = 0, gl = -1;
    __m256 swp0 = _mm256_setzero_ps(), swp1 = _mm256_setzero_ps();
    for (long s = 0; 2 * s < nb; s++) {
        const int two = 2 * s + 1 < nb;
        const long o = quad ? q4g_block_off(1, 2 * s) : 2 * bb * s;  /* a row's step s */
        if (pf) prefetch_lines(next + NR * 2 * bb * s, lines);
        if (fmt == Q4_FMT_G) q8_groups_next(bpg, &g, &k, &ga, &gb);
        __m256 sx = _mm256_loadu_ps(sx4 + 8 * s), xs2 = _mm256_setzero_ps();
        if (fmt == Q4_FMT_1) xs2 = _mm256_add_ps(_mm256_loadu_ps(xs4 + 8 * s), _mm256_loadu_ps(xs4 + 8 * s));
        if (fmt == Q4_FMT_G && sf == Q4_SF_W && ga != gl) {  /* a new group: the pairs' scales */
            gl = ga;
            swp0 = q4_pairh_avx2(s0[ga], NR >= 2 ? s1[ga] : 0);
            if (NR == 4) swp1 = q4_pairh_avx2(s2[ga], s3[ga]);
        }
        __m256i ncp = _mm256_setzero_si256(), ncp1 = _mm256_setzero_si256();
        if (fmt == Q4_FMT_0) {
            __m256i nc = _mm256_loadu_si256((const __m256i *)(ext + 32 * s));
            ncp = q8_pair_avx2(nc, nc);
            ncp1 = q8_pair_avx2(nc, _mm256_setzero_si256());
        }
        acc0 = q4_mv_pair_avx2(acc0, fmt, sf, w0 + o, w1 + o, s0, s1, qa, ext, sx, xs2, swp0, ncp, ncp1, s, ga, gb, two, NR >= 2);
        if (NR == 4) acc1 = q4_mv_pair_avx2(acc1, fmt, sf, w2 + o, w3 + o, s2, s3, qa, ext, sx, xs2, swp1, ncp, ncp1, s, ga, gb, two, 1);
    }
    const float *xg = (const float *)(act + Q4_A_XG(Kp));
    float v[4];
    q8_pairsum_avx2(acc0, &v[0], &v[1]);
    if (NR == 4) q8_pairsum_avx2(acc1, &v[2], &v[3]);
    for (int r = 0; r < NR; r++)
        out[i + r] = fmt == Q4_FMT_G ? v[r] - q4g_zsum_avx2(sc + (i + r) * G, zp + (i + r) * G, xg, G) : v[r];
}

/* ---- matmul ---- */

/* prepared tokens, per pair of tokens (the second zeros when T is odd) per step: the int16 q of
 * both (4 vectors each, the selections above), [sx of the first x2, of the second x2 | b+1]
 * and for Q4_1 the same pairing of xs / 2 per lane */
#define Q4_XP(fmt) ((fmt) == Q4_FMT_1 ? 320 : 288)
#ifndef Q4_AVX2_TP
#define Q4_AVX2_TP 8      /* matmul tile: pairs of tokens (at most 8) */
#endif
#define Q4_MIN_TP(n) ((n) < Q4_AVX2_TP ? (n) : Q4_AVX2_TP)
#ifndef Q4_AVX2_RM
#define Q4_AVX2_RM 1      /* matmul tile: rows */
#endif
#ifndef Q4_AVX2_KC
#define Q4_AVX2_KC 16     /* matmul: steps per chunk of K (the tile's x stays in L1) */
#endif
#ifndef Q4_AVX2_PANEL
#define Q4_AVX2_PANEL 32  /* matmul: rows kept in L2 while every group of tokens passes */
#endif

__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_x16_avx2(const uint8_t *act, long s, __m256i X[4]) {
    const __m256i himask = _mm256_set1_epi16((short)0xFF00);
    const int8_t *xp = (const int8_t *)act + Q4_ASTEP * (s >> 1) + 32 * (s & 1);
    for (int h = 0; h < 2; h++) {
        __m256i H = _mm256_loadu_si256((const __m256i *)(xp + 64 * h));
        __m256i L = _mm256_loadu_si256((const __m256i *)(xp + 128 + 64 * h));
        /* even elements: hi to the high byte, lo sign-extended; odd: both from the high bytes */
        X[2 * h] = _mm256_add_epi16(_mm256_slli_epi16(H, 8), _mm256_srai_epi16(_mm256_slli_epi16(L, 8), 8));
        X[2 * h + 1] = _mm256_add_epi16(_mm256_and_si256(H, himask), _mm256_srai_epi16(L, 8));
    }
}

/* tokens a and b (b NULL: none) -> xb, one pair's steps */
__attribute__((target(PECCA_Q4_AVX2)))
static void q4_prep_pair_avx2(int fmt, const uint8_t *a, const uint8_t *b, long nb, long Kp, uint8_t *xb) {
    const long xp = Q4_XP(fmt);
    for (long s = 0; 2 * s < nb; s++) {
        uint8_t *o = xb + xp * s;
        __m256i X[4], Y[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        __m256 sa = _mm256_loadu_ps((const float *)(a + Q4_A_SX(Kp)) + 8 * s), sb = _mm256_setzero_ps();
        __m256 ea = _mm256_setzero_ps(), eb = _mm256_setzero_ps();
        q4_x16_avx2(a, s, X);
        if (fmt == Q4_FMT_1) ea = _mm256_loadu_ps((const float *)(a + Q4_A_EXT(Kp)) + 8 * s);
        if (b) {
            q4_x16_avx2(b, s, Y);
            sb = _mm256_loadu_ps((const float *)(b + Q4_A_SX(Kp)) + 8 * s);
            if (fmt == Q4_FMT_1) eb = _mm256_loadu_ps((const float *)(b + Q4_A_EXT(Kp)) + 8 * s);
        }
        for (int k = 0; k < 4; k++) {
            _mm256_storeu_si256((__m256i *)(o + 32 * k), X[k]);
            _mm256_storeu_si256((__m256i *)(o + 128 + 32 * k), Y[k]);
        }
        _mm256_storeu_ps((float *)(o + 256), q8_pairps_avx2(sa, sb));
        if (fmt == Q4_FMT_1) _mm256_storeu_ps((float *)(o + 288), q8_pairps_avx2(_mm256_add_ps(ea, ea), _mm256_add_ps(eb, eb)));
    }
}

/* steps [s0, s1) of rows i..i+NR-1 against token pairs 0..NP-1 (at xb, pair stride xstride),
 * accumulators in accb[r][j] (8 floats each, kept across chunks) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_tile16_avx2(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc, long K,
                                  long G, const uint8_t *xb, long xstride, float *accb, long i,
                                  long s0, long s1, int NR, int NP) {
    long nb = K / Q4_QK, bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), rb = nb * bb, xp = Q4_XP(fmt);
    const __m256i m4 = _mm256_set1_epi16(15);
    __m256 acc[Q4_AVX2_RM][Q4_AVX2_TP];
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NP; j++) acc[r][j] = _mm256_loadu_ps(accb + 8 * (Q4_AVX2_TP * r + j));
    long g = s0 * 2 / bpg, k = s0 * 2 % bpg, ga = 0, gb = 0;
    for (long s = s0; s < s1; s++) {
        const int two = 2 * s + 1 < nb;
        if (fmt == Q4_FMT_G) q8_groups_next(bpg, &g, &k, &ga, &gb);
        for (int r = 0; r < NR; r++) {
            __m256 sw, sm = _mm256_setzero_ps();
            __m256i v = q4_wstep_avx2(fmt, sf, fmt == Q4_FMT_G ? q4g_row(w, i + r, rb, quad) + q4g_block_off(quad, 2 * s)
                                                           : w + (i + r) * rb + 2 * bb * s,
                                      fmt == Q4_FMT_G ? sc + (i + r) * G : NULL, ga, gb, two, &sw, &sm);
            __m256i c[4];
            c[0] = _mm256_and_si256(v, m4);
            c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 8), m4);
            c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            c[3] = _mm256_srli_epi16(v, 12);
            if (fmt == Q4_FMT_0) {
                const __m256i c8 = _mm256_set1_epi16(8);
                for (int q = 0; q < 4; q++) c[q] = _mm256_sub_epi16(c[q], c8);
            }
            for (int j = 0; j < NP; j++) {
                const __m256i *X = (const __m256i *)(xb + j * xstride + xp * s);
                __m256i ia = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_madd_epi16(c[0], _mm256_loadu_si256(X)), _mm256_madd_epi16(c[1], _mm256_loadu_si256(X + 1))),
                    _mm256_add_epi32(_mm256_madd_epi16(c[2], _mm256_loadu_si256(X + 2)), _mm256_madd_epi16(c[3], _mm256_loadu_si256(X + 3))));
                __m256i ib = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_madd_epi16(c[0], _mm256_loadu_si256(X + 4)), _mm256_madd_epi16(c[1], _mm256_loadu_si256(X + 5))),
                    _mm256_add_epi32(_mm256_madd_epi16(c[2], _mm256_loadu_si256(X + 6)), _mm256_madd_epi16(c[3], _mm256_loadu_si256(X + 7))));
                __m256 f = _mm256_cvtepi32_ps(q8_pair_avx2(ia, ib));
                acc[r][j] = _mm256_fmadd_ps(f, _mm256_mul_ps(sw, _mm256_loadu_ps((const float *)(X + 8))), acc[r][j]);
                if (fmt == Q4_FMT_1)
                    acc[r][j] = _mm256_fmadd_ps(sm, _mm256_loadu_ps((const float *)(X + 9)), acc[r][j]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NP; j++) _mm256_storeu_ps(accb + 8 * (Q4_AVX2_TP * r + j), acc[r][j]);
}

/* T = 1 (matvec), or T > 1 when the prepared tokens cannot be allocated: q4_mv_avx2 token by
 * token (the same bits); else tiles of Q4_AVX2_RM rows x Q4_AVX2_TP pairs of tokens over chunks
 * of Q4_AVX2_KC steps (that x stays in L1 while the panel's rows pass) and panels of
 * Q4_AVX2_PANEL rows (in L2 while every group of tokens passes). */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_gemm_avx2(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                long T, float *out, long ldo, long r0, long r1, long pf1) {
    long nb = K / Q4_QK, Kp = q4_padded(K), ns = (nb + 1) / 2, xstride = ns * Q4_XP(fmt);
    long npairs = (T + 1) / 2;
    uint8_t *xb = T > 1 ? (uint8_t *)pecca_alloc_lines((size_t)(npairs * xstride)) : NULL;
    if (xb == NULL) {
        for (long t = 0; t < T; t++) {
            long i = r0;
            for (; i + 4 <= r1; i += 4)
                q4_mv_avx2(fmt, sf, quad, w, sc, zp, K, G, act + t * ab, out + t * ldo, i, 4, i + 8 <= pf1);
            /* (no rows are left in quads: r1 - r0 is a multiple of 4 there) */
            for (; i + 2 <= r1; i += 2) q4_mv_avx2(fmt, sf, quad, w, sc, zp, K, G, act + t * ab, out + t * ldo, i, 2, 0);
            for (; i < r1; i++) q4_mv_avx2(fmt, sf, quad, w, sc, zp, K, G, act + t * ab, out + t * ldo, i, 1, 0);
        }
        return;
    }
    for (long p = 0; p < npairs; p++)
        q4_prep_pair_avx2(fmt, act + 2 * p * ab, 2 * p + 1 < T ? act + (2 * p + 1) * ab : NULL, nb, Kp, xb + p * xstride);
    float accb[Q4_AVX2_PANEL / Q4_AVX2_RM + 1][Q4_AVX2_RM * Q4_AVX2_TP * 8];
    for (long p0 = r0; p0 < r1; p0 += Q4_AVX2_PANEL) {
        long p1 = p0 + Q4_AVX2_PANEL < r1 ? p0 + Q4_AVX2_PANEL : r1;
        for (long j0 = 0; j0 < npairs; j0 += Q4_AVX2_TP) {
            int NP = (int)(npairs - j0 < Q4_AVX2_TP ? npairs - j0 : Q4_AVX2_TP);
            memset(accb, 0, sizeof accb);
            const uint8_t *xt = xb + j0 * xstride;
            for (long c0 = 0; c0 < ns; c0 += Q4_AVX2_KC) {
                long c1 = c0 + Q4_AVX2_KC < ns ? c0 + Q4_AVX2_KC : ns;
                long i = p0, q = 0;
#define Q4_TILE(NR, N) q4_tile16_avx2(fmt, sf, quad, w, sc, K, G, xt, xstride, accb[q], i, c0, c1, NR, N)
#define Q4_TILES(NR) switch (NP) { \
                    case 8: Q4_TILE(NR, Q4_MIN_TP(8)); break; case 7: Q4_TILE(NR, Q4_MIN_TP(7)); break; \
                    case 6: Q4_TILE(NR, Q4_MIN_TP(6)); break; case 5: Q4_TILE(NR, Q4_MIN_TP(5)); break; \
                    case 4: Q4_TILE(NR, Q4_MIN_TP(4)); break; case 3: Q4_TILE(NR, 3); break; \
                    case 2: Q4_TILE(NR, 2); break; default: Q4_TILE(NR, 1); }
                for (; i + Q4_AVX2_RM <= p1; i += Q4_AVX2_RM, q++) Q4_TILES(Q4_AVX2_RM)
                for (; i < p1; i++, q++) Q4_TILES(1)
#undef Q4_TILES
#undef Q4_TILE
            }
            /* results: row i + r of tile q, pair j: tokens 2 (j0 + j) and 2 (j0 + j) + 1 */
            long i = p0, q = 0;
            while (i < p1) {
                int NR = i + Q4_AVX2_RM <= p1 ? Q4_AVX2_RM : 1;
                for (int r = 0; r < NR; r++)
                    for (int j = 0; j < NP; j++) {
                        float v[2];
                        long t = 2 * (j0 + j);
                        q8_pairsum_avx2(_mm256_loadu_ps(accb[q] + 8 * (Q4_AVX2_TP * r + j)), &v[0], &v[1]);
                        for (int e = 0; e < 2 && t + e < T; e++) {
                            float z = fmt == Q4_FMT_G
                                ? q4g_zsum_avx2(sc + (i + r) * G, zp + (i + r) * G,
                                                (const float *)(act + (t + e) * ab + Q4_A_XG(Kp)), G) : 0.0f;
                            out[(t + e) * ldo + i + r] = fmt == Q4_FMT_G ? v[e] - z : v[e];
                        }
                    }
                i += NR;
                q++;
            }
        }
    }
    pecca_free_lines(xb);
}

__attribute__((target(PECCA_Q4_AVX2)))
static void q4_int8_rows_avx2(int fmt, int quad, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                              long K, long G, const uint8_t *act, long ab, long T, float *out,
                              long ldo, long r0, long r1, long pf1) {
#define Q4_GEMM(F, SF, Q) q4_gemm_avx2(F, SF, Q, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1, pf1)
    if (fmt == Q4_FMT_0) Q4_GEMM(Q4_FMT_0, Q4_SF_X, 0);
    else if (fmt == Q4_FMT_1) Q4_GEMM(Q4_FMT_1, Q4_SF_X, 0);
    else if ((K / Q4_QK / G) % 2 == 0) Q4_GEMM_LAYOUTS(Q4_FMT_G, Q4_SF_W);
    else Q4_GEMM_LAYOUTS(Q4_FMT_G, Q4_SF_X);
#undef Q4_GEMM
}

/* float path, q4g row: acc - s_g z_g X_g for the groups g < G rounded down to 8 (lane g % 8),
 * then the sum of the lanes minus the remaining groups' terms */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline float q4g_finish_avx2(__m256 acc, const uint16_t *sr, const int8_t *zr,
                                    const float *xg, long G) {
    long g = 0;
    for (; g + 8 <= G; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + g)));
        __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(zr + g))));
        acc = _mm256_fnmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(xg + g), acc);
    }
    float t = hsum256(acc);
    for (; g < G; g++) t -= _cvtsh_ss(sr[g]) * (float)zr[g] * xg[g];
    return t;
}

/* float path: 32 codes of a block as 4 x 8 floats (Q4_0: q - 8) */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_widen32_avx2(const uint8_t *qs, int q40, __m256 c[4]) {
    const __m128i m4 = _mm_set1_epi8(15);
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    if (q40) {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
        c[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        c[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        c[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        c[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
    } else {
        c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
}

/* float path, rows i..i+NR-1, one token. big: groups are whole blocks (Q4_0, Q4_1, q4g with
 * gs % 32 == 0; two partial sums per row); else q4g with gs % 8 == 0 (a group ends after some
 * 8-vector). */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4f_block_avx2(int fmt, int big, const uint8_t *w, const uint16_t *sc,
                                  const int8_t *zp, long K, long G, const float *act, float *out,
                                  long i, int NR, int pf) {
    long nb = K / Q4_QK, gs = fmt == Q4_FMT_G ? K / G : Q4_QK;
    long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt), rb = nb * bb;
    const float *x = act, *sums = act + K;
    const uint8_t *wr[4];
    __m256 acc[4], ga[4], gb[4];
    float mc[4];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (i + r) * rb;
        acc[r] = ga[r] = gb[r] = _mm256_setzero_ps();
        mc[r] = 0.0f;
    }
    const char *next = (const char *)(w + (i + NR) * rb);
    long g = 0, e = 0;  /* q4g: current group, inputs of it done */
    for (long b = 0; b < nb; b++) {
        if (pf) prefetch_lines(next + NR * bb * b, (NR * (int)bb + 63) / 64);
        const float *xb = x + Q4_QK * b;
        if (big) {
            __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
            __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
            for (int r = 0; r < NR; r++) {
                __m256 c[4];
                q4_widen32_avx2(wr[r] + bb * b + off, fmt == Q4_FMT_0, c);
                ga[r] = _mm256_fmadd_ps(c[0], x0, ga[r]);
                gb[r] = _mm256_fmadd_ps(c[1], x1, gb[r]);
                ga[r] = _mm256_fmadd_ps(c[2], x2, ga[r]);
                gb[r] = _mm256_fmadd_ps(c[3], x3, gb[r]);
            }
            int end = 1;
            if (fmt == Q4_FMT_G) {
                e += Q4_QK;
                end = e == gs;
            }
            if (end) {
                for (int r = 0; r < NR; r++) {
                    const uint8_t *blk = wr[r] + bb * b;
                    float s = fmt == Q4_FMT_G ? _cvtsh_ss(sc[(i + r) * G + g]) : _cvtsh_ss(q4_u16(blk));
                    acc[r] = _mm256_fmadd_ps(_mm256_add_ps(ga[r], gb[r]), _mm256_set1_ps(s), acc[r]);
                    ga[r] = gb[r] = _mm256_setzero_ps();
                    if (fmt == Q4_FMT_1) mc[r] += _cvtsh_ss(q4_u16(blk + 2)) * sums[b];
                }
                e = 0;
                g++;
            }
        } else {
            for (int v = 0; v < 4; v++) {
                __m256 xv = _mm256_loadu_ps(xb + 8 * v);
                for (int r = 0; r < NR; r++) {
                    __m128i q = _mm_loadl_epi64((const __m128i *)(wr[r] + bb * b + 8 * (v & 1)));
                    if (v >= 2) q = _mm_srli_epi16(q, 4);
                    q = _mm_and_si128(q, _mm_set1_epi8(15));
                    ga[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), xv, ga[r]);
                }
                e += 8;
                if (e == gs) {
                    for (int r = 0; r < NR; r++) {
                        float s = _cvtsh_ss(sc[(i + r) * G + g]);
                        acc[r] = _mm256_fmadd_ps(ga[r], _mm256_set1_ps(s), acc[r]);
                        ga[r] = _mm256_setzero_ps();
                    }
                    e = 0;
                    g++;
                }
            }
        }
    }
    for (int r = 0; r < NR; r++) {
        float v = fmt == Q4_FMT_G ? q4g_finish_avx2(acc[r], sc + (i + r) * G, zp + (i + r) * G, sums, G)
                                  : hsum256(acc[r]);
        if (fmt == Q4_FMT_1) v += mc[r];
        out[i + r] = v;
    }
}

__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4f_gemm_avx2(int fmt, int big, const uint8_t *w, const uint16_t *sc,
                                 const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                 long T, float *out, long ldo, long r0, long r1) {
    long i = r0;
    for (; i + 4 <= r1; i += 4)
        for (long t = 0; t < T; t++)
            q4f_block_avx2(fmt, big, w, sc, zp, K, G, (const float *)(act + t * ab), out + t * ldo,
                           i, 4, t == 0 && i + 8 <= r1);
    for (; i < r1; i++)
        for (long t = 0; t < T; t++)
            q4f_block_avx2(fmt, big, w, sc, zp, K, G, (const float *)(act + t * ab), out + t * ldo,
                           i, 1, 0);
}

/* gs % 8 == 0 for q4g */
__attribute__((target(PECCA_Q4_AVX2)))
static void q4_f32_rows_avx2(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                             long K, long G, const uint8_t *act, long ab, long T, float *out,
                             long ldo, long r0, long r1) {
    if (fmt == Q4_FMT_0) q4f_gemm_avx2(Q4_FMT_0, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (fmt == Q4_FMT_1) q4f_gemm_avx2(Q4_FMT_1, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if ((K / G) % Q4_QK == 0) q4f_gemm_avx2(Q4_FMT_G, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else q4f_gemm_avx2(Q4_FMT_G, 0, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}

/* gptq: columns c .. c + 8V - 1 against tokens x[0..NT) (rows of K, scaled as gptq_prepare's
 * xk), acc: NT * G * 8V floats */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void gptq_chunk_avx2(const uint32_t *qw, const uint32_t *qz, uint32_t zadd,
                                   const uint16_t *sc, const int32_t *gidx, long K, long N,
                                   long G, const float *x, const float *xsum, float *out,
                                   long ldo, long c, int V, int NT, float *acc) {
    const long CW = 8 * V;
    const __m256i m4 = _mm256_set1_epi32(15);
    __m256 reg[4][4];
    memset(acc, 0, (size_t)(NT * G * CW) * sizeof(float));
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < V; v++) reg[t][v] = _mm256_setzero_ps();
    long cur = K > 0 ? gidx[0] : 0;
    for (long r = 0; r < K / 8; r++) {
        const uint32_t *row = qw + r * N + c;
        /* packed rows are 4N bytes apart, too far for the hardware prefetchers */
        __builtin_prefetch(row + GPTQ_PF_ROWS * N, 0, 3);
        if (V > 2) __builtin_prefetch(row + GPTQ_PF_ROWS * N + 16, 0, 3);
        __m256i wv[4];
        for (int v = 0; v < V; v++) wv[v] = _mm256_loadu_si256((const __m256i *)(row + 8 * v));
        for (int k = 0; k < 8; k++) {
            long ii = 8 * r + k, g = gidx[ii];
            if (g != cur) {
                for (int t = 0; t < NT; t++)
                    for (int v = 0; v < V; v++) {
                        float *a = acc + (t * G + cur) * CW + 8 * v;
                        _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), reg[t][v]));
                        reg[t][v] = _mm256_setzero_ps();
                    }
                cur = g;
            }
            __m256 cv[4];
            for (int v = 0; v < V; v++)
                cv[v] = _mm256_cvtepi32_ps(k == 7 ? _mm256_srli_epi32(wv[v], 28)
                                                : _mm256_and_si256(wv[v], _mm256_set1_epi32(15 << (4 * k))));
            for (int t = 0; t < NT; t++) {
                __m256 xb = _mm256_set1_ps(x[t * K + ii]);
                for (int v = 0; v < V; v++) reg[t][v] = _mm256_fmadd_ps(cv[v], xb, reg[t][v]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < V; v++) {
            float *a = acc + (t * G + cur) * CW + 8 * v;
            _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), reg[t][v]));
        }
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (int v = 0; v < V; v++) {
        long cc = c + 8 * v;
        __m256 y[4];
        for (int t = 0; t < NT; t++) y[t] = _mm256_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + g * N + cc)));
            __m256i zw = _mm256_set1_epi32((int)(qz[g * (N / 8) + cc / 8] + zadd));
            __m256 z = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(zw, shifts), m4));
            for (int t = 0; t < NT; t++) {
                __m256 a = _mm256_loadu_ps(acc + (t * G + g) * CW + 8 * v);
                a = _mm256_fnmadd_ps(z, _mm256_set1_ps(xsum[t * G + g]), a);
                y[t] = _mm256_fmadd_ps(s, a, y[t]);
            }
        }
        for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + t * ldo + cc, y[t]);
    }
}

/* Column units (8 columns) [u0, u1) for T tokens. One token: chunks of 32 columns; several:
 * chunks of 16 columns against tiles of up to 4 tokens (the chunk stays in cache meanwhile). */
__attribute__((target(PECCA_Q4_AVX2)))
static void gptq_cols_avx2(const uint32_t *qw, const uint32_t *qz, uint32_t zadd,
                           const uint16_t *sc, const int32_t *gidx, long K, long N, long G,
                           const float *x, const float *xsum, long T, float *out, long ldo,
                           long u0, long u1, float *acc) {
    long u = u0;
    if (T == 1) {
        for (; u + 4 <= u1; u += 4)
            gptq_chunk_avx2(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, out, ldo, 8 * u, 4, 1, acc);
        for (; u < u1; u++)
            gptq_chunk_avx2(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, out, ldo, 8 * u, 1, 1, acc);
        return;
    }
    for (; u < u1; u += 2) {
        int two = u + 2 <= u1;
        for (long t = 0; t < T; t += 4) {
            const float *xt = x + t * K, *st = xsum + t * G;
            float *ot = out + t * ldo;
            long nt = T - t < 4 ? T - t : 4;
#define GPTQ_TILE(V, NT) gptq_chunk_avx2(qw, qz, zadd, sc, gidx, K, N, G, xt, st, ot, ldo, 8 * u, V, NT, acc)
            if (two) {
                if (nt == 4) GPTQ_TILE(2, 4);
                else if (nt == 3) GPTQ_TILE(2, 3);
                else if (nt == 2) GPTQ_TILE(2, 2);
                else GPTQ_TILE(2, 1);
            } else {
                if (nt == 4) GPTQ_TILE(1, 4);
                else if (nt == 3) GPTQ_TILE(1, 3);
                else if (nt == 2) GPTQ_TILE(1, 2);
                else GPTQ_TILE(1, 1);
            }
#undef GPTQ_TILE
        }
    }
}

/* ---------------- AVX-512 (gptq) ---------------- */
#define PECCA_Q4_AVX512 "avx2,fma,f16c,avx512f,avx512bw,avx512vl"

/* q4g row: acc - s_g z_g X_g, 16 groups per vector (lane g % 16) */
__attribute__((target(PECCA_Q4_AVX512), always_inline))
static inline __m512 q4g_fold_avx512(__m512 acc, const uint16_t *sr, const int8_t *zr,
                                     const float *xg, long G) {
    for (long g = 0; g < G; g += 16) {
        __mmask16 mk = (__mmask16)(G - g >= 16 ? 0xFFFFu : (1u << (G - g)) - 1);
        __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr + g));
        __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, zr + g)));
        acc = _mm512_fnmadd_ps(_mm512_mul_ps(sv, zv), _mm512_maskz_loadu_ps(mk, xg + g), acc);
    }
    return acc;
}

/* gptq_chunk_avx2 with 16 columns per vector: columns c .. c + 16V - 1, the last vector masked
 * by `last` (0x00FF: 8 columns). acc: NT * G * 16V floats. */
__attribute__((target(PECCA_Q4_AVX512), always_inline))
static inline void gptq_chunk_avx512(const uint32_t *qw, const uint32_t *qz, uint32_t zadd,
                                     const uint16_t *sc, const int32_t *gidx, long K, long N,
                                     long G, const float *x, const float *xsum, float *out,
                                     long ldo, long c, int V, int NT, __mmask16 last, float *acc) {
    const long CW = 16 * V;
    const __m512i m4 = _mm512_set1_epi32(15);
    __m512 reg[4][4];
    memset(acc, 0, (size_t)(NT * G * CW) * sizeof(float));
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < V; v++) reg[t][v] = _mm512_setzero_ps();
    long cur = K > 0 ? gidx[0] : 0;
    for (long r = 0; r < K / 8; r++) {
        const uint32_t *row = qw + r * N + c;
        for (int v = 0; v < V; v++) __builtin_prefetch(row + GPTQ_PF_ROWS * N + 16 * v, 0, 3);
        __m512i wv[4];
        for (int v = 0; v < V; v++)
            wv[v] = _mm512_maskz_loadu_epi32(v == V - 1 ? last : 0xFFFF, row + 16 * v);
        for (int k = 0; k < 8; k++) {
            long ii = 8 * r + k, g = gidx[ii];
            if (g != cur) {
                for (int t = 0; t < NT; t++)
                    for (int v = 0; v < V; v++) {
                        float *a = acc + (t * G + cur) * CW + 16 * v;
                        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), reg[t][v]));
                        reg[t][v] = _mm512_setzero_ps();
                    }
                cur = g;
            }
            __m512 cv[4];
            for (int v = 0; v < V; v++)
                cv[v] = _mm512_cvtepi32_ps(k == 7 ? _mm512_srli_epi32(wv[v], 28)
                                                : _mm512_and_si512(wv[v], _mm512_set1_epi32(15 << (4 * k))));
            for (int t = 0; t < NT; t++) {
                __m512 xb = _mm512_set1_ps(x[t * K + ii]);
                for (int v = 0; v < V; v++) reg[t][v] = _mm512_fmadd_ps(cv[v], xb, reg[t][v]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < V; v++) {
            float *a = acc + (t * G + cur) * CW + 16 * v;
            _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), reg[t][v]));
        }
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    for (int v = 0; v < V; v++) {
        long cc = c + 16 * v;
        __mmask16 mk = v == V - 1 ? last : 0xFFFF;
        __m512 y[4];
        for (int t = 0; t < NT; t++) y[t] = _mm512_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sc + g * N + cc));
            const uint32_t *zp = qz + g * (N / 8) + cc / 8;
            __m256i z0 = _mm256_set1_epi32((int)(zp[0] + zadd));
            __m256i z1 = _mm256_set1_epi32(mk == 0xFFFF ? (int)(zp[1] + zadd) : 0);
            __m512i zw = _mm512_inserti64x4(_mm512_castsi256_si512(z0), z1, 1);
            __m512 z = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(zw, shifts), m4));
            for (int t = 0; t < NT; t++) {
                __m512 a = _mm512_loadu_ps(acc + (t * G + g) * CW + 16 * v);
                a = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[t * G + g]), a);
                y[t] = _mm512_fmadd_ps(s, a, y[t]);
            }
        }
        for (int t = 0; t < NT; t++) _mm512_mask_storeu_ps(out + t * ldo + cc, mk, y[t]);
    }
}

/* float path with whole-block groups (Q4_0, Q4_1, q4g with gs % 32 == 0), 16 lanes: the 16
 * code bytes of a block widen to 16 int32 lanes, low nibbles meet x[0:16], high x[16:32]. */
__attribute__((target(PECCA_Q4_AVX512), always_inline))
static inline void q4f_block_avx512(int fmt, const uint8_t *w, const uint16_t *sc,
                                    const int8_t *zp, long K, long G, const float *act,
                                    float *out, long i, int NR, int pf) {
    long nb = K / Q4_QK, gs = fmt == Q4_FMT_G ? K / G : Q4_QK;
    long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt), rb = nb * bb;
    const float *x = act, *sums = act + K;
    const __m512i m4 = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const uint8_t *wr[4];
    __m512 acc[4], ga[4], gb[4];
    float mc[4];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (i + r) * rb;
        acc[r] = ga[r] = gb[r] = _mm512_setzero_ps();
        mc[r] = 0.0f;
    }
    const char *next = (const char *)(w + (i + NR) * rb);
    long g = 0, e = 0;
    for (long b = 0; b < nb; b++) {
        if (pf) prefetch_lines(next + NR * bb * b, (NR * (int)bb + 63) / 64);
        __m512 x0 = _mm512_loadu_ps(x + Q4_QK * b), x1 = _mm512_loadu_ps(x + Q4_QK * b + 16);
        for (int r = 0; r < NR; r++) {
            __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr[r] + bb * b + off)));
            __m512i lo = _mm512_and_si512(z, m4), hi = _mm512_srli_epi32(z, 4);
            if (fmt == Q4_FMT_0) {
                lo = _mm512_sub_epi32(lo, eight);
                hi = _mm512_sub_epi32(hi, eight);
            }
            ga[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), x0, ga[r]);
            gb[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), x1, gb[r]);
        }
        int end = 1;
        if (fmt == Q4_FMT_G) {
            e += Q4_QK;
            end = e == gs;
        }
        if (end) {
            for (int r = 0; r < NR; r++) {
                const uint8_t *blk = wr[r] + bb * b;
                float sv = _cvtsh_ss(fmt == Q4_FMT_G ? sc[(i + r) * G + g] : q4_u16(blk));
                acc[r] = _mm512_fmadd_ps(_mm512_add_ps(ga[r], gb[r]), _mm512_set1_ps(sv), acc[r]);
                ga[r] = gb[r] = _mm512_setzero_ps();
                if (fmt == Q4_FMT_1) mc[r] += _cvtsh_ss(q4_u16(blk + 2)) * sums[b];
            }
            e = 0;
            g++;
        }
    }
    for (int r = 0; r < NR; r++) {
        if (fmt == Q4_FMT_G) acc[r] = q4g_fold_avx512(acc[r], sc + (i + r) * G, zp + (i + r) * G, sums, G);
        out[i + r] = _mm512_reduce_add_ps(acc[r]) + (fmt == Q4_FMT_1 ? mc[r] : 0.0f);
    }
}

__attribute__((target(PECCA_Q4_AVX512), always_inline))
static inline void q4f_gemm_avx512(int fmt, const uint8_t *w, const uint16_t *sc,
                                   const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                   long T, float *out, long ldo, long r0, long r1) {
    long i = r0;
    for (; i + 4 <= r1; i += 4)
        for (long t = 0; t < T; t++)
            q4f_block_avx512(fmt, w, sc, zp, K, G, (const float *)(act + t * ab), out + t * ldo,
                             i, 4, t == 0 && i + 8 <= r1);
    for (; i < r1; i++)
        for (long t = 0; t < T; t++)
            q4f_block_avx512(fmt, w, sc, zp, K, G, (const float *)(act + t * ab), out + t * ldo,
                             i, 1, 0);
}

/* Q4_0, Q4_1, q4g with gs % 32 == 0 */
__attribute__((target(PECCA_Q4_AVX512)))
static void q4_f32_rows_avx512(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                               long K, long G, const uint8_t *act, long ab, long T, float *out,
                               long ldo, long r0, long r1) {
    if (fmt == Q4_FMT_0) q4f_gemm_avx512(Q4_FMT_0, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (fmt == Q4_FMT_1) q4f_gemm_avx512(Q4_FMT_1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else q4f_gemm_avx512(Q4_FMT_G, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}

/* As gptq_cols_avx2: one token in chunks of 64 columns, several in chunks of 32 against tiles of
 * up to 4 tokens; a last odd unit of 8 columns as a masked vector. */
__attribute__((target(PECCA_Q4_AVX512)))
static void gptq_cols_avx512(const uint32_t *qw, const uint32_t *qz, uint32_t zadd,
                             const uint16_t *sc, const int32_t *gidx, long K, long N, long G,
                             const float *x, const float *xsum, long T, float *out, long ldo,
                             long u0, long u1, float *acc) {
    long u = u0;
    if (T == 1) {
        for (; u + 8 <= u1; u += 8)
            gptq_chunk_avx512(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, out, ldo, 8 * u, 4, 1, 0xFFFF, acc);
        for (; u + 2 <= u1; u += 2)
            gptq_chunk_avx512(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, out, ldo, 8 * u, 1, 1, 0xFFFF, acc);
        if (u < u1)
            gptq_chunk_avx512(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, out, ldo, 8 * u, 1, 1, 0x00FF, acc);
        return;
    }
    while (u < u1) {
        int V = u + 4 <= u1 ? 2 : 1;
        __mmask16 last = u + 2 * V <= u1 ? 0xFFFF : 0x00FF;
        for (long t = 0; t < T; t += 4) {
            const float *xt = x + t * K, *st = xsum + t * G;
            float *ot = out + t * ldo;
            long nt = T - t < 4 ? T - t : 4;
#define GPTQ_TILE(V, NT) gptq_chunk_avx512(qw, qz, zadd, sc, gidx, K, N, G, xt, st, ot, ldo, 8 * u, V, NT, last, acc)
            if (V == 2) {
                if (nt == 4) GPTQ_TILE(2, 4);
                else if (nt == 3) GPTQ_TILE(2, 3);
                else if (nt == 2) GPTQ_TILE(2, 2);
                else GPTQ_TILE(2, 1);
            } else {
                if (nt == 4) GPTQ_TILE(1, 4);
                else if (nt == 3) GPTQ_TILE(1, 3);
                else if (nt == 2) GPTQ_TILE(1, 2);
                else GPTQ_TILE(1, 1);
            }
#undef GPTQ_TILE
        }
        u += last == 0xFFFF ? 2 * V : 1;
    }
}

/* ---------------- AVX-512 + VNNI ---------------- */

#define PECCA_Q4_VNNI "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
/* the tiles' short loops over rows, quads and tokens, unrolled so that their vectors stay in
 * registers */
#if defined(__clang__)
#define PECCA_Q4_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define PECCA_Q4_UNROLL _Pragma("GCC unroll 8")
#else
#define PECCA_Q4_UNROLL
#endif

/* word indices: the 4 x 16 code bytes of 4 Q4_0 / Q4_1 blocks (72 / 80 bytes) */
static const uint16_t q4_idx_q0[32] = {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,
                                       19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35};
static const uint16_t q4_idx_q1[32] = {2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19,
                                       22, 23, 24, 25, 26, 27, 28, 29, 32, 33, 34, 35, 36, 37, 38, 39};
/* the scales of 4 rows' 4 blocks (two vpermt2w, of rows 0, 1 and of rows 2, 3, then a blend):
 * word 4 blk + j is row j's d of block blk (Q4_1: then the m's) */
static const uint16_t q4_idx_r0[32] = {0, 32, 0, 32, 9, 41, 9, 41, 18, 50, 18, 50, 27, 59, 27, 59,
                                       0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
static const uint16_t q4_idx_r1[32] = {0, 32, 0, 32, 10, 42, 10, 42, 20, 52, 20, 52, 30, 62, 30, 62,
                                       1, 33, 1, 33, 11, 43, 11, 43, 21, 53, 21, 53, 31, 63, 31, 63};
/* 4 per-block values -> [v0 x4 | v1 x4 | v2 x4 | v3 x4] */
static const int32_t q4_idx_bc[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};

/* lanes 4 blk + l of v_j (block blk's 4 partial sums) -> lane 4 blk + j = their sum (integer:
 * exact in any order) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline __m512i q4_quadsum_vnni(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
}

/* a quad's accumulator -> its 4 rows' sums, (b0 + b2) + (b1 + b3) for each */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline __m128 q4_quadfinish_vnni(__m512 acc) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(acc),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* q4g: sum_g s_g z_g X_g of one row for NT tokens (their X at xg[t]), 16 groups per vector (lane
 * g % 16), then reduced: the same operations for a (row, token) in every tile */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4g_zterms_vnni(const uint16_t *sr, const int8_t *zr, const float *const xg[4],
                                   long G, int NT, float zt[4]) {
    __m512 z[4];
    for (int t = 0; t < NT; t++) z[t] = _mm512_setzero_ps();
    for (long g = 0; g < G; g += 16) {
        __mmask16 mk = (__mmask16)(G - g >= 16 ? 0xFFFFu : (1u << (G - g)) - 1);
        __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sr + g));
        __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, zr + g)));
        __m512 sz = _mm512_mul_ps(sv, zv);
        for (int t = 0; t < NT; t++) z[t] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, xg[t] + g), z[t]);
    }
    for (int t = 0; t < NT; t++) zt[t] = _mm512_reduce_add_ps(z[t]);
}

/* q4g, a quad of rows: st[4 g + j] = row i+j's scale of group g as a float (0 for j >= NR) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4g_rows_scales_vnni(const uint16_t *sc, long G, long i, int NR, float *st) {
    long g = 0;
    if (NR == 4) {
        const uint16_t *s0 = sc + i * G, *s1 = s0 + G, *s2 = s1 + G, *s3 = s2 + G;
        for (; g + 8 <= G; g += 8) {
            __m128i a = _mm_loadu_si128((const __m128i *)(s0 + g)), b = _mm_loadu_si128((const __m128i *)(s1 + g));
            __m128i c = _mm_loadu_si128((const __m128i *)(s2 + g)), d = _mm_loadu_si128((const __m128i *)(s3 + g));
            __m128i ab0 = _mm_unpacklo_epi16(a, b), ab1 = _mm_unpackhi_epi16(a, b);
            __m128i cd0 = _mm_unpacklo_epi16(c, d), cd1 = _mm_unpackhi_epi16(c, d);
            _mm256_storeu_ps(st + 4 * g, _mm256_cvtph_ps(_mm_unpacklo_epi32(ab0, cd0)));
            _mm256_storeu_ps(st + 4 * g + 8, _mm256_cvtph_ps(_mm_unpackhi_epi32(ab0, cd0)));
            _mm256_storeu_ps(st + 4 * g + 16, _mm256_cvtph_ps(_mm_unpacklo_epi32(ab1, cd1)));
            _mm256_storeu_ps(st + 4 * g + 24, _mm256_cvtph_ps(_mm_unpackhi_epi32(ab1, cd1)));
        }
    }
    for (; g < G; g++)
        for (int j = 0; j < 4; j++) st[4 * g + j] = j < NR ? _cvtsh_ss(sc[(i + j) * G + g]) : 0.0f;
}

/* the group of each block of step s (q4g; gl[L] for Q4_SF_X, gl[0] for Q4_SF_W) and whether a
 * Q4_SF_W group starts there; g, k: the group of the next block and its place in the group */
static inline int q4g_step_groups(int sf, long bpg, int nbk, long *g, long *k, long gl[4]) {
    int start = *k == 0;
    gl[0] = gl[1] = gl[2] = gl[3] = 0;
    if (sf == Q4_SF_W) {  /* whole steps per group: count steps */
        gl[0] = *g;
        *k += 4;
        if (*k == bpg) { *k = 0; (*g)++; }
    } else if (sf == Q4_SF_X) {
        for (int L = 0; L < nbk; L++) {
            gl[L] = *g;
            if (++*k == bpg) { *k = 0; (*g)++; }
        }
    }
    return start;
}

/* the 128 codes of row p's step (lo: the low nibbles' 64, hi: the high ones'); Q4_0 / Q4_1:
 * z0 = the step's first 64 bytes (their scales: words 9 blk / 10 blk) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_wload_vnni(int fmt, const uint8_t *p, int nbk, __m512i iq, __m512i *lo,
                                 __m512i *hi, __m512i *z0) {
    long bb = q4_block_bytes(fmt);
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i v;
    if (fmt == Q4_FMT_G) {
        v = nbk == 4 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((1ULL << (16 * nbk)) - 1, p);
    } else {
        __m512i z1;
        if (nbk == 4) {
            *z0 = _mm512_loadu_si512(p);
            z1 = _mm512_maskz_loadu_epi8(fmt == Q4_FMT_0 ? 0xFFULL : 0xFFFFULL, p + 64);
        } else {
            *z0 = _mm512_maskz_loadu_epi8((1ULL << (bb * nbk)) - 1, p);
            z1 = _mm512_setzero_si512();
        }
        v = _mm512_permutex2var_epi16(*z0, iq, z1);
    }
    *lo = _mm512_and_si512(v, m4);
    *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
}

/* int32 lanes 4 blk + l of row (lo, hi) against one token's step codes xp: sum w q over block
 * blk's elements 4l..4l+3 and 16+4l..16+4l+3, as 256 hi + lo (exact: |.| < 2^22). The two
 * levels' sums are two independent chains of 2 vpdpbusd, joined at the end (one chain of 4 ran
 * 3-13% slower on Zen 4: latency) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline __m512i q4_dot_vnni(__m512i lo, __m512i hi, const uint8_t *xp) {
    __m512i ih = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp));
    __m512i il = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp + 128));
    ih = _mm512_dpbusd_epi32(ih, hi, _mm512_loadu_si512(xp + 64));
    il = _mm512_dpbusd_epi32(il, hi, _mm512_loadu_si512(xp + 192));
    return _mm512_add_epi32(_mm512_slli_epi32(ih, 8), il);
}

/* a step's scales, lane 4 blk + j: Q4_0 / Q4_1 row j's d of block blk (sm: its m) from the
 * code bytes z0; q4g row j's scale of block blk's group from st (4 per group, reloaded only when
 * load: a group starts, or always for Q4_SF_1 / Q4_SF_X) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_step_scales_vnni(int fmt, int sf, __m512i z00, __m512i z01, __m512i z02,
                                       __m512i z03, __m512i ir,
                                       const float *st, long s, int nbk, int load,
                                       const long gl[4], __m512 *sw, __m512 *sm) {
    if (fmt != Q4_FMT_G) {
        __m512i h = _mm512_mask_blend_epi16(0xCCCCCCCCu, _mm512_permutex2var_epi16(z00, ir, z01),
                                            _mm512_permutex2var_epi16(z02, ir, z03));
        *sw = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
        if (fmt == Q4_FMT_1) *sm = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
    } else if (sf == Q4_SF_W) {
        if (load) *sw = _mm512_broadcast_f32x4(_mm_loadu_ps(st + 4 * gl[0]));
    } else if (sf == Q4_SF_1) {
        *sw = _mm512_maskz_loadu_ps((__mmask16)((1u << (4 * nbk)) - 1), st + 16 * s);
    } else {
        __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(st + 4 * gl[0]));
        v = _mm512_insertf32x4(v, _mm_loadu_ps(st + 4 * gl[1]), 1);
        v = _mm512_insertf32x4(v, _mm_loadu_ps(st + 4 * gl[2]), 2);
        v = _mm512_insertf32x4(v, _mm_loadu_ps(st + 4 * gl[3]), 3);
        *sw = _mm512_maskz_mov_ps((__mmask16)((1u << (4 * nbk)) - 1), v);
    }
}

/* a quad's accumulator after step s of one token (prepared at a): its 4 rows' integer lanes is
 * added into the quad, then per lane acc += float(B) * (s_w d_x) (Q4_0: B less 8 sum q_b;
 * Q4_1: then acc += m xs_b) */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline __m512 q4_step_acc_vnni(int fmt, __m512i is0, __m512i is1, __m512i is2, __m512i is3,
                                      const uint8_t *a, long Kp, long s, __m512i ibc, __m512 sw,
                                      __m512 sm, __m512 acc) {
    __m512i bq = q4_quadsum_vnni(is0, is1, is2, is3);
    if (fmt == Q4_FMT_0)
        bq = _mm512_add_epi32(bq, _mm512_permutexvar_epi32(ibc, _mm512_castsi128_si512(
                                      _mm_loadu_si128((const __m128i *)(a + Q4_A_NQB(Kp)) + s))));
    __m512 sx = _mm512_loadu_ps((const float *)(a + Q4_A_SX(Kp)) + 16 * s);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bq), _mm512_mul_ps(sw, sx), acc);
    if (fmt == Q4_FMT_1) {
        __m512 xs = _mm512_permutexvar_ps(ibc, _mm512_castps128_ps512(_mm_loadu_ps((const float *)(a + Q4_A_XSB(Kp)) + 4 * s)));
        acc = _mm512_fmadd_ps(sm, xs, acc);
    }
    return acc;
}

/* VNNI, per (row, token) and block the exact integer B = sum w q (Q4_0: minus 8 sum q) from
 * q4_dot_vnni's lanes, 4 rows at a time added into a quad (lane 4 blk + j = row j's block blk
 * of the step); per quad lane
 *   acc += float(B) * (s_w d_x)   then   Q4_1: acc += m xs
 * and at the end y = the sum of the row's 4 lanes (q4g: minus sum_g s_g z_g X_g, X_g the
 * token's group sums of xs). A (row, token) gets the same operations in every tile. */

/* a quad's results: rows i..i+NR-1, tokens t0.. (prepared at at[t]) from their accumulators */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_quad_store_vnni(int fmt, const uint16_t *sc, const int8_t *zp, long G, long Kp,
                                      const uint8_t *const at[4], __m512 acc0, __m512 acc1,
                                      __m512 acc2, __m512 acc3, float *out, long ldo, long i,
                                      long t0, int NR, int NT) {
    const float *xg[4];
    float v[4][4];
    PECCA_Q4_UNROLL
    for (int t = 0; t < 4; t++) xg[t] = (const float *)(at[t] + Q4_A_XG(Kp));
    _mm_storeu_ps(v[0], q4_quadfinish_vnni(acc0));
    if (NT > 1) _mm_storeu_ps(v[1], q4_quadfinish_vnni(acc1));
    if (NT > 2) _mm_storeu_ps(v[2], q4_quadfinish_vnni(acc2));
    if (NT > 3) _mm_storeu_ps(v[3], q4_quadfinish_vnni(acc3));
    for (int j = 0; j < NR; j++) {
        float zt[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (fmt == Q4_FMT_G) q4g_zterms_vnni(sc + (i + j) * G, zp + (i + j) * G, xg, G, NT, zt);
        for (int t = 0; t < NT; t++) out[(t0 + t) * ldo + i + j] = v[t][j] - zt[t];
    }
}

/* rows i..i+NR-1 (NR <= 4: one quad) x tokens t0..t0+NT-1 (NT <= 4: each load of a row's codes
 * serves them all), 4 blocks per step. pf > 0: prefetch the rows pfd quads ahead, pf - 1 lines
 * a step more than the step reads (and q4g's next scales and zero points). st: 4 G floats of
 * scratch (q4g). */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_tile_vnni(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                float *out, long ldo, long i, long t0, int NR, int NT, int pf,
                                int pfd, float *st) {
    long nb = K / Q4_QK, Kp = q4_padded(K), bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), sb = 4 * bb, rb = nb * bb;
    const long rs = quad ? 64 : rb, ss = quad ? q4g_step_stride(1) : sb;  /* row i + j: i rb + j rs; step s: + s ss */
    const __m512i iq = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_q1 : q4_idx_q0);
    const __m512i ir = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_r1 : q4_idx_r0);
    const __m512i ibc = _mm512_loadu_si512(q4_idx_bc);
    const uint8_t *at[4];
    __m512 acc[4], sw = _mm512_setzero_ps(), sm = _mm512_setzero_ps();
    PECCA_Q4_UNROLL
    for (int t = 0; t < 4; t++) {
        acc[t] = _mm512_setzero_ps();
        at[t] = act + (t0 + (t < NT ? t : 0)) * ab;
    }
    if (fmt == Q4_FMT_G) {
        if (pf) {  /* the next rows' scales and zero points, read at its start */
            prefetch_lines((const char *)(sc + (i + 4) * G), (int)((8 * G + 63) / 64));
            prefetch_lines((const char *)(zp + (i + 4) * G), (int)((4 * G + 63) / 64));
        }
        q4g_rows_scales_vnni(sc, G, i, NR, st);
    }
    const char *next = (const char *)(w + (i + 4 * pfd) * rb);
    long g = 0, k = 0;
    for (long s = 0; 4 * s < nb; s++) {
        const int nbk = nb - 4 * s < 4 ? (int)(nb - 4 * s) : 4;
        if (pf) prefetch_lines(next + 4 * sb * s, (4 * (int)sb + 63) / 64 + pf - 1);
        long gl[4];
        int gstart = fmt == Q4_FMT_G ? q4g_step_groups(sf, bpg, nbk, &g, &k, gl) : 0;
        /* the quad's rows: codes (their dots at once when there is one token) and scales */
        __m512i lo[4], hi[4], z0[4], is[4];
        PECCA_Q4_UNROLL
        for (int j = 0; j < 4; j++) {
            lo[j] = hi[j] = z0[j] = is[j] = _mm512_setzero_si512();
            if (j < NR) {
                q4_wload_vnni(fmt, w + i * rb + j * rs + ss * s, nbk, iq, &lo[j], &hi[j], &z0[j]);
                if (NT == 1) is[j] = q4_dot_vnni(lo[j], hi[j], at[0] + Q4_ASTEP * s);
            }
        }
        q4_step_scales_vnni(fmt, sf, z0[0], z0[1], z0[2], z0[3], ir, st, s, nbk, gstart, gl, &sw, &sm);
        PECCA_Q4_UNROLL
        for (int t = 0; t < NT; t++) {
            const uint8_t *a = at[t];
            if (NT > 1)
                PECCA_Q4_UNROLL
                for (int j = 0; j < 4; j++)
                    is[j] = j < NR ? q4_dot_vnni(lo[j], hi[j], a + Q4_ASTEP * s) : _mm512_setzero_si512();
            acc[t] = q4_step_acc_vnni(fmt, is[0], is[1], is[2], is[3], a, Kp, s, ibc, sw, sm, acc[t]);
        }
    }
    q4_quad_store_vnni(fmt, sc, zp, G, Kp, at, acc[0], acc[1], acc[2], acc[3], out, ldo, i, t0, NR, NT);
}

#ifndef Q4_PANEL
#define Q4_PANEL 64  /* matmul: rows kept in L2 while every group of tokens passes */
#endif
#ifndef Q4_PF_QUADS
#define Q4_PF_QUADS 6  /* matvec: how many quads of rows ahead to prefetch (into L2) */
#endif
#ifndef Q4_MV_CHUNK_K
#define Q4_MV_CHUNK_K 8192  /* matvec: from this K on, K in chunks across a panel of quads */
#endif

/* matvec of whole quads, rows [r0, r1) ((r1 - r0) % 4 == 0), for long rows (K >= Q4_MV_CHUNK_K).
 * A tile's pass over K reads the whole prepared token (2.5 bytes an input: 27 KB at K = 11008)
 * between two quads, while the quads' rows stream through L1 as well; the token then leaves
 * the 48 KB L1 and comes back from L2 at every quad, which cost 15-30% from DRAM (GPTQ's 4096 x
 * 11008 down projection ran at ~67% of the read bandwidth). Here panels of Q4_MV_PQ quads pass
 * K in chunks of Q4_MV_CS steps, every quad of the panel through a chunk before the next chunk,
 * so that the chunk's activations stay in L1; each quad keeps its accumulator between chunks
 * and gets the same operations in the same order as in q4_tile_vnni (same bits). The next panel
 * is prefetched linearly, 4 sb bytes per quad step. q4g's group scales of a panel (Q4_MV_PQ * 4
 * G floats) get their own allocation: a larger scratch for every call slowed SmolLM2's short
 * products by 5-10%, as did inlining this into q4_gemm_vnni. Returns 0 (nothing done) when that
 * allocation fails. Panels of 2 quads (8 row streams) in chunks of 4 steps ran 3-12% faster
 * than session 7's 4 quads (16 streams) in chunks of 8 (harness, 1 thread, 4096 x 11008: Q4_0
 * +7%, Q4_1 +12%, q4g +3%; 4096 x 14336 +3%, 8192 x 8192 +4%); 1 quad, or 4 quads in chunks of
 * 4, less so. */
__attribute__((target(PECCA_Q4_VNNI), noinline))
static int q4_mv_chunked_vnni(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc,
                              const int8_t *zp, long K, long G, const uint8_t *a, float *out,
                              long r0, long r1, long pf1) {
    float *st = NULL;
    if (fmt == Q4_FMT_G && (st = (float *)pecca_alloc_lines(sizeof(float) * 4 * G * Q4_MV_PQ)) == NULL)
        return 0;
    long nb = K / Q4_QK, Kp = q4_padded(K), bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), sb = 4 * bb, rb = nb * bb, ns = (nb + 3) / 4;
    const long rs = quad ? 64 : rb, ss = quad ? q4g_step_stride(1) : sb;  /* as in q4_tile_vnni */
    const __m512i iq = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_q1 : q4_idx_q0);
    const __m512i ir = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_r1 : q4_idx_r0);
    const __m512i ibc = _mm512_loadu_si512(q4_idx_bc);
    const uint8_t *const at[4] = {a, a, a, a};
    __m512 acc[Q4_MV_PQ];
    for (long p0 = r0; p0 < r1; p0 += 4 * Q4_MV_PQ) {
        int nq = (int)((r1 - p0) / 4 < Q4_MV_PQ ? (r1 - p0) / 4 : Q4_MV_PQ);
        const char *next = (const char *)(w + (p0 + 4 * Q4_MV_PQ) * rb);
        long pfend = (pf1 - p0 - 4 * Q4_MV_PQ) * rb, pfpos = 0;  /* nothing past pf1 */
        for (int q = 0; q < nq; q++) {
            acc[q] = _mm512_setzero_ps();
            if (fmt == Q4_FMT_G) {
                long i = p0 + 4 * q;
                if (i + 4 * Q4_MV_PQ + 4 <= pf1) {
                    prefetch_lines((const char *)(sc + (i + 4 * Q4_MV_PQ) * G), (int)((8 * G + 63) / 64));
                    prefetch_lines((const char *)(zp + (i + 4 * Q4_MV_PQ) * G), (int)((4 * G + 63) / 64));
                }
                q4g_rows_scales_vnni(sc, G, i, 4, st + 4 * G * q);
            }
        }
        for (long s0 = 0; s0 < ns; s0 += Q4_MV_CS) {
            long s1 = s0 + Q4_MV_CS < ns ? s0 + Q4_MV_CS : ns;
            for (int q = 0; q < nq; q++) {
                const uint8_t *wq = w + (p0 + 4 * q) * rb;
                const float *stq = st + 4 * G * q;
                __m512 accq = acc[q], swq = _mm512_setzero_ps(), sm = _mm512_setzero_ps();
                long g = 4 * s0 / bpg, k = 4 * s0 % bpg;  /* q4g_step_groups' state at s0 */
                for (long s = s0; s < s1; s++) {
                    const int nbk = nb - 4 * s < 4 ? (int)(nb - 4 * s) : 4;
                    if (pfpos < pfend) {
                        prefetch_lines(next + pfpos, (4 * (int)sb + 63) / 64 + Q4_PF_EXTRA);
                        pfpos += 4 * sb;
                    }
                    long gl[4];
                    int gstart = fmt == Q4_FMT_G ? q4g_step_groups(sf, bpg, nbk, &g, &k, gl) : 0;
                    __m512i lo[4], hi[4], z0[4], is[4];
                    PECCA_Q4_UNROLL
                    for (int j = 0; j < 4; j++) {
                        z0[j] = _mm512_setzero_si512();
                        q4_wload_vnni(fmt, wq + j * rs + ss * s, nbk, iq, &lo[j], &hi[j], &z0[j]);
                        is[j] = q4_dot_vnni(lo[j], hi[j], a + Q4_ASTEP * s);
                    }
                    /* a chunk's first step loads its group's scale, which the tile kept from an
                     * earlier step (the same value) */
                    q4_step_scales_vnni(fmt, sf, z0[0], z0[1], z0[2], z0[3], ir, stq, s, nbk, gstart || s == s0, gl, &swq, &sm);
                    accq = q4_step_acc_vnni(fmt, is[0], is[1], is[2], is[3], a, Kp, s, ibc, swq, sm, accq);
                }
                acc[q] = accq;
            }
        }
        for (int q = 0; q < nq; q++)
            q4_quad_store_vnni(fmt, sc, zp, G, Kp, at, acc[q], acc[q], acc[q], acc[q], out, 1, p0 + 4 * q, 0, 4, 1);
    }
    pecca_free_lines(st);
    return 1;
}

__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_gemm_vnni(int fmt, int sf, int quad, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                long T, float *out, long ldo, long r0, long r1, long pf1,
                                float *st) {
#define Q4_TILE(i, t, NR, NT, pf, pfd) \
    q4_tile_vnni(fmt, sf, quad, w, sc, zp, K, G, act, ab, out, ldo, i, t, NR, NT, pf, pfd, st)
    if (T == 1) {  /* 4 rows at a time, the next ones prefetched Q4_PF_QUADS quads ahead */
        long i = r0;
        if (K >= Q4_MV_CHUNK_K && q4_mv_chunked_vnni(fmt, sf, quad, w, sc, zp, K, G, act, out, r0,
                                                     r0 + (r1 - r0) / 4 * 4, pf1))
            i = r0 + (r1 - r0) / 4 * 4;
        const int pf = (r1 - r0) * (K / Q4_QK) * q4_block_bytes(fmt) >= PECCA_STREAM_BYTES ? 1 + Q4_PF_EXTRA : 1;
        for (; i + 4 <= r1; i += 4) Q4_TILE(i, 0, 4, 1, i + 4 + 4 * Q4_PF_QUADS <= pf1 ? pf : 0, Q4_PF_QUADS);
        if (i < r1) Q4_TILE(i, 0, (int)(r1 - i), 1, 0, 1);
        return;
    }
    /* panels of rows against each group of up to 4 tokens in turn, 4 rows at a time */
    for (long p0 = r0; p0 < r1; p0 += Q4_PANEL) {
        long p1 = p0 + Q4_PANEL < r1 ? p0 + Q4_PANEL : r1;
        for (long t = 0; t < T; t += 4) {
            int nt = T - t < 4 ? (int)(T - t) : 4;
            long i = p0;
            for (; i + 4 <= p1; i += 4) {
                int pf = t == 0 && i + 8 <= r1;
                if (nt == 4) Q4_TILE(i, t, 4, 4, pf, 1);
                else if (nt == 3) Q4_TILE(i, t, 4, 3, pf, 1);
                else if (nt == 2) Q4_TILE(i, t, 4, 2, pf, 1);
                else Q4_TILE(i, t, 4, 1, pf, 1);
            }
            if (i < p1) Q4_TILE(i, t, (int)(p1 - i), nt, 0, 1);
        }
    }
#undef Q4_TILE
}

__attribute__((target(PECCA_Q4_VNNI)))
static void q4_int8_rows_vnni(int fmt, int quad, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                              long K, long G, const uint8_t *act, long ab, long T, float *out,
                              long ldo, long r0, long r1, long pf1, float *st) {
    long bpg = K / Q4_QK / G;
#define Q4_GEMM(F, SF, Q) q4_gemm_vnni(F, SF, Q, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1, pf1, st)
    if (fmt == Q4_FMT_0) Q4_GEMM(Q4_FMT_0, Q4_SF_X, 0);
    else if (fmt == Q4_FMT_1) Q4_GEMM(Q4_FMT_1, Q4_SF_X, 0);
    else if (bpg % 4 == 0) Q4_GEMM_LAYOUTS(Q4_FMT_G, Q4_SF_W);
    else if (bpg == 1) Q4_GEMM_LAYOUTS(Q4_FMT_G, Q4_SF_1);
    else Q4_GEMM_LAYOUTS(Q4_FMT_G, Q4_SF_X);
#undef Q4_GEMM
}
#endif /* PECCA_X86 */

/* ---------------- dispatch ---------------- */

/* scratch floats q4_int8_rows needs (for one call at a time) */
static long q4_int8_scratch_floats(long G) { return 4 * G + 16; }

/* Scratch for nt threads' q4_int8_rows, each slice (*stride floats apart) on cache lines of its
 * own. The q4g tiles write their group scales there at every quad; with plain malloc a line of
 * one thread's slice could hold the other's slice or the end of the prepared activations, which
 * every thread reads, and bounced between the cores: q4g 4096 x 4096 in cache took 213 us at 2
 * threads against 194 at 1 (Q4_0, which writes no scratch: 99 against 184). Free with
 * pecca_free_lines. */
static float *q4_thread_scratch(int nt, long G, long *stride) {
    *stride = (q4_int8_scratch_floats(G) + 15) / 16 * 16;
    return (float *)pecca_alloc_lines(sizeof(float) * *stride * (nt > 1 ? nt : 1));
}

/* out[t * ldo + r] = W[r] . x_t for rows [r0, r1), tokens t < T prepared by q4_prepare_int8
 * (act + t * ab). q4g: gs = K / G a multiple of 32. scratch: q4_int8_scratch_floats(G) floats
 * for this call's exclusive use. pf1 >= r1: the matvec may prefetch rows up to pf1 (the rows
 * the matrix has), so that a thread's next call, on the rows that follow (work stealing's
 * chunks), finds its first rows on the way. */
static void q4_int8_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                         long K, long G, const uint8_t *act, long ab, long T, float *out,
                         long ldo, long r0, long r1, long pf1, float *scratch) {
    int quad = (fmt & Q4_FMT_QUADS) != 0;
    fmt &= ~Q4_FMT_QUADS;
#if PECCA_X86
    int level = q8_kernel_level();
    if (level == 2) { q4_int8_rows_vnni(fmt, quad, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1, pf1, scratch); return; }
    if (level == 1) { q4_int8_rows_avx2(fmt, quad, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1, pf1); return; }
#endif
    q4_rows_portable(fmt, quad, 0, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}

/* As q4_int8_rows with tokens prepared by q4_prepare_f32 (ab in bytes). q4g: any gs. */
static void q4_f32_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                        long K, long G, const uint8_t *act, long ab, long T, float *out,
                        long ldo, long r0, long r1) {
    if (fmt & Q4_FMT_QUADS) {  /* the float path (a check of the int8 one) reads quads portably */
        q4_rows_portable(fmt & ~Q4_FMT_QUADS, 1, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
        return;
    }
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512 && (fmt != Q4_FMT_G || (K / G) % Q4_QK == 0)) {
        q4_f32_rows_avx512(fmt, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
        return;
    }
    if (level >= PECCA_SIMD_AVX2 && (fmt != Q4_FMT_G || (K / G) % 8 == 0)) {
        q4_f32_rows_avx2(fmt, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
        return;
    }
#endif
    q4_rows_portable(fmt, 0, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}

/* gptq: columns [8 u0, 8 u1) of out (T, ldo) for tokens x (T, K) with xsum and xk (T, G) and
 * (T, K) from gptq_prepare. acc: gptq_acc_floats(G) floats of scratch for this call's
 * exclusive use. */
static long gptq_acc_floats(long G) { return 4 * G * 64; }

static void gptq_cols(const uint32_t *qw, const uint32_t *qz, uint32_t zadd, const uint16_t *sc,
                      const int32_t *gidx, long K, long N, long G, const float *x,
                      const float *xsum, const float *xk, long T, float *out, long ldo,
                      long u0, long u1, float *acc) {
#if PECCA_X86
    if (pecca_simd_level() == PECCA_SIMD_AVX512) {
        gptq_cols_avx512(qw, qz, zadd, sc, gidx, K, N, G, xk, xsum, T, out, ldo, u0, u1, acc);
        return;
    }
    if (q8_kernel_level() >= 1) {
        gptq_cols_avx2(qw, qz, zadd, sc, gidx, K, N, G, xk, xsum, T, out, ldo, u0, u1, acc);
        return;
    }
#endif
    gptq_cols_portable(qw, qz, zadd, sc, gidx, K, N, G, x, xsum, T, out, ldo, u0, u1, acc);
}

#endif
