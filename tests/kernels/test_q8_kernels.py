"""int8 weight kernels (llama2.c q8 groups, GGUF Q8_0) on every SIMD path this CPU has.

References, all NumPy:
 - the activation quantizers re-implemented (runq.c's quantize, llama.cpp's quantize_row_q8_0):
   the kernels' int8 values and scales must equal them bit for bit;
 - the exact product of the quantized x with the quantized W (integer group sums, then the
   scales, in float64): the kernels must match it to float32 rounding,
   |out - ref| <= eps32 * (4 sqrt(m) + 4) * sum_j |wq_j xq_j| w_scale x_scale, m = max(groups,
   n / 32): test_f32.py's bound on the float32 sum of at most m scaled partial sums (the SIMD
   paths convert partial integer sums, lane by lane, so |products| and not |group sums|), plus
   the roundings of the scale products;
 - W dequantized (float64; for Q8_0 by gguf.quants.dequantize) times the float x: off by the
   activation's quantization error on top of that. Each x_j is within s_g * (1/2 + 2^-16) of
   q_j * s_g (round to nearest of x/s, or x * (1/d), computed in float32 with |q| <= 127), so
   |out - W x| <= 0.50002 * sum_j |W_j| s_g(j)  +  the float32 bound above;
 - runq.c's matmul emulated step for step in float32: the portable q8g path must equal it exactly.
"""
import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from pecca import _kernels
from pecca._kernels import q8, runtime
from pecca.weights import Q8_0Linear, Q8GroupLinear
from kernel_checks import (assert_many_equal_single, assert_matmul_rows_equal_matvec,
                           assert_stealing_equals_one_thread, split_fixture)

ORDER = ["portable", "avx2", "avx512"]
PATHS = ORDER[:ORDER.index(runtime.simd_supported()) + 1]
EPS = float(np.finfo(np.float32).eps)
ROWS = [1, 7, 33]
# (n, gs): every n of the brief with the group sizes llama2.c's export can give it (64, halved
# until it divides n) plus multi-block groups (96, 128) and sub-32 groups (4, 8, 16: portable)
Q8G_SHAPES = [(32, 32), (64, 64), (64, 16), (288, 32), (288, 96), (288, 4), (768, 64),
              (768, 8), (4096, 64), (4096, 128), (172, 4)]
Q8_0_N = [32, 64, 288, 768, 4096]


@pytest.fixture(params=PATHS)
def simd(request):
    assert _kernels.set_simd_path(request.param) == request.param
    yield request.param
    _kernels.set_simd_path(None)


# ---------------- NumPy references ----------------

split = split_fixture(q8)


def round_half_away(v):
    """C round()/roundf() of float32 values. Done in float64, where |v| + 0.5 is exact (in
    float32, 0.49999997 + 0.5 rounds up to 1)."""
    v = v.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def np_quantize_q8g(x, gs):
    """runq.c's quantize: float32 max |x| / 127, float32 division, round half away; scale 0 ->
    q 0 (where runq.c divides by zero)."""
    xg = x.reshape(-1, gs)
    scale = np.abs(xg).max(axis=1) / np.float32(127.0)
    assert scale.dtype == np.float32
    with np.errstate(divide="ignore", invalid="ignore"):
        v = xg / scale[:, None]
    q = np.where(scale[:, None] == 0, 0, np.clip(round_half_away(v), -127, 127))
    return q.astype(np.int8).reshape(-1), scale


def np_quantize_q8_0(x):
    """llama.cpp's quantize_row_q8_0 with d kept float32: id = 1/d (0 if d == 0), roundf(x*id)."""
    xb = x.reshape(-1, 32)
    d = np.abs(xb).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = xb * idv[:, None]
    assert v.dtype == np.float32
    return np.clip(round_half_away(v), -127, 127).astype(np.int8).reshape(-1), d


def random_x(n, rng, zero_groups_of=None):
    """float32 activations; with zero_groups_of=gs, every third group is all zeros (scale 0)."""
    x = (rng.standard_normal(n) * rng.uniform(0.1, 10.0)).astype(np.float32)
    if zero_groups_of:
        xg = x.reshape(-1, zero_groups_of)
        xg[::3] = 0.0
    return x


def random_q8g(rows, n, gs, rng):
    """int8 (rows, n) over the whole int8 range (-128 included: the kernels take any int8
    weight) and positive and negative float32 scales (rows * n / gs,)."""
    wq = rng.integers(-128, 128, (rows, n), dtype=np.int8)
    ws = (rng.standard_normal(rows * n // gs) * 0.01).astype(np.float32)
    return wq, ws


def random_q8_0(rows, n, rng):
    """GGUF Q8_0 blocks (rows, n/32*34) uint8, built by hand: f16 scale then 32 int8."""
    nb = n // 32
    d = (rng.standard_normal((rows, nb)) * 0.01).astype(np.float16)
    qs = rng.integers(-128, 128, (rows, nb, 32), dtype=np.int8)
    blocks = np.empty((rows, nb, 34), np.uint8)
    blocks[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)  # little-endian, as on disk
    blocks[:, :, 2:] = qs.view(np.uint8)
    return blocks.reshape(rows, nb * 34), d, qs


def int_terms_q8g(wq, ws, xq, xs, gs):
    """(exact product, float32 error bound), each (rows,): sum_g ival_g * w_scale * x_scale
    in float64 with ival exact, and the bound of the module docstring."""
    rows, n = wq.shape
    G = n // gs
    prod = wq.reshape(rows, G, gs).astype(np.int64) * xq.reshape(G, gs).astype(np.int64)
    scales = ws.reshape(rows, G).astype(np.float64) * xs.astype(np.float64)
    return exact_and_bound(prod, scales, n)


def int_terms_q8_0(d, qs, xq, xd):
    prod = qs.astype(np.int64) * xq.reshape(-1, 32).astype(np.int64)
    return exact_and_bound(prod, d.astype(np.float64) * xd.astype(np.float64), qs.shape[1] * 32)


def exact_and_bound(prod, scales, n):
    """prod (rows, G, gs) int64 products, scales (rows, G)."""
    exact = (prod.sum(-1) * scales).sum(-1)
    m = max(prod.shape[1], n // 32)
    bound = EPS * (4 * np.sqrt(m) + 4) * (np.abs(prod).sum(-1) * np.abs(scales)).sum(-1) + 1e-30
    return exact, bound


def check_q8g_product(out, wq, ws, gs, x):
    """out (rows,) vs the exact integer product and the float64 dequantized reference."""
    xq, xs = np_quantize_q8g(x, gs)
    exact, fb = int_terms_q8g(wq, ws, xq, xs, gs)
    assert np.all(np.abs(out - exact) <= fb)
    wdeq = wq.astype(np.float64) * np.repeat(ws.reshape(wq.shape[0], -1), gs, axis=1)
    qb = 0.50002 * (np.abs(wdeq) @ np.repeat(xs.astype(np.float64), gs))
    assert np.all(np.abs(out - wdeq @ x.astype(np.float64)) <= qb + fb)


def check_q8_0_product(out, blocks, d, qs, x):
    xq, xd = np_quantize_q8_0(x)
    exact, fb = int_terms_q8_0(d, qs, xq, xd)
    assert np.all(np.abs(out - exact) <= fb)
    wdeq = dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).astype(np.float64)
    qb = 0.50002 * (np.abs(wdeq) @ np.repeat(xd.astype(np.float64), 32))
    assert np.all(np.abs(out - wdeq @ x.astype(np.float64)) <= qb + fb)


def runq_matmul_f32(wq, ws, xq, xs, gs):
    """runq.c's matmul in float32, in its order: val += ((float)ival * w_s) * x_s per group."""
    rows, n = wq.shape
    G = n // gs
    ival = (wq.reshape(rows, G, gs).astype(np.int32) * xq.reshape(G, gs).astype(np.int32)).sum(-1, dtype=np.int32)
    wsm = ws.reshape(rows, G)
    val = np.zeros(rows, np.float32)
    for g in range(G):
        p = ival[:, g].astype(np.float32) * wsm[:, g]
        p = p * xs[g]
        val = val + p
    return val


def llamacpp_vec_dot_f32(d, qs, xq, xd):
    """llama.cpp's scalar Q8_0 dot (x scale float32): val += (float)ival * (d_w * d_x)."""
    rows, nb = d.shape
    ival = (qs.astype(np.int32) * xq.reshape(nb, 32).astype(np.int32)).sum(-1, dtype=np.int32)
    dw = d.astype(np.float32)
    val = np.zeros(rows, np.float32)
    for b in range(nb):
        p = ival[:, b].astype(np.float32) * (dw[:, b] * xd[b])
        val = val + p
    return val


# ---------------- tests ----------------

def test_paths_cover_this_cpu():
    assert runtime.simd_supported() in PATHS
    assert PATHS[0] == "portable"
    assert runtime.int8_path() in ("portable", "avx2", "avx512-vnni")
    assert runtime.vnni_available() == (runtime.int8_path() == "avx512-vnni")
    if runtime.vnni_available():
        assert runtime.vnni_supported() and q8.uses_vnni()


def test_int8_path_follows_simd_path(simd):
    want = {"portable": "portable", "avx2": "avx2",
            "avx512": "avx512-vnni" if runtime.vnni_supported() else "avx2"}[simd]
    assert runtime.int8_path() == want
    assert q8.uses_vnni() == (want == "avx512-vnni")


@pytest.mark.parametrize("n,gs", Q8G_SHAPES)
def test_quantize_q8g_matches_runq(simd, n, gs):
    rng = np.random.default_rng(n + gs)
    for x in (random_x(n, rng), random_x(n, rng, zero_groups_of=gs), np.zeros(n, np.float32)):
        q, s = q8.quantize_q8g(x, gs)
        rq, rs = np_quantize_q8g(x, gs)
        np.testing.assert_array_equal(s.view(np.uint32), rs.view(np.uint32))
        np.testing.assert_array_equal(q, rq)


@pytest.mark.parametrize("n", Q8_0_N)
def test_quantize_q8_0_matches_llamacpp(simd, n):
    rng = np.random.default_rng(n)
    for x in (random_x(n, rng), random_x(n, rng, zero_groups_of=32), np.zeros(n, np.float32)):
        q, d = q8.quantize_q8_0(x)
        rq, rd = np_quantize_q8_0(x)
        np.testing.assert_array_equal(d.view(np.uint32), rd.view(np.uint32))
        np.testing.assert_array_equal(q, rq)


TIES = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5,
                 np.nextafter(np.float32(0.5), np.float32(0)), -np.nextafter(np.float32(0.5), np.float32(0)),
                 np.nextafter(np.float32(2.5), np.float32(0)), np.nextafter(np.float32(2.5), np.float32(3)),
                 -0.0, 0.0, 1e-30, -1e-30], np.float32)


@pytest.mark.parametrize("gs", [4, 32, 64])
def test_quantize_rounds_half_away_from_zero(simd, gs):
    """Ties and near-ties (0.49999997 must give 0): a group whose max is 127 has scale exactly 1
    (Q8_0: d = 1 and 1/d = 1), so the rounded values are the inputs themselves."""
    x = np.resize(TIES, 64).astype(np.float32)
    x[::gs] = 127.0  # every group's max
    q, s = q8.quantize_q8g(x, gs)
    assert np.all(s == 1.0)
    np.testing.assert_array_equal(q, round_half_away(x).astype(np.int8))
    assert list(q[1:7]) == [-1, 2, -2, 3, -3, 127] or gs == 4
    x0 = np.resize(TIES, 64).astype(np.float32)
    x0[::32] = 127.0
    q0, d0 = q8.quantize_q8_0(x0)
    assert np.all(d0 == 1.0)
    np.testing.assert_array_equal(q0, round_half_away(x0).astype(np.int8))


@pytest.mark.parametrize("n,gs", Q8G_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_q8g(simd, split, rows, n, gs, threads):
    rng = np.random.default_rng(rows * 1000 + n + gs)
    wq, ws = random_q8g(rows, n, gs, rng)
    x = random_x(n, rng, zero_groups_of=gs)
    out = np.full(rows, np.nan, np.float32)
    q8.matvec_q8g(wq, ws, gs, x, out, threads)
    check_q8g_product(out, wq, ws, gs, x)
    xq, xs = np_quantize_q8g(x, gs)
    if simd == "portable" or gs % 32 != 0:  # runq.c's loop, exactly
        np.testing.assert_array_equal(out, runq_matmul_f32(wq, ws, xq, xs, gs))


@pytest.mark.parametrize("gs", [4, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_portable_q8g_is_runq_matmul(gs, threads):
    """Larger random case of the exact emulation: pecca's portable path = runq.c's matmul."""
    assert _kernels.set_simd_path("portable") == "portable"
    try:
        rng = np.random.default_rng(gs)
        rows, n = 67, 768
        wq = rng.integers(-127, 128, (rows, n), dtype=np.int8)
        ws = rng.uniform(1e-4, 1e-2, rows * n // gs).astype(np.float32)
        for trial in range(3):
            x = random_x(n, rng)
            out = np.zeros(rows, np.float32)
            q8.matvec_q8g(wq, ws, gs, x, out, threads)
            xq, xs = np_quantize_q8g(x, gs)
            np.testing.assert_array_equal(out, runq_matmul_f32(wq, ws, xq, xs, gs))
    finally:
        _kernels.set_simd_path(None)


@pytest.mark.parametrize("n", Q8_0_N)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_q8_0(simd, split, rows, n, threads):
    rng = np.random.default_rng(rows * 1000 + n)
    blocks, d, qs = random_q8_0(rows, n, rng)
    x = random_x(n, rng, zero_groups_of=32)
    out = np.full(rows, np.nan, np.float32)
    q8.matvec_q8_0(blocks, x, out, threads)
    check_q8_0_product(out, blocks, d, qs, x)
    if simd == "portable":
        xq, xd = np_quantize_q8_0(x)
        np.testing.assert_array_equal(out, llamacpp_vec_dot_f32(d, qs, xq, xd))


def test_q8_0_blocks_match_gguf():
    """The hand-built blocks decode as gguf decodes them, and gguf's own quantizer's output
    (weights in [-127, 127]) runs through the kernel like any other."""
    rng = np.random.default_rng(5)
    blocks, d, qs = random_q8_0(9, 96, rng)
    mine = d.astype(np.float32)[:, :, None] * qs.astype(np.float32)
    np.testing.assert_array_equal(dequantize(blocks, gguf.GGMLQuantizationType.Q8_0), mine.reshape(9, 96))
    wf = rng.standard_normal((13, 288)).astype(np.float32)
    gblocks = gguf.quants.quantize(wf, gguf.GGMLQuantizationType.Q8_0)
    assert gblocks.shape == (13, 288 // 32 * 34) and gblocks.dtype == np.uint8
    g = gblocks.reshape(13, 9, 34)
    gd = g[:, :, :2].copy().view(np.float16).reshape(13, 9)
    gq = g[:, :, 2:].copy().view(np.int8)
    x = random_x(288, rng)
    for path in PATHS:
        _kernels.set_simd_path(path)
        out = np.zeros(13, np.float32)
        q8.matvec_q8_0(gblocks, x, out, 2)
        check_q8_0_product(out, gblocks, gd, gq, x)
    _kernels.set_simd_path(None)


@pytest.mark.parametrize("n,gs", Q8G_SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_q8g(simd, rows, n, gs, T, threads):
    rng = np.random.default_rng(rows * 7 + n * 3 + gs + T)
    wq, ws = random_q8g(rows, n, gs, rng)
    x = np.stack([random_x(n, rng, zero_groups_of=gs) for _ in range(T)])
    x[T // 2] = 0.0  # a token of all-zero activations
    out = np.full((T, rows), np.nan, np.float32)
    q8.matmul_q8g(wq, ws, gs, x, out, threads)
    one = np.zeros(rows, np.float32)
    for t in range(T):
        check_q8g_product(out[t], wq, ws, gs, x[t])
        q8.matvec_q8g(wq, ws, gs, x[t], one, 1)
        np.testing.assert_array_equal(out[t], one)  # same operations as matvec, bit for bit
    assert not out[T // 2].any()


@pytest.mark.parametrize("n", Q8_0_N)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_q8_0(simd, rows, n, T, threads):
    rng = np.random.default_rng(rows * 7 + n * 3 + T)
    blocks, d, qs = random_q8_0(rows, n, rng)
    x = np.stack([random_x(n, rng, zero_groups_of=32) for _ in range(T)])
    x[T // 2] = 0.0
    out = np.full((T, rows), np.nan, np.float32)
    q8.matmul_q8_0(blocks, x, out, threads)
    one = np.zeros(rows, np.float32)
    for t in range(T):
        check_q8_0_product(out[t], blocks, d, qs, x[t])
        q8.matvec_q8_0(blocks, x[t], one, 1)
        np.testing.assert_array_equal(out[t], one)
    assert not out[T // 2].any()


@pytest.mark.parametrize("kind", ["q8_0", "q8g32", "q8g64", "q8g96"])
@pytest.mark.parametrize("n", [288, 2112])  # 2112 = 22 * 96
def test_matmul_rows_equal_matvec_every_batch_size(simd, kind, n):
    """Every batch size 1..20 (the matmul tiles take tokens in groups, the last ones partial; n =
    288 ends in half a step of two blocks): each row of matmul is matvec's bit for bit, at 1 and 2
    threads."""
    rng = np.random.default_rng(n + len(kind))
    rows = 37
    if kind == "q8_0":
        blocks, _, _ = random_q8_0(rows, n, rng)

        def mv(x, out):
            q8.matvec_q8_0(blocks, x, out, 1)

        def mm(x, out, nt):
            q8.matmul_q8_0(blocks, x, out, nt)
    else:
        gs = int(kind[3:]) if n % int(kind[3:]) == 0 else 32
        wq, ws = random_q8g(rows, n, gs, rng)

        def mv(x, out):
            q8.matvec_q8g(wq, ws, gs, x, out, 1)

        def mm(x, out, nt):
            q8.matmul_q8g(wq, ws, gs, x, out, nt)
    xs = np.stack([random_x(n, rng) for _ in range(20)])
    assert_matmul_rows_equal_matvec(mv, mm, xs, rows)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_parallel_split(simd, split, threads):
    """Enough rows for the threaded split (rows not a multiple of 4 or of the team)."""
    rng = np.random.default_rng(11)
    rows, n = 203, 512
    wq, ws = random_q8g(rows, n, 64, rng)
    blocks, d, qs = random_q8_0(rows, n, rng)
    x = random_x(n, rng)
    out = np.full(rows, np.nan, np.float32)
    q8.matvec_q8g(wq, ws, 64, x, out, threads)
    check_q8g_product(out, wq, ws, 64, x)
    q8.matvec_q8_0(blocks, x, out, threads)
    check_q8_0_product(out, blocks, d, qs, x)
    xs = np.stack([random_x(n, rng) for _ in range(6)])
    outs = np.full((6, rows), np.nan, np.float32)
    q8.matmul_q8_0(blocks, xs, outs, threads)
    for t in range(6):
        check_q8_0_product(outs[t], blocks, d, qs, xs[t])


@pytest.mark.parametrize("rows, n", [(523, 4096), (3709, 576)])
def test_matvec_of_large_shares_streams_rows_with_the_same_bits(simd, split, rows, n):
    """A thread's share of 2 MiB or more is read one row at a time (the memory-bound form) when
    its rows are 1 KiB or longer: each row equals the 4-row tiles' result (2 threads: shares
    under 2 MiB) and matmul's, bit for bit, and the reference. n = 576 (612-byte rows, 2.27 MB):
    tiles at every share size, the same bits again."""
    rng = np.random.default_rng(13)
    # Q8_0 2.27 MB, q8g (gs 64) 2.19 MB + scales: a 1-thread share over 2 MiB
    blocks, d, qs = random_q8_0(rows, n, rng)
    wq, ws = random_q8g(rows, n, 64, rng)
    x = random_x(n, rng)
    one, two = np.full(rows, np.nan, np.float32), np.full(rows, np.nan, np.float32)
    q8.matvec_q8_0(blocks, x, one, 1)
    q8.matvec_q8_0(blocks, x, two, 2)
    check_q8_0_product(one, blocks, d, qs, x)
    np.testing.assert_array_equal(one, two)
    mm = np.full((3, rows), np.nan, np.float32)
    q8.matmul_q8_0(blocks, np.stack([x, x, x]), mm, 1)
    np.testing.assert_array_equal(mm[1], one)
    q8.matvec_q8g(wq, ws, 64, x, one, 1)
    q8.matvec_q8g(wq, ws, 64, x, two, 2)
    check_q8g_product(one, wq, ws, 64, x)
    np.testing.assert_array_equal(one, two)


def test_reads_readonly_memmap(tmp_path, simd):
    rng = np.random.default_rng(2)
    wq, ws = random_q8g(6, 64, 32, rng)
    blocks, d, qs = random_q8_0(6, 64, rng)
    p = tmp_path / "w.bin"
    with open(p, "wb") as f:
        f.write(wq.tobytes() + ws.tobytes() + blocks.tobytes())
    mq = np.memmap(p, dtype=np.int8, mode="r", shape=(6, 64))
    ms = np.memmap(p, dtype=np.float32, mode="r", offset=wq.nbytes, shape=(ws.size,))
    mb = np.memmap(p, dtype=np.uint8, mode="r", offset=wq.nbytes + ws.nbytes, shape=blocks.shape)
    x = random_x(64, rng)
    out, ref = np.zeros(6, np.float32), np.zeros(6, np.float32)
    q8.matvec_q8g(mq, ms, 32, x, out, 2)
    q8.matvec_q8g(wq, ws, 32, x, ref, 2)
    np.testing.assert_array_equal(out, ref)
    q8.matvec_q8_0(mb, x, out, 2)
    q8.matvec_q8_0(blocks, x, ref, 2)
    np.testing.assert_array_equal(out, ref)


def test_matmul_writes_into_a_cache_slice():
    rng = np.random.default_rng(0)
    wq, ws = random_q8g(12, 64, 32, rng)
    x = np.stack([random_x(64, rng) for _ in range(3)])
    cache = np.zeros((2, 8, 12), np.float32)
    q8.matmul_q8g(wq, ws, 32, x, cache[1, 4:7], 2)
    for t in range(3):
        check_q8g_product(cache[1, 4 + t], wq, ws, 32, x[t])
    assert not cache[0].any() and not cache[1, :4].any() and not cache[1, 7:].any()


def test_rejects_bad_shapes():
    wq = np.zeros((3, 64), np.int8)
    ws = np.zeros(3 * 2, np.float32)
    x = np.zeros(64, np.float32)
    out = np.zeros(3, np.float32)
    q8.matvec_q8g(wq, ws, 32, x, out)  # the valid call
    for bad in [
        lambda: q8.matvec_q8g(wq, ws, 0, x, out),  # gs 0
        lambda: q8.matvec_q8g(wq, ws, -32, x, out),
        lambda: q8.matvec_q8g(wq, ws, 48, x, out),  # does not divide n
        lambda: q8.matvec_q8g(wq, ws[:5], 32, x, out),  # too few scales
        lambda: q8.matvec_q8g(wq, np.zeros(12, np.float32), 32, x, out),
        lambda: q8.matvec_q8g(wq, ws, 32, np.zeros(63, np.float32), out),
        lambda: q8.matvec_q8g(wq, ws, 32, x, np.zeros(4, np.float32)),
        lambda: q8.matmul_q8g(wq, ws, 32, np.zeros((2, 63), np.float32), np.zeros((2, 3), np.float32)),
        lambda: q8.matmul_q8g(wq, ws, 32, np.zeros((2, 64), np.float32), np.zeros((3, 3), np.float32)),
        lambda: q8.matmul_q8g(wq, ws, 48, np.zeros((2, 64), np.float32), np.zeros((2, 3), np.float32)),
        lambda: q8.quantize_q8g(x, 48),
        lambda: q8.quantize_q8g(x, 0),
    ]:
        with pytest.raises(ValueError):
            bad()
    w0 = np.zeros((3, 68), np.uint8)
    q8.matvec_q8_0(w0, x, out)
    for bad in [
        lambda: q8.matvec_q8_0(np.zeros((3, 67), np.uint8), x, out),  # not whole blocks
        lambda: q8.matvec_q8_0(w0, np.zeros(65, np.float32), out),
        lambda: q8.matvec_q8_0(w0, x, np.zeros(2, np.float32)),
        lambda: q8.matmul_q8_0(w0, np.zeros((2, 32), np.float32), np.zeros((2, 3), np.float32)),
        lambda: q8.matmul_q8_0(w0, np.zeros((2, 64), np.float32), np.zeros((2, 4), np.float32)),
        lambda: q8.quantize_q8_0(np.zeros(48, np.float32)),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_rejects_wrong_dtypes():
    x = np.zeros(64, np.float32)
    out = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        q8.matvec_q8g(np.zeros((3, 64), np.uint8), np.zeros(6, np.float32), 32, x, out)
    with pytest.raises(ValueError):
        q8.matvec_q8g(np.zeros((3, 64), np.int8), np.zeros(6, np.float64), 32, x, out)
    with pytest.raises(ValueError):
        q8.matvec_q8_0(np.zeros((3, 68), np.int8), x, out)
    with pytest.raises(ValueError):
        q8.matvec_q8_0(np.zeros((3, 68), np.uint8), x.astype(np.float64), out)


# ---------------- Linear classes ----------------

def test_q8group_linear():
    rng = np.random.default_rng(3)
    wq, ws = random_q8g(40, 96, 32, rng)
    for s in (ws, ws.reshape(40, 3)):
        lin = Q8GroupLinear(wq, s, 32)
        assert lin.kind == "q8" and (lin.out_features, lin.in_features) == (40, 96)
        assert lin.group_size == 32 and lin.nbytes == wq.nbytes + ws.nbytes
        assert lin.q is wq and np.shares_memory(lin.s, ws)
        x = random_x(96, rng)
        out = np.zeros(40, np.float32)
        lin(x, out, 2)
        check_q8g_product(out, wq, ws, 32, x)
        xs = np.stack([random_x(96, rng) for _ in range(5)])
        outs = np.zeros((5, 40), np.float32)
        lin.batch(xs, outs, 2)
        for t in range(5):
            check_q8g_product(outs[t], wq, ws, 32, xs[t])


def test_q8_0_linear():
    rng = np.random.default_rng(4)
    blocks, d, qs = random_q8_0(40, 96, rng)
    lin = Q8_0Linear(blocks)
    assert lin.kind == "q8_0" and (lin.out_features, lin.in_features) == (40, 96)
    assert lin.nbytes == blocks.nbytes and lin.blocks is blocks
    x = random_x(96, rng)
    out = np.zeros(40, np.float32)
    lin(x, out, 2)
    check_q8_0_product(out, blocks, d, qs, x)
    xs = np.stack([random_x(96, rng) for _ in range(5)])
    outs = np.zeros((5, 40), np.float32)
    lin.batch(xs, outs, 2)
    for t in range(5):
        check_q8_0_product(outs[t], blocks, d, qs, xs[t])


@pytest.mark.parametrize("args", [
    (np.zeros((3, 64), np.uint8), np.zeros(6, np.float32), 32),  # q not int8
    (np.zeros((3, 64), np.int8), np.zeros(6, np.float64), 32),  # s not float32
    (np.zeros(64, np.int8), np.zeros(2, np.float32), 32),  # q 1-D
    (np.zeros((3, 128), np.int8)[:, ::2], np.zeros(6, np.float32), 32),  # q not C-contiguous
    (np.zeros((3, 64), np.int8), np.zeros(5, np.float32), 32),  # wrong number of scales
    (np.zeros((3, 64), np.int8), np.zeros((3, 3), np.float32), 32),  # 2-D scales of the wrong shape
    (np.zeros((3, 64), np.int8), np.zeros(6, np.float32), 48),  # gs does not divide n
    (np.zeros((3, 64), np.int8), np.zeros(6, np.float32), 0),
])
def test_q8group_linear_rejects(args):
    with pytest.raises(ValueError):
        Q8GroupLinear(*args)


@pytest.mark.parametrize("bad", [
    np.zeros((3, 68), np.int8),  # not uint8
    np.zeros((3, 67), np.uint8),  # not whole blocks
    np.zeros(68, np.uint8),  # 1-D
    np.zeros((3, 136), np.uint8)[:, ::2],  # not C-contiguous
])
def test_q8_0_linear_rejects(bad):
    with pytest.raises(ValueError):
        Q8_0Linear(bad)


@pytest.mark.parametrize("n", [32, 576, 4096])
@pytest.mark.parametrize("rows", [(1,), (7, 264), (576, 192, 192), (264, 1, 7, 3)])
def test_matvec_q8_0_many_equals_one_call_each(simd, split, n, rows):
    """A layer's q, k, v (or gate, up) in one call: x quantized once, the same bits as a matvec
    each, at 1 and 2 threads."""
    rng = np.random.default_rng(n + len(rows))
    ws = [random_q8_0(r, n, rng)[0] for r in rows]
    assert_many_equal_single(q8.matvec_q8_0, q8.matvec_q8_0_many, ws, random_x(n, rng))


def test_matvec_q8_0_many_rejects_bad_shapes():
    rng = np.random.default_rng(4)
    a, b = random_q8_0(8, 64, rng)[0], random_q8_0(8, 96, rng)[0]
    x, o = np.ones(64, np.float32), np.empty(8, np.float32)
    with pytest.raises(ValueError, match="matrix 1 is 8x96"):
        q8.matvec_q8_0_many([a, b], x, [o, np.empty(8, np.float32)])
    with pytest.raises(ValueError, match="out has 9"):
        q8.matvec_q8_0_many([a], x, [np.empty(9, np.float32)])
    with pytest.raises(ValueError, match="1 to 4 matrices"):
        q8.matvec_q8_0_many([], x, [])



@pytest.mark.parametrize("kind", ["q8_0", "q8g"])
def test_work_stealing_equals_one_thread(simd, kind):
    """Rows shared out by work stealing and read one at a time (the memory form): the same bits
    as at 1 thread (4-row tiles there), every time; Q8_0 also three matrices in one call."""
    rng = np.random.default_rng(len(kind))
    n, rows = 1024, (1001, 7, 264)
    if kind == "q8_0":  # with a matrix of no rows among them
        rows = (1001, 7, 0, 264)
        ws = [random_q8_0(r, n, rng)[0] if r else np.empty((0, n // 32 * 34), np.uint8)
              for r in rows]
        one, many = q8.matvec_q8_0, q8.matvec_q8_0_many
    else:
        ws, many, rows = [random_q8g(rows[0], n, 64, rng)], None, rows[:1]

        def one(w, x, out, nt):
            q8.matvec_q8g(w[0], w[1], 64, x, out, nt)
    assert_stealing_equals_one_thread(q8, one, many, ws, rows, random_x(n, rng))
