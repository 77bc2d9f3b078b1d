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


@pytest.mark.parametrize("n", [1, 4095, 4096, 6145, 44032])
@pytest.mark.parametrize("threads", [2, 3, 16])
def test_swiglu_threads_same_bits(n, threads):
    """Split over threads (a batch's rows, a 7B hidden layer) each element is computed as alone."""
    h, g = rand(n, 14, 3.0), rand(n, 15)
    one, many = h.copy(), h.copy()
    ops.swiglu(one, g)
    ops.swiglu(many, g, threads)
    np.testing.assert_array_equal(many, one)
    h64 = h.astype(np.float64)
    close(many, h64 / (1 + np.exp(-h64)) * g)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 1000, 20003])
def test_swiglu_every_path_and_range(simd, n):
    """silu through each path's exp (vector paths: a polynomial, portable: expf), inputs from
    -200 to 200 (exp over- and underflows at the ends), every length around the vector widths;
    split over threads each element keeps its bits."""
    _kernels.set_simd_path(simd)
    try:
        rng = np.random.default_rng(n)
        h = rng.uniform(-200, 200, n).astype(np.float32)
        h[: n // 2] = rng.standard_normal(n // 2).astype(np.float32) * 4
        g = rng.standard_normal(n).astype(np.float32)
        h64 = h.astype(np.float64)
        with np.errstate(over="ignore"):
            ref = h64 / (1 + np.exp(-h64)) * g
        one = h.copy()
        ops.swiglu(one, g)
        assert np.all(np.isfinite(one))
        close(one, ref)
        np.testing.assert_allclose(one, ref, rtol=2e-6, atol=1e-30)
        many = h.copy()
        ops.swiglu(many, g, 3)
        np.testing.assert_array_equal(many, one)
    finally:
        _kernels.set_simd_path(None)


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
@pytest.mark.parametrize("n_heads,n_kv,head_size", [(1, 1, 2), (8, 4, 8), (6, 6, 48), (12, 3, 64), (5, 1, 7 * 2 + 3 * 2),
                                                    (4, 2, 16), (6, 3, 32), (3, 3, 96), (4, 4, 128),
                                                    (8, 1, 64), (5, 5, 80)])
@pytest.mark.parametrize("pos", [0, 6, 15, 16, 32, 300])
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


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("spread", [1e-3, 30.0, 3000.0])
@pytest.mark.parametrize("pos", [0, 7, 8, 15, 16, 17, 130])
def test_attention_softmax_over_any_score_range(simd, spread, pos):
    """The vector paths' softmax (a polynomial exp): scores spread from nearly equal to
    thousands apart (most weights underflow to 0), every length around the vector widths."""
    _kernels.set_simd_path(simd)
    try:
        rng = np.random.default_rng(int(pos + spread))
        n_heads, n_kv, hs = 4, 2, 16
        q = (rng.standard_normal(n_heads * hs) * spread).astype(np.float32)
        kc = rng.standard_normal((pos + 1, n_kv * hs)).astype(np.float32)
        vc = rng.standard_normal((pos + 1, n_kv * hs)).astype(np.float32)
        att = np.zeros((n_heads, pos + 1), np.float32)
        out = np.zeros_like(q)
        ops.attention(out, q, kc, vc, att, pos, n_heads, n_kv, 1)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(att.sum(axis=1), 1.0, rtol=1e-5)
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


# ---- an f16 KV cache: the store rounds as numpy; attention over it is the f32 attention over
# the same (rounded) values, bit for bit -------------------------------------------------------

def half_specials():
    """float32 values around every rounding case of float32 -> half: ties to even at each
    magnitude, the subnormal range and its ties, the overflow boundary (65504, 65519.996,
    65520), zeros, infinities; the neighbours (one float32 ulp away) of each."""
    h = np.arange(0, 0x7c01, dtype=np.uint32)  # every non-negative finite half, and inf
    lo = h[:-1].astype(np.uint16).view(np.float16).astype(np.float64)
    hi = h[1:].astype(np.uint16).view(np.float16).astype(np.float64)
    ties = ((lo + hi) / 2).astype(np.float32)  # exact in float32 below 65520 (the last is 65520)
    base = np.concatenate([ties, lo.astype(np.float32), np.float32([65504, 65520, 1e5, 3.4e38, np.inf])])
    up, down = np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(0))
    x = np.concatenate([base, up, down])
    return np.concatenate([x, -x])


@pytest.mark.parametrize("simd", PATHS)
def test_to_f16_rounds_as_numpy(simd):
    _kernels.set_simd_path(simd)
    try:
        rng = np.random.default_rng(5)
        bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
        for x in (half_specials(), bits.view(np.float32)):
            with np.errstate(over="ignore", invalid="ignore"):
                want = x.astype(np.float16)
            got = np.zeros(len(x), np.uint16)
            ops.to_f16(got, x)
            nan = np.isnan(x)
            np.testing.assert_array_equal(got[~nan], want.view(np.uint16)[~nan])
            assert np.isnan(got[nan].view(np.float16)).all()  # a nan's payload bits may differ
        for n in (0, 1, 7, 8, 15, 16, 17, 33):  # the vector paths' tails
            x = rng.standard_normal(n).astype(np.float32) * 1e3
            got = np.full(n, 0xFFFF, np.uint16)
            ops.to_f16(got, x)
            np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))
        with pytest.raises(ValueError):
            ops.to_f16(np.zeros(3, np.uint16), np.zeros(4, np.float32))
    finally:
        _kernels.set_simd_path(None)


def f16_cache(rng, shape, scale=1.0):
    """(f16 bits as uint16, the same values as float32)"""
    h = (rng.standard_normal(shape) * scale).astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n_heads,n_kv,head_size", [(1, 1, 2), (8, 4, 8), (6, 6, 48), (12, 3, 64), (5, 1, 20),
                                                    (4, 2, 16), (3, 3, 96), (4, 4, 128), (8, 1, 64), (5, 5, 80),
                                                    (2, 2, 264), (3, 1, 10)])
@pytest.mark.parametrize("pos", [0, 6, 15, 16, 33, 300])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_over_an_f16_cache(simd, n_heads, n_kv, head_size, pos, threads):
    """Every path (vector tiles and row-by-row bodies, head sizes off the vector widths and
    past 256) gives over the half cache the bits the float32 attention gives over the widened
    cache, and is close to float64."""
    _kernels.set_simd_path(simd)
    try:
        seq = 301
        rng = np.random.default_rng(pos + 7 * n_heads + head_size)
        q = rng.standard_normal(n_heads * head_size).astype(np.float32)
        kh, kf = f16_cache(rng, (seq, n_kv * head_size))
        vh, vf = f16_cache(rng, (seq, n_kv * head_size))
        att = np.zeros((n_heads, seq), np.float32)
        want, got = np.zeros_like(q), np.full_like(q, np.nan)
        ops.attention(want, q, kf, vf, att, pos, n_heads, n_kv, threads)
        ops.attention(got, q, kh, vh, att, pos, n_heads, n_kv, threads)
        np.testing.assert_array_equal(got, want)
        close(got, attention_ref(q, kf, vf, pos, n_heads, n_kv), 1e-5)
    finally:
        _kernels.set_simd_path(None)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n_heads,n_kv,head_size,pos0,T", [(8, 4, 8, 0, 7), (6, 6, 48, 10, 33), (2, 1, 6, 5, 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_rows_over_an_f16_cache(simd, n_heads, n_kv, head_size, pos0, T, threads):
    _kernels.set_simd_path(simd)
    try:
        seq = pos0 + T + 3
        rng = np.random.default_rng(T + pos0 + 1)
        q = rng.standard_normal((T, n_heads * head_size)).astype(np.float32)
        kh, kf = f16_cache(rng, (seq, n_kv * head_size))
        vh, vf = f16_cache(rng, (seq, n_kv * head_size))
        att = np.zeros((threads, n_heads, seq), np.float32)
        want, got = np.zeros_like(q), np.full_like(q, np.nan)
        ops.attention_rows(want, q, kf, vf, att, pos0, n_heads, n_kv, threads)
        ops.attention_rows(got, q, kh, vh, att, pos0, n_heads, n_kv, threads)
        np.testing.assert_array_equal(got, want)
    finally:
        _kernels.set_simd_path(None)


def test_attention_refuses_mixed_cache_types():
    q, att, out = np.zeros(16, np.float32), np.zeros((2, 4), np.float32), np.zeros(16, np.float32)
    with pytest.raises((TypeError, ValueError)):  # keys half, values float32: no kernel takes that
        ops.attention(out, q, np.zeros((4, 8), np.uint16), np.zeros((4, 8), np.float32), att, 0, 2, 1)
    with pytest.raises((TypeError, ValueError)):  # numpy's float16 itself: pass its uint16 view
        ops.attention(out, q, np.zeros((4, 8), np.float16), np.zeros((4, 8), np.float16), att, 0, 2, 1)


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


# ---- the serving batch: rows at their own positions, in their own cache slots --------------

@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n_heads,n_kv,head_size,positions,slots", [
    (1, 1, 2, [0], [0]),
    (3, 1, 6, [5, 0, 11], [2, 0, 1]),
    (8, 4, 8, [40, 3, 0, 90, 7], [4, 1, 3, 0, 2]),
    (9, 3, 64, [300, 2], [1, 3]),
    (6, 6, 46, [17, 299, 60], [0, 2, 4]),
    (8, 2, 128, [33, 0, 7], [3, 0, 1]),
])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_attend_slots_equals_rope_store_attention_per_row(simd, n_heads, n_kv, head_size, positions,
                                                          slots, threads, kv):
    """Bit for bit what Model.forward does for each row (rope, rope, store k and v, attention),
    close to float64, padding rows and other cache rows untouched; with an f16 cache, k and v
    are stored rounded to half (numpy's astype(float16))."""
    _kernels.set_simd_path(simd)
    try:
        n_slots, layers, seq, layer = 5, 3, 301, 1
        B, R = len(slots), len(slots) + 2  # two padding rows the kernel must leave alone
        dim, kv_dim = n_heads * head_size, n_kv * head_size
        rng = np.random.default_rng(sum(positions) + n_heads)
        q = rng.standard_normal((R, dim)).astype(np.float32)
        k = rng.standard_normal((R, kv_dim)).astype(np.float32)
        v = rng.standard_normal((R, kv_dim)).astype(np.float32)
        kc = rng.standard_normal((n_slots, layers, seq, kv_dim)).astype(np.float32)
        vc = rng.standard_normal((n_slots, layers, seq, kv_dim)).astype(np.float32)
        if kv == "f16":
            kc, vc = (c.astype(np.float16).view(np.uint16) for c in (kc, vc))
        stored = (lambda r: r.astype(np.float16).view(np.uint16)) if kv == "f16" else (lambda r: r)
        widened = (lambda c: c.view(np.float16).astype(np.float32)) if kv == "f16" else (lambda c: c)
        freqs = np.empty(head_size // 2, np.float32)
        ops.rope_freqs(head_size, 10000.0, freqs)
        cos = np.empty((seq, head_size // 2), np.float32)
        sin = np.empty((seq, head_size // 2), np.float32)
        for p in range(seq):
            ops.rope_table(p, freqs, cos[p], sin[p])
        # the reference: the one-token ops, row by row
        want_q, want_k, want_kc, want_vc = q.copy(), k.copy(), kc.copy(), vc.copy()
        want = np.full((R, dim), 7.0, np.float32)
        att1 = np.zeros((n_heads, seq), np.float32)
        for b, (s, p) in enumerate(zip(slots, positions)):
            ops.rope(want_q[b], head_size, cos[p], sin[p])
            ops.rope(want_k[b], head_size, cos[p], sin[p])
            want_kc[s, layer, p] = stored(want_k[b])
            want_vc[s, layer, p] = stored(v[b])
            ops.attention(want[b], want_q[b], want_kc[s, layer], want_vc[s, layer], att1, p, n_heads, n_kv, 1)
            close(want[b], attention_ref(want_q[b], widened(want_kc[s, layer]), widened(want_vc[s, layer]), p,
                                         n_heads, n_kv), 1e-5)
        out = np.full((R, dim), 7.0, np.float32)
        att = np.zeros((threads, n_heads, seq), np.float32)
        ops.attend_slots(out, q, k, v, kc, vc, layer, np.array(slots, np.int32), np.array(positions, np.int32),
                         cos, sin, att, n_heads, n_kv, threads)
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(q, want_q)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(kc, want_kc)
        np.testing.assert_array_equal(vc, want_vc)
    finally:
        _kernels.set_simd_path(None)


def test_attend_slots_rejects_bad_rows():
    n_heads, hs, seq = 2, 4, 8
    q = np.zeros((2, n_heads * hs), np.float32)
    kc = np.zeros((3, 2, seq, hs), np.float32)
    cos = np.zeros((seq, hs // 2), np.float32)
    att = np.zeros((1, n_heads, seq), np.float32)
    k = np.zeros((2, hs), np.float32)

    def call(slots, positions, layer=0, heads=n_heads):
        ops.attend_slots(q.copy(), q.copy(), k.copy(), k, kc, kc.copy(), layer, np.array(slots, np.int32),
                         np.array(positions, np.int32), cos, cos, att, heads, 1, 1)

    call([0, 2], [0, seq - 1])  # fine
    for slots, positions in [([3], [0]), ([-1], [0]), ([0], [seq]), ([0], [-1]), ([0, 1], [0])]:
        with pytest.raises(ValueError):
            call(slots, positions)
    with pytest.raises(ValueError):
        call([0], [0], layer=2)
    with pytest.raises(ValueError):
        call([0], [0], heads=3)
    call([], [])  # no rows: nothing to do


@pytest.mark.parametrize("n", [1, 2, 7, 33, 1000, 49153])
def test_sample_mult_is_the_first_index_past_the_coin(n):
    """A sequential float32 running sum (np.cumsum's), stopping at the first entry past the coin;
    the last index when rounding leaves the total at or under it."""
    rng = np.random.default_rng(n)
    for scale in (0.1, 3.0, 30.0):
        p = rand(n, n + int(scale), scale)
        if n > 3:
            p[rng.integers(0, n, n // 3)] = -np.inf  # zero probabilities (top-k, min-p)
        ops.softmax(p)
        cdf = np.cumsum(p, dtype=np.float32)
        for coin in [0.0, 1e-9, *rng.random(20), cdf[-1], np.nextafter(np.float32(1), np.float32(0))]:
            coin = np.float32(coin)
            want = min(int(np.searchsorted(cdf, coin, side="right")), n - 1)
            assert ops.sample_mult(p, coin) == want
    with pytest.raises(ValueError):
        ops.sample_mult(np.zeros(0, np.float32), 0.5)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 33, 49152, 49155])
def test_argmax_finite(simd, n):
    """np.argmax's first maximum, -1 as soon as a NaN or an infinity is anywhere, on every
    path: the vector part and the tail past the last whole vector, ties within and between
    them, the maximum in each, signed zeros."""
    _kernels.set_simd_path(simd)
    try:
        rng = np.random.default_rng(n)
        x = np.round(rand(n, n, 3.0))  # ties: the first one wins
        assert ops.argmax_finite(x) == int(np.argmax(x))
        x[rng.integers(0, n)] = x.max()
        assert ops.argmax_finite(x) == int(np.argmax(x))
        for i in {0, n // 2, n - 1}:  # the only maximum at the start, middle, end (tail)
            y = x.copy()
            y[i] = x.max() + 1
            assert ops.argmax_finite(y) == i
            if i > 0:  # a tie with an earlier entry goes to that one
                y[i - 1] = y[i]
                assert ops.argmax_finite(y) == i - 1
        for bad in (np.nan, np.inf, -np.inf):
            for i in {0, rng.integers(0, n), n - 1}:
                y = x.copy()
                y[i] = bad
                assert ops.argmax_finite(y) == -1
        assert ops.argmax_finite(np.full(n, -np.float32(3e38))) == 0
        z = np.zeros(n, np.float32)
        z[::2] = -0.0
        assert ops.argmax_finite(z) == 0  # -0.0 == 0.0: the first
        with pytest.raises(ValueError):
            ops.argmax_finite(np.zeros(0, np.float32))
    finally:
        _kernels.set_simd_path(None)
