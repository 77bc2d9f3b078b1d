"""Several sequences decoding together: one KV-cache slot each, one pass over the weights.

A `SlotPool` holds `n` KV-cache slots (each a `pecca.model.Model` over the shared weights, so a
new sequence's prompt is prefilled by the model's own batched prefill, exactly as
`LLM.generate` prefills it). `BatchDecoder.step` then feeds one token for each of B sequences:
every linear layer runs as one matrix-matrix product over the B rows (`Linear.batch`), so the
weights stream through memory once per step for all of them, while RoPE and attention run per
row, at that row's own position, over that row's own slot: one nogil kernel call per layer for
all rows (`ops.attend_slots`), over the pool's caches, one array for all slots.

The batch is padded with zero rows when the model's kernels need it, so that a sequence's
logits (and hence its tokens) do not depend on how many other requests happen to share its step:
the f32/f16/bf16 GEMMs below 8 tokens compute whole tiles of 4 tokens with another summation
order than their leftover rows (padding to a multiple of 4 makes every row a tile row), and from
8 tokens on put tokens in vector lanes, one multiply-add chain per output whatever the batch
(padding to at least 8 rows keeps every step on that form). Padded, each row's arithmetic is
the same whatever the batch, and a greedy reply is the same under load as alone. The int8
kernels sum integers, exactly, in any tiling: a model whose every layer is int8 is not padded.
`row_padding` finds, once at start, the least padding under which each kernel of the model gives
a row the same bits alone as in a batch.
"""
import time
from typing import List, Sequence, Tuple

import numpy as np

from pecca._kernels import ops
from pecca.config import ModelConfig
from pecca.errors import PeccaError
from pecca.model import (BatchState, Model, _total_memory, aligned_zeros, block_rows, embed,
                         kv_cache_bytes, kv_dtype)
from pecca.threads import governor
from pecca.weights import Weights

ROW_MULTIPLE = 4  # the float GEMMs' token tiles below LANES_MIN_ROWS
LANES_MIN_ROWS = 8  # from this many tokens on, the float GEMMs' tokens-in-lanes form
CHECK_ROWS = 2 * LANES_MIN_ROWS + 1  # rows of the batch a kernel is checked on


def padded(n: int, multiple: int = ROW_MULTIPLE, minimum: int = 1) -> int:
    """Rows a batch of n is computed as: a multiple of `multiple`, at least `minimum`."""
    return max(minimum, -(-n // multiple) * multiple)


def rows_exact(linear, threads: int, multiple: int = 1, minimum: int = 1) -> bool:
    """Whether `linear.batch`, on batches padded(n, multiple, minimum) rows long (zero rows
    after the real ones), gives each row of a large batch the bits it gives that row alone
    (float GEMM tiles differ from their leftover rows in the last bits on random data, always)."""
    n = CHECK_ROWS
    rng = np.random.default_rng(0)
    x = np.zeros((padded(n, multiple, minimum), linear.in_features), np.float32)
    x[:n] = rng.standard_normal((n, linear.in_features))
    together = np.zeros((len(x), linear.out_features), np.float32)
    linear.batch(x, together, threads)
    one = np.zeros((padded(1, multiple, minimum), linear.in_features), np.float32)
    alone = np.zeros((len(one), linear.out_features), np.float32)
    for t in range(n):
        one[0] = x[t]
        linear.batch(one, alone, threads)
        if not np.array_equal(alone[0], together[t]):
            return False
    return True


def row_padding(weights: Weights, threads: int) -> Tuple[int, int]:
    """(multiple, minimum) for `padded`: the least padding under which every kernel of the
    model is exact row by row ((1, 1) for int8 kernels; one layer's kinds stand for all layers:
    each layer holds the same kinds of matrices)."""
    layer = weights.layers[0] if weights.layers else None
    names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    linears = [getattr(layer, n) for n in names] if layer is not None else []
    linears.append(weights.output)
    multiple, minimum = 1, 1
    for lin in linears:
        for m, lo in ((1, 1), (1, LANES_MIN_ROWS), (ROW_MULTIPLE, 1), (ROW_MULTIPLE, LANES_MIN_ROWS)):
            if (m, lo) == (ROW_MULTIPLE, LANES_MIN_ROWS) or rows_exact(lin, threads, m, lo):
                break
        multiple, minimum = max(multiple, m), max(minimum, lo)
    return multiple, minimum


class SlotPool:
    """`n` KV-cache slots of `seq_len` positions over one set of weights; `kv_type` as Model's."""

    def __init__(self, config: ModelConfig, weights: Weights, n: int, seq_len: int, threads: int,
                 kv_type: str = "f32"):
        need = n * kv_cache_bytes(config, seq_len, kv_type)
        if need > _total_memory():
            raise PeccaError(f"{n} KV-cache slots of {seq_len} positions need {need / 2**30:.1f} GiB, "
                             "more than this machine has; lower --parallel or --ctx-size")
        self.models = [Model(config, weights, threads, seq_len, kv_type) for _ in range(n)]
        # every slot's cache in one array (slot, layer, position, kv_dim), so that one kernel call
        # serves the whole batch; each Model sees its own slot (its prefill writes there). The
        # caches each Model allocated are zero pages never touched: dropping them costs nothing.
        shape = (n, config.n_layers, seq_len, config.kv_dim)
        self.key_cache = aligned_zeros(shape, kv_dtype(kv_type))
        self.value_cache = aligned_zeros(shape, kv_dtype(kv_type))
        for i, m in enumerate(self.models):
            m.state.key_cache, m.state.value_cache = self.key_cache[i], self.value_cache[i]
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
        m._forward_batch(list(tokens), pos0, logits=pos0 + len(tokens) >= whole_prompt_len)
        return m.state.logits


class BatchDecoder:
    """One decode step for up to `max_rows` sequences of a SlotPool."""

    def __init__(self, pool: SlotPool, max_rows: int):
        m0 = pool.models[0]
        c, f = m0.config, np.float32
        self.pool, self.config, self.weights = pool, c, m0.weights
        self.threads, self.seq_len = m0.threads, m0.seq_len
        self.multiple, self.minimum = row_padding(self.weights, self.threads)
        # rows each batch size is computed as, in the layers and in the output layer
        self.rows_layers = [padded(b, self.multiple, self.minimum) for b in range(max_rows + 1)]
        self.rows_output = list(self.rows_layers)
        if (self.multiple, self.minimum) == (1, 1):
            self._pad_where_faster(max_rows)
        R = max(self.rows_layers + self.rows_output)
        self.rows = BatchState(c, R, self.seq_len, self.threads)  # a prefill's buffers, R rows
        self.logits = aligned_zeros((R, c.vocab_size), f)
        self.slots = np.zeros(max_rows, np.int32)
        self.positions = np.zeros(max_rows, np.int32)
        self.cos, self.sin = rope_tables(m0.state.rope_freqs, self.seq_len)

    def step(self, rows: Sequence[Tuple[int, int, int]]) -> np.ndarray:
        """Feed rows of (slot, token, position); returns logits (B, vocab_size), one row per
        input row (a view, overwritten by the next step)."""
        c, w, pool = self.config, self.weights, self.pool
        nt = governor.threads(self.threads)  # fewer while other processes hold cores
        B = len(rows)
        R, Ro = self.rows_layers[B], self.rows_output[B]
        bs = self.rows
        x, xb, xb2, q, k, v = (a[:R] for a in (bs.x, bs.xb, bs.xb2, bs.q, bs.k, bs.v))
        hb, hb2 = bs.hb[:R], bs.hb2[:R]
        embed(w.token_embedding, [t for _, t, _ in rows], x[:B])
        bs.x[B:max(R, Ro)] = 0  # padding rows stay zero through every layer
        slots, positions = self.slots[:B], self.positions[:B]
        for b, (s, _, pos) in enumerate(rows):
            slots[b], positions[b] = s, pos
        args = (pool.key_cache, pool.value_cache)
        cos, sin, att, nh, nkv = self.cos, self.sin, bs.att, c.n_heads, c.n_kv_heads

        def attend(l, k, v):  # each row at its own position, in its own slot's cache
            ops.attend_slots(xb, q, k, v, *args, l, slots, positions, cos, sin, att, nh, nkv, nt)

        for l, layer in enumerate(w.layers):
            block_rows(c, layer, l, x, xb, xb2, q, k, v, hb, hb2, nt, attend)
        ops.rmsnorm_rows(bs.xb[:Ro], bs.x[:Ro], w.norm, c.norm_eps)
        w.output.batch(bs.xb[:Ro], self.logits[:Ro], nt)
        return self.logits[:B]

    def _pad_where_faster(self, max_rows: int) -> None:
        """Exact kernels give a row the same bits in any batch, so a batch may be padded just
        for speed: the int8 GEMMs compute tiles of 4 tokens, and where a kernel's tile for 2
        or 3 tokens costs about what 4 do, padding costs nothing and keeps a warm tile shape.
        For each batch size, the layers (timed on one layer's matrices) and the output layer
        each get padded to a multiple of ROW_MULTIPLE where that is faster."""
        layer = self.weights.layers[0] if self.weights.layers else None
        names = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
        groups = [(self.rows_output, [self.weights.output])]
        if layer is not None:
            groups.append((self.rows_layers, [getattr(layer, n) for n in names]))
        for rows, linears in groups:
            for b in range(1, min(max_rows, 4 * ROW_MULTIPLE) + 1):
                alt = padded(b, ROW_MULTIPLE)
                if alt == b:
                    continue
                t_alt, t_b = batch_seconds(linears, (alt, b), self.threads)
                # ties go to the tiles: alone, 2 tokens of SmolLM2's output layer cost what 4 do
                # once warm, but within a decode step they took 3 times as long
                if t_alt < 1.1 * t_b:
                    rows[b] = alt
            for b in range(4 * ROW_MULTIPLE + 1, max_rows + 1):  # large batches: as the tiles go
                rows[b] = padded(b, ROW_MULTIPLE) if rows[4 * ROW_MULTIPLE - 1] > 4 * ROW_MULTIPLE - 1 else b


def batch_seconds(linears, sizes, threads: int, reps: int = 5) -> List[float]:
    """For each row count of `sizes`, the least time over `reps` tries (the sizes taking turns,
    each warmed up first) of one `batch` call of each linear on that many rows."""
    rng = np.random.default_rng(1)
    args = []
    for rows in sizes:
        calls = []
        for lin in linears:
            x = rng.standard_normal((rows, lin.in_features)).astype(np.float32)
            out = np.zeros((rows, lin.out_features), np.float32)
            for _ in range(3):  # warm: the first calls of a size can be several times slower
                lin.batch(x, out, threads)
            calls.append((lin, x, out))
        args.append(calls)
    best = [float("inf")] * len(sizes)
    for _ in range(reps):
        for i, calls in enumerate(args):
            t = time.perf_counter()
            for lin, x, out in calls:
                lin.batch(x, out, threads)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def rope_tables(freqs: np.ndarray, seq_len: int):
    """cos/sin of every position's RoPE angles, by ops.rope_table (Model.forward's own)."""
    half = len(freqs)
    cos = np.zeros((seq_len, half), np.float32)
    sin = np.zeros((seq_len, half), np.float32)
    for pos in range(seq_len):
        ops.rope_table(pos, freqs, cos[pos], sin[pos])
    return cos, sin
