# Declarations of the C kernels in f32_kernels.h / simd.h, shared by the .pyx modules.
cdef extern from "simd.h" nogil:
    int pecca_simd_level() noexcept
    int pecca_simd_supported() noexcept
    void pecca_simd_reset() noexcept
    long pecca_quad_share(long rows, long b, long nt) noexcept
    void *pecca_alloc_lines(size_t bytes) noexcept
    void pecca_free_lines(void *p) noexcept
    ctypedef struct pecca_span:
        pass
    long pecca_quads(long rows) noexcept
    int pecca_steals(long bytes, int nt, long min_bytes) noexcept
    int pecca_claimed_rows(long u0, long u1, long base, long rows, long *r0, long *r1) noexcept
    void pecca_steal_init(pecca_span *sp, long units, int nt) noexcept
    int pecca_steal_next(pecca_span *sp, int id, int nt, long chunk, long *u0, long *u1) noexcept

cdef extern from "f32_kernels.h" nogil:
    enum: PECCA_STREAM_BYTES
    void swiglu_f32(float *h, const float *g, long n) noexcept
    long argmax_finite_f32(const float *x, long n) noexcept
    void softmax_portable(float *a, long n) noexcept
    void matvec_f32_rows(const float *w, const float *x, float *out,
                         long n, long r0, long r1) noexcept

cdef extern from "f32_gemm.h" nogil:
    void gemm_f32_rows(const float *w, const float *x, float *out, long n, long T,
                       long ldo, long r0, long r1) noexcept

# f16 / bf16 weights (uint16_t bit patterns), f16_kernels.h
from libc.stdint cimport uint16_t

# attention over a float32 or an f16 (uint16_t bits) KV cache, and the f16 store, attention.h
cdef extern from "attention.h" nogil:
    void attention_heads_f32(const float *q, const float *kc, const float *vc,
                             float *att, long att_stride, float *out, long h0, long h1,
                             long pos, long head_size, long kv_dim, long kv_mul,
                             float scale) noexcept
    void attention_heads_f16(const float *q, const uint16_t *kc, const uint16_t *vc,
                             float *att, long att_stride, float *out, long h0, long h1,
                             long pos, long head_size, long kv_dim, long kv_mul,
                             float scale) noexcept
    void floats_to_f16(const float *x, uint16_t *out, long n) noexcept

cdef extern from "f16_kernels.h" nogil:
    float f16_to_f32(uint16_t h) noexcept
    void matvec_f16_rows(const uint16_t *w, const float *x, float *out,
                         long n, long r0, long r1) noexcept
    void matvec_bf16_rows(const uint16_t *w, const float *x, float *out,
                          long n, long r0, long r1) noexcept
    void gemm_f16_rows(const uint16_t *w, const float *x, float *out, long n, long T,
                       long ldo, long r0, long r1) noexcept
    void gemm_bf16_rows(const uint16_t *w, const float *x, float *out, long n, long T,
                        long ldo, long r0, long r1) noexcept

# int8 weights with int8-quantized activations (q8 groups, GGUF Q8_0), q8_kernels.h
from libc.stdint cimport int8_t, uint8_t

cdef extern from "simd.h" nogil:
    int pecca_vnni_supported() noexcept

cdef extern from "q8_kernels.h" nogil:
    void quantize_q8g(const float *x, int8_t *qx, float *sx, long n, long gs) noexcept
    void quantize_q8_0(const float *x, int8_t *qx, float *dx, long n) noexcept
    void matvec_q8g_rows(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs,
                         float *out, long n, long gs, long r0, long r1, long pf1,
                         int stream) noexcept
    void matvec_q8_0_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                          long n, long r0, long r1, long pf1, int stream) noexcept
    void gemm_q8g_rows(const int8_t *wq, const float *ws, const int8_t *xq, const float *xs,
                       float *out, long n, long gs, long T, long ldo, long r0, long r1) noexcept
    void gemm_q8_0_rows(const uint8_t *w, const int8_t *xq, const float *xd, float *out,
                        long n, long T, long ldo, long r0, long r1) noexcept
    int q8_uses_vnni() noexcept

# 4-bit weights (q4g, GGUF Q4_0 / Q4_1, native GPTQ), q4_kernels.h
from libc.stdint cimport int32_t, uint32_t

cdef extern from "q4_kernels.h" nogil:
    long q4_padded(long K) noexcept
    long q4_act_bytes(long K, long G) noexcept
    long q4_actf_floats(long K, long G) noexcept
    void q4_prepare_int8(int fmt, const float *x, const int32_t *perm, float *work,
                         uint8_t *act, long K, long G) noexcept
    void q4_prepare_f32(int fmt, const float *x, const int32_t *perm, float *act, long K,
                        long G) noexcept
    float *q4_thread_scratch(int nt, long G, long *stride) noexcept
    void q4_int8_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                      long K, long G, const uint8_t *act, long ab, long T, float *out,
                      long ldo, long r0, long r1, long pf1, float *scratch) noexcept
    void q4_f32_rows(int fmt, const uint8_t *w, const uint16_t *sc, const int8_t *zp,
                     long K, long G, const uint8_t *act, long ab, long T, float *out,
                     long ldo, long r0, long r1) noexcept
    void gptq_prepare(const float *x, const int32_t *gidx, float *xsum, float *xk, long K,
                      long G) noexcept
    long gptq_acc_floats(long G) noexcept
    void gptq_cols(const uint32_t *qw, const uint32_t *qz, uint32_t zadd, const uint16_t *sc,
                   const int32_t *gidx, long K, long N, long G, const float *x,
                   const float *xsum, const float *xk, long T, float *out, long ldo,
                   long u0, long u1, float *acc) noexcept
