"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, seeded.

With top_k = 0 this is llama2.c run.c's sampler step for step: logits / temperature,
softmax (float32, sequential sum), one coin from its xorshift64* RNG per token, then
multinomial sampling (top_p = 1) or nucleus sampling over the probabilities sorted in
descending order (a stable sort, as glibc's qsort is for these sizes). The same seed,
temperature and top-p therefore give run.c's exact tokens. top-k (pecca's addition) keeps
the k largest logits before the softmax.
"""
import math
import os

import numpy as np

from pecca._kernels import ops
from pecca.errors import InvalidArgumentError

MASK64 = (1 << 64) - 1
F32 = np.float32


class XorShiftRng:
    """llama2.c's random_u32 / random_f32 (xorshift64*)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def f32(self) -> np.float32:
        """A float32 in [0, 1)."""
        return F32(self.u32() >> 8) / F32(16777216.0)


def validate_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")


def resolve_seed(seed):
    """A seed for the RNG: the given one, or a random one when None. The xorshift state must
    not be 0 (it would stay 0), so 0 is replaced by a fixed non-zero constant."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    if not isinstance(seed, int) or seed < 0 or seed > MASK64:
        raise InvalidArgumentError(f"seed must be an integer in 0..2**64-1, got {seed}")
    return seed or 0x9E3779B97F4A7C15


class Sampler:
    def __init__(self, vocab_size: int, temperature: float = 1.0, top_p: float = 0.9,
                 top_k: int = 0, seed=None):
        validate_sampling(temperature, top_p, top_k)
        self.vocab_size = vocab_size
        self.temperature = F32(temperature)
        self.top_p = F32(top_p)
        self.top_k = top_k
        self.seed = resolve_seed(seed)
        self.rng = XorShiftRng(self.seed)

    def sample(self, logits: np.ndarray) -> int:
        """The next token. `logits` (float32, vocab_size) is overwritten."""
        if self.temperature == 0:
            return int(np.argmax(logits))  # first maximum, as run.c
        if 0 < self.top_k < self.vocab_size:
            kth = np.partition(logits, -self.top_k)[-self.top_k]
            logits[logits < kth] = -np.inf
        np.divide(logits, self.temperature, out=logits)
        ops.softmax(logits)
        coin = self.rng.f32()
        if self.top_p >= 1:
            return sample_mult(logits, coin)
        return sample_topp(logits, self.top_p, coin)


def sample_mult(probs: np.ndarray, coin) -> int:
    """The first index whose cumulative probability exceeds coin (run.c's sample_mult)."""
    cdf = np.cumsum(probs, dtype=F32)  # sequential float32 sums, as run.c's loop
    i = int(np.searchsorted(cdf, coin, side="right"))
    return min(i, len(probs) - 1)


def sample_topp(probs: np.ndarray, top_p, coin) -> int:
    """Nucleus sampling, run.c's sample_topp."""
    n = len(probs)
    if n == 1:
        return 0
    cutoff = (F32(1.0) - top_p) / F32(n - 1)
    idx = np.flatnonzero(probs >= cutoff)
    order = idx[np.argsort(-probs[idx], kind="stable")]
    cum = np.cumsum(probs[order], dtype=F32)
    over = np.flatnonzero(cum > top_p)
    last = int(over[0]) if len(over) else len(order) - 1
    r = F32(coin) * cum[last]
    i = int(np.searchsorted(cum[:last + 1], r, side="right"))
    return int(order[min(i, last)])
