"""f16 / bf16 weight kernels vs a float64 NumPy reference, on every SIMD path this CPU has.

Every f16 and bf16 value is exactly a float64, so the reference widens the weights exactly
and the error bound is the f32 kernels' (test_f32.py): only the float32 sums round.
"""
import numpy as np
import pytest

from pecca import _kernels
from pecca._kernels import f16, runtime
from pecca.formats.tensors import bf16_from_f32
from pecca.weights import BF16Linear, F16Linear

SIZES = [(1, 1), (1, 7), (7, 33), (33, 7), (288, 768), (5, 4099), (17, 1000)]
ORDER = ["portable", "avx2", "avx512"]
PATHS = ORDER[:ORDER.index(runtime.simd_supported()) + 1]
FORMATS = ["f16", "bf16"]
MATVEC = {"f16": f16.matvec_f16, "bf16": f16.matvec_bf16}
MATMUL = {"f16": f16.matmul_f16, "bf16": f16.matmul_bf16}


@pytest.fixture(params=PATHS)
def simd(request):
    assert _kernels.set_simd_path(request.param) == request.param
    yield request.param
    _kernels.set_simd_path(None)


def bf16_to_f64(bits):
    """bf16 bits -> float64, exactly: the bits are the high half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def random_weights(fmt, shape, rng):
    """(uint16 bits for the kernel, exact float64 values)."""
    w = rng.standard_normal(shape).astype(np.float32)
    if fmt == "f16":
        h = w.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = bf16_from_f32(w)
    return bits, bf16_to_f64(bits)


def within_bound(out, ref, w64, x, n):
    # error bound of a float32 dot product: ~ n * eps * sum |w_j x_j| (as test_f32.py)
    bound = 4 * np.finfo(np.float32).eps * np.sqrt(n) * (np.abs(x.astype(np.float64)) @ np.abs(w64).T) + 1e-30
    return np.all(np.abs(out - ref) <= bound + 1e-6 * np.abs(ref))


def test_paths_cover_this_cpu():
    assert runtime.simd_supported() in PATHS
    assert PATHS[0] == "portable"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_matches_float64(simd, fmt, rows, n, threads):
    rng = np.random.default_rng(rows * 1000 + n)
    w, w64 = random_weights(fmt, (rows, n), rng)
    x = rng.standard_normal(n).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    MATVEC[fmt](w, x, out, threads)
    ref = w64 @ x.astype(np.float64)
    assert within_bound(out, ref, w64, x, n)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [33, 4096, 4064 + 17, 8192 + 45, 11008, 20000 + 3])
def test_matvec_of_large_shares_streams_rows_with_the_same_bits(simd, fmt, n):
    """A thread's share of 2 MiB or more is read one row at a time (AVX-512: x in chunks of 4096
    floats, rows in groups of 64): each row equals the 4-row blocks' result (2 threads: shares
    under 2 MiB), bit for bit, and float64. Sizes: one chunk and none, a chunk and a piece of
    one, two and a 16-wide and a masked tail, five chunks; the row counts end mid-group."""
    rng = np.random.default_rng(n)
    rows = 2 * 2**20 // (2 * n) + 7
    w, w64 = random_weights(fmt, (rows, n), rng)
    x = rng.standard_normal(n).astype(np.float32)
    one, two = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
    MATVEC[fmt](w, x, one, 1)
    MATVEC[fmt](w, x, two, 2)
    np.testing.assert_array_equal(one, two)
    assert within_bound(one, w64 @ x.astype(np.float64), w64, x, n)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("T", [1, 3, 4, 9, 17, 40])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_matches_float64(simd, fmt, rows, n, T, threads):
    rng = np.random.default_rng(rows * 7 + n * 3 + T)
    w, w64 = random_weights(fmt, (rows, n), rng)
    x = rng.standard_normal((T, n)).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    MATMUL[fmt](w, x, out, threads)
    ref = x.astype(np.float64) @ w64.T
    assert within_bound(out, ref, w64, x, n)


def all_finite_patterns(fmt):
    """Every finite bit pattern of the format, with its exact value: zeros of both signs,
    f16 subnormals, the largest values (65504 for f16)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    exp_mask = 0x7C00 if fmt == "f16" else 0x7F80
    bits = bits[(bits & exp_mask) != exp_mask]  # all-ones exponent: inf and nan
    vals = bits.view(np.float16).astype(np.float64) if fmt == "f16" else bf16_to_f64(bits)
    assert np.all(np.isfinite(vals))
    return bits, vals


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 17, 40])
def test_every_finite_value_widens_exactly(simd, fmt, n):
    """One weight per row, in the last column (the SIMD tail for n = 17), met by a one-hot x:
    each output is that weight times 1 plus zeros, so it must equal the exact value."""
    bits, vals = all_finite_patterns(fmt)
    w = np.zeros((len(bits), n), np.uint16)
    w[:, n - 1] = bits
    x = np.zeros(n, np.float32)
    x[n - 1] = 1.0
    out = np.full(len(bits), np.nan, np.float32)
    MATVEC[fmt](w, x, out, 2)
    np.testing.assert_array_equal(out.astype(np.float64), vals)
    # matmul: token t picks column (n - 1) for even t, column 0 (all zeros) for odd t
    xs = np.zeros((3, n), np.float32)
    xs[0, n - 1] = xs[2, n - 1] = 1.0
    xs[1, 0] = 1.0 if n > 1 else 0.0
    outs = np.full((3, len(bits)), np.nan, np.float32)
    MATMUL[fmt](w, xs, outs, 2)
    np.testing.assert_array_equal(outs[0].astype(np.float64), vals)
    np.testing.assert_array_equal(outs[2].astype(np.float64), vals)
    assert not outs[1].any()


def test_f16_special_values(simd):
    # subnormals: 2^-24 (smallest), 1023 * 2^-24 (largest); -0; 65504 (largest finite)
    special = np.array([2.0 ** -24, -(1023 * 2.0 ** -24), -0.0, 65504.0, -65504.0, 1.0, 2.0 ** -14],
                       np.float16)
    assert special[0] != 0 and special[3] == 65504  # the values survived the cast to f16
    n = len(special)
    w = np.tile(special, (9, 1))
    x = np.array([2.0 ** 20, 2.0 ** 18, 3.0, 1.0, 0.5, 7.0, 2.0 ** 10], np.float32)
    for threads in (1, 2):
        out = np.full(9, np.nan, np.float32)
        f16.matvec_f16(w.view(np.uint16), x, out, threads)
        ref = w.astype(np.float64) @ x.astype(np.float64)
        assert within_bound(out, ref, w.astype(np.float64), x, n)
    # inf and nan propagate: a row with +inf (x > 0) is +inf, a row with nan is nan
    bits = np.zeros((5, 20), np.uint16)
    bits[0, 3] = 0x7C00  # +inf
    bits[1, 19] = 0xFC00  # -inf, in the tail
    bits[2, 5] = 0x7E00  # nan
    bits[3, 18] = 0x7C01  # signalling nan
    bits[4, :] = np.array([1.0] * 20, np.float16).view(np.uint16)
    out = np.full(5, 0.0, np.float32)
    f16.matvec_f16(bits, np.ones(20, np.float32), out)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and np.isnan(out[3])
    assert out[4] == 20.0


def test_bf16_special_values(simd):
    bits = np.zeros((4, 20), np.uint16)
    bits[0, 3] = 0x7F80  # +inf
    bits[1, 19] = 0xFF80  # -inf, in the tail
    bits[2, 5] = 0x7FC0  # nan
    bits[3, 0] = 0x8000  # -0
    bits[3, 1] = 0x0001  # the smallest bf16 subnormal, 2^-133
    out = np.full(4, 0.0, np.float32)
    f16.matvec_bf16(bits, np.ones(20, np.float32), out)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert out[3] == np.float32(2.0 ** -133)


def test_matvec_reads_readonly_memmap(tmp_path, simd):
    w = np.arange(35, dtype=np.float16).reshape(5, 7)
    p = tmp_path / "w.bin"
    w.tofile(p)
    mm = np.memmap(p, dtype=np.float16, mode="r", shape=(5, 7))
    out = np.zeros(5, np.float32)
    f16.matvec_f16(mm.view(np.uint16), np.ones(7, np.float32), out, 2)
    np.testing.assert_array_equal(out, w.astype(np.float32).sum(axis=1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rejects_shape_mismatch(fmt):
    w = np.zeros((3, 4), np.uint16)
    with pytest.raises(ValueError):
        MATVEC[fmt](w, np.zeros(5, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        MATVEC[fmt](w, np.zeros(4, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        MATMUL[fmt](w, np.zeros((2, 5), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
        MATMUL[fmt](w, np.zeros((2, 4), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError):
        MATMUL[fmt](w, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))


def test_matmul_writes_into_a_cache_slice():
    """prefill writes keys straight into rows of the KV cache: a contiguous 2-D slice."""
    w = np.random.default_rng(0).standard_normal((12, 10)).astype(np.float16)
    x = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    cache = np.zeros((2, 8, 12), np.float32)
    f16.matmul_f16(w.view(np.uint16), x, cache[1, 4:7], 2)
    np.testing.assert_allclose(cache[1, 4:7], x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5)
    assert not cache[0].any() and not cache[1, :4].any() and not cache[1, 7:].any()


def lin_out(lin, x):
    out = np.zeros(lin.out_features, np.float32)
    lin(x, out)
    return out


def test_f16_linear_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 24)).astype(np.float16)
    lin = F16Linear(w)
    assert lin.kind == "f16" and (lin.out_features, lin.in_features) == (40, 24)
    assert lin.nbytes == 40 * 24 * 2 and lin.w is w
    x = rng.standard_normal(24).astype(np.float32)
    out = np.zeros(40, np.float32)
    lin(x, out, 2)
    w64 = w.astype(np.float64)
    assert within_bound(out, w64 @ x.astype(np.float64), w64, x, 24)
    xs = rng.standard_normal((5, 24)).astype(np.float32)
    outs = np.zeros((5, 40), np.float32)
    lin.batch(xs, outs, 2)
    assert within_bound(outs, xs.astype(np.float64) @ w64.T, w64, xs, 24)
    np.testing.assert_allclose(outs[2], lin_out(lin, xs[2]), rtol=1e-5, atol=1e-5)


def test_bf16_linear_round_trip():
    rng = np.random.default_rng(4)
    w32 = rng.standard_normal((40, 24)).astype(np.float32)
    bits = bf16_from_f32(w32)
    lin = BF16Linear(bits)
    assert lin.kind == "bf16" and (lin.out_features, lin.in_features) == (40, 24)
    assert lin.nbytes == 40 * 24 * 2
    w64 = bf16_to_f64(bits)
    assert np.all(np.abs(w64 - w32) <= np.abs(w32) * 2.0 ** -8)  # bf16 kept 8 significant bits
    x = rng.standard_normal(24).astype(np.float32)
    out = np.zeros(40, np.float32)
    lin(x, out, 2)
    assert within_bound(out, w64 @ x.astype(np.float64), w64, x, 24)
    xs = rng.standard_normal((5, 24)).astype(np.float32)
    outs = np.zeros((5, 40), np.float32)
    lin.batch(xs, outs, 2)
    assert within_bound(outs, xs.astype(np.float64) @ w64.T, w64, xs, 24)


@pytest.mark.parametrize("cls,bad", [
    (F16Linear, np.zeros((3, 4), np.float32)),  # wrong dtype
    (F16Linear, np.zeros((3, 4), np.uint16)),  # bits, not float16
    (F16Linear, np.zeros(4, np.float16)),  # 1-D
    (F16Linear, np.zeros((4, 6), np.float16)[:, ::2]),  # not C-contiguous
    (BF16Linear, np.zeros((3, 4), np.float16)),
    (BF16Linear, np.zeros((3, 4), np.float32)),
    (BF16Linear, np.zeros((2, 3, 4), np.uint16)),
    (BF16Linear, np.zeros((4, 6), np.uint16)[:, ::2]),
])
def test_linear_rejects_bad_weights(cls, bad):
    with pytest.raises(ValueError):
        cls(bad)
