"""Checks shared by the kernel tests of several weight formats."""
from contextlib import contextmanager

import numpy as np
import pytest


@contextmanager
def forced_stealing(module):
    """Within: module's multi-thread matvecs share their rows by work stealing (simd.h) at every
    size, a quad at a time (otherwise only products from memory do, in 64 KB claims or more)."""
    old = module._steal_settings(0, 1)
    try:
        yield
    finally:
        module._steal_settings(*old)


def split_fixture(module):
    """A fixture `split` for module's tests: how a 2-thread matvec shares its rows, static
    shares or work stealing (which products from memory use) forced on every size."""
    @pytest.fixture(params=["static", "steal"])
    def split(request):
        if request.param == "steal":
            with forced_stealing(module):
                yield request.param
        else:
            yield request.param
    return split


def assert_stealing_equals_one_thread(module, one, many, ws, rows, x, reps=10):
    """one(w, x, out, nt) a matvec, many(ws, x, outs, nt) several in one call (or None), ws of
    rows outputs each: with forced stealing at 2, 3 and 4 threads (more threads than cores:
    preempted threads are stolen from), every output the same bits as one's at 1 thread, reps
    times."""
    ref = [np.full(r, np.nan, np.float32) for r in rows]
    for w, r in zip(ws, ref):
        one(w, x, r, 1)
    with forced_stealing(module):
        for _ in range(reps):
            for nt in (2, 3, 4):
                out = np.full(len(ref[0]), np.nan, np.float32)
                one(ws[0], x, out, nt)
                np.testing.assert_array_equal(out, ref[0])
                if many is not None:
                    outs = [np.full(len(r), np.nan, np.float32) for r in ref]
                    many(ws, x, outs, nt)
                    for o, r in zip(outs, ref):
                        np.testing.assert_array_equal(o, r)


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
