/* Run-time CPU feature detection for pecca's kernels.
 *
 * Kernels are compiled once for baseline x86-64 (no -march=native); the AVX2+FMA and
 * AVX-512 variants live in functions marked with __attribute__((target(...))) and are
 * chosen here, once, from the CPU's features. PECCA_SIMD=portable|avx2|avx512 forces a
 * lower path (a request above what the CPU has is capped), so tests can cover each path.
 */
#ifndef PECCA_SIMD_H
#define PECCA_SIMD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PECCA_SIMD_PORTABLE 0
#define PECCA_SIMD_AVX2 1
#define PECCA_SIMD_AVX512 2

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define PECCA_X86 1
#include <immintrin.h>
#else
#define PECCA_X86 0
#endif

static int pecca_simd_supported(void) {
#if PECCA_X86
    __builtin_cpu_init();
    /* F16C (half -> float, used by the AVX2 f16 kernels) is a separate CPUID bit; every
     * AVX2 and AVX-512 CPU has it, but it is checked so that the AVX2 path, which PECCA_SIMD
     * may force on an AVX-512 CPU too, never meets a CPU without it. */
    int f16c = __builtin_cpu_supports("f16c");
    /* AVX-512 path needs F (float ops, masks); BW/VL are used by later int8 kernels. */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && f16c)
        return PECCA_SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        return PECCA_SIMD_AVX2;
#endif
    return PECCA_SIMD_PORTABLE;
}

static int pecca_simd_level_cached = -1;

static int pecca_simd_level(void) {
    if (pecca_simd_level_cached >= 0) return pecca_simd_level_cached;
    int level = pecca_simd_supported();
    const char *force = getenv("PECCA_SIMD");
    if (force && *force) {
        int want = level;
        if (strcmp(force, "portable") == 0) want = PECCA_SIMD_PORTABLE;
        else if (strcmp(force, "avx2") == 0) want = PECCA_SIMD_AVX2;
        else if (strcmp(force, "avx512") == 0) want = PECCA_SIMD_AVX512;
        if (want < level) level = want;
    }
    pecca_simd_level_cached = level;
    return level;
}

/* Re-read PECCA_SIMD (tests switch paths inside one process). */
static void pecca_simd_reset(void) { pecca_simd_level_cached = -1; }

/* AVX512-VNNI (vpdpbusd: u8 x s8 products summed in fours into int32) is a separate flag, not
 * part of the AVX-512 level: the int8 kernels (q8_kernels.h) use it on the AVX-512 path when the
 * CPU has it and fall back to their AVX2 code otherwise. It is a CPU fact, so it is cached for
 * good; PECCA_SIMD below avx512 turns it off through the level. */
static int pecca_vnni_cached = -1;

static int pecca_vnni_supported(void) {
    if (pecca_vnni_cached >= 0) return pecca_vnni_cached;
    int vnni = 0;
#if PECCA_X86
    __builtin_cpu_init();
    vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
#endif
    pecca_vnni_cached = vnni;
    return vnni;
}

/* First row of thread b's share of a matrix of `rows` rows split over nt threads in whole quads
 * (4-row tiles; the last thread also takes the 0-3 rows left over): thread b runs rows
 * [pecca_quad_share(rows, b, nt), pecca_quad_share(rows, b + 1, nt)). */
static inline long pecca_quad_share(long rows, long b, long nt) {
    return b >= nt ? rows : rows / 4 * b / nt * 4;
}

/* Work stealing over the rows of matvecs that stream from memory. With static shares one
 * thread ends first and idles: in this VM's fast 2-thread state (each core drawing its own ~40
 * GB/s, so an idle core's bandwidth is lost) one thread of a plain 2-thread read of 8 MB
 * matrices idled 5-15% of the wall time. Here each thread starts on its static share (in quads,
 * 4 rows) and claims it front to back, a quarter of its rest at a time but at least `chunk`
 * quads: one contiguous stream in a few calls (the kernels prefetch across a call's end, pf1).
 * A thread whose share is done takes the back half of the largest unclaimed rest and goes on
 * there. Session 11, 7B-layer GPTQ at 2 threads in the fast state: products 1.035x, decode
 * 1.018x static shares (8 gated pairs); in the slow state equal. Fixed chunks lost (64 KB
 * without prefetch across calls: 0.7-0.8x; a shared pool of chunks, session 10: 0.97x).
 *
 * A span is lo | hi << 32 (quads [lo, hi)), one per thread on a cache line of its own: a thread
 * claims from its own line, which no other core touches until someone steals from it. */
typedef struct {
    uint64_t w;
    char pad[56];
} pecca_span;

#define PECCA_STEAL_MIN_QUADS 2  /* steal only from shares with at least this many chunks left */
#define PECCA_STEAL_SHIFT 2      /* a claim: a quarter of the share's rest, or at least a chunk */

static inline uint64_t pecca_span_pack(long lo, long hi) {
    return ((uint64_t)hi << 32) | (uint64_t)(uint32_t)lo;
}

/* The quads (4-row units) of a matrix of `rows` rows. */
static inline long pecca_quads(long rows) { return (rows + 3) / 4; }

/* Whether a matvec of `bytes` weight bytes over nt threads shares its rows by stealing: when each
 * thread's share is at least min_bytes (from memory); smaller products keep static shares. */
static inline int pecca_steals(long bytes, int nt, long min_bytes) {
    return nt > 1 && bytes >= nt * min_bytes;
}

/* The rows [*r0, *r1) of a matrix of `rows` rows, whose quads are the units [base, base +
 * pecca_quads(rows)), that claimed units [u0, u1) cover; 0 when they cover none of them. */
static inline int pecca_claimed_rows(long u0, long u1, long base, long rows, long *r0, long *r1) {
    long end = base + pecca_quads(rows), a = u0 > base ? u0 : base, c = u1 < end ? u1 : end;
    if (a >= c) return 0;
    *r0 = 4 * (a - base);
    *r1 = 4 * (c - base) < rows ? 4 * (c - base) : rows;
    return 1;
}

/* Thread b's static share of units quads: [units b / nt, units (b + 1) / nt). units < 2^32
 * (a span packs two 32-bit bounds): 2^34 rows, far beyond any matrix. */
static inline void pecca_steal_init(pecca_span *sp, long units, int nt) {
    for (int b = 0; b < nt; b++) sp[b].w = pecca_span_pack(units * b / nt, units * (b + 1) / nt);
}

/* Thread id's next quads [*u0, *u1); 0 when no work is left for it. chunk < 1 counts as 1. */
static inline int pecca_steal_next(pecca_span *sp, int id, int nt, long chunk, long *u0, long *u1) {
    if (chunk < 1) chunk = 1;
    for (;;) {
        uint64_t w = __atomic_load_n(&sp[id].w, __ATOMIC_ACQUIRE);
        long lo = (long)(uint32_t)w, hi = (long)(w >> 32);
        if (lo < hi) {
            long take = (hi - lo) >> PECCA_STEAL_SHIFT;
            if (take < chunk) take = chunk;
            long e = hi - lo > take ? lo + take : hi;
            if (__atomic_compare_exchange_n(&sp[id].w, &w, pecca_span_pack(e, hi), 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                *u0 = lo;
                *u1 = e;
                return 1;
            }
            continue;
        }
        int v = -1;
        long most = 0;
        uint64_t vw = 0;
        for (int o = 0; o < nt; o++) {
            if (o == id) continue;
            uint64_t ow = __atomic_load_n(&sp[o].w, __ATOMIC_ACQUIRE);
            long left = (long)(ow >> 32) - (long)(uint32_t)ow;
            if (left > most) { most = left; v = o; vw = ow; }
        }
        if (v < 0 || most < PECCA_STEAL_MIN_QUADS * chunk) return 0;
        long vlo = (long)(uint32_t)vw, vhi = (long)(vw >> 32), mid = vhi - (vhi - vlo) / 2;
        if (__atomic_compare_exchange_n(&sp[v].w, &vw, pecca_span_pack(vlo, mid), 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            __atomic_store_n(&sp[id].w, pecca_span_pack(mid, vhi), __ATOMIC_RELEASE);
    }
}

/* Scratch on whole cache lines of its own (64-byte aligned, size rounded up to 64): no vector
 * load from it straddles two lines, and no line holds another object that another thread writes
 * or reads. Every kernel's per-call scratch (prepared activations, per-thread buffers) comes
 * from here: with plain malloc (16-byte aligned) each 64-byte activation load of the int8 / 4-bit
 * kernels touched two lines, and a q4g tile's scale writes shared lines with the activations that
 * the other thread read. Carved out of a malloc'd block (the block's address kept just before
 * the aligned start): portable, and it keeps malloc's fast path for small blocks, where
 * aligned_alloc cost ~0.08 us a call. Free with pecca_free_lines; NULL when it cannot be
 * allocated. */
static inline void *pecca_alloc_lines(size_t bytes) {
    size_t n = (bytes + 63) / 64 * 64;
    unsigned char *raw = (unsigned char *)malloc(n + 64 + sizeof(void *));
    if (raw == NULL) return NULL;
    unsigned char *p = (unsigned char *)(((uintptr_t)raw + sizeof(void *) + 63) & ~(uintptr_t)63);
    memcpy(p - sizeof(void *), &raw, sizeof raw);
    return p;
}

static inline void pecca_free_lines(void *p) {
    void *raw;
    if (p == NULL) return;
    memcpy(&raw, (unsigned char *)p - sizeof(void *), sizeof raw);
    free(raw);
}

#endif
