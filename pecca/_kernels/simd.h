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
