"""Checks shared by the kernel tests of several weight formats."""
import numpy as np


def assert_matmul_rows_equal_matvec(mv, mm, xs, n, threads=(1, 2)):
    """mv(x, out) one token, mm(x, out, nt) a batch, both into n outputs: for every batch size
    1..len(xs) and each thread count, each row of mm is mv's bit for bit."""
    one = np.zeros(n, np.float32)
    ref = np.zeros((len(xs), n), np.float32)
    for i in range(len(xs)):
        mv(xs[i], one)
        ref[i] = one
    for t in range(1, len(xs) + 1):
        for nt in threads:
            out = np.full((t, n), np.nan, np.float32)
            mm(xs[:t], out, nt)
            np.testing.assert_array_equal(out, ref[:t])


def assert_many_equal_single(one, many, ws, x, threads=(1, 2)):
    """one(w, x, out, nt) a matvec, many(ws, x, outs, nt) the same for several matrices of the
    same input in one call: each out equals one's bit for bit, at each thread count."""
    for nt in threads:
        ref = []
        for w in ws:
            ref.append(np.full(w.shape[0], np.nan, np.float32))
            one(w, x, ref[-1], nt)
        outs = [np.full(w.shape[0], np.nan, np.float32) for w in ws]
        many(ws, x, outs, nt)
        for r, o in zip(ref, outs):
            np.testing.assert_array_equal(o, r)
