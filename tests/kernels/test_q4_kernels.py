"""4-bit weight kernels (q4g, GGUF Q4_0 / Q4_1, native GPTQ) on every SIMD path this CPU has.

References, all NumPy float64:
 - W dequantized from the codes (q4g / gptq: s * (code - z); Q4_0 / Q4_1: gguf's dequantize),
   then x @ W.T;
 - the int8-activation kernels against the same product with the activations they quantize
   (np_quantize_act: per block of 32, d = amax / 32512 in float32, q = round(x / d), which the
   kernels split into two int8 levels, dequantized block by block): only float32 rounding
   differs, bounded by eps32 * (4 sqrt(m) + 8) * sum |terms| with m the number of partial sums
   (blocks + groups) as in test_q8_kernels.py, the terms including the zero-point ones
   (|s| (code + z) |x|); and against the exact x within the activation rounding:
   |x_j - q_j d_b| <= d_b (1/2 + 32512 * 2^-24), so |out - W x| <= 0.502 sum_j |W_j| d_b(j) + the
   above; the activations themselves read out exactly through identity weights (edge cases
   included); and the int8 path's error against exact x below 2e-4 of the output's scale;
 - the float-activation kernels against W x within the float32 bound.
matmul rows must equal matvec bit for bit, and 1 and 2 threads must agree bit for bit.
"""
import json
import struct

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from pecca import _kernels
from pecca._kernels import q4, runtime
from pecca.weights import GPTQLinear, Q4_0Linear, Q4_1Linear, Q4GLinear, matvec_same_input
from shared_data import shared_file
from kernel_checks import (assert_many_equal_single, assert_matmul_rows_equal_matvec,
                           assert_stealing_equals_one_thread, split_fixture)

ORDER = ["portable", "avx2", "avx512"]
PATHS = ORDER[:ORDER.index(runtime.simd_supported()) + 1]
EPS = float(np.finfo(np.float32).eps)
ROWS = [1, 7, 264]
TOKENS = [1, 3, 17]
# (K, group sizes): gs = -1 is K; multiples of 32 use int8 activations, the others (16, 8, 24:
# AVX2 float code; 12: portable float code) float ones. K = 96 and 288 leave a partial SIMD step.
# K >= 8192 takes the VNNI matvec's chunked form (q4_mv_chunked_vnni: panels of 2 quads, K in
# chunks of 4 steps): 8320 = 65 steps (a last chunk of one step), 8224 = 257 blocks (a last
# step of one block); gs 128 / -1 / 32 / 64 at 8320 and -1 at 8224 give each q4g scale form.
Q4G_SHAPES = [(32, [32, 16, 8]), (96, [32, 96, 24, 12, 8]), (256, [32, 64, 128, -1, 16]),
              (288, [32, 96, -1, 16, 24, 12]), (4096, [32, 128, -1, 16]),
              (8320, [128, -1, 32, 64]), (8224, [32, -1])]
Q4G_CASES = [(k, gs) for k, gss in Q4G_SHAPES for gs in gss]
BLOCK_K = [32, 96, 256, 288, 4096, 8224]
V1_ADD = 0x11111111


@pytest.fixture(params=PATHS)
def simd(request):
    assert _kernels.set_simd_path(request.param) == request.param
    q4._reset_simd()
    yield request.param
    _kernels.set_simd_path(None)
    q4._reset_simd()


split = split_fixture(q4)


# ---------------- NumPy references ----------------

def round_half_away(v):
    v = v.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


QMAX = 32512  # 127 * 256: the int8 path's two-level activation range


def np_quantize_act(x):
    """The int8 path's activations: per block of 32, d = amax / 32512 (float32), q = x / d
    (float32 division) rounded half away from zero, clamped to +-32512 (NaN -> 0; d = 0 -> 0),
    which the kernels split into 256 hi + lo (two int8 dots, exact). Returns x as the kernels
    see it (q d, float64) and the block scale d of every element."""
    xb = x.astype(np.float32).reshape(-1, 32)
    d = np.fmax.reduce(np.abs(xb), axis=1) / np.float32(QMAX)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d[:, None] != 0, xb / d[:, None], np.float32(0.0)).astype(np.float32)
    v = np.nan_to_num(v, nan=0.0, posinf=QMAX, neginf=-QMAX)
    q = round_half_away(np.clip(v, -QMAX, QMAX))
    return (q * d.astype(np.float64)[:, None]).reshape(-1), np.repeat(d.astype(np.float64), 32)


def random_x(n, rng):
    return (rng.standard_normal(n) * rng.uniform(0.1, 10.0)).astype(np.float32)


def random_scales(shape, rng):
    """f16 scales of both signs, a few exactly zero"""
    s = (rng.standard_normal(shape) * 0.02).astype(np.float16)
    s.reshape(-1)[::37] = 0
    return s


def pack_q4g(codes):
    """codes (N, K) 0..15 -> qs (N, K/2): block b byte j = code 32b+j | code 32b+16+j << 4"""
    n, k = codes.shape
    c = codes.reshape(n, k // 32, 2, 16).astype(np.uint8)
    return np.ascontiguousarray((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2))


def random_q4g(n, k, gs, rng, sym, act_order):
    """(qs, scales f16, zeros int8, perm or None, dense W (N, K) float64 in input order,
    |terms| weights (N, K) in input order: |s| (code + z))"""
    g = k // gs
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = random_scales((n, g), rng)
    zeros = np.full((n, g), 8, np.int8) if sym else rng.integers(0, 16, (n, g), dtype=np.int8)
    perm = rng.permutation(k).astype(np.int32) if act_order else None
    s = np.repeat(scales.astype(np.float64), gs, axis=1)
    z = np.repeat(zeros.astype(np.float64), gs, axis=1)
    wp = s * (codes - z)  # permuted order: column i is input perm[i]
    mag = np.abs(s) * (codes + z)
    w, m = np.empty_like(wp), np.empty_like(mag)
    p = perm if perm is not None else np.arange(k)
    w[:, p] = wp
    m[:, p] = mag
    return pack_q4g(codes), scales, zeros, perm, w, m


def random_blocks(kind, n, k, rng):
    """GGUF Q4_0 / Q4_1 rows built by hand over the whole nibble range with f16 d (and m) of both
    signs; returns (blocks, W float64 (from gguf's dequantize), |terms| (N, K))."""
    nb = k // 32
    bb = 18 if kind == "q4_0" else 20
    blocks = np.empty((n, nb, bb), np.uint8)
    d = random_scales((n, nb), rng)
    blocks[:, :, :2] = d.view(np.uint8).reshape(n, nb, 2)
    m = np.zeros((n, nb), np.float16)
    if kind == "q4_1":
        m = (rng.standard_normal((n, nb)) * 0.05).astype(np.float16)
        blocks[:, :, 2:4] = m.view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, bb - 16:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    blocks = blocks.reshape(n, nb * bb)
    return blocks, *block_terms(kind, blocks)


def block_terms(kind, blocks):
    n = blocks.shape[0]
    bb = 18 if kind == "q4_0" else 20
    b = blocks.reshape(n, -1, bb)
    d = b[:, :, :2].copy().view(np.float16).astype(np.float64)[:, :, 0]
    qs = b[:, :, bb - 16:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float64)  # (n, nb, 32)
    if kind == "q4_0":
        w = d[:, :, None] * (codes - 8)
        mag = np.abs(w)
    else:
        m = b[:, :, 2:4].copy().view(np.float16).astype(np.float64)[:, :, 0]
        w = d[:, :, None] * codes + m[:, :, None]
        mag = np.abs(d[:, :, None]) * codes + np.abs(m[:, :, None])
    qtype = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q4_1
    wg = dequantize(blocks, qtype).astype(np.float64)
    np.testing.assert_array_equal(wg, w.reshape(n, -1))  # our reading of the layout is gguf's
    return wg, mag.reshape(n, -1)


def pack_gptq(codes, true_zeros, v1):
    """codes (K, N), true zeros (G, N) -> (qweight (K/8, N) int32, qzeros (G, N/8) int32,
    zero_add). v1 stores the zero word minus 0x11111111 (GPTQModel's export: whole-word
    subtraction, so a zero of 0 borrows from the next nibble)."""
    k, n = codes.shape
    c = codes.astype(np.uint32).reshape(k // 8, 8, n)
    qweight = np.zeros((k // 8, n), np.uint32)
    for j in range(8):
        qweight |= c[:, j, :] << np.uint32(4 * j)
    z = true_zeros.astype(np.uint32).reshape(true_zeros.shape[0], n // 8, 8)
    zw = np.zeros(z.shape[:2], np.uint32)
    for j in range(8):
        zw |= z[:, :, j] << np.uint32(4 * j)
    if v1:
        zw = (zw.astype(np.uint64) - V1_ADD) % (1 << 32)
        zw = zw.astype(np.uint32)
    return qweight.view(np.int32), zw.view(np.int32), V1_ADD if v1 else 0


def random_gptq(k, n, gs, rng, sym, act_order, v1):
    """(qweight, qzeros, zero_add, scales f16 (G, N), g_idx, W (N, K) float64, |terms| (N, K))"""
    g = k // gs
    codes = rng.integers(0, 16, (k, n), dtype=np.uint8)
    zeros = np.full((g, n), 8, np.int64) if sym else rng.integers(0, 16, (g, n))
    if not sym:
        zeros.reshape(-1)[::5] = 0  # borrows in v1 words
    scales = random_scales((g, n), rng)
    gidx = np.arange(k) // gs
    if act_order:
        gidx = rng.permutation(gidx)
    gidx = gidx.astype(np.int32)
    qweight, qzeros, zero_add = pack_gptq(codes, zeros, v1)
    s = scales.astype(np.float64)[gidx]  # (K, N)
    z = zeros.astype(np.float64)[gidx]
    w = (s * (codes - z)).T
    mag = (np.abs(s) * (codes + z)).T
    return qweight, qzeros, zero_add, scales, gidx, w, mag


def f32_bound(mag, x, m):
    """float32 rounding bound of sum_j w_j x_j over m partial sums; mag (N, K) |terms|"""
    return EPS * (4 * np.sqrt(m) + 8) * (mag @ np.abs(x.astype(np.float64))) + 1e-30


def check_float(out, w, mag, x, m):
    ref = w @ x.astype(np.float64)
    assert np.all(np.abs(out - ref) <= f32_bound(mag, x, m))


def check_int8_perm(out, w, mag, x, perm, m):
    """int8 path: W x with x quantized per 32-block of x[perm] (the order the kernel sees)."""
    p = perm if perm is not None else np.arange(x.shape[0])
    xd_p, d_p = np_quantize_act(x[p])
    xd, d = np.empty_like(xd_p), np.empty_like(d_p)
    xd[p], d[p] = xd_p, d_p
    exact = w @ xd
    fb = f32_bound(mag, xd, m)
    assert np.all(np.abs(out - exact) <= fb)
    # |x - q d| <= d (1/2 + 32512 * 2^-24): the rounding plus that of the float32 division
    qb = 0.502 * (np.abs(w) @ d)
    assert np.all(np.abs(out - w @ x.astype(np.float64)) <= qb + fb)


def run_both(matvec, matmul, n, x1, xs, check):
    """matvec at 1 and 2 threads (equal), matmul (each row == matvec) for every T of xs."""
    out1 = np.full(n, np.nan, np.float32)
    out2 = np.full(n, np.nan, np.float32)
    matvec(x1, out1, 1)
    matvec(x1, out2, 2)
    np.testing.assert_array_equal(out1, out2)
    check(out1, x1)
    for x in xs:
        t = x.shape[0]
        outs = np.full((t, n), np.nan, np.float32)
        matmul(x, outs, 2)
        one = np.zeros(n, np.float32)
        for i in range(t):
            matvec(x[i], one, 1)
            np.testing.assert_array_equal(outs[i], one)
        check(outs[t - 1], x[t - 1])


def token_batches(k, rng):
    return [np.stack([random_x(k, rng) for _ in range(t)]) for t in TOKENS]


# ---------------- q4g ----------------

def run_acts(mv_f, mm_f, w, mag, perm, m, xs, rng, float_acts):
    """run_both with each float_act setting (mv_f(x, out, nt, float_act), mm_f likewise)
    against the float64 references of W (w, mag: dense (N, K), m partial sums; perm: the input
    permutation the int8 path gathers by, or None)."""
    n, k = w.shape
    for float_act in float_acts:
        def mv(x, out, nt):
            mv_f(x, out, nt, float_act)

        def mm(x, out, nt):
            mm_f(x, out, nt, float_act)

        if float_act:
            def check(out, x):
                check_float(out, w, mag, x, m)
        else:
            def check(out, x):
                check_int8_perm(out, w, mag, x, perm, m)
        run_both(mv, mm, n, random_x(k, rng), xs, check)


def run_q4g(qs, sb, zeros, perm, w, mag, m, xs, rng, float_acts, slices=1, quads=False):
    """run_acts for a q4g matrix in `slices` column slices (quads: in the quad layout)."""
    def mv(x, out, nt, float_act):
        q4.matvec_q4g(qs, sb, zeros, perm, x, out, nt, float_act, slices, quads)

    def mm(x, out, nt, float_act):
        q4.matmul_q4g(qs, sb, zeros, perm, x, out, nt, float_act, slices, quads)

    run_acts(mv, mm, w, mag, perm, m, xs, rng, float_acts)


@pytest.mark.parametrize("k,gs", Q4G_CASES)
@pytest.mark.parametrize("n", ROWS)
def test_q4g(simd, n, k, gs):
    rng = np.random.default_rng(n * 10007 + k * 31 + gs)
    gs = k if gs == -1 else gs
    G = k // gs
    m = k // 32 + G
    xs = token_batches(k, rng)
    for sym, act in [(True, False), (False, False), (True, True), (False, True)]:
        qs, scales, zeros, perm, w, mag = random_q4g(n, k, gs, rng, sym, act)
        sb = scales.view(np.uint16)
        run_q4g(qs, sb, zeros, perm, w, mag, m, xs, rng, [False, True] if gs % 32 == 0 else [True])
        if gs % 32 != 0:  # float_act=False still takes the float path
            out_a, out_b = np.zeros(n, np.float32), np.zeros(n, np.float32)
            x = random_x(k, rng)
            q4.matvec_q4g(qs, sb, zeros, perm, x, out_a, 1, False)
            q4.matvec_q4g(qs, sb, zeros, perm, x, out_b, 1, True)
            np.testing.assert_array_equal(out_a, out_b)


def slice_q4g(qs, scales, zeros, s):
    """A q4g matrix as s column slices in the kernels' 2-D form (s = 1: a copy of it): slice j's
    N rows (its inputs j K/s .. (j + 1) K/s - 1) after slice j - 1's; one group per row is
    repeated in each slice."""
    n = qs.shape[0]

    def split(a):
        w = a.shape[1] // s
        return np.ascontiguousarray(a.reshape(n, s, w).transpose(1, 0, 2)).reshape(s * n, w)

    if scales.shape[1] == 1:
        return split(qs), np.tile(scales, (s, 1)), np.tile(zeros, (s, 1))
    return split(qs), split(scales), split(zeros)


# (K, gs, slices): int8 activations (gs % 32 == 0) and float ones (gs 16; 24 on a slice of 96),
# one group per row repeated in every slice (-1), 7B's ffn_down (11008 = 2 x 5504), slices of
# one block (96 = 3 x 32), K >= 8192 (the VNNI matvec's chunked form for the unsliced rows)
Q4G_SLICED = [(256, 32, 2), (96, -1, 3), (288, 24, 3), (384, 16, 3), (4096, 128, 2), (8192, 64, 4),
              (8320, -1, 2), (11008, 128, 2)]


@pytest.mark.parametrize("k,gs,s", Q4G_SLICED)
@pytest.mark.parametrize("n", ROWS)
def test_q4g_column_slices(simd, split, n, k, gs, s):
    """A matrix in column slices (export.gptq's layout for long rows): the product of the whole
    matrix against the float64 references, matmul rows equal to matvec, 1 and 2 threads equal."""
    rng = np.random.default_rng(n * 7 + k + gs + s)
    gs = k if gs == -1 else gs
    m = k // 32 + k // gs + s
    xs = token_batches(k, rng)[:2]
    for sym, act in [(False, False), (True, True), (False, True)]:
        qs, scales, zeros, perm, w, mag = random_q4g(n, k, gs, rng, sym, act)
        sq, ssc, sz = slice_q4g(qs, scales, zeros, s)
        sb = ssc.view(np.uint16)
        gs_slice = k // s // sz.shape[1]
        run_q4g(sq, sb, sz, perm, w, mag, m, xs, rng, [False, True] if gs_slice % 32 == 0 else [True], s)


@pytest.mark.parametrize("k,gs,s", [(512, 64, 2), (8192, -1, 2), (11008, 128, 2)])
@pytest.mark.parametrize("act_order", [False, True])
def test_matvec_q4g_many_column_slices(simd, split, k, gs, s, act_order):
    """Sliced q, k, v in one call: the same bits as a sliced matvec each, at 1 and 2 threads."""
    rng = np.random.default_rng(k + gs + act_order)
    gs = k if gs == -1 else gs
    rows = (264, 1, 7)
    mats = [random_q4g(n, k, gs, rng, False, act_order) for n in rows]
    perm = mats[0][3]
    sliced = [slice_q4g(m[0], m[1], m[2], s) for m in mats]
    x = random_x(k, rng)
    for nt in (1, 2):
        ref = []
        for (sq, ssc, sz), n in zip(sliced, rows):
            ref.append(np.full(n, np.nan, np.float32))
            q4.matvec_q4g(sq, ssc.view(np.uint16), sz, perm, x, ref[-1], nt, False, s)
        outs = [np.full(n, np.nan, np.float32) for n in rows]
        q4.matvec_q4g_many([a[0] for a in sliced], [a[1].view(np.uint16) for a in sliced],
                           [a[2] for a in sliced], perm, x, outs, nt, slices=s)
        for r, o in zip(ref, outs):
            np.testing.assert_array_equal(o, r)


# (N, K, gs, slices) that fit the quad layout (N % 4 == 0, K / slices % 128 == 0): one step, one
# quad; whole-K groups; 4096 (7B's q/k/v/o rows); K >= 8192 unsliced (the VNNI matvec's chunked
# form, a last chunk of one step); 7B's ffn_down in 2 slices of 5504; 4 slices; 3 slices of
# 128 with one group per row repeated
Q4G_QUADS = [(4, 128, 32, 1), (8, 256, -1, 1), (264, 4096, 128, 1), (12, 8320, 128, 1),
             (264, 11008, 128, 2), (40, 8192, 64, 4), (16, 384, -1, 3)]


@pytest.mark.parametrize("n,k,gs,s", Q4G_QUADS)
def test_q4g_quads(simd, split, n, k, gs, s):
    """The quad layout (export.gptq.to_quads) of a matrix: every product, matvec and matmul at 1
    and 2 threads, equals the row layout's bit for bit on the int8 path, and the float path
    (portable for quads) meets the float64 references."""
    from export.gptq import to_quads

    rng = np.random.default_rng(n + k + gs + s)
    gs = k if gs == -1 else gs
    xs = token_batches(k, rng)[:2]
    for sym, act in [(False, False), (True, True), (False, True)]:
        qs, scales, zeros, perm, w, mag = random_q4g(n, k, gs, rng, sym, act)
        sq, ssc, sz = slice_q4g(qs, scales, zeros, s)
        qq = to_quads(sq.reshape(s, n, -1)).reshape(sq.shape)
        assert np.array_equal(qq, sq) == (k // s == 128)  # one step a row: the same bytes
        sb = ssc.view(np.uint16)
        for nt in (1, 2):
            a, b = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
            x = random_x(k, rng)
            q4.matvec_q4g(sq, sb, sz, perm, x, a, nt, False, s)
            q4.matvec_q4g(qq, sb, sz, perm, x, b, nt, False, s, True)
            np.testing.assert_array_equal(b, a)
            for xt in xs:
                a2, b2 = (np.full((xt.shape[0], n), np.nan, np.float32) for _ in range(2))
                q4.matmul_q4g(sq, sb, sz, perm, xt, a2, nt, False, s)
                q4.matmul_q4g(qq, sb, sz, perm, xt, b2, nt, False, s, True)
                np.testing.assert_array_equal(b2, a2)
        m = k // 32 + k // gs + s
        run_q4g(qq, sb, sz, perm, w, mag, m, xs, rng, [False, True], s, quads=True)


def test_matvec_q4g_many_quads(simd, split):
    """q, k, v in the quad layout in one call: the bits of the row layout's one call each."""
    from export.gptq import to_quads

    rng = np.random.default_rng(5)
    k, rows = 4096, (264, 8, 32)
    mats = [random_q4g(n, k, 128, rng, False, True) for n in rows]
    perm, x = mats[0][3], random_x(k, rng)
    for nt in (1, 2):
        ref = [np.full(n, np.nan, np.float32) for n in rows]
        for (qs, sc, z, *_), r in zip(mats, ref):
            q4.matvec_q4g(qs, sc.view(np.uint16), z, perm, x, r, nt)
        outs = [np.full(n, np.nan, np.float32) for n in rows]
        q4.matvec_q4g_many([to_quads(mt[0]) for mt in mats], [mt[1].view(np.uint16) for mt in mats],
                           [mt[2] for mt in mats], perm, x, outs, nt, quads=True)
        for r, o in zip(ref, outs):
            np.testing.assert_array_equal(o, r)


def test_q4g_quads_bad_shapes():
    """The quad layout needs rows in multiples of 4 and slices of a multiple of 128 inputs: a
    clear error otherwise (kernel and Linear), never a read past the rows."""
    rng = np.random.default_rng(6)
    for n, k, s in [(6, 256, 1), (8, 192, 1), (8, 320, 2)]:
        qs, scales, zeros, perm, _, _ = random_q4g(n, k, 32, rng, False, False)
        sq, ssc, sz = slice_q4g(qs, scales, zeros, s)
        with pytest.raises(ValueError, match="quad layout"):
            q4.matvec_q4g(sq, ssc.view(np.uint16), sz, None, random_x(k, rng), np.zeros(n, np.float32),
                          1, False, s, True)
        with pytest.raises(ValueError, match="quad layout"):
            Q4GLinear(sq.reshape(s, n, -1) if s > 1 else sq, ssc.reshape(s, n, -1) if s > 1 else ssc,
                      sz.reshape(s, n, -1) if s > 1 else sz, quads=True)


def test_q4g_column_slices_bad_shapes():
    rng = np.random.default_rng(5)
    qs, scales, zeros, perm, _, _ = random_q4g(6, 256, 32, rng, False, True)
    sq, ssc, sz = slice_q4g(qs, scales, zeros, 2)
    sb, x, out = ssc.view(np.uint16), random_x(256, rng), np.zeros(6, np.float32)
    q4.matvec_q4g(sq, sb, sz, perm, x, out, 1, False, 2)  # the valid call
    for call, words in [
            (lambda: q4.matvec_q4g(sq, sb, sz, perm, x, out, 1, False, 5), "not 5 column slices"),
            (lambda: q4.matvec_q4g(sq, sb, sz, perm, x, out, 1, False, 0), "not 0 column slices"),
            (lambda: q4.matvec_q4g(sq, sb, sz, None, x, out, 1, False, 4), "x has 256"),  # 3 rows x 512
            (lambda: q4.matvec_q4g(sq, sb, sz, perm, x, out, 1, False, 4), "perm has 256 entries, expected 512"),
            (lambda: q4.matvec_q4g(sq, sb, sz, None, x[:128], out, 1, False, 1), "W is 12x128"),
            (lambda: q4.matmul_q4g(sq, sb, sz, perm, x[None], out[None], 1, False, 7), "not 7 column slices"),
            (lambda: q4.matvec_q4g_many([sq], [sb], [sz], perm, x, [out], 1, slices=4), "matrix 0 is 3x512")]:
        with pytest.raises(ValueError, match=words):
            call()


def test_q4g_linear_column_slices():
    """Q4GLinear over 3-D (slices, N, ...) arrays: its features, its products equal the kernel's
    on the slices, and one many_plan only for Linears of the same slicing."""
    rng = np.random.default_rng(6)
    k, s = 512, 2
    mats = [random_q4g(n, k, 64, rng, False, True) for n in (12, 20)]
    perm = mats[0][3]
    lins = []
    for qs, scales, zeros, _, _, _ in mats:
        sq, ssc, sz = slice_q4g(qs, scales, zeros, s)
        n = qs.shape[0]
        lins.append(Q4GLinear(sq.reshape(s, n, -1), ssc.reshape(s, n, -1), sz.reshape(s, n, -1), perm))
    a = lins[0]
    assert (a.out_features, a.in_features, a.group_size, a.slices) == (12, k, 64, s)
    x = random_x(k, rng)
    out, ref = np.zeros(12, np.float32), np.zeros(12, np.float32)
    a(x, out, 2)
    q4.matvec_q4g(a.qs, a._scale_bits, a.zeros, perm, x, ref, 2, False, s)
    np.testing.assert_array_equal(out, ref)
    check_int8_perm(out, mats[0][4], mats[0][5], x, perm, k // 32 + k // 64 + s)
    batch = np.zeros((3, 12), np.float32)
    a.batch(np.stack([x, x, x]), batch, 2)
    np.testing.assert_array_equal(batch[1], out)
    plain = Q4GLinear(*mats[1][:4])
    assert Q4GLinear.many_plan(lins) is not None and Q4GLinear.many_plan([a, plain]) is None
    outs = [np.zeros(12, np.float32), np.zeros(20, np.float32)]
    matvec_same_input([a, plain], x, outs, 2)
    np.testing.assert_array_equal(outs[0], out)
    n = 12
    qs3 = a.qs.reshape(s, n, -1)
    for args, words in [((qs3, a.scales.view(np.float16).reshape(s, n, -1)[:1], a.zeros.reshape(s, n, -1), perm), "scales has shape"),
                        ((qs3, a.scales.view(np.float16).reshape(s, n, -1), a.zeros.reshape(s * n, -1), perm), "zeros has shape"),
                        ((np.ascontiguousarray(qs3[:, :, :24]), a.scales.view(np.float16).reshape(s, n, -1), a.zeros.reshape(s, n, -1), None), "multiple of 32"),
                        ((qs3[:0], a.scales.view(np.float16).reshape(s, n, -1)[:0], a.zeros.reshape(s, n, -1)[:0], None), "no column slices"),
                        ((qs3, a.scales.view(np.float16).reshape(s, n, -1), a.zeros.reshape(s, n, -1), perm[:256]), "perm has shape")]:
        with pytest.raises(ValueError, match=words):
            Q4GLinear(*args)


def test_q4g_perm_none_or_empty(simd):
    rng = np.random.default_rng(1)
    qs, scales, zeros, _, w, mag = random_q4g(9, 256, 64, rng, False, False)
    x = random_x(256, rng)
    outs = []
    for perm in (None, np.zeros(0, np.int32), np.arange(256, dtype=np.int32)):
        out = np.zeros(9, np.float32)
        q4.matvec_q4g(qs, scales.view(np.uint16), zeros, perm, x, out)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    check_int8_perm(outs[0], w, mag, x, None, 4 + 8)


def test_q4g_zero_activations(simd):
    rng = np.random.default_rng(2)
    qs, scales, zeros, perm, _, _ = random_q4g(12, 288, 32, rng, False, True)
    for fa in (False, True):
        out = np.full((3, 12), np.nan, np.float32)
        q4.matmul_q4g(qs, scales.view(np.uint16), zeros, perm, np.zeros((3, 288), np.float32), out, 2, fa)
        assert not out.any()


# ---------------- Q4_0 / Q4_1 ----------------

@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
@pytest.mark.parametrize("k", BLOCK_K)
@pytest.mark.parametrize("n", ROWS)
def test_q4_blocks(simd, split, kind, n, k):
    rng = np.random.default_rng(n * 7919 + k + (kind == "q4_1"))
    blocks, w, mag = random_blocks(kind, n, k, rng)
    mv_f = q4.matvec_q4_0 if kind == "q4_0" else q4.matvec_q4_1
    mm_f = q4.matmul_q4_0 if kind == "q4_0" else q4.matmul_q4_1
    m = 2 * (k // 32)
    run_acts(lambda x, out, nt, fa: mv_f(blocks, x, out, nt, fa),
             lambda x, out, nt, fa: mm_f(blocks, x, out, nt, fa),
             w, mag, None, m, token_batches(k, rng), rng, (False, True))


@pytest.mark.parametrize("kind", ["q4g32", "q4g64", "q4_0", "q4_1"])
@pytest.mark.parametrize("k", [288, 2080, 8320])
def test_matmul_rows_equal_matvec_every_batch_size(simd, kind, k):
    """Every batch size 1..20 (the matmul tiles take tokens in pairs and groups of pairs, the
    last ones partial; K = 2080 spans several chunks of K, 288 ends in half a step; at 8320
    the VNNI matvec runs its chunked form over panels of quads, 37 rows = 2 panels, a lone quad
    and a row): each row of matmul is matvec's bit for bit, at 1 and 2 threads."""
    rng = np.random.default_rng(k + len(kind))
    n = 37
    if kind.startswith("q4g"):
        gs = int(kind[3:]) if k % int(kind[3:]) == 0 else 32
        qs, scales, zeros, perm, _, _ = random_q4g(n, k, gs, rng, False, True)
        sb = scales.view(np.uint16)

        def mv(x, out):
            q4.matvec_q4g(qs, sb, zeros, perm, x, out, 1)

        def mm(x, out, nt):
            q4.matmul_q4g(qs, sb, zeros, perm, x, out, nt)
    else:
        blocks, _, _ = random_blocks(kind, n, k, rng)
        mv_f = q4.matvec_q4_0 if kind == "q4_0" else q4.matvec_q4_1
        mm_f = q4.matmul_q4_0 if kind == "q4_0" else q4.matmul_q4_1

        def mv(x, out):
            mv_f(blocks, x, out, 1)

        def mm(x, out, nt):
            mm_f(blocks, x, out, nt)
    xs = np.stack([random_x(k, rng) for _ in range(20)])
    assert_matmul_rows_equal_matvec(mv, mm, xs, n)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_blocks_from_gguf_quantize(simd, kind):
    """gguf's own quantizer's blocks run through the kernels like any other."""
    rng = np.random.default_rng(4)
    qtype = gguf.GGMLQuantizationType.Q4_0 if kind == "q4_0" else gguf.GGMLQuantizationType.Q4_1
    wf = rng.standard_normal((37, 288)).astype(np.float32)
    blocks = quantize(wf, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (37, 288 // 32 * (18 if kind == "q4_0" else 20))
    w, mag = block_terms(kind, blocks)
    x = random_x(288, rng)
    f = q4.matvec_q4_0 if kind == "q4_0" else q4.matvec_q4_1
    for fa in (False, True):
        out = np.zeros(37, np.float32)
        f(blocks, x, out, 2, fa)
        if fa:
            check_float(out, w, mag, x, 18)
        else:
            check_int8_perm(out, w, mag, x, None, 18)


# ---------------- the int8 path's activations ----------------

def special_x(k, rng):
    """random x whose first blocks are edge cases of the activation quantization: half-way
    values (d = 1 exactly: amax 32512), a zero block, a NaN, subnormal scales (clamped q), a
    scale that underflows to 0, a dominant value"""
    x = random_x(k, rng)
    halves = [32512.0, 100.5, -100.5, 0.5, -0.5, 2.5, -2.5, 32511.5, -32511.5, 1.5, -1.5, 0.49999997]
    x[:32] = rng.uniform(-32512, 32512, 32).astype(np.float32)
    x[:len(halves)] = halves
    x[32:64] = 0
    x[64 + 5] = np.nan
    x[96:128] = (rng.standard_normal(32) * 1e-40).astype(np.float32)
    x[128:160] = np.float32(1e-45) * rng.choice([-1, 0, 1], 32).astype(np.float32)
    x[160 + 7] = 1e30
    return x


def readout_weights(kind, k, gs):
    """W (K, K) = identity in the order the kernel sees its inputs: out[j] = q_j d_b, the j-th
    activation exactly as the kernel holds it (every other term is an exact zero)"""
    eye = np.eye(k, dtype=np.uint8)
    nb = k // 32
    if kind == "q4g":
        return pack_q4g(eye), np.ones((k, k // gs), np.float16), np.zeros((k, k // gs), np.int8)
    bb = 18 if kind == "q4_0" else 20
    codes = (eye + 8 if kind == "q4_0" else eye).reshape(k, nb, 32)  # Q4_0: w = q - 8
    blocks = np.zeros((k, nb, bb), np.uint8)
    blocks[:, :, :2] = np.ones((k, nb), np.float16).view(np.uint8).reshape(k, nb, 2)  # d = 1, m = 0
    blocks[:, :, bb - 16:] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    return blocks.reshape(k, nb * bb)


@pytest.mark.parametrize("kind,k,gs,act_order", [("q4_0", 288, 0, False), ("q4_1", 288, 0, False),
                                                 ("q4g", 288, 32, False), ("q4g", 288, 96, True),
                                                 ("q4g", 256, 128, True)])
def test_int8_activations_exactly_as_simulated(simd, kind, k, gs, act_order):
    """The kernels' activations equal np_quantize_act's bit for bit (read out through identity
    weights), edge cases included."""
    rng = np.random.default_rng(k + gs)
    x = special_x(k, rng)
    perm = rng.permutation(k).astype(np.int32) if act_order else None
    xp = x[perm] if act_order else x
    q, d = np_quantize_act(xp)
    want = q.astype(np.float32)  # q d: one rounding, as the kernel's fma
    out = np.full(k, np.nan, np.float32)
    outs = np.full((2, k), np.nan, np.float32)
    if kind == "q4g":
        qs, sc, z = readout_weights(kind, k, gs)
        q4.matvec_q4g(qs, sc.view(np.uint16), z, perm, x, out, 2)
        q4.matmul_q4g(qs, sc.view(np.uint16), z, perm, np.stack([x, x]), outs, 2)
    else:
        blocks = readout_weights(kind, k, gs)
        (q4.matvec_q4_0 if kind == "q4_0" else q4.matvec_q4_1)(blocks, x, out, 2)
        (q4.matmul_q4_0 if kind == "q4_0" else q4.matmul_q4_1)(blocks, np.stack([x, x]), outs, 2)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(outs[1], want)
    # the edge cases did what they were meant to (without perm, blocks in place)
    if not act_order:
        assert list(want[1:11]) == [101, -101, 1, -1, 3, -3, 32512, -32512, 2, -2] and want[11] == 0
        assert not want[32:64].any() and want[64 + 5] == 0 and not want[128:160].any()
        assert np.abs(q[96:128] / d[96:128]).max() == QMAX


def np_quantize_q8_0(x):
    """the earlier one-level scheme (llama.cpp's Q8_0 activations), for comparison only"""
    xb = x.astype(np.float64).reshape(-1, 32)
    d = np.abs(xb).max(axis=1, keepdims=True) / 127
    return (round_half_away(xb / np.where(d == 0, 1, d)) * d).reshape(-1)


@pytest.mark.parametrize("kind", ["q4g", "q4_0", "q4_1"])
def test_int8_path_error_against_exact_x(simd, kind):
    """The int8 path against W x with x exact (float64): below 2e-4 of the output's scale on
    random inputs, also with outliers (measured 2.1-2.8e-5, with outliers 4.5e-5 .. 1.1e-4; the
    one-level int8 scheme it replaces: 5e-3 .. 1.7e-2)."""
    rng = np.random.default_rng(15 + len(kind))
    n, k = 264, 4096
    if kind == "q4g":
        qs, scales, zeros, perm, w, _ = random_q4g(n, k, 128, rng, False, True)

        def mv(x, out):
            q4.matvec_q4g(qs, scales.view(np.uint16), zeros, perm, x, out, 2)
    else:
        blocks, w, _ = random_blocks(kind, n, k, rng)
        f = q4.matvec_q4_0 if kind == "q4_0" else q4.matvec_q4_1

        def mv(x, out):
            f(blocks, x, out, 2)
    figures = []
    for outliers in (False, True):
        worst = worst_old = 0.0
        for _ in range(3):
            x = random_x(k, rng)
            if outliers:  # as LLaMA activations have: their blocks' other inputs get coarser
                x[rng.choice(k, 8, replace=False)] *= 50
            out = np.zeros(n, np.float32)
            mv(x, out)
            ref = w @ x.astype(np.float64)
            scale = np.abs(ref).max()
            worst = max(worst, np.abs(out - ref).max() / scale)
            worst_old = max(worst_old, np.abs(w @ np_quantize_q8_0(x) - ref).max() / scale)
        figures.append(f"{'with outliers' if outliers else 'normal x'} {worst:.2e} "
                       f"(one-level int8: {worst_old:.2e})")
        assert worst < 2e-4
    print(f"\n{kind} {simd}: int8 path max|out - W x| / max|W x|: " + ", ".join(figures))


# ---------------- native GPTQ ----------------

GPTQ_SHAPES = [(32, [32, 8]), (256, [32, 128, -1, 16]), (4096, [32, 128, -1])]
GPTQ_CASES = [(k, gs) for k, gss in GPTQ_SHAPES for gs in gss]


@pytest.mark.parametrize("k,gs", GPTQ_CASES)
@pytest.mark.parametrize("n", [8, 24, 264])
def test_gptq(simd, n, k, gs):
    rng = np.random.default_rng(n * 13 + k * 3 + gs)
    gs = k if gs == -1 else gs
    xs = token_batches(k, rng)
    m = k + k // gs
    for sym, act, v1, operm in [(True, False, True, False), (False, False, True, True),
                                (False, True, True, False), (False, True, False, True),
                                (True, True, False, False)]:
        qweight, qzeros, zero_add, scales, gidx, w, mag = random_gptq(k, n, gs, rng, sym, act, v1)
        op = rng.permutation(n).astype(np.int32) if operm else None
        wo = w[op] if operm else w
        mo = mag[op] if operm else mag
        sb = scales.view(np.uint16)

        def mv(x, out, nt):
            q4.matvec_gptq(qweight, qzeros, zero_add, sb, gidx, op, x, out, nt)

        def mm(x, out, nt):
            q4.matmul_gptq(qweight, qzeros, zero_add, sb, gidx, op, x, out, nt)

        def check(out, x):
            check_float(out, wo, mo, x, m)

        run_both(mv, mm, n, random_x(k, rng), xs, check)


def read_safetensors(path):
    """tiny reader: 8-byte header length, JSON header, raw little-endian tensors"""
    dtypes = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + hlen + a:8 + hlen + b], dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def borrow_case():
    path = shared_file("reference", "gptq", "gptq_v1_asym_borrow_case.safetensors")
    return {k.split(".", 1)[1]: np.ascontiguousarray(v) for k, v in read_safetensors(path).items()}


def borrow_weights(c):
    """(exact W (N, K) float64 from the true zeros, |terms|); the file's dequant_fp32 is that W
    rounded to f16 (GPTQModel's dequantize_weight computes in the scales' dtype)."""
    qw = c["qweight"].view(np.uint32)
    k, n = 8 * qw.shape[0], qw.shape[1]
    codes = np.stack([(qw >> np.uint32(4 * j)) & 15 for j in range(8)], axis=1).reshape(k, n).astype(np.int64)
    s = c["scales"].astype(np.float64)[c["g_idx"]]
    z = c["true_zeros"].astype(np.int64)[c["g_idx"]]
    w = (s * (codes - z)).T
    np.testing.assert_array_equal(w.astype(np.float16).astype(np.float32), c["dequant_fp32"])
    return w, (np.abs(s) * (codes + z)).T, codes


def check_borrow(out, c, w, mag, x, m):
    check_float(out, w, mag, x, m)
    d = c["dequant_fp32"].astype(np.float64)
    bound = 2.0 ** -11 * (np.abs(d) @ np.abs(x.astype(np.float64))) + f32_bound(mag, x, m)
    assert np.all(np.abs(out - d @ x.astype(np.float64)) <= bound)


def test_gptq_v1_borrow_reference(simd):
    """GPTQModel's own v1 asym export with zero points of 0 (borrowing words): the whole-word
    +0x11111111 rule reproduces its dequantized weights (dequant_fp32 @ x, to their f16
    rounding; the exact s * (q - z) to float32 rounding)."""
    c = borrow_case()
    w, mag, _ = borrow_weights(c)
    n, k = w.shape
    rng = np.random.default_rng(6)
    lin = GPTQLinear(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], v1=True)
    assert (lin.out_features, lin.in_features) == (n, k)
    x = random_x(k, rng)
    out = np.zeros(n, np.float32)
    lin(x, out, 2)
    check_borrow(out, c, w, mag, x, k)
    xs = np.stack([random_x(k, rng) for _ in range(5)])
    outs = np.zeros((5, n), np.float32)
    lin.batch(xs, outs, 2)
    for t in range(5):
        check_borrow(outs[t], c, w, mag, xs[t], k)
    # the case really borrows: reading its words as v2 (no add) is far off
    lin2 = GPTQLinear(c["qweight"], c["qzeros"], c["scales"], c["g_idx"], v1=False)
    lin2(x, out, 1)
    assert np.abs(out - w @ x).max() > 1e-2 * np.abs(w @ x).max()
    # and its v2 words hold the true zeros
    lin3 = GPTQLinear(c["qweight"], c["qzeros_v2"], c["scales"], c["g_idx"], v1=False)
    lin3(x, out, 1)
    check_borrow(out, c, w, mag, x, k)


def test_gptq_case_as_q4g(simd):
    """The same case repacked into q4g (inputs sorted by group, codes transposed, true zeros)
    gives the same product through the q4g kernels."""
    c = borrow_case()
    w, mag, codes = borrow_weights(c)
    n, k = w.shape
    perm = np.argsort(c["g_idx"], kind="stable").astype(np.int32)
    lin = Q4GLinear(pack_q4g(codes[perm].T.astype(np.uint8)), np.ascontiguousarray(c["scales"].T),
                    np.ascontiguousarray(c["true_zeros"].T.astype(np.int8)), perm)
    x = random_x(k, np.random.default_rng(7))
    out = np.zeros(n, np.float32)
    lin.float_act = True
    lin(x, out)
    check_borrow(out, c, w, mag, x, k)
    lin.float_act = False
    lin(x, out)
    check_int8_perm(out, w, mag, x, perm, k)


# ---------------- shapes, memory, classes ----------------

def test_reads_readonly_memmap(tmp_path, simd):
    rng = np.random.default_rng(8)
    qs, scales, zeros, perm, _, _ = random_q4g(6, 256, 128, rng, False, True)
    blocks, _, _ = random_blocks("q4_0", 6, 256, rng)
    p = tmp_path / "w.bin"
    p.write_bytes(qs.tobytes() + scales.tobytes() + zeros.tobytes() + perm.tobytes() + blocks.tobytes())
    off = 0
    views = []
    for a in (qs, scales.view(np.uint16), zeros, perm, blocks):
        views.append(np.memmap(p, dtype=a.dtype, mode="r", offset=off, shape=a.shape))
        off += a.nbytes
    x = random_x(256, rng)
    out, ref = np.zeros(6, np.float32), np.zeros(6, np.float32)
    q4.matvec_q4g(*views[:4], x, out, 2)
    q4.matvec_q4g(qs, scales.view(np.uint16), zeros, perm, x, ref, 2)
    np.testing.assert_array_equal(out, ref)
    q4.matvec_q4_0(views[4], x, out, 2)
    q4.matvec_q4_0(blocks, x, ref, 2)
    np.testing.assert_array_equal(out, ref)


def test_matmul_writes_into_a_cache_slice():
    rng = np.random.default_rng(9)
    blocks, w, mag = random_blocks("q4_1", 12, 64, rng)
    x = np.stack([random_x(64, rng) for _ in range(3)])
    cache = np.zeros((2, 8, 12), np.float32)
    q4.matmul_q4_1(blocks, x, cache[1, 4:7], 2)
    for t in range(3):
        check_int8_perm(cache[1, 4 + t], w, mag, x[t], None, 4)
    assert not cache[0].any() and not cache[1, :4].any() and not cache[1, 7:].any()


def test_rejects_bad_shapes():
    qs = np.zeros((3, 32), np.uint8)  # K = 64
    sc = np.zeros((3, 2), np.uint16)
    z = np.zeros((3, 2), np.int8)
    x = np.zeros(64, np.float32)
    out = np.zeros(3, np.float32)
    q4.matvec_q4g(qs, sc, z, None, x, out)  # the valid call
    for bad in [
        lambda: q4.matvec_q4g(np.zeros((3, 24), np.uint8), np.zeros((3, 3), np.uint16), np.zeros((3, 3), np.int8), None, np.zeros(48, np.float32), out),  # K % 32
        lambda: q4.matvec_q4g(qs, np.zeros((3, 3), np.uint16), np.zeros((3, 3), np.int8), None, x, out),  # 3 groups of 64
        lambda: q4.matvec_q4g(qs, np.zeros((3, 0), np.uint16), np.zeros((3, 0), np.int8), None, x, out),
        lambda: q4.matvec_q4g(qs, np.zeros((4, 2), np.uint16), z, None, x, out),
        lambda: q4.matvec_q4g(qs, sc, np.zeros((3, 1), np.int8), None, x, out),
        lambda: q4.matvec_q4g(qs, sc, z, np.arange(63, dtype=np.int32), x, out),
        lambda: q4.matvec_q4g(qs, sc, z, np.full(64, 64, np.int32), x, out),  # out of range
        lambda: q4.matvec_q4g(qs, sc, z, np.full(64, -1, np.int32), x, out),
        lambda: q4.matvec_q4g(qs, sc, z, None, np.zeros(63, np.float32), out),
        lambda: q4.matvec_q4g(qs, sc, z, None, x, np.zeros(4, np.float32)),
        lambda: q4.matmul_q4g(qs, sc, z, None, np.zeros((2, 64), np.float32), np.zeros((3, 3), np.float32)),
        lambda: q4.matmul_q4g(qs, sc, z, None, np.zeros((2, 32), np.float32), np.zeros((2, 3), np.float32)),
        lambda: q4.matvec_q4g(qs.astype(np.int8), sc, z, None, x, out),  # dtypes
        lambda: q4.matvec_q4g(qs, sc.view(np.float16), z, None, x, out),
        lambda: q4.matvec_q4g(qs, sc, z, None, x.astype(np.float64), out),
    ]:
        with pytest.raises(ValueError):
            bad()
    b0 = np.zeros((3, 36), np.uint8)
    q4.matvec_q4_0(b0, x, out)
    q4.matvec_q4_1(np.zeros((3, 40), np.uint8), x, out)
    for bad in [
        lambda: q4.matvec_q4_0(np.zeros((3, 35), np.uint8), x, out),
        lambda: q4.matvec_q4_1(b0, x, out),  # 36 bytes is not whole 20-byte blocks
        lambda: q4.matvec_q4_0(b0, np.zeros(32, np.float32), out),
        lambda: q4.matvec_q4_0(b0, x, np.zeros(2, np.float32)),
        lambda: q4.matmul_q4_0(b0, np.zeros((2, 64), np.float32), np.zeros((2, 4), np.float32)),
        lambda: q4.matmul_q4_1(np.zeros((3, 40), np.uint8), np.zeros((2, 64), np.float32), np.zeros((3, 3), np.float32)),
    ]:
        with pytest.raises(ValueError):
            bad()
    qw = np.zeros((8, 16), np.int32)  # K = 64, N = 16
    qz = np.zeros((2, 2), np.int32)
    gsc = np.zeros((2, 16), np.uint16)
    gi = (np.arange(64) // 32).astype(np.int32)
    out16 = np.zeros(16, np.float32)
    q4.matvec_gptq(qw, qz, V1_ADD, gsc, gi, None, x, out16)
    for bad in [
        lambda: q4.matvec_gptq(np.zeros((8, 12), np.int32), qz, 0, np.zeros((2, 12), np.uint16), gi, None, x, np.zeros(12, np.float32)),  # N % 8
        lambda: q4.matvec_gptq(qw, np.zeros((2, 3), np.int32), 0, gsc, gi, None, x, out16),
        lambda: q4.matvec_gptq(qw, np.zeros((3, 2), np.int32), 0, gsc, gi, None, x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, np.zeros((2, 8), np.uint16), gi, None, x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi[:63], None, x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, None, None, x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi + 1, None, x, out16),  # group 2 of 2
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi, np.arange(15, dtype=np.int32), x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi, np.arange(1, 17, dtype=np.int32), x, out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi, None, np.zeros(56, np.float32), out16),
        lambda: q4.matvec_gptq(qw, qz, 0, gsc, gi, None, x, out),
        lambda: q4.matmul_gptq(qw, qz, 0, gsc, gi, None, np.zeros((2, 64), np.float32), np.zeros((3, 16), np.float32)),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_q4g_linear():
    rng = np.random.default_rng(10)
    qs, scales, zeros, perm, w, mag = random_q4g(40, 256, 64, rng, False, True)
    lin = Q4GLinear(qs, scales, zeros, perm)
    assert lin.kind == "gptq4" and (lin.out_features, lin.in_features) == (40, 256)
    assert lin.float_act is False and lin.group_size == 64
    assert lin.nbytes == qs.nbytes + scales.nbytes + zeros.nbytes + perm.nbytes
    x = random_x(256, rng)
    out = np.zeros(40, np.float32)
    lin(x, out, 2)
    check_int8_perm(out, w, mag, x, perm, 12)
    xs = np.stack([random_x(256, rng) for _ in range(4)])
    outs = np.zeros((4, 40), np.float32)
    lin.float_act = True
    lin.batch(xs, outs, 2)
    for t in range(4):
        check_float(outs[t], w, mag, xs[t], 12)
    # gs % 32 != 0 takes the float path by itself
    qs, scales, zeros, _, w, mag = random_q4g(5, 96, 24, rng, True, False)
    lin = Q4GLinear(qs, scales, zeros)
    assert lin.nbytes == qs.nbytes + scales.nbytes + zeros.nbytes
    x = random_x(96, rng)
    out = np.zeros(5, np.float32)
    lin(x, out)
    check_float(out, w, mag, x, 8)


def test_q4g_linear_validates():
    rng = np.random.default_rng(11)
    qs, scales, zeros, perm, _, _ = random_q4g(4, 64, 32, rng, False, True)
    Q4GLinear(qs, scales, zeros, perm)
    bad_perm = perm.copy()
    bad_perm[0] = bad_perm[1]
    bad_zeros = zeros.copy()
    bad_zeros[0, 0] = 16
    neg_zeros = zeros.copy()
    neg_zeros[1, 1] = -1
    for args in [
        (qs.astype(np.int8), scales, zeros, perm),
        (qs, scales.astype(np.float32), zeros, perm),
        (qs, scales, zeros.astype(np.int32), perm),
        (qs, scales, zeros, perm.astype(np.int64)),
        (qs, scales, zeros, bad_perm),  # not a permutation
        (qs, scales, bad_zeros, perm),
        (qs, scales, neg_zeros, perm),
        (qs, scales[:, :1].copy(), zeros, perm),
        (qs, scales, zeros[:3], perm),
        (qs[:, :16], scales, zeros, perm),
        (np.asfortranarray(qs), scales, zeros, perm),
        (qs, scales, zeros, perm[:-1]),
        (qs[:, :12].copy(), scales[:, :1].copy(), zeros[:, :1].copy(), None),  # K = 24
        (qs, np.zeros((4, 3), np.float16), np.zeros((4, 3), np.int8), perm),  # 3 does not divide 64
    ]:
        with pytest.raises(ValueError):
            Q4GLinear(*args)


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_q4_block_linear(kind):
    rng = np.random.default_rng(12)
    blocks, w, mag = random_blocks(kind, 20, 288, rng)
    cls = Q4_0Linear if kind == "q4_0" else Q4_1Linear
    lin = cls(blocks)
    assert lin.kind == kind and (lin.out_features, lin.in_features) == (20, 288)
    assert lin.nbytes == blocks.nbytes and lin.float_act is False
    x = random_x(288, rng)
    out = np.zeros(20, np.float32)
    lin(x, out, 2)
    check_int8_perm(out, w, mag, x, None, 18)
    lin.float_act = True
    outs = np.zeros((2, 20), np.float32)
    lin.batch(np.stack([x, x]), outs, 2)
    check_float(outs[1], w, mag, x, 18)
    for bad in (blocks.astype(np.int8), blocks[:, :-1].copy(), np.asfortranarray(blocks), blocks[0]):
        with pytest.raises(ValueError):
            cls(bad)


def test_gptq_linear():
    rng = np.random.default_rng(13)
    k, n, gs = 256, 24, 32
    qweight, qzeros, zero_add, scales, gidx, w, mag = random_gptq(k, n, gs, rng, False, True, True)
    op = rng.permutation(n).astype(np.int32)
    bias = rng.standard_normal(n).astype(np.float32)
    lin = GPTQLinear(qweight, qzeros, scales, gidx, v1=True, out_perm=op, bias=bias)
    assert lin.kind == "gptq4" and (lin.out_features, lin.in_features) == (n, k)
    assert lin.nbytes == sum(a.nbytes for a in (qweight, qzeros, scales, gidx, op, bias))
    x = random_x(k, rng)
    out = np.zeros(n, np.float32)
    lin(x, out, 2)
    ref = w[op] @ x.astype(np.float64) + bias
    assert np.all(np.abs(out - ref) <= f32_bound(mag[op], x, k + 8) + 1e-6 * np.abs(bias))
    outs = np.zeros((3, n), np.float32)
    lin.batch(np.stack([x, x, x]), outs, 2)
    np.testing.assert_array_equal(outs[2], out)


def test_gptq_linear_validates():
    rng = np.random.default_rng(14)
    k, n = 64, 16
    qweight, qzeros, _, scales, gidx, _, _ = random_gptq(k, n, 32, rng, False, False, True)
    GPTQLinear(qweight, qzeros, scales, gidx, v1=True)
    bad_g = gidx.copy()
    bad_g[3] = 2
    for kw in [
        dict(qweight=qweight.view(np.uint32)),
        dict(qweight=qweight[:, :8].copy()),
        dict(qzeros=qzeros.astype(np.int64)),
        dict(qzeros=qzeros[:1].copy()),
        dict(scales=scales.astype(np.float32)),
        dict(scales=scales[:, :8].copy()),
        dict(g_idx=bad_g),
        dict(g_idx=gidx[:-8].copy()),
        dict(g_idx=gidx.astype(np.int64)),
        dict(out_perm=np.zeros(n, np.int32)),  # not a permutation
        dict(out_perm=np.arange(n + 1, dtype=np.int32)),
        dict(bias=np.zeros(n + 1, np.float32)),
        dict(bias=np.zeros(n, np.float64)),
        dict(qweight=np.asfortranarray(qweight)),
    ]:
        args = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=gidx, v1=True)
        args.update(kw)
        with pytest.raises(ValueError):
            GPTQLinear(**args)


# ---------------- several matrices of one input in one call ----------------

MANY = {"q4_0": (q4.matvec_q4_0, q4.matvec_q4_0_many), "q4_1": (q4.matvec_q4_1, q4.matvec_q4_1_many)}


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
@pytest.mark.parametrize("k", [32, 288, 4096, 8224])
@pytest.mark.parametrize("rows", [(1,), (7, 264), (264, 1, 7), (576, 192, 192, 3)])
def test_matvec_many_equals_one_call_each(simd, split, kind, k, rows):
    """A layer's q, k, v (or gate, up) in one call: the same bits as a matvec each, at 1 and 2
    threads (each thread takes its share of every matrix)."""
    rng = np.random.default_rng(k + len(rows))
    ws = [random_blocks(kind, n, k, rng)[0] for n in rows]
    one, many = MANY[kind]
    assert_many_equal_single(one, many, ws, random_x(k, rng))


@pytest.mark.parametrize("k,gs", [(256, 32), (4096, 128), (8320, -1), (8320, 64)])
@pytest.mark.parametrize("rows", [(7, 264), (264, 1, 7), (576, 192, 192, 3)])
@pytest.mark.parametrize("act_order", [False, True])
def test_matvec_q4g_many_equals_one_call_each(simd, split, k, gs, rows, act_order):
    """q4g matrices with one group size and one input permutation (GPTQ act-order q, k, v):
    one call, the same bits as a matvec each, at 1 and 2 threads."""
    rng = np.random.default_rng(k + len(rows) + gs)
    gs = k if gs == -1 else gs
    mats = [random_q4g(n, k, gs, rng, False, act_order) for n in rows]
    perm = mats[0][3]
    parts = {id(m[0]): (m[1].view(np.uint16), m[2]) for m in mats}

    def one(qs, x, out, nt):
        q4.matvec_q4g(qs, parts[id(qs)][0], parts[id(qs)][1], perm, x, out, nt)

    def many(qss, x, outs, nt):
        q4.matvec_q4g_many(qss, [parts[id(q)][0] for q in qss], [parts[id(q)][1] for q in qss],
                           perm, x, outs, nt)

    assert_many_equal_single(one, many, [m[0] for m in mats], random_x(k, rng))


def test_matvec_q4g_many_rejects_bad_shapes():
    rng = np.random.default_rng(7)
    a = random_q4g(8, 256, 32, rng, False, True)
    b = random_q4g(8, 256, 64, rng, False, True)
    c = random_q4g(8, 256, 16, rng, False, False)
    x, o = np.ones(256, np.float32), np.empty(8, np.float32)

    def call(ms, perm=None, x=x, outs=None):
        q4.matvec_q4g_many([m[0] for m in ms], [m[1].view(np.uint16) for m in ms],
                           [m[2] for m in ms], perm, x, outs or [np.empty(8, np.float32) for _ in ms])

    with pytest.raises(ValueError, match="matrix 1 .* 4 groups.* 8 groups"):
        call([a, b])
    with pytest.raises(ValueError, match="multiples of 32"):
        call([c])
    with pytest.raises(ValueError, match="x has 255"):
        call([a], x=np.ones(255, np.float32))
    with pytest.raises(ValueError, match="perm has 3 entries"):
        call([a], perm=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"perm\[0\] = 256"):
        call([a], perm=np.full(256, 256, np.int32))
    with pytest.raises(ValueError, match="1 to 4 matrices"):
        call([a], outs=[o, o])
    with pytest.raises(ValueError, match="2 qs, 1 scales"):
        q4.matvec_q4g_many([a[0], a[0]], [a[1].view(np.uint16)], [a[2], a[2]], None, x, [o, o])


def test_q4g_linear_many_only_for_a_shared_perm():
    """Q4GLinear.many_plan is one call for equal perms (equal contents, different arrays) and
    None for different perms, group sizes or float activations; either way matvec_same_input
    gives each Linear's own result, also after float_act changes."""
    rng = np.random.default_rng(8)

    def lin(n, gs, perm):
        qs, scales, zeros, _, _, _ = random_q4g(n, 256, gs, rng, False, False)
        return Q4GLinear(qs, scales, zeros, perm)

    p0 = rng.permutation(256).astype(np.int32)
    a, b, c = lin(12, 32, p0), lin(20, 32, p0.copy()), lin(4, 32, rng.permutation(256).astype(np.int32))
    d, e = lin(8, 64, p0), lin(8, 32, None)
    f = lin(8, 32, p0)
    f.float_act = True
    x = random_x(256, rng)
    for lins, one_call in (([a, b], True), ([a, c], False), ([a, d], False), ([a, e], False),
                           ([e, e], True), ([a, f], False)):
        assert (Q4GLinear.many_plan(lins) is not None) is one_call
        outs = [np.full(l.out_features, np.nan, np.float32) for l in lins]
        matvec_same_input(lins, x, outs, 2)
        for lin_, o in zip(lins, outs):
            ref = np.empty(lin_.out_features, np.float32)
            lin_(x, ref, 2)
            np.testing.assert_array_equal(o, ref)
    b.float_act = True  # the kept plan for [a, b] is not used for the new setting
    outs = [np.full(n, np.nan, np.float32) for n in (12, 20)]
    matvec_same_input([a, b], x, outs, 2)
    for lin_, o in zip([a, b], outs):
        ref = np.empty(lin_.out_features, np.float32)
        lin_(x, ref, 2)
        np.testing.assert_array_equal(o, ref)


def test_matvec_many_rejects_bad_shapes():
    rng = np.random.default_rng(5)
    a, b = random_blocks("q4_0", 8, 64, rng)[0], random_blocks("q4_0", 8, 96, rng)[0]
    x, o = np.ones(64, np.float32), np.empty(8, np.float32)
    with pytest.raises(ValueError, match="matrix 1 is 8x96"):
        q4.matvec_q4_0_many([a, b], x, [o, np.empty(8, np.float32)])
    with pytest.raises(ValueError, match="out has 7"):
        q4.matvec_q4_0_many([a], x, [np.empty(7, np.float32)])
    with pytest.raises(ValueError, match="1 to 4 matrices"):
        q4.matvec_q4_0_many([a] * 5, x, [o] * 5)
    with pytest.raises(ValueError, match="1 to 4 matrices"):
        q4.matvec_q4_0_many([a, a], x, [o])


def test_matvec_same_input_falls_back_to_one_call_each():
    """Mixed kinds, or float activations, take one call per product: the same results as
    calling each Linear."""
    rng = np.random.default_rng(6)
    q0 = Q4_0Linear(random_blocks("q4_0", 12, 64, rng)[0])
    q1 = Q4_1Linear(random_blocks("q4_1", 20, 64, rng)[0])
    q0f = Q4_0Linear(random_blocks("q4_0", 4, 64, rng)[0])
    q0f.float_act = True
    x = random_x(64, rng)
    for lins in ([q0, q1], [q0, q0f], [q0, q0], [q1]):
        ref = []
        for lin in lins:
            ref.append(np.empty(lin.out_features, np.float32))
            lin(x, ref[-1], 2)
        outs = [np.full(lin.out_features, np.nan, np.float32) for lin in lins]
        matvec_same_input(lins, x, outs, 2)
        for r, o in zip(ref, outs):
            np.testing.assert_array_equal(o, r)



@pytest.mark.parametrize("kind", ["q4g", "q4g-sliced", "q4_0"])
def test_work_stealing_equals_one_thread(simd, kind):
    """Rows shared out by work stealing, one matrix and three in one call (the units run on
    across matrices and slices): the same bits as at 1 thread, every time."""
    rng = np.random.default_rng(len(kind))
    k, rows = 512, (1001, 7, 264)
    if kind == "q4_0":  # with a matrix of no rows among them
        rows = (1001, 7, 0, 264)
        ws = [random_blocks("q4_0", n, k, rng)[0] if n else np.empty((0, k // 32 * 18), np.uint8)
              for n in rows]
        one, many = q4.matvec_q4_0, q4.matvec_q4_0_many
    else:
        s = 2 if kind == "q4g-sliced" else 1
        mats = [random_q4g(n, k, 64, rng, False, True) for n in rows]
        perm = mats[0][3]
        ws = [slice_q4g(m[0], m[1], m[2], s) for m in mats]

        def one(w, x, out, nt):
            q4.matvec_q4g(w[0], w[1].view(np.uint16), w[2], perm, x, out, nt, False, s)

        def many(ws, x, outs, nt):
            q4.matvec_q4g_many([w[0] for w in ws], [w[1].view(np.uint16) for w in ws],
                               [w[2] for w in ws], perm, x, outs, nt, slices=s)
    assert_stealing_equals_one_thread(q4, one, many, ws, rows, random_x(k, rng))


@pytest.mark.parametrize("units,nt,chunk,ids", [
    (101, 2, 1, [1, 0]), (101, 2, 3, [0, 1]), (1000, 3, 4, [2, 0, 1]), (1000, 3, 1, [1, 2, 0]),
    (5, 4, 1, [3, 2, 1, 0]), (7, 8, 1, list(range(7, -1, -1))), (0, 2, 1, [0, 1]),
    (50, 2, 0, [1, 0])])
def test_steal_claims_cover_every_unit_once(units, nt, chunk, ids):
    """The work-stealing scheduler (simd.h) on its own, threads asking in turn: every unit
    handed out exactly once; a thread whose share is done takes from another's (the back half
    of its rest, while at least 2 chunks are left), and claims never exceed a quarter of the
    rest of the share or a chunk, whichever is more."""
    claims = q4._steal_claims(units, nt, chunk, ids)
    got = sorted(u for _, u0, u1 in claims for u in range(u0, u1))
    assert got == list(range(units))
    first = ids[0]
    own = range(units * first // nt, units * (first + 1) // nt)
    taken = [(u0, u1) for i, u0, u1 in claims if i == first]
    if units >= 2 * nt * max(chunk, 1) * 4:
        assert any(u0 not in own for u0, _ in taken), "the first thread never stole"
        lo, hi = taken[0]
        assert hi - lo == max(max(chunk, 1), len(own) >> 2)
