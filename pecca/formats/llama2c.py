"""Reader for llama2.c checkpoints (karpathy/llama2.c run.c / export.py).

Version 0 ("legacy", run.c's format): 7 x int32 header
    [dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len]
(vocab_size < 0 means an unshared classifier), then float32 tensors in the order
    tok_embeddings, attention_norm[L], wq[L], wk[L], wv[L], wo[L], ffn_norm[L],
    w1[L], w2[L], w3[L], norm, freq_cis_real, freq_cis_imag, (output if unshared).
Version 1 (export.py version1_export): 256-byte header: uint32 magic 0x616b3432, int32 version,
7 x int32 config, uint8 shared_classifier; then float32
    attention_norm[L], ffn_norm[L], norm, tok_embeddings, wq[L], wk[L], wv[L], wo[L],
    w1[L], w2[L], w3[L], (output if unshared).
Version 2 (export.py version2_export, runq.c): the same 256-byte header with an int32 group
size at byte 37; float32 attention_norm[L], ffn_norm[L], norm; then for each of
    tok_embeddings, wq[L], wk[L], wv[L], wo[L], w1[L], w2[L], w3[L], (output if unshared)
its int8 values followed by its float32 scales, one per group of `group_size` values.

Everything is a view into one read-only np.memmap: opening a file costs no copy.
"""
import os
import struct

import numpy as np

from pecca.config import ModelConfig, check_heads
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats import LoadedModel
from pecca.formats.tensors import map_readonly
from pecca.weights import F32Linear, LayerWeights, Weights

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32 (bytes on disk: "24ka")
MAGIC_ASCII = struct.unpack("<I", b"ak42")[0]  # some ports wrote the ASCII bytes instead
LEGACY_HEADER = 7 * 4
V1_HEADER = 256

# Sanity limits: far beyond any real LLaMA (70B: dim 8192, hidden 28672, 80 layers, 128k vocab),
# small enough that no product of them overflows or asks for an absurd allocation.
LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
          "n_kv_heads": 1 << 10, "vocab_size": 1 << 22, "seq_len": 1 << 20}
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read(path: str) -> LoadedModel:
    size = os.path.getsize(path)
    if size < LEGACY_HEADER:
        raise ModelFormatError(f"{path}: file is {size} bytes, too short for a llama2.c header")
    with open(path, "rb") as f:
        head = f.read(V1_HEADER)
    magic = struct.unpack_from("<I", head)[0]
    if magic in (MAGIC, MAGIC_ASCII):
        if size < V1_HEADER:
            raise ModelFormatError(f"{path}: file is {size} bytes, shorter than the 256-byte header")
        version = struct.unpack_from("<i", head, 4)[0]
        if version not in (1, 2):
            raise UnsupportedModelError(f"{path}: llama2.c file version {version}; pecca reads 0, 1 and 2")
        values = struct.unpack_from("<7i", head, 8)
        shared = head[36] != 0
        config = _config(path, values, vocab_size=values[5])
        if version == 2:
            return _map_q8(path, size, config, shared, struct.unpack_from("<i", head, 37)[0])
        return _map(path, size, config, shared, version=1)
    values = struct.unpack_from("<7i", head, 0)
    shared = values[5] > 0
    config = _config(path, values, vocab_size=abs(values[5]))
    return _map(path, size, config, shared, version=0)


def _config(path, values, vocab_size) -> ModelConfig:
    named = dict(zip(FIELDS, values))
    named["vocab_size"] = vocab_size
    for name in FIELDS:
        v = named[name]
        if not 0 < v <= LIMITS[name]:
            raise ModelFormatError(
                f"{path}: header field {name} = {values[FIELDS.index(name)]} is outside 1..{LIMITS[name]}"
                " (not a llama2.c checkpoint, or a corrupt header)")
    check_heads(path, named["dim"], named["n_heads"], named["n_kv_heads"])
    return ModelConfig(**named)


class _Cursor:
    """Walks through the memmap handing out float32 views of given shapes."""

    def __init__(self, mm, offset):
        self.mm, self.offset = mm, offset

    def take(self, *shape):
        n = int(np.prod(shape))
        view = self.mm[self.offset:self.offset + 4 * n].view(np.float32).reshape(shape)
        self.offset += 4 * n
        return view

    def skip(self, n):
        self.offset += 4 * n

    def take_i8(self, *shape):
        n = int(np.prod(shape))
        view = self.mm[self.offset:self.offset + n].view(np.int8).reshape(shape)
        self.offset += n
        return view

    def take_scales(self, n):
        """float32 scales; copied (they are small) when int8 data left them unaligned."""
        view = self.mm[self.offset:self.offset + 4 * n].view(np.float32)
        self.offset += 4 * n
        return view if view.flags.aligned else view.copy()


def _expected_floats(c: ModelConfig, shared: bool, version: int) -> int:
    d, h, L, kv, V = c.dim, c.hidden_dim, c.n_layers, c.kv_dim, c.vocab_size
    n = V * d + 2 * L * d + L * d * d * 2 + 2 * L * d * kv + 3 * L * d * h + d
    if version == 0:
        n += c.seq_len * c.head_size  # freq_cis_real + freq_cis_imag, unused
    if not shared:
        n += V * d
    return n


def _map(path, size, c: ModelConfig, shared: bool, version: int) -> LoadedModel:
    header = LEGACY_HEADER if version == 0 else V1_HEADER
    expected = header + 4 * _expected_floats(c, shared, version)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header implies"
        raise ModelFormatError(
            f"{path}: file is {what}: {size} bytes, expected {expected} for "
            f"dim={c.dim} hidden_dim={c.hidden_dim} n_layers={c.n_layers} n_heads={c.n_heads} "
            f"n_kv_heads={c.n_kv_heads} vocab_size={c.vocab_size} seq_len={c.seq_len} "
            f"({'shared' if shared else 'unshared'} classifier, version {version})")
    mm = map_readonly(path)
    cur = _Cursor(mm, header)
    d, h, L, kv, V = c.dim, c.hidden_dim, c.n_layers, c.kv_dim, c.vocab_size
    if version == 0:
        emb = cur.take(V, d)
        att_norm = cur.take(L, d)
    else:
        att_norm = cur.take(L, d)
        ffn_norm = cur.take(L, d)
        norm = cur.take(d)
        emb = cur.take(V, d)
    wq = cur.take(L, d, d)
    wk = cur.take(L, kv, d)
    wv = cur.take(L, kv, d)
    wo = cur.take(L, d, d)
    if version == 0:
        ffn_norm = cur.take(L, d)
    w1 = cur.take(L, h, d)
    w2 = cur.take(L, d, h)
    w3 = cur.take(L, h, d)
    if version == 0:
        norm = cur.take(d)
        cur.skip(c.seq_len * c.head_size)
    output = emb if shared else cur.take(V, d)
    layers = [LayerWeights(att_norm[i], F32Linear(wq[i]), F32Linear(wk[i]), F32Linear(wv[i]),
                           F32Linear(wo[i]), ffn_norm[i], F32Linear(w1[i]), F32Linear(w2[i]),
                           F32Linear(w3[i])) for i in range(L)]
    weights = Weights(emb, layers, norm, F32Linear(output), shared)
    return LoadedModel(c, weights, path, f"llama2c-v{version}", size,
                       extra={"shared_classifier": shared, "tensor_types": {"F32": 9 * L + 3}})


def _map_q8(path, size, c: ModelConfig, shared: bool, gs: int) -> LoadedModel:
    """Version 2: int8 weights with float32 group scales (runq.c's format)."""
    from pecca import weights as W
    from pecca.quant import Q8GroupRows

    d, h, L, kv, V = c.dim, c.hidden_dim, c.n_layers, c.kv_dim, c.vocab_size
    if not 0 < gs <= 1 << 16:
        raise ModelFormatError(f"{path}: header field group_size = {gs} is outside 1..65536")
    for name, n in (("dim", d), ("hidden_dim", h)):
        if n % gs:
            raise ModelFormatError(f"{path}: group_size {gs} does not divide the row length {name} = {n}")
    mats = [(V, d)] + [(d, d)] * L + [(kv, d)] * 2 * L + [(d, d)] * L + [(h, d)] * L \
        + [(d, h)] * L + [(h, d)] * L + ([] if shared else [(V, d)])
    expected = V1_HEADER + 4 * (2 * L * d + d) + sum(r * n + 4 * (r * n // gs) for r, n in mats)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header implies"
        raise ModelFormatError(f"{path}: file is {what}: {size} bytes, expected {expected} for "
                               f"dim={d} hidden_dim={h} n_layers={L} n_kv_heads={c.n_kv_heads} "
                               f"vocab_size={V} group_size={gs} (version 2)")
    mm = map_readonly(path)
    cur = _Cursor(mm, V1_HEADER)
    att_norm, ffn_norm, norm = cur.take(L, d), cur.take(L, d), cur.take(d)

    def qtensor(rows, n):
        q = cur.take_i8(rows, n)
        return q, cur.take_scales(rows * n // gs)

    emb_q, emb_s = qtensor(V, d)
    per_layer = {name: [qtensor(r, n) for _ in range(L)]
                 for name, (r, n) in (("wq", (d, d)), ("wk", (kv, d)), ("wv", (kv, d)), ("wo", (d, d)),
                                      ("w1", (h, d)), ("w2", (d, h)), ("w3", (h, d)))}
    out_q, out_s = (emb_q, emb_s) if shared else qtensor(V, d)

    def lin(name, i):
        q, sc = per_layer[name][i]
        return W.Q8GroupLinear(q, sc, gs)

    layers = [LayerWeights(att_norm[i], lin("wq", i), lin("wk", i), lin("wv", i), lin("wo", i),
                           ffn_norm[i], lin("w1", i), lin("w2", i), lin("w3", i)) for i in range(L)]
    weights = Weights(Q8GroupRows(emb_q, emb_s, gs), layers, norm, W.Q8GroupLinear(out_q, out_s, gs), shared)
    return LoadedModel(c, weights, path, "llama2c-v2", size,
                       extra={"shared_classifier": shared, "group_size": gs,
                              "tensor_types": {"F32": 2 * L + 1, f"Q8 (group {gs})": 7 * L + 1 + (not shared)}})
