"""Choosing the next token from the logits: greedy, temperature, top-k, top-p, seeded.

With top_k = 0 this is llama2.c run.c's sampler step for step: logits / temperature,
softmax (float32, sequential sum), one coin from its xorshift64* RNG per token, then
multinomial sampling (top_p = 1) or nucleus sampling over the probabilities sorted in
descending order (a stable sort, as glibc's qsort is for these sizes). The same seed,
temperature and top-p therefore give run.c's exact tokens. top-k (pecca's addition) keeps
the k largest logits before the softmax.

Two more filters work on the logits first, and only when asked for, so the default path stays
run.c's:
  - repetition_penalty (llama.cpp's repeat_penalty, transformers' repetition_penalty): each
    distinct token among the last `repeat_last_n` tokens has its logit divided by the penalty
    when positive and multiplied by it when negative (also when greedy);
  - min_p (llama.cpp's): tokens whose probability is below min_p times the most likely one's
    are dropped, i.e. logits below max + ln(min_p), before the temperature.
"""
import math
import os
from typing import Sequence

import numpy as np

from pecca._kernels import ops
from pecca.errors import InvalidArgumentError, NonFiniteLogitsError  # noqa: F401 (re-exported)

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


def _number(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def validate_sampling(temperature: float, top_p: float, top_k: int, min_p: float = 0.0,
                      repetition_penalty: float = 1.0, repeat_last_n: int = 64) -> None:
    if not (_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (_number(top_p) and 0 < top_p <= 1):
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise InvalidArgumentError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not (_number(min_p) and 0 <= min_p <= 1):
        raise InvalidArgumentError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")
    if not (_number(repetition_penalty) and math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise InvalidArgumentError(f"repetition_penalty must be a finite number > 0 (1 disables it), "
                                   f"got {repetition_penalty}")
    if not (isinstance(repeat_last_n, int) and not isinstance(repeat_last_n, bool) and repeat_last_n >= -1):
        raise InvalidArgumentError(f"repeat_last_n must be an integer >= -1 (0 disables the penalty, "
                                   f"-1 means every previous token), got {repeat_last_n}")


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
                 top_k: int = 0, seed=None, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 repeat_last_n: int = 64):
        validate_sampling(temperature, top_p, top_k, min_p, repetition_penalty, repeat_last_n)
        self.vocab_size = vocab_size
        self.temperature = F32(temperature)
        self.top_p = F32(top_p)
        self.top_k = top_k
        self.min_p = float(min_p)
        self.repetition_penalty = F32(repetition_penalty)
        self.repeat_last_n = repeat_last_n
        self.seed = resolve_seed(seed)
        self.rng = XorShiftRng(self.seed)
        # scratch kept between tokens: nothing vocabulary-sized is allocated per token
        self._mask = np.empty(vocab_size, bool)
        self._values = np.empty(vocab_size, F32)
        self._topp = np.empty(vocab_size * ops.TOPP_SCRATCH_BYTES, np.uint8)

    def sample(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        """The next token. `logits` (float32, vocab_size) is overwritten. `previous`: the
        tokens so far (prompt and generated), for the repetition penalty."""
        penalty = self.repetition_penalty != 1 and self.repeat_last_n != 0 and len(previous)
        if self.temperature == 0 and not penalty and logits.dtype == F32 and logits.flags.c_contiguous:
            token = ops.argmax_finite(logits)  # greedy: one pass finds the token and any NaN
            if token < 0:
                check_finite(logits)
            return token
        mask = self._mask[:len(logits)]
        check_finite(logits, mask)
        if penalty:
            window = previous if self.repeat_last_n < 0 else previous[-self.repeat_last_n:]
            penalize(logits, window, self.repetition_penalty)
        if self.temperature == 0:
            return int(np.argmax(logits))  # first maximum, as run.c
        if self.min_p > 0:
            apply_min_p(logits, self.min_p, mask)
        if 0 < self.top_k < self.vocab_size:
            values = self._values[:len(logits)]
            np.copyto(values, logits)
            values.partition(len(values) - self.top_k)  # in place: the k-th largest lands there
            np.less(logits, values[len(values) - self.top_k], out=mask)
            np.copyto(logits, -np.inf, where=mask)
        np.divide(logits, self.temperature, out=logits)
        ops.softmax(logits)
        coin = self.rng.f32()
        if self.top_p >= 1:
            return sample_mult(logits, coin)
        return sample_topp(logits, self.top_p, coin, self._topp)


def check_finite(logits: np.ndarray, mask=None) -> None:
    """NonFiniteLogitsError if a logit is NaN or infinite (`mask`: a bool buffer to use)."""
    if not np.isfinite(logits, out=mask).all():
        bad = np.flatnonzero(~np.isfinite(logits))
        raise NonFiniteLogitsError(
            f"the model produced {len(bad)} non-finite logits (token {int(bad[0])}: {logits[bad[0]]}); "
            "its weights may be broken, or a value overflowed")


def penalize(logits: np.ndarray, tokens: Sequence[int], penalty) -> None:
    """Repetition penalty on each distinct token of `tokens`: positive logits / penalty,
    negative ones * penalty (llama.cpp, transformers)."""
    ids = np.unique(np.asarray(tokens, dtype=np.int64))
    x = logits[ids]
    logits[ids] = np.where(x > 0, x / penalty, x * penalty)


def apply_min_p(logits: np.ndarray, min_p: float, mask=None) -> None:
    """Drop (-inf) the tokens whose probability is below min_p times the largest one's
    (`mask`: a bool buffer to use)."""
    mask = np.less(logits, logits.max() + F32(math.log(min_p)), out=mask)
    np.copyto(logits, -np.inf, where=mask)


def sample_mult(probs: np.ndarray, coin) -> int:
    """The first index whose cumulative probability exceeds coin (run.c's sample_mult: a
    sequential float32 sum, stopping there)."""
    return ops.sample_mult(probs, coin)


def sample_topp(probs: np.ndarray, top_p, coin, scratch=None) -> int:
    """Nucleus sampling, run.c's sample_topp (ops.sample_topp; `scratch`: its buffer, kept
    between tokens)."""
    if scratch is None:
        scratch = np.empty(len(probs) * ops.TOPP_SCRATCH_BYTES, np.uint8)
    return ops.sample_topp(probs, F32(top_p), F32(coin), scratch)
