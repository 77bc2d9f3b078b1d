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
