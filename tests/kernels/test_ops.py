"""rmsnorm, softmax, RoPE, SwiGLU, residual add and attention vs float64 NumPy references."""
import numpy as np
import pytest

from pecca import _kernels
from pecca._kernels import ops, runtime

SIZES = [1, 7, 33, 288, 768]
ORDER = ["portable", "avx2", "avx512"]
PATHS = ORDER[:ORDER.index(runtime.simd_supported()) + 1]
RTOL = 2e-6


def rand(n, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def close(got, ref, rtol=RTOL):
    ref = np.asarray(ref, np.float64)
    err = np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err <= rtol, f"max relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("n", SIZES)
def test_rmsnorm(n):
    x, w = rand(n, 1), rand(n, 2)
    out = np.empty(n, np.float32)
    ops.rmsnorm(out, x, w, 1e-5)
    x64 = x.astype(np.float64)
    close(out, w * x64 / np.sqrt(np.mean(x64 ** 2) + 1e-5))
    ops.rmsnorm(x, x, w, 1e-5)  # in place, as the final norm uses it
    np.testing.assert_array_equal(x, out)


@pytest.mark.parametrize("n", SIZES)
def test_softmax(n):
    x = rand(n, 3, scale=5.0)
    ref = np.exp(x.astype(np.float64) - x.max())
    ops.softmax(x)
    close(x, ref / ref.sum(), 1e-5)  # sequential float32 sum, as run.c: error grows with n


@pytest.mark.parametrize("n_heads,head_size", [(1, 2), (3, 8), (6, 48), (12, 64), (7, 34)])
@pytest.mark.parametrize("pos", [0, 1, 17, 255])
def test_rope(n_heads, head_size, pos):
    vec = rand(n_heads * head_size, pos + head_size)
    cos, sin = np.empty(head_size // 2, np.float32), np.empty(head_size // 2, np.float32)
    freqs = np.empty(head_size // 2, np.float32)
    ops.rope_freqs(head_size, 10000.0, freqs)
    ops.rope_table(pos, freqs, cos, sin)
    ref = vec.astype(np.float64).reshape(n_heads, head_size // 2, 2).copy()
    ang = pos / 10000.0 ** (np.arange(0, head_size, 2) / head_size)
    c, s = np.cos(ang), np.sin(ang)
    a, b = ref[..., 0].copy(), ref[..., 1].copy()
    ref[..., 0], ref[..., 1] = a * c - b * s, a * s + b * c
    ops.rope(vec, head_size, cos, sin)
    np.testing.assert_allclose(vec, ref.reshape(-1), rtol=0, atol=2e-5 * (1 + pos / 100))


@pytest.mark.parametrize("n", SIZES)
def test_swiglu_and_add(n):
    h, g = rand(n, 4, 3.0), rand(n, 5)
    h64, g64 = h.astype(np.float64), g.astype(np.float64)
    ops.swiglu(h, g)
    close(h, h64 / (1 + np.exp(-h64)) * g64)
    x, y = rand(n, 6), rand(n, 7)
    ref = x.astype(np.float64) + y
    ops.add(x, y)
    close(x, ref, 1e-7)


def attention_ref(q, kc, vc, pos, n_heads, n_kv):
    hs = q.shape[0] // n_heads
    out = np.zeros(q.shape[0])
    for h in range(n_heads):
        kvh = h // (n_heads // n_kv)
        qh = q[h * hs:(h + 1) * hs].astype(np.float64)
        k = kc[:pos + 1, kvh * hs:(kvh + 1) * hs].astype(np.float64)
        v = vc[:pos + 1, kvh * hs:(kvh + 1) * hs].astype(np.float64)
        s = k @ qh / np.sqrt(hs)
        p = np.exp(s - s.max())
        out[h * hs:(h + 1) * hs] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n_heads,n_kv,head_size", [(1, 1, 2), (8, 4, 8), (6, 6, 48), (12, 3, 64), (5, 1, 7 * 2 + 3 * 2)])
@pytest.mark.parametrize("pos", [0, 6, 32, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention(simd, n_heads, n_kv, head_size, pos, threads):
    _kernels.set_simd_path(simd)
    try:
        seq = 301
        rng = np.random.default_rng(pos + n_heads)
        q = rng.standard_normal(n_heads * head_size).astype(np.float32)
        kc = rng.standard_normal((seq, n_kv * head_size)).astype(np.float32)
        vc = rng.standard_normal((seq, n_kv * head_size)).astype(np.float32)
        att = np.zeros((n_heads, seq), np.float32)
        out = np.zeros_like(q)
        ops.attention(out, q, kc, vc, att, pos, n_heads, n_kv, threads)
        close(out, attention_ref(q, kc, vc, pos, n_heads, n_kv), 1e-5)
    finally:
        _kernels.set_simd_path(None)


def test_attention_rejects_bad_shapes():
    q = np.zeros(16, np.float32)
    kc = np.zeros((4, 8), np.float32)
    att = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError):
        ops.attention(np.zeros(16, np.float32), q, kc, kc, att, 4, 2, 1)  # pos past the cache
    with pytest.raises(ValueError):
        ops.attention(np.zeros(16, np.float32), q, kc, kc, att, 0, 3, 1)  # heads do not divide


# ---- batched forms (prefill) against the one-token forms and float64 -----------------------

@pytest.mark.parametrize("T,n", [(1, 7), (5, 33), (13, 288)])
def test_rmsnorm_rows(T, n):
    x = np.random.default_rng(T).standard_normal((T, n)).astype(np.float32)
    w = rand(n, 9)
    out = np.empty_like(x)
    ops.rmsnorm_rows(out, x, w, 1e-5)
    x64 = x.astype(np.float64)
    close(out, w * x64 / np.sqrt(np.mean(x64 ** 2, axis=1, keepdims=True) + 1e-5))


@pytest.mark.parametrize("n_heads,head_size,pos0,T", [(3, 8, 0, 5), (6, 48, 17, 9), (1, 2, 3, 1)])
def test_rope_rows_equals_rope_per_position(n_heads, head_size, pos0, T):
    x = np.random.default_rng(pos0).standard_normal((T, n_heads * head_size)).astype(np.float32)
    want = x.copy()
    cos, sin = np.empty(head_size // 2, np.float32), np.empty(head_size // 2, np.float32)
    freqs = np.empty(head_size // 2, np.float32)
    ops.rope_freqs(head_size, 10000.0, freqs)
    freqs /= np.linspace(1, 3, head_size // 2).astype(np.float32)  # as a rope scaling would
    for t in range(T):
        ops.rope_table(pos0 + t, freqs, cos, sin)
        ops.rope(want[t], head_size, cos, sin)
    ops.rope_rows(x, head_size, pos0, freqs)
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n_heads,n_kv,head_size,pos0,T", [(8, 4, 8, 0, 7), (6, 6, 48, 10, 33),
                                                           (12, 3, 64, 0, 1), (2, 1, 6, 5, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_rows_is_causal_per_token(simd, n_heads, n_kv, head_size, pos0, T, threads):
    _kernels.set_simd_path(simd)
    try:
        seq = pos0 + T + 3
        rng = np.random.default_rng(T + pos0)
        q = rng.standard_normal((T, n_heads * head_size)).astype(np.float32)
        kc = rng.standard_normal((seq, n_kv * head_size)).astype(np.float32)
        vc = rng.standard_normal((seq, n_kv * head_size)).astype(np.float32)
        att = np.zeros((threads, n_heads, seq), np.float32)
        out = np.zeros_like(q)
        ops.attention_rows(out, q, kc, vc, att, pos0, n_heads, n_kv, threads)
        for t in range(T):
            close(out[t], attention_ref(q[t], kc, vc, pos0 + t, n_heads, n_kv), 1e-5)
    finally:
        _kernels.set_simd_path(None)
