/* Standalone timing of the 4-bit VNNI kernel (q4_int8_rows_vnni, pecca/_kernels/q4_kernels.h)
 * and, optionally, of a candidate variant of it, on random weights: no Python, no 1-minute
 * rebuild of the extensions, and a bit-for-bit comparison of the candidate's output with the
 * kernel's. Sessions 5-7 used it for the knock-out, layout and K-chunking experiments in
 * docs/performance.md ("4-bit decode: where the limit is").
 *
 * Build and run (an AVX-512 VNNI machine):
 *   gcc -O3 -fopenmp -Ipecca/_kernels -o /tmp/q4h bench/q4_tile_harness.c -lm
 *   [PAIRS=8] /tmp/q4h FMT N K T NMAT [SECONDS]
 *     FMT 0 = q4g (GPTQ, group 128), 1 = Q4_0, 2 = Q4_1; N x K weights (N a multiple of 4, K of 32;
 *     q4g: of 128); T tokens;
 *     NMAT matrices swept in turn (enough of them to exceed the L3: the matrices come from DRAM)
 *   env NTH=2: split the rows over 2 OpenMP threads, as the extension does.
 *   env QUADS=1: read q4g's bytes in the quad layout (export.gptq.to_quads) instead of rows.
 * A candidate: copy q4_tile_vnni / q4_gemm_vnni / q4_int8_rows_vnni into a header, rename the
 * entry point cand_rows (same arguments, pf1 included: the rows the kernel may prefetch up to),
 * change what is to be tried, then
 *   gcc -O3 -fopenmp -Ipecca/_kernels -DCAND='"cand.h"' -o /tmp/q4h bench/q4_tile_harness.c -lm
 * Prints the median Gweights/s over PAIRS runs of SECONDS each (kernel and candidate in ABBA
 * order) and the median of their per-pair ratio, and, with a candidate, whether its outputs
 * equal the kernel's bit for bit. Timings on this shared VM drift by 10-30% within a minute:
 * trust ratios whose whole range sits on one side of 1. Matrices that fit the L3 (32 MB here)
 * partly come from it: NMAT x N x K / 2 bytes well above it. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "q4_kernels.h"
#ifdef CAND
#include CAND
#endif

__attribute__((target("f16c"))) static uint16_t to_half(float f) { return _cvtss_sh(f, 0); }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint32_t seed = 12345;
static uint32_t rnd(void) { seed = seed * 1664525u + 1013904223u; return seed >> 8; }
static float frand(void) { return (float)(rnd() % 20001) / 10000.0f - 1.0f; }

typedef void (*rows_fn)(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp, long K,
                        long G, const uint8_t *act, long ab, long T, float *out, long ldo, long r0,
                        long r1, long pf1, float *st);

/* the kernel, in the row layout, or in the quad layout with QUADS=1 in the environment (the same
 * random bytes read as the other layout: timing only) */
static int quads = 0;
static void kernel_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp, long K,
                        long G, const uint8_t *act, long ab, long T, float *out, long ldo, long r0,
                        long r1, long pf1, float *st) {
    q4_int8_rows_vnni(fmt, quads && fmt == Q4_FMT_G, w, sc, zp, K, G, act, ab, T, out, ldo, r0, r1, pf1, st);
}

/* every matrix once, rows split over nth threads as 4-row quads */
static void sweep(rows_fn f, int fmt, const uint8_t *W, const uint16_t *sc, const int8_t *zp,
                  long N, long K, long G, long rb, const uint8_t *act, long ab, long T, float *out,
                  float *st, long sts, long nmat, int nth) {
    for (long m = 0; m < nmat; m++) {
#pragma omp parallel num_threads(nth)
        {
            int b = omp_get_thread_num();
            long q = N / 4, r0 = q * b / nth * 4, r1 = b == nth - 1 ? N : q * (b + 1) / nth * 4;
            f(fmt, W + m * N * rb, sc + m * N * G, zp + m * N * G, K, G, act, ab, T, out, N, r0, r1, N,
              st + b * sts);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s FMT(0 q4g, 1 Q4_0, 2 Q4_1) N K T NMAT [SECONDS]\n", argv[0]);
        return 2;
    }
    if (q8_kernel_level() != 2) {
        fprintf(stderr, "this CPU has no AVX-512 VNNI: nothing to time\n");
        return 0;
    }
    int fmt = atoi(argv[1]), nth = getenv("NTH") ? atoi(getenv("NTH")) : 1;
    quads = getenv("QUADS") ? atoi(getenv("QUADS")) : 0;
    long N = atol(argv[2]), K = atol(argv[3]), T = atol(argv[4]), nmat = atol(argv[5]);
    double secs = argc > 6 ? atof(argv[6]) : 1.0;
    if (K % (fmt == Q4_FMT_G ? 128 : 32) || N % 4 || T < 1 || nmat < 1 || nth < 1 || fmt < 0 || fmt > 2) {
        fprintf(stderr, "K must be a multiple of 32 (q4g: 128), N of 4\n");
        return 2;
    }
    long G = fmt == Q4_FMT_G ? K / 128 : 1, rb = q4_row_bytes(fmt, K), bytes = nmat * N * rb;
    /* on 2 MiB pages, as the model's weights are in the page cache's large folios (on 4 KB
     * pages q4g 4096 x 4096 from DRAM ran at 39 Gweights/s at 1 thread against 47 on 2 MiB pages,
     * Zen 4: the model decodes at the 2 MiB pages' rate) */
    uint8_t *W = aligned_alloc(1 << 21, (bytes + (1 << 21) - 1) / (1 << 21) * (1 << 21));
    madvise(W, (bytes + (1 << 21) - 1) / (1 << 21) * (1 << 21), MADV_HUGEPAGE);
    for (long i = 0; i < bytes; i++) W[i] = (uint8_t)rnd();
    if (fmt != Q4_FMT_G)  /* sane block scales (and Q4_1 minima) */
        for (long r = 0; r < nmat * N; r++)
            for (long b = 0; b < K / Q4_QK; b++) {
                uint8_t *p = W + r * rb + b * q4_block_bytes(fmt);
                uint16_t h = to_half(frand() * 0.01f);
                memcpy(p, &h, 2);
                if (fmt == Q4_FMT_1) { h = to_half(frand() * 0.01f); memcpy(p + 2, &h, 2); }
            }
    uint16_t *sc = malloc(2 * nmat * N * G + 64);
    int8_t *zp = malloc(nmat * N * G + 64);
    for (long i = 0; i < nmat * N * G; i++) { sc[i] = to_half(frand() * 0.01f); zp[i] = (int8_t)(rnd() % 16); }
    long ab = q4_act_bytes(K, G);
    uint8_t *act = aligned_alloc(64, ab * T);
    float *x = malloc(4 * K);
    for (long t = 0; t < T; t++) {
        for (long i = 0; i < K; i++) x[i] = frand();
        q4_prepare_int8(fmt, x, NULL, NULL, act + t * ab, K, G);
    }
    float *out[2] = {calloc(T * N, 4), calloc(T * N, 4)};
    long sts;  /* each thread's scratch on lines of its own, as the extension's */
    float *st = q4_thread_scratch(nth, G, &sts);
    rows_fn fns[2] = {kernel_rows, NULL};
    const char *names[2] = {"kernel", "candidate"};
#ifdef CAND
    fns[1] = cand_rows;
#endif
    /* ABBA-ordered pairs of runs (the second of two back-to-back runs tends to time lower, and
     * the VM's speed drifts): medians of each and of the per-pair ratio */
    int nf = fns[1] ? 2 : 1, pairs = getenv("PAIRS") ? atoi(getenv("PAIRS")) : 8;
    if (pairs < 1 || pairs > 64) pairs = 8;
    double gw[2][64], ratio[64];
    for (int which = 0; which < nf; which++)  /* warm: page in, start the threads */
        sweep(fns[which], fmt, W, sc, zp, N, K, G, rb, act, ab, T, out[which], st, sts, nmat, nth);
    for (int p = 0; p < pairs; p++) {
        for (int k = 0; k < nf; k++) {
            int which = (p & 1) ? nf - 1 - k : k;
            long it = 0;
            double t0 = now();
            do {
                sweep(fns[which], fmt, W, sc, zp, N, K, G, rb, act, ab, T, out[which], st, sts, nmat, nth);
                it++;
            } while (now() - t0 < secs);
            gw[which][p] = (double)N * K * T * it * nmat / (now() - t0) / 1e9;
        }
        ratio[p] = nf == 2 ? gw[1][p] / gw[0][p] : 1.0;
    }
    for (int which = 0; which < nf; which++) {
        qsort(gw[which], pairs, sizeof(double), cmp_double);
        printf("%-9s Gweights/s median %.1f [%.1f .. %.1f]\n", names[which], gw[which][pairs / 2],
               gw[which][0], gw[which][pairs - 1]);
    }
    if (nf == 2) {
        qsort(ratio, pairs, sizeof(double), cmp_double);
        printf("candidate / kernel median %.3f [%.3f .. %.3f]\n", ratio[pairs / 2], ratio[0], ratio[pairs - 1]);
    }
    if (fns[1]) {
        long bad = 0;
        for (long i = 0; i < T * N; i++) bad += memcmp(&out[0][i], &out[1][i], 4) != 0;
        printf("%s (%ld outputs differ)\n", bad ? "MISMATCH" : "bit-identical", bad);
    }
    return 0;
}
