"""Write a HuggingFace GPTQ checkpoint directory with random weights, of any Llama shape: by
default Llama-2-70B's (dim 8192, hidden 28672, 64 heads, 8 kv heads, vocab 32000, group 128,
act-order, symmetric, AutoGPTQ's v1 zero points), with --layers of them (80 for the full model:
~36 GB of disk). --preset 7b gives Llama-2-7B's widths.

The directory holds what GPTQModel writes: config.json with a quantization_config block,
quantize_config.json, safetensors (sharded with an index beyond --shard-gb), and a tokenizer:
a generated 32000-token byte-level BPE tokenizer.json (GPT-2 style; no sentencepiece needed),
or a copy of --tokenizer FILE (e.g. ../shared/models/tokenizers/llama2-chat/tokenizer.model).

Written tensor by tensor in chunks of rows, so memory stays near one chunk whatever the size.
The weights are random but scaled so activations stay near unit size: decoding produces
finite logits (and nonsense text).

Usage: python bench/make_gptq_checkpoint.py OUT_DIR [--layers 2] [--preset 70b|7b]
       [--dim N --hidden N --heads N --kv-heads N --vocab N] [--group-size 128|-1|...]
       [--no-act-order] [--asym] [--format gptq|gptq_v2] [--shard-gb 4] [--seed 0]
"""
import argparse
import json
import os
import shutil
import string
import struct
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = {"70b": dict(dim=8192, hidden=28672, heads=64, kv_heads=8, vocab=32000),
           "7b": dict(dim=4096, hidden=11008, heads=32, kv_heads=32, vocab=32000)}
CHUNK_BYTES = 32 << 20
DTYPES = {"I32": np.int32, "F16": np.float16, "F32": np.float32}
V1_ZERO_ADD = 0x11111111


class Shapes:
    def __init__(self, dim, hidden, heads, kv_heads, vocab, layers, group_size):
        self.dim, self.hidden, self.heads, self.kv_heads = dim, hidden, heads, kv_heads
        self.vocab, self.layers, self.group_size = vocab, layers, group_size
        self.kv = kv_heads * (dim // heads)

    def linears(self):
        """(HF module name, out_features, in_features) of one layer's Linears."""
        d, h, kv = self.dim, self.hidden, self.kv
        return [("self_attn.q_proj", d, d), ("self_attn.k_proj", kv, d), ("self_attn.v_proj", kv, d),
                ("self_attn.o_proj", d, d), ("mlp.gate_proj", h, d), ("mlp.up_proj", h, d),
                ("mlp.down_proj", d, h)]

    def groups(self, k):
        return 1 if self.group_size == -1 else k // self.group_size


class Random:
    """The random contents of every tensor, made a chunk of rows at a time."""

    def __init__(self, seed, act_order, sym, fmt):
        self.rng = np.random.default_rng(seed)
        self.act_order, self.sym, self.fmt = act_order, sym, fmt
        self._g_idx = {}

    def words(self, rows, cols):
        """Uniformly random int32 words: eight random 4-bit codes each."""
        return np.frombuffer(self.rng.bytes(rows * cols * 4), np.int32).reshape(rows, cols)

    def qzeros(self, rows, cols):
        """Packed zero points: 8 when symmetric, random otherwise; v1 stores zero - 1 per word."""
        if self.sym:
            z = np.full((rows, cols), 0x88888888, np.uint32)
        else:
            z = self.words(rows, cols).view(np.uint32).copy()
        if self.fmt == "gptq":
            z -= np.uint32(V1_ZERO_ADD)  # wraps: the v1 convention's borrow, as GPTQModel writes it
        return z.view(np.int32)

    def scales(self, rows, cols, k):
        """Scales giving weights of standard deviation ~ 1/sqrt(k) (4-bit codes minus 8 have ~4.6)."""
        s = self.rng.uniform(0.5, 1.5, (rows, cols)) / (4.6 * np.sqrt(k))
        return s.astype(np.float16)

    def g_idx(self, k, groups, shared=None):
        """Act-order: a random order of the inputs' groups. Products of one input (shared: a
        layer's q, k, v, or its gate and up) get the same one, as from GPTQ, whose order sorts
        the inputs by the Hessian of that input."""
        if shared is not None and shared in self._g_idx:
            return self._g_idx[shared]
        g = (np.arange(k, dtype=np.int32) * groups // k).astype(np.int32)
        g = self.rng.permutation(g) if self.act_order else g
        if shared is not None:
            self._g_idx[shared] = g
        return g

    def normal(self, rows, cols, std):
        return (self.rng.standard_normal((rows, cols), np.float32) * np.float32(std)).astype(np.float16)


def gptq_tensors(m, n_out, k, g, r: Random, shared=None):
    """The four tensors of GPTQ module `m`: (name, dtype, shape, make)."""
    return [(m + ".qweight", "I32", (k // 8, n_out), lambda a, n: r.words(n, n_out)),
            (m + ".qzeros", "I32", (g, n_out // 8), lambda a, n: r.qzeros(n, n_out // 8)),
            (m + ".scales", "F16", (g, n_out), lambda a, n: r.scales(n, n_out, k)),
            (m + ".g_idx", "I32", (k,), lambda a, n: r.g_idx(k, g, shared))]


# modules whose products share their input, hence their act-order g_idx
SHARED_INPUT = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}


def tensor_list(s: Shapes, r: Random, lm_head=False):
    """(name, dtype, shape, make(row0, rows) -> array) of every tensor, in file order."""
    d, V = s.dim, s.vocab
    ones = lambda a, n: np.ones(n, np.float16)  # noqa: E731
    out = [("model.embed_tokens.weight", "F16", (V, d), lambda a, n: r.normal(n, d, 1.0))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", "F16", (d,), ones))
        for name, n_out, k in s.linears():
            shared = SHARED_INPUT.get(name)
            out += gptq_tensors(p + name, n_out, k, s.groups(k), r, shared and (i, shared))
            if name == "self_attn.o_proj":
                out.append((p + "post_attention_layernorm.weight", "F16", (d,), ones))
    out.append(("model.norm.weight", "F16", (d,), ones))
    if lm_head:  # GPTQModel's lm_head=True
        out += gptq_tensors("lm_head", V, d, s.groups(d), r)
    else:
        out.append(("lm_head.weight", "F16", (V, d), lambda a, n: r.normal(n, d, 1 / np.sqrt(d))))
    return out


def nbytes(dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize


def write_safetensors(path: Path, tensors) -> None:
    """A safetensors file written by streaming: the header first (every offset is known from
    the shapes), then each tensor a chunk of rows at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _ in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes(dtype, shape)]}
        offset += nbytes(dtype, shape)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data 8-byte aligned, as the safetensors package writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape, make in tensors:
            if len(shape) == 1:
                a = make(0, shape[0])
                assert a.dtype == DTYPES[dtype] and a.shape == tuple(shape), name
                a.tofile(f)
                continue
            step = max(1, CHUNK_BYTES // nbytes(dtype, shape[1:]))
            for row in range(0, shape[0], step):
                a = make(row, min(step, shape[0] - row))
                assert a.dtype == DTYPES[dtype] and a.shape[1:] == tuple(shape[1:]), name
                a.tofile(f)


def write_weights(d: Path, tensors, shard_bytes: int) -> int:
    """model.safetensors, or shards of about shard_bytes and their index; returns the bytes."""
    shards, cur, size = [], [], 0
    for t in tensors:
        n = nbytes(t[1], t[2])
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    shards.append(cur)
    if len(shards) == 1:
        write_safetensors(d / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(d / fname, part)
            weight_map.update({t[0]: fname for t in part})
        total = sum(nbytes(t[1], t[2]) for t in tensors)
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return sum(nbytes(t[1], t[2]) for t in tensors)


def quantization_config(group_size, act_order, sym, fmt, lm_head=False) -> dict:
    return {"bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym, "lm_head": lm_head,
            "method": "gptq", "quant_method": "gptq", "format": fmt, "checkpoint_format": fmt,
            "pack_dtype": "int32", "meta": {"quantizer": ["pecca bench/make_gptq_checkpoint.py"],
                                           "static_groups": False, "true_sequential": True}}


def model_config(s: Shapes, qcfg) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.dim,
            "intermediate_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads, "vocab_size": s.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float16", "quantization_config": qcfg}


def write_tokenizer_json(d: Path, vocab_size: int) -> None:
    """A GPT-2-style byte-level BPE tokenizer.json with `vocab_size` tokens: <s>, </s>, the 256
    byte characters, then merges of common letter pairs ("Ġ" is the space byte) until full."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet, key=lambda c: (len(c.encode()), c)):
        vocab[ch] = len(vocab)
    letters = ["\u0120"] + list(string.ascii_lowercase + string.ascii_uppercase)
    merges = []
    for a in letters:
        for b in letters + [x + y for x in letters for y in letters[1:27]]:
            if len(vocab) >= vocab_size:
                break
            if a + b not in vocab and (b in vocab):
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    for i in range(len(vocab), vocab_size):  # wider vocabularies: unreachable fillers
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, indent=1))


def make_checkpoint(out: Path, layers=2, preset="70b", dim=None, hidden=None, heads=None, kv_heads=None,
                    vocab=None, group_size=128, act_order=True, sym=True, fmt="gptq", shard_gb=4.0,
                    seed=0, tokenizer=None, lm_head=False) -> int:
    """Write the checkpoint into directory `out`; returns the bytes of tensors written."""
    p = dict(PRESETS[preset])
    p.update({k: v for k, v in dict(dim=dim, hidden=hidden, heads=heads, kv_heads=kv_heads,
                                     vocab=vocab).items() if v is not None})
    s = Shapes(layers=layers, group_size=group_size, **p)
    for _, n_out, k in s.linears():
        if k % 32 or n_out % 32 or (group_size != -1 and k % group_size):
            raise SystemExit(f"a {n_out}x{k} Linear does not fit GPTQ packing (multiples of 32) or group "
                             f"size {group_size}")
    out.mkdir(parents=True, exist_ok=True)
    qcfg = quantization_config(group_size, act_order, sym, fmt, lm_head)
    (out / "config.json").write_text(json.dumps(model_config(s, qcfg), indent=1))
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=1))
    if tokenizer:
        shutil.copy(tokenizer, out / os.path.basename(tokenizer))
    else:
        write_tokenizer_json(out, s.vocab)
    return write_weights(out, tensor_list(s, Random(seed, act_order, sym, fmt), lm_head), int(shard_gb * 2**30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="70b")
    for name in ("dim", "hidden", "heads", "kv-heads", "vocab"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--group-size", type=int, default=128, help="-1: one group per column")
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--format", dest="fmt", choices=("gptq", "gptq_v2"), default="gptq")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="copy this tokenizer file instead of generating tokenizer.json")
    ap.add_argument("--lm-head", action="store_true", help="quantize lm_head too (GPTQModel's lm_head=True)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    n = make_checkpoint(a.out, a.layers, a.preset, a.dim, a.hidden, a.heads, a.kv_heads, a.vocab,
                        a.group_size, a.act_order, a.sym, a.fmt, a.shard_gb, a.seed, a.tokenizer, a.lm_head)
    print(f"wrote {a.out}: {n / 2**30:.2f} GiB of tensors in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
