"""f32 matrix-vector product vs a float64 NumPy reference, on every SIMD path this CPU has."""
import numpy as np
import pytest

from pecca import _kernels
from pecca._kernels import f32, runtime

SIZES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (288, 288), (768, 288), (288, 768),
         (17, 1000), (5, 4099), (1, 768)]
ORDER = ["portable", "avx2", "avx512"]
PATHS = ORDER[:ORDER.index(runtime.simd_supported()) + 1]


@pytest.fixture(params=PATHS)
def simd(request):
    assert _kernels.set_simd_path(request.param) == request.param
    yield request.param
    _kernels.set_simd_path(None)


def test_paths_cover_this_cpu():
    assert runtime.simd_supported() in PATHS
    assert PATHS[0] == "portable"


@pytest.mark.parametrize("rows,n", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_matches_float64(simd, rows, n, threads):
    rng = np.random.default_rng(rows * 1000 + n)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    f32.matvec(w, x, out, threads)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    # error bound of a float32 dot product: ~ n * eps * sum |w_j x_j|
    bound = 4 * np.finfo(np.float32).eps * np.sqrt(n) * (np.abs(w) @ np.abs(x)) + 1e-30
    assert np.all(np.abs(out - ref) <= bound + 1e-6 * np.abs(ref))


@pytest.mark.parametrize("n", [288, 1000, 1023])
def test_matvec_of_large_shares_streams_short_rows_with_the_same_bits(simd, n):
    """AVX-512: a thread's share of 2 MiB or more with rows under 1024 floats is read one row at
    a time, prefetched 48 KB ahead (the last rows without): each row equals the 4-row blocks'
    result (2 threads: shares under 2 MiB), bit for bit, and float64."""
    rng = np.random.default_rng(n)
    rows = 2 * 2**20 // (4 * n) + 7
    w = rng.standard_normal((rows, n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    one, two = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
    f32.matvec(w, x, one, 1)
    f32.matvec(w, x, two, 2)
    np.testing.assert_array_equal(one, two)
    ref = w.astype(np.float64) @ x.astype(np.float64)
    bound = 4 * np.finfo(np.float32).eps * np.sqrt(n) * (np.abs(w) @ np.abs(x)) + 1e-30
    assert np.all(np.abs(one - ref) <= bound + 1e-6 * np.abs(ref))


def test_matvec_reads_readonly_memmap(tmp_path, simd):
    w = np.arange(35, dtype=np.float32).reshape(5, 7)
    p = tmp_path / "w.bin"
    w.tofile(p)
    mm = np.memmap(p, dtype=np.float32, mode="r", shape=(5, 7))
    x = np.ones(7, np.float32)
    out = np.zeros(5, np.float32)
    f32.matvec(mm, x, out, 2)
    np.testing.assert_array_equal(out, w.sum(axis=1))


def test_matvec_rejects_shape_mismatch():
    w = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError):
        f32.matvec(w, np.zeros(5, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError):
        f32.matvec(w, np.zeros(4, np.float32), np.zeros(2, np.float32))


GEMM_SIZES = [(1, 1, 1), (1, 7, 3), (7, 1, 2), (7, 33, 5), (33, 7, 4), (288, 288, 9),
              (768, 288, 1), (5, 4099, 6), (9, 31, 7), (4, 16, 4), (64, 172, 64),
              # tokens-in-lanes form (T >= 8): row tiles of 12 (AVX-512) / 6 (AVX2) and
              # their leftovers, token vectors of 16 / 8 and a 32 / 16 tile with a half tail
              (1, 9, 8), (13, 50, 16), (25, 33, 17), (7, 1, 33), (40, 300, 48), (12, 64, 63),
              # n a multiple of 512: the rows are copied to a scratch with a padded stride
              (25, 512, 9), (14, 1024, 33)]


@pytest.mark.parametrize("rows,n,T", GEMM_SIZES)
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_matches_float64(simd, rows, n, T, threads):
    rng = np.random.default_rng(rows * 7 + n * 3 + T)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    x = rng.standard_normal((T, n)).astype(np.float32)
    out = np.full((T, rows), np.nan, np.float32)
    f32.matmul(w, x, out, threads)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = 4 * np.finfo(np.float32).eps * np.sqrt(n) * (np.abs(x) @ np.abs(w).T) + 1e-30
    assert np.all(np.abs(out - ref) <= bound + 1e-6 * np.abs(ref))


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_token_independent_of_batch(simd, threads):
    """From 8 tokens on, each output is one multiply-add chain over the row: a token's result
    has the same bits whatever other tokens share the call (the serving batch relies on it)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((29, 70)).astype(np.float32)
    x = rng.standard_normal((40, 70)).astype(np.float32)
    full = np.empty((40, 29), np.float32)
    f32.matmul(w, x, full, threads)
    for lo, hi in [(0, 8), (3, 20), (31, 40), (5, 38)]:
        part = np.empty((hi - lo, 29), np.float32)
        f32.matmul(w, x[lo:hi], part, threads)
        np.testing.assert_array_equal(part, full[lo:hi])


def test_matmul_writes_into_a_cache_slice():
    """prefill writes keys straight into rows of the KV cache: a contiguous 2-D slice."""
    w = np.random.default_rng(0).standard_normal((12, 10)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    cache = np.zeros((2, 8, 12), np.float32)
    f32.matmul(w, x, cache[1, 4:7], 2)
    np.testing.assert_allclose(cache[1, 4:7], x @ w.T, rtol=1e-5, atol=1e-5)
    assert not cache[0].any() and not cache[1, :4].any() and not cache[1, 7:].any()


def test_matmul_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        f32.matmul(np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
        f32.matmul(np.zeros((3, 4), np.float32), np.zeros((2, 4), np.float32), np.zeros((3, 2), np.float32))
