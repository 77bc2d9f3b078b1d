"""ops.sample_topp (run.c's sample_topp in C, no per-token allocation) against a NumPy
transcription of run.c's algorithm, and the sampler's vocabulary-sized scratch."""
import tracemalloc

import numpy as np
import pytest

from pecca._kernels import ops
from pecca.sampling import Sampler, sample_topp

F32 = np.float32


def topp_reference(probs, top_p, coin):
    """run.c's sample_topp in NumPy: candidates >= (1 - top_p) / (n - 1), largest first (ties
    in index order), cut after the cumulative float32 sum exceeds top_p, then the first whose
    cumulative sum exceeds coin times the kept mass."""
    n = len(probs)
    if n == 1:
        return 0
    cutoff = (F32(1.0) - F32(top_p)) / F32(n - 1)
    idx = np.flatnonzero(probs >= cutoff)
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order], dtype=F32)
    over = np.flatnonzero(cum > F32(top_p))
    last = int(over[0]) if len(over) else len(order) - 1
    r = F32(coin) * cum[last]
    i = int(np.searchsorted(cum[:last + 1], r, side="right"))
    return int(order[min(i, last)])


def softmax(z):
    e = np.exp(z - z.max())
    return (e / e.sum()).astype(F32)


@pytest.mark.parametrize("n", [2, 3, 31, 1000, 49152])
def test_matches_reference(n):
    rng = np.random.default_rng(n)
    scratch = np.empty(n * ops.TOPP_SCRATCH_BYTES, np.uint8)
    for trial in range(40):
        scale = [0.1, 1.0, 5.0, 20.0][trial % 4]
        z = (rng.standard_normal(n) * scale).astype(F32)
        if trial % 5 == 0:  # ties: repeated logits
            z = np.round(z)
        probs = softmax(z)
        for top_p in (0.05, 0.5, 0.9, 0.99):
            cutoff = (F32(1.0) - F32(top_p)) / F32(n - 1)
            for coin in (0.0, 0.3, 0.999999):
                got = ops.sample_topp(probs, F32(top_p), F32(coin), scratch)
                if (probs >= cutoff).any():
                    assert got == topp_reference(probs, top_p, coin)
                else:  # no candidate at all (run.c reads before its array): the most probable
                    assert got == int(np.argmax(probs))


def test_one_token_and_bad_scratch():
    assert ops.sample_topp(np.ones(1, F32), F32(0.9), F32(0.5), np.empty(8, np.uint8)) == 0
    with pytest.raises(ValueError):
        ops.sample_topp(np.full(4, 0.25, F32), F32(0.9), F32(0.5), np.empty(3, np.uint8))


def test_everything_under_the_cutoff_takes_the_most_probable():
    """A near-uniform softmax and a tiny top_p leave no candidate (run.c reads before its
    array there); the most probable token is returned."""
    probs = np.full(10, 0.1, F32)
    probs[7] = F32(0.1000001)
    assert ops.sample_topp(probs, F32(1e-4), F32(0.5), np.empty(80, np.uint8)) == 7


def test_module_function_keeps_its_signature():
    probs = softmax(np.arange(20, dtype=F32) / 3)
    assert sample_topp(probs, F32(0.9), 0.25) == topp_reference(probs, 0.9, 0.25)


@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=40),
                                dict(temperature=1.0, top_p=1.0), dict(temperature=0.7, min_p=0.05),
                                dict(temperature=0.0)])
def test_sampler_allocates_nothing_vocabulary_sized_per_token(kw):
    vocab = 49152
    s = Sampler(vocab, seed=3, **kw)
    logits = np.random.default_rng(0).standard_normal(vocab).astype(F32)
    work = logits.copy()
    s.sample(work, [1, 2, 3])
    tracemalloc.start()
    try:
        worst = 0
        for _ in range(5):
            np.copyto(work, logits)
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            s.sample(work, [1, 2, 3])
            worst = max(worst, tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert worst < vocab  # less than one byte per vocabulary entry
