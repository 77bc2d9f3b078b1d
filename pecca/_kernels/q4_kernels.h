/* 4-bit weights: products y = W x with W (N, K) stored as 4-bit codes, read in place.
 *
 * Layouts (see /tmp/q4_spec.md, "pecca 4-bit design"):
 *  q4g (pecca's repacked GPTQ): qs uint8 (N, K/2): row n, block b of 32 (permuted) inputs is
 *    bytes [16b, 16b+16): byte j's low nibble is the code of input 32b+j, its high nibble the code
 *    of input 32b+16+j (Q4_0's order). scales f16 (N, G), zeros int8 (N, G) (true zero points
 *    0..15), optional perm int32 (K,): input i of the product is x[perm[i]]. gs = K / G;
 *    W[n, perm[i]] = scales[n, i/gs] * (code(n, i) - zeros[n, i/gs]).
 *  Q4_0 (GGUF): per 32-block 18 bytes: f16 d, 16 bytes of nibbles (same order); w = d * (q - 8).
 *  Q4_1 (GGUF): per 32-block 20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m.
 *  gptq (native HF): qweight int32 (K/8, N): code of input 8r+k, column j is
 *    (qweight[r, j] >> 4k) & 15; qzeros int32 (G, N/8): zero of (g, 8c+k) is
 *    ((qzeros[g, c] + zero_add) >> 4k) & 15 (whole-word add: v1's stored words borrow);
 *    scales f16 (G, N); g_idx int32 (K,) (any order); optional out_perm: out[i] = y[out_perm[i]].
 *
 * int8-activation path (q4g with gs % 32 == 0, Q4_0, Q4_1). Each token is prepared once per
 * product (q4_prepare_int8): quantized per 32-block by q8's quantize_q8_0 (d = amax/127), then
 * rearranged per step of 4 blocks (128 inputs) as [elements 0..15 of blocks 0,1,2,3 | elements
 * 16..31 of blocks 0,1,2,3], so that the low nibbles of 64 contiguous code bytes meet the first
 * 64 bytes and the high nibbles the next 64 without any shuffle of the weights. Alongside: the
 * block scales repeated 4x (one per int32 lane of a block), the block sums xs_b = d_b * sum(q),
 * for Q4_0 the per-lane -8 * sum(q) (the zero point 8 as an integer start value), for Q4_1
 * xs_b / 4 per lane, for q4g the group sums X_g = sum of xs_b over the group. The weight codes
 * are unsigned (0..15), so they are the unsigned operand of maddubs / vpdpbusd as they are:
 * no sign trick. Each int16 of AVX2's maddubs(lo) + maddubs(hi) is at most 4 * 15 * 127 = 7620
 * < 32767: no saturation. Int32 lane l of a block covers its elements 4l..4l+3 and 16+4l..16+4l+3
 * on both paths (and the Q4_0 correction is laid out the same way). Per row:
 *   q4g:  sum_b (d_b s_g(b)) * dot_b  -  sum_g s_g z_g X_g   (the second sum once per row and
 *         token, folded into the accumulator's lanes 8 / 16 groups at a time)
 *   Q4_0: sum_b (d_b d_w) * (dot_b - 8 sum q_b)                (integer, exact)
 *   Q4_1: sum_b (d_b d_w) * dot_b + m_b xs_b
 *  AVX2: 2 blocks (64 inputs) per step on ymm. AVX-512 + VNNI: 4 blocks per step on zmm, two
 *  vpdpbusd (low and high nibbles) per row; Q4_0 / Q4_1's 18 / 20-byte blocks are gathered with
 *  one vpermt2w (the code bytes of 4 blocks) and one vpermw (their f16 scales). The AVX-512
 *  level without VNNI runs the AVX2 code, like q8. Integer sums are exact; only the float
 *  accumulation rounds (~1e-6 relative). Rows go 4 at a time sharing each x load; the next 4-row
 *  block is prefetched linearly (as in q8_kernels.h). matmul: AVX2 runs each 4-row block against
 *  every token while it is in L1/L2; VNNI uses tiles of 4 rows x 4 tokens. Either way a (row,
 *  token) gets the same operations in the same order as in matvec: bit-identical rows.
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
#include "simd.h"
#include "f32_kernels.h"
#include "f16_kernels.h"
#include "q8_kernels.h"

#define Q4_QK 32
#define Q4_0_BYTES 18
#define Q4_1_BYTES 20
#define Q4_STEP 128

#define Q4_FMT_G 0
#define Q4_FMT_0 1
#define Q4_FMT_1 2

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
 * int8 path, one token, Kp = K rounded up to 128 (the padding is zeros):
 *   [0, Kp)            int8 codes, rearranged per step of 4 blocks (header comment)
 *   [Kp, 1.5 Kp)       float sx4[Kp/8]: d_b repeated 4 times
 *   [1.5 Kp, 2 Kp)     Q4_0: int32 [Kp/8], -8 * the lane sums; Q4_1: float xs_b / 4 per lane
 *   [2 Kp, 2.125 Kp)   float xsb[Kp/32]: d_b * sum(q_b)
 *   then               float X[G] (q4g): sums of xsb over each group
 */
static inline long q4_act_bytes(long K, long G) {
    long Kp = q4_padded(K);
    long n = 2 * Kp + Kp / 8 + 4 * G;
    return (n + 63) / 64 * 64;
}

/* float path, one token: x (gathered by perm) then the sums (G for q4g, K/32 for Q4_1) */
static inline long q4_actf_floats(long K, long G) {
    long s = G > K / Q4_QK ? G : K / Q4_QK;
    return (K + s + 15) / 16 * 16;
}

/* x (K,) -> act. perm (K) or NULL; work: K floats (used with perm). For q4g, K / G % 32 == 0. */
static void q4_prepare_int8(int fmt, const float *x, const int32_t *perm, float *work,
                            uint8_t *act, long K, long G) {
    long Kp = q4_padded(K), nb = K / Q4_QK, nbp = Kp / Q4_QK;
    int8_t *qa = (int8_t *)act;
    float *sx4 = (float *)(act + Kp), *xsb = (float *)(act + 2 * Kp);
    float *xg = (float *)(act + 2 * Kp + Kp / 8);
    int32_t *nc = (int32_t *)(act + Kp + Kp / 2);
    float *xs4 = (float *)(act + Kp + Kp / 2);
    if (perm) {
        for (long i = 0; i < K; i++) work[i] = x[perm[i]];
        x = work;
    }
    memset(qa + K, 0, (size_t)(Kp - K));
    quantize_q8_0(x, qa, xsb, K);  /* natural order; d_b parked in xsb */
    for (long b = 0; b < nbp; b++) {
        const int8_t *q = qa + Q4_QK * b;
        float d = b < nb ? xsb[b] : 0.0f;
        int32_t isum = 0;
        for (int l = 0; l < 4; l++) {
            int32_t ls = 0;
            for (int j = 0; j < 4; j++) ls += q[4 * l + j] + q[16 + 4 * l + j];
            isum += ls;
            sx4[4 * b + l] = d;
            if (fmt == Q4_FMT_0) nc[4 * b + l] = -8 * ls;
        }
        float xs = d * (float)isum;
        xsb[b] = xs;
        if (fmt == Q4_FMT_1)
            for (int l = 0; l < 4; l++) xs4[4 * b + l] = xs * 0.25f;
    }
    for (long s = 0; s < Kp / Q4_STEP; s++) {
        int8_t tmp[Q4_STEP], *q = qa + Q4_STEP * s;
        for (int L = 0; L < 4; L++) {
            memcpy(tmp + 16 * L, q + 32 * L, 16);
            memcpy(tmp + 64 + 16 * L, q + 32 * L + 16, 16);
        }
        memcpy(q, tmp, Q4_STEP);
    }
    if (fmt == Q4_FMT_G) {
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

/* element j of block b in the rearranged activation codes */
static inline int q4_xa(const int8_t *qa, long b, int j) {
    const int8_t *s = qa + Q4_STEP * (b >> 2) + 16 * (b & 3);
    return j < 16 ? s[j] : s[64 + j - 16];
}

static float q4_int8_dot_portable(int fmt, const uint8_t *wr, const uint16_t *sr,
                                  const int8_t *zr, long K, long G, const uint8_t *act) {
    long Kp = q4_padded(K), nb = K / Q4_QK;
    const int8_t *qa = (const int8_t *)act;
    const float *sx4 = (const float *)(act + Kp), *xsb = (const float *)(act + 2 * Kp);
    const float *xg = (const float *)(act + 2 * Kp + Kp / 8);
    float val = 0.0f;
    if (fmt == Q4_FMT_G) {
        long bpg = nb / G;
        for (long g = 0; g < G; g++) {
            float gsum = 0.0f;
            for (long b = g * bpg; b < (g + 1) * bpg; b++) {
                int32_t dot = 0;
                for (int j = 0; j < Q4_QK; j++) dot += q4_nib(wr + 16 * b, j) * q4_xa(qa, b, j);
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
            int q = q4_xa(qa, b, j);
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

static float q4_f32_dot_portable(int fmt, const uint8_t *wr, const uint16_t *sr,
                                 const int8_t *zr, long K, long G, const float *act) {
    const float *x = act, *sums = act + K;
    float val = 0.0f;
    if (fmt == Q4_FMT_G) {
        long gs = K / G;
        for (long g = 0; g < G; g++) {
            float gsum = 0.0f;
            for (long i = g * gs; i < (g + 1) * gs; i++) {
                float p = (float)q4_nib(wr + 16 * (i / Q4_QK), (int)(i % Q4_QK)) * x[i];
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
static void q4_rows_portable(int fmt, int float_act, const uint8_t *w, const uint16_t *sc,
                             const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                             long T, float *out, long ldo, long r0, long r1) {
    long rb = q4_row_bytes(fmt, K);
    for (long r = r0; r < r1; r += 4) {
        long re = r + 4 < r1 ? r + 4 : r1;
        for (long t = 0; t < T; t++)
            for (long i = r; i < re; i++) {
                const uint16_t *sr = fmt == Q4_FMT_G ? sc + i * G : NULL;
                const int8_t *zr = fmt == Q4_FMT_G ? zp + i * G : NULL;
                out[t * ldo + i] = float_act
                    ? q4_f32_dot_portable(fmt, w + i * rb, sr, zr, K, G, (const float *)(act + t * ab))
                    : q4_int8_dot_portable(fmt, w + i * rb, sr, zr, K, G, act + t * ab);
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
#define PECCA_Q4_AVX2 "avx2,fma,f16c"

/* [f16 h0 x4 | f16 h1 x4] as floats */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline __m256 q4_halves2_avx2(uint32_t h0, uint32_t h1) {
    __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)(h0 | (h1 << 16))));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* q4g row: acc - s_g z_g X_g for the groups g < G rounded down to 8 (lane g % 8), then the
 * sum of the lanes minus the remaining groups' terms */
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

/* Rows i..i+NR-1 (NR = 4 or 1) against one prepared token, 2 blocks per step. */
__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_block_avx2(int fmt, int sf, const uint8_t *w, const uint16_t *sc,
                                 const int8_t *zp, long K, long G, const uint8_t *act, float *out,
                                 long i, int NR, int pf) {
    long nb = K / Q4_QK, Kp = q4_padded(K), bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), off = q4_code_offset(fmt), rb = nb * bb;
    const int8_t *qa = (const int8_t *)act;
    const float *sx4 = (const float *)(act + Kp);
    const uint8_t *ext = act + Kp + Kp / 2;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *wr[4];
    __m256 acc[4], sw[4];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (i + r) * rb;
        acc[r] = _mm256_setzero_ps();
        sw[r] = _mm256_setzero_ps();
    }
    const char *next = (const char *)(w + (i + NR) * rb);
    long g = 0, k = 0;  /* group of the next block, its place in the group */
    for (long s = 0; 2 * s < nb; s++) {
        const int two = 2 * s + 1 < nb;
        if (pf) prefetch_lines(next + NR * 2 * bb * s, (NR * 2 * (int)bb + 63) / 64);
        const int8_t *xp = qa + Q4_STEP * (s >> 1) + 32 * (s & 1);
        __m256i xlo = _mm256_loadu_si256((const __m256i *)xp);
        __m256i xhi = _mm256_loadu_si256((const __m256i *)(xp + 64));
        __m256 sx = _mm256_loadu_ps(sx4 + 8 * s);
        __m256i nc = _mm256_setzero_si256();
        __m256 xs = _mm256_setzero_ps();
        if (fmt == Q4_FMT_0) nc = _mm256_loadu_si256((const __m256i *)(ext + 32 * s));
        if (fmt == Q4_FMT_1) xs = _mm256_loadu_ps((const float *)ext + 8 * s);
        long ga = g, kstart = k, gb = g;
        if (fmt == Q4_FMT_G && sf == Q4_SF_W) {  /* whole steps per group */
            k += 2;
            if (k == bpg) { k = 0; g++; }
        } else if (fmt == Q4_FMT_G) {
            if (++k == bpg) { k = 0; g++; }
            gb = g;
            if (two && ++k == bpg) { k = 0; g++; }
        }
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = wr[r] + 2 * bb * s;
            __m256i v;
            if (fmt == Q4_FMT_G && two) {
                v = _mm256_loadu_si256((const __m256i *)p);
            } else {
                __m128i hi = two ? _mm_loadu_si128((const __m128i *)(p + bb + off)) : _mm_setzero_si128();
                v = _mm256_set_m128i(hi, _mm_loadu_si128((const __m128i *)(p + off)));
            }
            __m256i lo4 = _mm256_and_si256(v, m4), hi4 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            __m256i is = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo4, xlo),
                                                            _mm256_maddubs_epi16(hi4, xhi)), ones);
            __m256 sm = _mm256_setzero_ps();
            if (fmt == Q4_FMT_0) {
                is = _mm256_add_epi32(is, nc);
                sw[r] = q4_halves2_avx2(q4_u16(p), two ? q4_u16(p + bb) : 0);
            } else if (fmt == Q4_FMT_1) {
                __m128 f = _mm_cvtph_ps(_mm_set_epi32(0, 0, two ? (int)q4_u32(p + bb) : 0, (int)q4_u32(p)));
                __m256 f8 = _mm256_castps128_ps256(f);
                sw[r] = _mm256_permutevar8x32_ps(f8, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
                sm = _mm256_permutevar8x32_ps(f8, _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3));
            } else if (sf == Q4_SF_W) {
                if (kstart == 0) sw[r] = _mm256_cvtph_ps(_mm_set1_epi16((short)sc[(i + r) * G + ga]));
            } else {
                const uint16_t *sr = sc + (i + r) * G;
                sw[r] = q4_halves2_avx2(sr[ga], two ? sr[gb] : 0);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_mul_ps(sw[r], sx), acc[r]);
            if (fmt == Q4_FMT_1) acc[r] = _mm256_fmadd_ps(sm, xs, acc[r]);
        }
    }
    const float *xg = (const float *)(act + 2 * Kp + Kp / 8);
    for (int r = 0; r < NR; r++)
        out[i + r] = fmt == Q4_FMT_G ? q4g_finish_avx2(acc[r], sc + (i + r) * G, zp + (i + r) * G, xg, G)
                                     : hsum256(acc[r]);
}

__attribute__((target(PECCA_Q4_AVX2), always_inline))
static inline void q4_gemm_avx2(int fmt, int sf, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                long T, float *out, long ldo, long r0, long r1) {
    long i = r0;
    for (; i + 4 <= r1; i += 4)
        for (long t = 0; t < T; t++)
            q4_block_avx2(fmt, sf, w, sc, zp, K, G, act + t * ab, out + t * ldo, i, 4,
                          t == 0 && i + 8 <= r1);
    for (; i < r1; i++)
        for (long t = 0; t < T; t++)
            q4_block_avx2(fmt, sf, w, sc, zp, K, G, act + t * ab, out + t * ldo, i, 1, 0);
}

__attribute__((target(PECCA_Q4_AVX2)))
static void q4_int8_rows_avx2(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                              long K, long G, const uint8_t *act, long ab, long T, float *out,
                              long ldo, long r0, long r1) {
    if (fmt == Q4_FMT_0) q4_gemm_avx2(Q4_FMT_0, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (fmt == Q4_FMT_1) q4_gemm_avx2(Q4_FMT_1, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if ((K / Q4_QK / G) % 2 == 0) q4_gemm_avx2(Q4_FMT_G, Q4_SF_W, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else q4_gemm_avx2(Q4_FMT_G, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
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

/* word indices: the 4 x 16 code bytes of 4 Q4_0 / Q4_1 blocks (72 / 80 bytes), and their
 * scales [d0 x4 | d1 x4 | d2 x4 | d3 x4] (Q4_1: then [m0 x4 | ... ]) */
static const uint16_t q4_idx_q0[32] = {1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17,
                                       19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35};
static const uint16_t q4_idx_q1[32] = {2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19,
                                       22, 23, 24, 25, 26, 27, 28, 29, 32, 33, 34, 35, 36, 37, 38, 39};
static const uint16_t q4_idx_s0[32] = {0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27,
                                       0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
static const uint16_t q4_idx_s1[32] = {0, 0, 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30,
                                       1, 1, 1, 1, 11, 11, 11, 11, 21, 21, 21, 21, 31, 31, 31, 31};

/* 4 f16 bit patterns (in a uint64) -> [s0 x4 | s1 x4 | s2 x4 | s3 x4] */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline __m512 q4_quarters_vnni(__m128i h) {
    __m128 f = _mm_cvtph_ps(h);
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(f));
}

/* rows i..i+NR-1 x tokens t0..t0+NT-1, 4 blocks per step */
__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_tile_vnni(int fmt, int sf, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                float *out, long ldo, long i, long t0, int NR, int NT, int pf) {
    long nb = K / Q4_QK, Kp = q4_padded(K), bpg = fmt == Q4_FMT_G ? nb / G : 1;
    long bb = q4_block_bytes(fmt), sb = 4 * bb, rb = nb * bb;
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i iq = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_q1 : q4_idx_q0);
    const __m512i is_ = _mm512_loadu_si512(fmt == Q4_FMT_1 ? q4_idx_s1 : q4_idx_s0);
    const uint8_t *wr[4], *at[4];
    __m512 acc[4][4], sw[4];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (i + r) * rb;
        sw[r] = _mm512_setzero_ps();
    }
    for (int t = 0; t < NT; t++) {
        at[t] = act + (t0 + t) * ab;
        for (int r = 0; r < NR; r++) acc[r][t] = _mm512_setzero_ps();
    }
    const char *next = (const char *)(w + (i + NR) * rb);
    long g = 0, k = 0;
    for (long s = 0; 4 * s < nb; s++) {
        const int nbk = nb - 4 * s < 4 ? (int)(nb - 4 * s) : 4;
        if (pf) prefetch_lines(next + NR * sb * s, (NR * (int)sb + 63) / 64);
        long gl[4] = {0, 0, 0, 0}, kstart = k;
        if (fmt == Q4_FMT_G && sf == Q4_SF_W) {  /* whole steps per group: count steps */
            gl[0] = g;
            k += 4;
            if (k == bpg) { k = 0; g++; }
        } else if (fmt == Q4_FMT_G && sf == Q4_SF_X) {
            for (int L = 0; L < nbk; L++) {
                gl[L] = g;
                if (++k == bpg) { k = 0; g++; }
            }
        }
        __m512i lo[4], hi[4];
        __m512 sm[4];
        for (int r = 0; r < NR; r++) {
            const uint8_t *p = wr[r] + sb * s;
            __m512i v;
            if (fmt == Q4_FMT_G) {
                v = nbk == 4 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8((1ULL << (16 * nbk)) - 1, p);
                if (sf == Q4_SF_W) {
                    if (kstart == 0)
                        sw[r] = _mm512_cvtph_ps(_mm256_set1_epi16((short)sc[(i + r) * G + gl[0]]));
                } else if (sf == Q4_SF_1) {
                    const uint16_t *sp = sc + (i + r) * G + 4 * s;
                    __m128i h = nbk == 4 ? _mm_loadl_epi64((const __m128i *)sp)
                                         : _mm_maskz_loadu_epi16((__mmask8)((1u << nbk) - 1), sp);
                    sw[r] = q4_quarters_vnni(h);
                } else {
                    const uint16_t *sr = sc + (i + r) * G;
                    uint64_t h = 0;
                    for (int L = 0; L < nbk; L++) h |= (uint64_t)sr[gl[L]] << (16 * L);
                    sw[r] = q4_quarters_vnni(_mm_loadl_epi64((const __m128i *)&h));
                }
            } else {
                __m512i z0, z1;
                if (nbk == 4) {
                    z0 = _mm512_loadu_si512(p);
                    z1 = _mm512_maskz_loadu_epi8(fmt == Q4_FMT_0 ? 0xFFULL : 0xFFFFULL, p + 64);
                } else {
                    z0 = _mm512_maskz_loadu_epi8((1ULL << (bb * nbk)) - 1, p);
                    z1 = _mm512_setzero_si512();
                }
                v = _mm512_permutex2var_epi16(z0, iq, z1);
                __m512i h = _mm512_permutexvar_epi16(is_, z0);
                sw[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
                if (fmt == Q4_FMT_1) sm[r] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
            }
            lo[r] = _mm512_and_si512(v, m4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        }
        for (int t = 0; t < NT; t++) {
            const uint8_t *a = at[t];
            __m512i xlo = _mm512_loadu_si512(a + Q4_STEP * s);
            __m512i xhi = _mm512_loadu_si512(a + Q4_STEP * s + 64);
            __m512 sx = _mm512_loadu_ps((const float *)(a + Kp) + 16 * s);
            __m512i init = _mm512_setzero_si512();
            __m512 xs = _mm512_setzero_ps();
            if (fmt == Q4_FMT_0) init = _mm512_loadu_si512(a + Kp + Kp / 2 + 64 * s);
            if (fmt == Q4_FMT_1) xs = _mm512_loadu_ps((const float *)(a + Kp + Kp / 2) + 16 * s);
            for (int r = 0; r < NR; r++) {
                __m512i is = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init, lo[r], xlo), hi[r], xhi);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(sw[r], sx), acc[r][t]);
                if (fmt == Q4_FMT_1) acc[r][t] = _mm512_fmadd_ps(sm[r], xs, acc[r][t]);
            }
        }
    }
    if (fmt == Q4_FMT_G) {
        /* - sum_g s_g z_g X_g, 16 groups per vector (lane g % 16), s_g z_g shared by the tokens */
        for (long g = 0; g < G; g += 16) {
            __mmask16 mk = (__mmask16)(G - g >= 16 ? 0xFFFFu : (1u << (G - g)) - 1);
            __m512 xg[4];
            for (int t = 0; t < NT; t++)
                xg[t] = _mm512_maskz_loadu_ps(mk, (const float *)(at[t] + 2 * Kp + Kp / 8) + g);
            for (int r = 0; r < NR; r++) {
                __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sc + (i + r) * G + g));
                __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, zp + (i + r) * G + g)));
                __m512 sz = _mm512_mul_ps(sv, zv);
                for (int t = 0; t < NT; t++) acc[r][t] = _mm512_fnmadd_ps(sz, xg[t], acc[r][t]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < NR; r++) out[(t0 + t) * ldo + i + r] = _mm512_reduce_add_ps(acc[r][t]);
}

__attribute__((target(PECCA_Q4_VNNI), always_inline))
static inline void q4_gemm_vnni(int fmt, int sf, const uint8_t *w, const uint16_t *sc,
                                const int8_t *zp, long K, long G, const uint8_t *act, long ab,
                                long T, float *out, long ldo, long r0, long r1) {
    long i = r0;
    for (; i + 4 <= r1; i += 4) {
        long t = 0;
        for (; t + 4 <= T; t += 4)
            q4_tile_vnni(fmt, sf, w, sc, zp, K, G, act, ab, out, ldo, i, t, 4, 4, t == 0 && i + 8 <= r1);
        for (; t < T; t++)
            q4_tile_vnni(fmt, sf, w, sc, zp, K, G, act, ab, out, ldo, i, t, 4, 1, t == 0 && i + 8 <= r1);
    }
    for (; i < r1; i++) {
        long t = 0;
        for (; t + 4 <= T; t += 4) q4_tile_vnni(fmt, sf, w, sc, zp, K, G, act, ab, out, ldo, i, t, 1, 4, 0);
        for (; t < T; t++) q4_tile_vnni(fmt, sf, w, sc, zp, K, G, act, ab, out, ldo, i, t, 1, 1, 0);
    }
}

__attribute__((target(PECCA_Q4_VNNI)))
static void q4_int8_rows_vnni(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                              long K, long G, const uint8_t *act, long ab, long T, float *out,
                              long ldo, long r0, long r1) {
    long bpg = K / Q4_QK / G;
    if (fmt == Q4_FMT_0) q4_gemm_vnni(Q4_FMT_0, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (fmt == Q4_FMT_1) q4_gemm_vnni(Q4_FMT_1, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (bpg % 4 == 0) q4_gemm_vnni(Q4_FMT_G, Q4_SF_W, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else if (bpg == 1) q4_gemm_vnni(Q4_FMT_G, Q4_SF_1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
    else q4_gemm_vnni(Q4_FMT_G, Q4_SF_X, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}
#endif /* PECCA_X86 */

/* ---------------- dispatch ---------------- */

/* out[t * ldo + r] = W[r] . x_t for rows [r0, r1), tokens t < T prepared by q4_prepare_int8
 * (act + t * ab). q4g: gs = K / G a multiple of 32. */
static void q4_int8_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                         long K, long G, const uint8_t *act, long ab, long T, float *out,
                         long ldo, long r0, long r1) {
#if PECCA_X86
    int level = q8_kernel_level();
    if (level == 2) { q4_int8_rows_vnni(fmt, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1); return; }
    if (level == 1) { q4_int8_rows_avx2(fmt, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1); return; }
#endif
    q4_rows_portable(fmt, 0, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
}

/* As q4_int8_rows with tokens prepared by q4_prepare_f32 (ab in bytes). q4g: any gs. */
static void q4_f32_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                        long K, long G, const uint8_t *act, long ab, long T, float *out,
                        long ldo, long r0, long r1) {
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
    q4_rows_portable(fmt, 1, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1);
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
