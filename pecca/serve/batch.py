"""Several sequences decoding together: one KV-cache slot each, one pass over the weights.

A `SlotPool` holds `n` KV-cache slots (each a `pecca.model.Model` over the shared weights, so a
new sequence's prompt is prefilled by the model's own batched prefill, exactly as
`LLM.generate` prefills it). `BatchDecoder.step` then feeds one token for each of B sequences:
every linear layer runs as one matrix-matrix product over the B rows (`Linear.batch`), so the
weights stream through memory once per step for all of them, while RoPE and attention run per
row, at that row's own position, over that row's own slot.

The batch is padded with zero rows to a multiple of `ROW_MULTIPLE` when the model's kernels
need it: the f32/f16/bf16 GEMM kernels compute whole tiles of 4 tokens with a different
summation order than their leftover rows, so without padding a sequence's logits (and hence its
tokens) would depend on how many other requests happen to share its step. Padded, each row's
arithmetic is the same whatever the batch, and a greedy reply is the same under load as alone.
The int8 kernels sum integers, exactly, in any tiling: a model whose every layer is int8 is not
padded (`rows_exact` checks each kernel once at start).
"""
from typing import List, Sequence, Tuple

import numpy as np

from pecca._kernels import ops
from pecca.config import ModelConfig
from pecca.errors import PeccaError
from pecca.model import BatchState, Model, _total_memory, block_rows, embed, kv_cache_bytes
from pecca.weights import Weights

ROW_MULTIPLE = 4


def padded(n: int, multiple: int = ROW_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def rows_exact(linear, threads: int) -> bool:
    """Whether `linear.batch` gives each row of a batch the bits it gives that row alone (float
    GEMM tiles differ from their leftover rows in the last bits on random data, always)."""
    x = np.random.default_rng(0).standard_normal((ROW_MULTIPLE + 1, linear.in_features)).astype(np.float32)
    together = np.zeros((len(x), linear.out_features), np.float32)
    alone = np.zeros((1, linear.out_features), np.float32)
    linear.batch(x, together, threads)
    for t in range(len(x)):
        linear.batch(x[t:t + 1], alone, threads)
        if not np.array_equal(alone[0], together[t]):
            return False
    return True


def row_multiple(weights: Weights, threads: int) -> int:
    """ROW_MULTIPLE, or 1 when every kernel of the model is exact row by row (one layer's kinds
    stand for all layers: each layer holds the same kinds of matrices)."""
    layer = weights.layers[0] if weights.layers else None
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    linears = [getattr(layer, n) for n in names] if layer is not None else []
    linears.append(weights.output)
    return 1 if all(rows_exact(lin, threads) for lin in linears) else ROW_MULTIPLE


class SlotPool:
    """`n` KV-cache slots of `seq_len` positions over one set of weights."""

    def __init__(self, config: ModelConfig, weights: Weights, n: int, seq_len: int, threads: int):
        need = n * kv_cache_bytes(config, seq_len)
        if need > _total_memory():
            raise PeccaError(f"{n} KV-cache slots of {seq_len} positions need {need / 2**30:.1f} GiB, "
                             "more than this machine has; lower --parallel or --ctx-size")
        self.models = [Model(config, weights, threads, seq_len) for _ in range(n)]
        # the engine prefills one sequence at a time: one set of prefill buffers serves all slots
        shared = BatchState(config, Model.PREFILL_BATCH, seq_len, threads)
        for m in self.models:
            m.batch_state = shared
        self.free: List[int] = list(range(n))[::-1]

    def __len__(self) -> int:
        return len(self.models)

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def prefill(self, slot: int, tokens: Sequence[int], pos0: int, whole_prompt_len: int) -> np.ndarray:
        """Feed a chunk (at most Model.PREFILL_BATCH tokens) of a prompt into `slot`, the way
        Model.prefill feeds the whole prompt (a one-token prompt goes through `forward`), so the
        logits after the last chunk are bit for bit those of `LLM.generate`."""
        m = self.models[slot]
        if whole_prompt_len == 1:
            return m.forward(tokens[0], pos0)
        m._check_batch(tokens, pos0)
        m._forward_batch(list(tokens), pos0)
        return m.state.logits


class BatchDecoder:
    """One decode step for up to `max_rows` sequences of a SlotPool."""

    def __init__(self, pool: SlotPool, max_rows: int):
        m0 = pool.models[0]
        c, f = m0.config, np.float32
        self.pool, self.config, self.weights = pool, c, m0.weights
        self.threads, self.seq_len = m0.threads, m0.seq_len
        self.multiple = row_multiple(self.weights, self.threads)
        R = padded(max_rows, self.multiple)
        self.x = np.zeros((R, c.dim), f)
        self.xb = np.zeros((R, c.dim), f)
        self.xb2 = np.zeros((R, c.dim), f)
        self.q = np.zeros((R, c.dim), f)
        self.k = np.zeros((R, c.kv_dim), f)
        self.v = np.zeros((R, c.kv_dim), f)
        self.hb = np.zeros((R, c.hidden_dim), f)
        self.hb2 = np.zeros((R, c.hidden_dim), f)
        self.logits = np.zeros((R, c.vocab_size), f)
        self.att = np.zeros((c.n_heads, self.seq_len), f)
        self.cos, self.sin = rope_tables(m0.state.rope_freqs, self.seq_len)

    def step(self, rows: Sequence[Tuple[int, int, int]]) -> np.ndarray:
        """Feed rows of (slot, token, position); returns logits (B, vocab_size), one row per
        input row (a view, overwritten by the next step)."""
        c, w, nt = self.config, self.weights, self.threads
        B = len(rows)
        R = padded(B, self.multiple)
        x, xb, xb2, q, k, v = (a[:R] for a in (self.x, self.xb, self.xb2, self.q, self.k, self.v))
        hb, hb2 = self.hb[:R], self.hb2[:R]
        embed(w.token_embedding, [t for _, t, _ in rows], x[:B])
        x[B:] = 0  # padding rows stay zero through every layer
        caches = [self.pool.models[s].state for s, _, _ in rows]

        def attend(l, k, v):  # each row at its own position, in its own slot's cache
            for b, (_, _, pos) in enumerate(rows):
                self._attend(l, b, pos, caches[b])

        for l, layer in enumerate(w.layers):
            block_rows(c, layer, l, x, xb, xb2, q, k, v, hb, hb2, nt, attend)
        ops.rmsnorm_rows(xb, x, w.norm, c.norm_eps)
        w.output.batch(xb, self.logits[:R], nt)
        return self.logits[:B]

    def _attend(self, l: int, b: int, pos: int, state) -> None:
        """Row b at position `pos`: RoPE as Model.forward does it, its key and value into its
        own slot's cache, attention over that cache; the result replaces xb[b]."""
        c = self.config
        q, k = self.q[b], self.k[b]
        ops.rope(q, c.head_size, self.cos[pos], self.sin[pos])
        ops.rope(k, c.head_size, self.cos[pos], self.sin[pos])
        state.key_cache[l, pos] = k
        state.value_cache[l, pos] = self.v[b]
        ops.attention(self.xb[b], q, state.key_cache[l], state.value_cache[l], self.att, pos,
                      c.n_heads, c.n_kv_heads, self.threads)


def rope_tables(freqs: np.ndarray, seq_len: int):
    """cos/sin of every position's RoPE angles, by ops.rope_table (Model.forward's own)."""
    half = len(freqs)
    cos = np.zeros((seq_len, half), np.float32)
    sin = np.zeros((seq_len, half), np.float32)
    for pos in range(seq_len):
        ops.rope_table(pos, freqs, cos[pos], sin[pos])
    return cos, sin
