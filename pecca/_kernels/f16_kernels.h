/* Half-precision weights: matrix-vector and matrix-matrix products with W stored as IEEE
 * half (f16) or bfloat16 (bf16) bit patterns (uint16_t), x and out float32.
 *
 * Decoding one token reads every weight once, so its speed is set by memory bandwidth: 16-bit
 * weights halve the bytes per multiply-add. The weights are widened to float32 in registers
 * (F16C / AVX-512 vcvtph2ps for f16; a 16-bit shift for bf16, which is the top half of a
 * float32) and multiplied in float32. Every f16 and bf16 value is exactly a float32, so the
 * results round as the f32 kernels' would on the widened matrix: ~1e-6 relative to float64.
 *
 * matvec_<t>_rows: the f32 structure (matvec_rows_avx2 / _avx512 in f32_kernels.h), 4 rows at
 * a time with 2 accumulators each, the next 4-row block prefetched. gemm_<t>_rows: from
 * PECCA_LANES_MIN_T tokens on, f32_gemm.h's tokens-in-lanes GEMM with the rows widened a tile
 * at a time (widen_<t>_from); below that, each 4-row block is widened into a float32 scratch
 * block and handed to the f32 dot-product tiles. Either way the widening is one operation per
 * weight against T multiply-adds.
 *
 * Each path has one body for both formats, instantiated through an always_inline helper with
 * a constant `bf16` flag: after inlining the flag folds away, leaving no branch in the loops.
 */
#ifndef PECCA_F16_KERNELS_H
#define PECCA_F16_KERNELS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"
#include "f32_kernels.h"
#include "f32_gemm.h"

/* ---------------- portable ---------------- */

/* Exact IEEE half -> float. Every half is a float32: normals re-bias the exponent (15 -> 127),
 * subnormals (mant * 2^-24) become normal floats, inf and nan keep their class (a signalling
 * nan is made quiet, as vcvtph2ps does). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    float f;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else {
        /* zero or subnormal: mant < 2^10 and the scale is a power of two, so exact */
        f = (float)mant * 5.9604644775390625e-8f; /* 2^-24 */
        return sign ? -f : f;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* bf16 is the high half of a float32: the bits shift back into place, nothing else. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) float half_to_f32(uint16_t h, int bf16) {
    return bf16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline __attribute__((always_inline))
float dot_half_portable(const uint16_t *w, const float *x, long n, int bf16) {
    /* the same eight partial sums as dot_portable, so both paths round alike */
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long j = 0;
    for (; j + 8 <= n; j += 8)
        for (int k = 0; k < 8; k++) acc[k] += half_to_f32(w[j + k], bf16) * x[j + k];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; j < n; j++) s += half_to_f32(w[j], bf16) * x[j];
    return s;
}

static void matvec_f16_rows_portable(const uint16_t *w, const float *x, float *out,
                                     long n, long r0, long r1) {
    for (long i = r0; i < r1; i++) out[i] = dot_half_portable(w + i * n, x, n, 0);
}

static void matvec_bf16_rows_portable(const uint16_t *w, const float *x, float *out,
                                      long n, long r0, long r1) {
    for (long i = r0; i < r1; i++) out[i] = dot_half_portable(w + i * n, x, n, 1);
}

static void widen_f16_portable(const uint16_t *src, float *dst, long count) {
    for (long j = 0; j < count; j++) dst[j] = f16_to_f32(src[j]);
}

static void widen_bf16_portable(const uint16_t *src, float *dst, long count) {
    for (long j = 0; j < count; j++) dst[j] = bf16_to_f32(src[j]);
}

#if PECCA_X86
/* ---------------- AVX2 + FMA + F16C ---------------- */
/* F16C is separate from AVX2 in the ISA; simd.h picks the AVX2 level only when the CPU has
 * it (every AVX2 CPU does). */
#define PECCA_F16_AVX2 "avx2,fma,f16c"

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline __m256 load8_half_avx2(const uint16_t *p, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* AVX2 has no 16-bit masked load: the last r < 8 weights go through a zeroed buffer (once per
 * row, so its cost does not matter). */
__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline __m256 load_tail_half_avx2(const uint16_t *p, long r, int bf16) {
    uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(buf, p, (size_t)r * sizeof(uint16_t));
    return load8_half_avx2(buf, bf16);
}

/* one row's dot product from j on, the two accumulators given (the row stream's tail) */
__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline float dot_half_from_avx2(const uint16_t *w, const float *x, long j, long n, int bf16,
                                       __m256 s0, __m256 s1) {
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(load8_half_avx2(w + j, bf16), _mm256_loadu_ps(x + j), s0);
        s1 = _mm256_fmadd_ps(load8_half_avx2(w + j + 8, bf16), _mm256_loadu_ps(x + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8)
        s0 = _mm256_fmadd_ps(load8_half_avx2(w + j, bf16), _mm256_loadu_ps(x + j), s0);
    if (j < n) {
        __m256i m = tail_mask256(n - j);
        s1 = _mm256_fmadd_ps(load_tail_half_avx2(w + j, n - j, bf16), _mm256_maskload_ps(x + j, m), s1);
    }
    return hsum256(_mm256_add_ps(s0, s1));
}

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline float dot_half_avx2(const uint16_t *w, const float *x, long n, int bf16) {
    return dot_half_from_avx2(w, x, 0, n, bf16, _mm256_setzero_ps(), _mm256_setzero_ps());
}

/* Rows that come from memory (a thread's share of PECCA_STREAM_BYTES or more) are read one at
 * a time, as one stream per thread, as q8_kernels.h explains (4-row blocks: 4 interleaved
 * streams, 78% of the read bandwidth against 100% at 8192 x 4096, 1 thread). A row reads all
 * of x, which at n = 11008 (44 KB of floats: Llama-2-7B's down projection) does not fit a
 * 32 KB L1: x then came from L2 for every row and the stream read 15 GB/s where 4096-wide rows
 * read 21. So x is taken HALF_CHUNK floats (16 KB) at a time: each row of a group of
 * HALF_GROUP rows adds that chunk to its two accumulators, kept in `acc` between chunks, and
 * the group moves to the next chunk. The row's arithmetic, and so its bits, are those of
 * dot_half_avx512 / dot_half_avx2 (and of the 4-row blocks). The memory is read in pieces of
 * one row and one chunk; the piece HALF_PF_PIECES later in that order (rows of one chunk or
 * less: at least PECCA_PF_AHEAD bytes later) is prefetched meanwhile, HALF_PF_LINES lines per
 * 64 bytes read (2 lines: 19-20 GB/s, 3: 21-23, 4: 23-24; Zen 4, 1 thread, 4096 x 11008;
 * 2 threads 39-41 against 24-33 for the row stream or the 4-row blocks; 7B-layer F16 decode at
 * 1 thread 10.1 -> 14.0 tok/s). The AVX2 form is the same, unmeasured on an AVX2-only CPU. */
#define HALF_CHUNK 4096L
#define HALF_GROUP 64L
#define HALF_PF_PIECES 2L
#ifndef HALF_PF_LINES
#define HALF_PF_LINES 4
#endif

/* how many pieces ahead the streams prefetch, nfull being the part of n they take in chunks:
 * HALF_PF_PIECES, and for rows of one chunk or less at least PECCA_PF_AHEAD bytes */
static inline long half_pieces_ahead(long n, long nfull) {
    long ahead = nfull > HALF_CHUNK ? HALF_PF_PIECES : pf_blocks_ahead(2 * n);
    return ahead > HALF_PF_PIECES ? ahead : HALF_PF_PIECES;
}

/* the piece `ahead` pieces after (row i, chunk c) in the streams' order, or
 * NULL past the last row r1 (several chunks: ahead < HALF_GROUP) */
static inline const uint16_t *half_piece_ahead(const uint16_t *w, long n, long nfull, long i,
                                               long c, long g, long ge, long r1, long ahead) {
    long row = i + ahead, col = c;
    if (row >= ge) {  /* past the group: its next chunk, or the next group's first */
        row = g + (row - ge);
        col = c + HALF_CHUNK;
        if (col >= nfull) {
            col = 0;
            row = ge + (row - g);
        }
    }
    return row < r1 ? w + row * n + col : NULL;
}

/* the stream above with dot_half_avx2's arithmetic */
__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void matvec_half_stream_avx2(const uint16_t *w, const float *x, float *out,
                                           long n, long r0, long r1, int bf16) {
    __m256 acc[2 * HALF_GROUP];
    long n16 = n & ~15L, ahead = half_pieces_ahead(n, n16);
    for (long g = r0; g < r1; g += HALF_GROUP) {
        long ge = g + HALF_GROUP < r1 ? g + HALF_GROUP : r1;
        for (long i = g; i < ge; i++) acc[2 * (i - g)] = acc[2 * (i - g) + 1] = _mm256_setzero_ps();
        for (long c = 0; c < n16; c += HALF_CHUNK) {
            long ce = c + HALF_CHUNK < n16 ? c + HALF_CHUNK : n16;
            for (long i = g; i < ge; i++) {
                const uint16_t *wr = w + i * n;
                const char *pf = (const char *)half_piece_ahead(w, n, n16, i, c, g, ge, r1, ahead);
                __m256 s0 = acc[2 * (i - g)], s1 = acc[2 * (i - g) + 1];
                for (long j = c; j < ce; j += 16) {
                    if (pf && !((j - c) & 31)) prefetch_lines(pf + 2 * (j - c), HALF_PF_LINES);
                    s0 = _mm256_fmadd_ps(load8_half_avx2(wr + j, bf16), _mm256_loadu_ps(x + j), s0);
                    s1 = _mm256_fmadd_ps(load8_half_avx2(wr + j + 8, bf16), _mm256_loadu_ps(x + j + 8), s1);
                }
                acc[2 * (i - g)] = s0;
                acc[2 * (i - g) + 1] = s1;
            }
        }
        for (long i = g; i < ge; i++)
            out[i] = dot_half_from_avx2(w + i * n, x, n16, n, bf16, acc[2 * (i - g)],
                                        acc[2 * (i - g) + 1]);
    }
}

/* As matvec_rows_avx2: four rows share each load of x, two accumulators per row. A step of 16
 * weights is 32 bytes per row, 128 bytes for the block, so 2 lines of the next block are
 * prefetched per step. */
__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void matvec_half_rows_avx2(const uint16_t *w, const float *x, float *out,
                                         long n, long r0, long r1, int bf16) {
    if ((r1 - r0) * n * 2 >= PECCA_STREAM_BYTES) {
        matvec_half_stream_avx2(w, x, out, n, r0, r1, bf16);
        return;
    }
    long i = r0;
    long n16 = n & ~15L, n8 = n & ~7L;
    __m256i m = tail_mask256(n - n8);
    for (; i + 4 <= r1; i += 4) {
        const uint16_t *w0 = w + i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        const char *next = (const char *)(w3 + n);  /* the next block, fetched meanwhile */
        int pf = i + 8 <= r1;
        long j = 0;
        for (; j < n16; j += 16) {
            if (pf) prefetch_lines(next + 8 * j, 2);
            __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);
            a0 = _mm256_fmadd_ps(load8_half_avx2(w0 + j, bf16), xa, a0);
            a1 = _mm256_fmadd_ps(load8_half_avx2(w1 + j, bf16), xa, a1);
            a2 = _mm256_fmadd_ps(load8_half_avx2(w2 + j, bf16), xa, a2);
            a3 = _mm256_fmadd_ps(load8_half_avx2(w3 + j, bf16), xa, a3);
            b0 = _mm256_fmadd_ps(load8_half_avx2(w0 + j + 8, bf16), xb, b0);
            b1 = _mm256_fmadd_ps(load8_half_avx2(w1 + j + 8, bf16), xb, b1);
            b2 = _mm256_fmadd_ps(load8_half_avx2(w2 + j + 8, bf16), xb, b2);
            b3 = _mm256_fmadd_ps(load8_half_avx2(w3 + j + 8, bf16), xb, b3);
        }
        for (; j < n8; j += 8) {
            __m256 xa = _mm256_loadu_ps(x + j);
            a0 = _mm256_fmadd_ps(load8_half_avx2(w0 + j, bf16), xa, a0);
            a1 = _mm256_fmadd_ps(load8_half_avx2(w1 + j, bf16), xa, a1);
            a2 = _mm256_fmadd_ps(load8_half_avx2(w2 + j, bf16), xa, a2);
            a3 = _mm256_fmadd_ps(load8_half_avx2(w3 + j, bf16), xa, a3);
        }
        if (j < n) {
            __m256 xa = _mm256_maskload_ps(x + j, m);
            b0 = _mm256_fmadd_ps(load_tail_half_avx2(w0 + j, n - j, bf16), xa, b0);
            b1 = _mm256_fmadd_ps(load_tail_half_avx2(w1 + j, n - j, bf16), xa, b1);
            b2 = _mm256_fmadd_ps(load_tail_half_avx2(w2 + j, n - j, bf16), xa, b2);
            b3 = _mm256_fmadd_ps(load_tail_half_avx2(w3 + j, n - j, bf16), xa, b3);
        }
        out[i] = hsum256(_mm256_add_ps(a0, b0));
        out[i + 1] = hsum256(_mm256_add_ps(a1, b1));
        out[i + 2] = hsum256(_mm256_add_ps(a2, b2));
        out[i + 3] = hsum256(_mm256_add_ps(a3, b3));
    }
    for (; i < r1; i++) out[i] = dot_half_avx2(w + i * n, x, n, bf16);
}

__attribute__((target(PECCA_F16_AVX2), always_inline))
static inline void widen_half_avx2(const uint16_t *src, float *dst, long count, int bf16) {
    long j = 0;
    for (; j + 8 <= count; j += 8) _mm256_storeu_ps(dst + j, load8_half_avx2(src + j, bf16));
    for (; j < count; j++) dst[j] = half_to_f32(src[j], bf16);
}

__attribute__((target(PECCA_F16_AVX2)))
static void matvec_f16_rows_avx2(const uint16_t *w, const float *x, float *out,
                                 long n, long r0, long r1) {
    matvec_half_rows_avx2(w, x, out, n, r0, r1, 0);
}

__attribute__((target(PECCA_F16_AVX2)))
static void matvec_bf16_rows_avx2(const uint16_t *w, const float *x, float *out,
                                  long n, long r0, long r1) {
    matvec_half_rows_avx2(w, x, out, n, r0, r1, 1);
}

__attribute__((target(PECCA_F16_AVX2)))
static void widen_f16_avx2(const uint16_t *src, float *dst, long count) {
    widen_half_avx2(src, dst, count, 0);
}

__attribute__((target(PECCA_F16_AVX2)))
static void widen_bf16_avx2(const uint16_t *src, float *dst, long count) {
    widen_half_avx2(src, dst, count, 1);
}

/* ---------------- AVX-512 ---------------- */
/* vcvtph2ps on zmm is AVX-512F; the masked 16-bit tail load is AVX-512BW+VL. */
#define PECCA_F16_AVX512 "avx512f,avx512bw,avx512vl,fma"

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline __m512 widen16_avx512(__m256i h, int bf16) {
    if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline __m512 load16_half_avx512(const uint16_t *p, int bf16) {
    return widen16_avx512(_mm256_loadu_si256((const __m256i *)p), bf16);
}

/* masked-off lanes are neither read (no fault past the row's end) nor nonzero */
__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline __m512 load16m_half_avx512(__mmask16 m, const uint16_t *p, int bf16) {
    return widen16_avx512(_mm256_maskz_loadu_epi16(m, p), bf16);
}

/* one row's dot product from j on, the two accumulators given (2 accumulators, as
 * matvec_half_rows_avx512 keeps per row; the row stream passes its tail) */
__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline float dot_half_from_avx512(const uint16_t *w, const float *x, long j, long n,
                                         int bf16, __m512 s0, __m512 s1) {
    for (; j + 32 <= n; j += 32) {
        s0 = _mm512_fmadd_ps(load16_half_avx512(w + j, bf16), _mm512_loadu_ps(x + j), s0);
        s1 = _mm512_fmadd_ps(load16_half_avx512(w + j + 16, bf16), _mm512_loadu_ps(x + j + 16), s1);
    }
    for (; j + 16 <= n; j += 16)
        s0 = _mm512_fmadd_ps(load16_half_avx512(w + j, bf16), _mm512_loadu_ps(x + j), s0);
    if (j < n) {
        __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
        s1 = _mm512_fmadd_ps(load16m_half_avx512(m, w + j, bf16), _mm512_maskz_loadu_ps(m, x + j), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline float dot_half_avx512(const uint16_t *w, const float *x, long n, int bf16) {
    return dot_half_from_avx512(w, x, 0, n, bf16, _mm512_setzero_ps(), _mm512_setzero_ps());
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void matvec_half_stream_avx512(const uint16_t *w, const float *x, float *out,
                                             long n, long r0, long r1, int bf16) {
    __m512 acc[2 * HALF_GROUP];
    long n32 = n & ~31L, ahead = half_pieces_ahead(n, n32);
    for (long g = r0; g < r1; g += HALF_GROUP) {
        long ge = g + HALF_GROUP < r1 ? g + HALF_GROUP : r1;
        for (long i = g; i < ge; i++) acc[2 * (i - g)] = acc[2 * (i - g) + 1] = _mm512_setzero_ps();
        for (long c = 0; c < n32; c += HALF_CHUNK) {
            long ce = c + HALF_CHUNK < n32 ? c + HALF_CHUNK : n32;
            for (long i = g; i < ge; i++) {
                const uint16_t *wr = w + i * n;
                const char *pf = (const char *)half_piece_ahead(w, n, n32, i, c, g, ge, r1, ahead);
                __m512 s0 = acc[2 * (i - g)], s1 = acc[2 * (i - g) + 1];
                for (long j = c; j < ce; j += 32) {
                    if (pf) prefetch_lines(pf + 2 * (j - c), HALF_PF_LINES);
                    s0 = _mm512_fmadd_ps(load16_half_avx512(wr + j, bf16), _mm512_loadu_ps(x + j), s0);
                    s1 = _mm512_fmadd_ps(load16_half_avx512(wr + j + 16, bf16), _mm512_loadu_ps(x + j + 16), s1);
                }
                acc[2 * (i - g)] = s0;
                acc[2 * (i - g) + 1] = s1;
            }
        }
        for (long i = g; i < ge; i++)
            out[i] = dot_half_from_avx512(w + i * n, x, n32, n, bf16, acc[2 * (i - g)],
                                          acc[2 * (i - g) + 1]);
    }
}

/* As matvec_rows_avx512; a step of 32 weights is 64 bytes per row, 4 lines per block, so 4
 * lines of the next block are prefetched per step. */
__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void matvec_half_rows_avx512(const uint16_t *w, const float *x, float *out,
                                           long n, long r0, long r1, int bf16) {
    long i = r0;
    if ((r1 - r0) * n * 2 >= PECCA_STREAM_BYTES) {
        matvec_half_stream_avx512(w, x, out, n, r0, r1, bf16);
        return;
    }
    long n32 = n & ~31L, n16 = n & ~15L;
    __mmask16 m = (__mmask16)((1u << (n - n16)) - 1u);
    for (; i + 4 <= r1; i += 4) {
        const uint16_t *w0 = w + i * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        __m512 b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
        const char *next = (const char *)(w3 + n);  /* the next block, fetched meanwhile */
        int pf = i + 8 <= r1;
        long j = 0;
        for (; j < n32; j += 32) {
            if (pf) prefetch_lines(next + 8 * j, 4);
            __m512 xa = _mm512_loadu_ps(x + j), xb = _mm512_loadu_ps(x + j + 16);
            a0 = _mm512_fmadd_ps(load16_half_avx512(w0 + j, bf16), xa, a0);
            a1 = _mm512_fmadd_ps(load16_half_avx512(w1 + j, bf16), xa, a1);
            a2 = _mm512_fmadd_ps(load16_half_avx512(w2 + j, bf16), xa, a2);
            a3 = _mm512_fmadd_ps(load16_half_avx512(w3 + j, bf16), xa, a3);
            b0 = _mm512_fmadd_ps(load16_half_avx512(w0 + j + 16, bf16), xb, b0);
            b1 = _mm512_fmadd_ps(load16_half_avx512(w1 + j + 16, bf16), xb, b1);
            b2 = _mm512_fmadd_ps(load16_half_avx512(w2 + j + 16, bf16), xb, b2);
            b3 = _mm512_fmadd_ps(load16_half_avx512(w3 + j + 16, bf16), xb, b3);
        }
        for (; j < n16; j += 16) {
            __m512 xa = _mm512_loadu_ps(x + j);
            a0 = _mm512_fmadd_ps(load16_half_avx512(w0 + j, bf16), xa, a0);
            a1 = _mm512_fmadd_ps(load16_half_avx512(w1 + j, bf16), xa, a1);
            a2 = _mm512_fmadd_ps(load16_half_avx512(w2 + j, bf16), xa, a2);
            a3 = _mm512_fmadd_ps(load16_half_avx512(w3 + j, bf16), xa, a3);
        }
        if (j < n) {
            __m512 xa = _mm512_maskz_loadu_ps(m, x + j);
            b0 = _mm512_fmadd_ps(load16m_half_avx512(m, w0 + j, bf16), xa, b0);
            b1 = _mm512_fmadd_ps(load16m_half_avx512(m, w1 + j, bf16), xa, b1);
            b2 = _mm512_fmadd_ps(load16m_half_avx512(m, w2 + j, bf16), xa, b2);
            b3 = _mm512_fmadd_ps(load16m_half_avx512(m, w3 + j, bf16), xa, b3);
        }
        out[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
        out[i + 1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
        out[i + 2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
        out[i + 3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
    }
    for (; i < r1; i++) out[i] = dot_half_avx512(w + i * n, x, n, bf16);
}

__attribute__((target(PECCA_F16_AVX512), always_inline))
static inline void widen_half_avx512(const uint16_t *src, float *dst, long count, int bf16) {
    long j = 0;
    for (; j + 16 <= count; j += 16) _mm512_storeu_ps(dst + j, load16_half_avx512(src + j, bf16));
    if (j < count) {
        __mmask16 m = (__mmask16)((1u << (count - j)) - 1u);
        _mm512_mask_storeu_ps(dst + j, m, load16m_half_avx512(m, src + j, bf16));
    }
}

__attribute__((target(PECCA_F16_AVX512)))
static void matvec_f16_rows_avx512(const uint16_t *w, const float *x, float *out,
                                   long n, long r0, long r1) {
    matvec_half_rows_avx512(w, x, out, n, r0, r1, 0);
}

__attribute__((target(PECCA_F16_AVX512)))
static void matvec_bf16_rows_avx512(const uint16_t *w, const float *x, float *out,
                                    long n, long r0, long r1) {
    matvec_half_rows_avx512(w, x, out, n, r0, r1, 1);
}

__attribute__((target(PECCA_F16_AVX512)))
static void widen_f16_avx512(const uint16_t *src, float *dst, long count) {
    widen_half_avx512(src, dst, count, 0);
}

__attribute__((target(PECCA_F16_AVX512)))
static void widen_bf16_avx512(const uint16_t *src, float *dst, long count) {
    widen_half_avx512(src, dst, count, 1);
}
#endif /* PECCA_X86 */

/* ---------------- dispatch ---------------- */

/* out[r0:r1] = W[r0:r1, :] @ x, W row-major (rows, n) of f16 bits. */
static void matvec_f16_rows(const uint16_t *w, const float *x, float *out,
                            long n, long r0, long r1) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { matvec_f16_rows_avx512(w, x, out, n, r0, r1); return; }
    if (level == PECCA_SIMD_AVX2) { matvec_f16_rows_avx2(w, x, out, n, r0, r1); return; }
#endif
    matvec_f16_rows_portable(w, x, out, n, r0, r1);
}

/* out[r0:r1] = W[r0:r1, :] @ x, W row-major (rows, n) of bf16 bits. */
static void matvec_bf16_rows(const uint16_t *w, const float *x, float *out,
                             long n, long r0, long r1) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { matvec_bf16_rows_avx512(w, x, out, n, r0, r1); return; }
    if (level == PECCA_SIMD_AVX2) { matvec_bf16_rows_avx2(w, x, out, n, r0, r1); return; }
#endif
    matvec_bf16_rows_portable(w, x, out, n, r0, r1);
}

/* dst[0:count] = float32 of src[0:count] (exact). */
static void widen_f16(const uint16_t *src, float *dst, long count) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { widen_f16_avx512(src, dst, count); return; }
    if (level == PECCA_SIMD_AVX2) { widen_f16_avx2(src, dst, count); return; }
#endif
    widen_f16_portable(src, dst, count);
}

static void widen_bf16(const uint16_t *src, float *dst, long count) {
#if PECCA_X86
    int level = pecca_simd_level();
    if (level == PECCA_SIMD_AVX512) { widen_bf16_avx512(src, dst, count); return; }
    if (level == PECCA_SIMD_AVX2) { widen_bf16_avx2(src, dst, count); return; }
#endif
    widen_bf16_portable(src, dst, count);
}

typedef void (*pecca_matvec_half_fn)(const uint16_t *w, const float *x, float *out,
                                     long n, long r0, long r1);

/* out[t, r] = sum_j w[r, j] x[t, j] for rows [r0, r1), all T tokens; out (T, ldo).
 * From PECCA_LANES_MIN_T tokens on: gemm_lanes_rows (f32_gemm.h). Below that,
 * each block of 4 rows (fewer at the end) is widened into a float32 scratch block that stays
 * in L1/L2 while gemm_f32_rows runs it against every token. One token is a plain matvec (no
 * reuse to pay for the widening). The scratch is 16n bytes, up to 4 MiB for n = 65536: too
 * big for the stack, so it is allocated (pecca_alloc_lines) once per call (per thread); if that
 * fails, each token falls back to the matvec, which needs no memory. */
static void gemm_half_rows(const uint16_t *w, const float *x, float *out, long n, long T,
                           long ldo, long r0, long r1, pecca_widen_rows_fn widen,
                           pecca_matvec_half_fn matvec) {
    if (r1 <= r0 || T <= 0) return;
    if (T >= PECCA_LANES_MIN_T && gemm_lanes_rows(w, widen, x, out, n, T, ldo, r0, r1)) return;
    float *buf = T > 1 ? (float *)pecca_alloc_lines((size_t)(4 * n) * sizeof(float)) : NULL;
    if (buf == NULL) {
        for (long t = 0; t < T; t++) matvec(w, x + t * n, out + t * ldo, n, r0, r1);
        return;
    }
    for (long r = r0; r < r1; r += 4) {
        long k = r1 - r < 4 ? r1 - r : 4;
        widen(w, r * n, buf, k * n);
        gemm_f32_rows(buf, x, out + r, n, T, ldo, 0, k);
    }
    pecca_free_lines(buf);
}

static void widen_f16_from(const void *w, long first, float *dst, long count) {
    widen_f16((const uint16_t *)w + first, dst, count);
}

static void widen_bf16_from(const void *w, long first, float *dst, long count) {
    widen_bf16((const uint16_t *)w + first, dst, count);
}

static void gemm_f16_rows(const uint16_t *w, const float *x, float *out, long n, long T,
                          long ldo, long r0, long r1) {
    gemm_half_rows(w, x, out, n, T, ldo, r0, r1, widen_f16_from, matvec_f16_rows);
}

static void gemm_bf16_rows(const uint16_t *w, const float *x, float *out, long n, long T,
                           long ldo, long r0, long r1) {
    gemm_half_rows(w, x, out, n, T, ldo, r0, r1, widen_bf16_from, matvec_bf16_rows);
}

#endif
