"""Perplexity of a model on a text: how users compare quantizations.

The text is tokenized once (no BOS) and cut into windows of `ctx - 1` tokens; each window is
fed after a BOS, in one batched pass, and every token of the window is scored given the ones
before it in the window. PPL = exp(mean negative log-likelihood over all scored tokens).
"""
import math
from dataclasses import dataclass

import numpy as np

from pecca.errors import InvalidArgumentError
from pecca.progress import progress


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens
    windows: int
    ctx: int


def nll(logits: np.ndarray, targets) -> np.ndarray:
    """-log p(target) per row, computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    return logsum - z[np.arange(len(targets)), targets]


def perplexity(m, text: str, ctx: int = 0) -> PerplexityResult:
    """Perplexity of `m` (a pecca.LLM) on `text` with windows of `ctx` positions (default: the
    model's context)."""
    ctx = ctx or m.model.seq_len
    if not 2 <= ctx <= m.model.seq_len:
        raise InvalidArgumentError(f"--ctx {ctx}: expected 2..{m.model.seq_len} (the model's context)")
    ids = m.tokenizer.encode(text, add_bos=False)
    if len(ids) < 2:
        raise InvalidArgumentError("the text has fewer than 2 tokens: nothing to score")
    step = ctx - 1
    starts = list(range(0, len(ids), step))
    total, count = 0.0, 0
    with progress("perplexity", len(starts)) as advance:
        for s in starts:
            window = [m.tokenizer.bos_id] + ids[s:s + step]
            logits = m.model.logits_all(window, 0)
            total += float(nll(logits[:-1], window[1:]).sum())
            count += len(window) - 1
            advance()
    return PerplexityResult(math.exp(total / count), count, len(starts), ctx)
