"""Write llama2.c checkpoints (the layouts of llama2.c's export.py `legacy_export`,
`version1_export` and `version2_export`), tensor by tensor so memory stays near one tensor.

Version 2 (runq.c's int8 format) quantizes each matrix with pecca.quant.quantize_q8_groups
(export.py's quantize_q80) and writes its int8 values, then its float32 group scales.

`tensors` maps llama2.c's names to float32 arrays in PyTorch (out, in) layout:
tok_embeddings (V, D); per layer i: attention_norm.i (D,), wq.i (D, D), wk.i (KV, D),
wv.i (KV, D), wo.i (D, D), ffn_norm.i (D,), w1.i (H, D), w2.i (D, H), w3.i (H, D);
norm (D,); output (V, D) when the classifier is not shared.
"""
import os
import struct
from typing import Callable, Dict, Iterable

import numpy as np

from pecca.config import ModelConfig
from pecca.progress import progress
from pecca.quant import quantize_q8_groups

MAGIC = 0x616B3432
QUANT_CHUNK = 1 << 24  # values quantized at a time: NumPy's temporaries stay ~100 MB


def tensor_order(c: ModelConfig, version: int, shared: bool) -> Iterable[str]:
    L = range(c.n_layers)
    per = lambda name: [f"{name}.{i}" for i in L]  # noqa: E731
    if version == 0:
        names = (["tok_embeddings"] + per("attention_norm") + per("wq") + per("wk") + per("wv")
                 + per("wo") + per("ffn_norm") + per("w1") + per("w2") + per("w3") + ["norm"]
                 + ["freq_cis_real", "freq_cis_imag"])
    else:  # versions 1 and 2: norms first (in version 2 the f32 part), then the matrices
        names = (per("attention_norm") + per("ffn_norm") + ["norm", "tok_embeddings"] + per("wq")
                 + per("wk") + per("wv") + per("wo") + per("w1") + per("w2") + per("w3"))
    return names + ([] if shared else ["output"])


def freq_cis(c: ModelConfig):
    """llama2.c model.py precompute_freqs_cis (stored in version-0 files, unused by run.c)."""
    hs = c.head_size
    freqs = 1.0 / (c.rope_theta ** (np.arange(0, hs, 2)[: hs // 2].astype(np.float32) / hs))
    ang = np.outer(np.arange(c.seq_len, dtype=np.float32), freqs).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def header(c: ModelConfig, version: int, shared: bool, group_size: int) -> bytes:
    fields = [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len]
    if version == 0:
        if not shared:
            fields[5] = -fields[5]
        return struct.pack("<7i", *fields)
    head = struct.pack("<Ii7iB", MAGIC, version, *fields, int(shared))
    if version == 2:
        head += struct.pack("<i", group_size)  # unaligned, at byte 37, as export.py packs it
    return head + b"\0" * (256 - len(head))


def check_group_size(c: ModelConfig, group_size: int) -> None:
    """runq.c quantizes activations of length dim and hidden_dim in whole groups and would
    silently drop a partial last group, so the group size must divide both."""
    if group_size <= 0 or c.dim % group_size or c.hidden_dim % group_size:
        raise ValueError(f"group_size {group_size} must divide dim {c.dim} and "
                         f"hidden_dim {c.hidden_dim}")


def write_q8(f, arr: np.ndarray, group_size: int) -> None:
    """One version-2 tensor: all its int8 values, then all its float32 scales. Quantized a
    chunk of whole groups at a time (groups never straddle chunks)."""
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    step = max(group_size, QUANT_CHUNK // group_size * group_size)
    scales = []
    for start in range(0, flat.size, step):
        q, s = quantize_q8_groups(flat[start:start + step], group_size)
        f.write(q.tobytes())
        scales.append(s)
    f.write(np.concatenate(scales).astype("<f4").tobytes())


def write_llama2c(path: str, c: ModelConfig, get: Callable[[str], np.ndarray],
                  version: int = 0, shared: bool = True, group_size: int = 64) -> None:
    """Write a llama2.c file. `get(name)` returns each tensor when it is needed (so a big
    model streams); the file appears under `path` only once complete. `group_size` is the
    quantization group of version 2 (ignored otherwise)."""
    if version not in (0, 1, 2):
        raise ValueError("version must be 0, 1 or 2")
    if version == 2:
        check_group_size(c, group_size)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header(c, version, shared, group_size))
            cos, sin = freq_cis(c) if version == 0 else (None, None)
            names = tensor_order(c, version, shared)
            with progress(f"writing {os.path.basename(path)}", len(names)) as advance:
                for name in names:
                    if name == "freq_cis_real":
                        arr = cos
                    elif name == "freq_cis_imag":
                        arr = sin
                    else:
                        arr = get(name)
                    if version == 2 and np.ndim(arr) == 2:
                        write_q8(f, arr, group_size)
                    else:
                        f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
                    advance()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def shapes(c: ModelConfig) -> Dict[str, tuple]:
    d, h, kv, V = c.dim, c.hidden_dim, c.kv_dim, c.vocab_size
    out = {"tok_embeddings": (V, d), "norm": (d,), "output": (V, d)}
    for i in range(c.n_layers):
        out.update({f"attention_norm.{i}": (d,), f"ffn_norm.{i}": (d,), f"wq.{i}": (d, d),
                    f"wk.{i}": (kv, d), f"wv.{i}": (kv, d), f"wo.{i}": (d, d),
                    f"w1.{i}": (h, d), f"w2.{i}": (d, h), f"w3.{i}": (h, d)})
    return out


def random_weights(c: ModelConfig, seed: int = 0) -> Callable[[str], np.ndarray]:
    """Deterministic random tensors at the scale of a trained model (norms near 1, matrices
    ~ N(0, 1/in_features)), so activations stay in a realistic range."""
    shp = shapes(c)

    def get(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, sum(map(ord, name)), len(name)])
        s = shp[name]
        if len(s) == 1:
            return (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        return (rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32)

    return get


STORIES_SHAPES = {
    "stories15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6,
                              vocab_size=32000, seq_len=256),
    "stories42M": ModelConfig(dim=512, hidden_dim=1376, n_layers=8, n_heads=8, n_kv_heads=8,
                              vocab_size=32000, seq_len=1024),
    "stories110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12,
                               vocab_size=32000, seq_len=1024),
}


class Llama2cSource:
    """A llama2.c checkpoint (versions 0 and 1) as an export source. Its q/k rows are already
    in Meta's order, which is GGUF's."""

    def __init__(self, path: str, tokenizer_path: str):
        from export.vocab import vocab_from_llama2c, vocab_from_sentencepiece
        from pecca.formats import llama2c as reader

        self.path = path
        self.loaded = reader.read(path)
        self.config = self.loaded.config
        self.tied = self.loaded.weights.shared_classifier
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.vocab = (vocab_from_sentencepiece(tokenizer_path) if tokenizer_path.endswith(".model")
                      else vocab_from_llama2c(tokenizer_path))

    def tensor(self, name: str):
        from pecca.formats.tensors import RawTensor

        w = self.loaded.weights
        if name == "token_embd.weight":
            return RawTensor(w.token_embedding, "f32")
        if name == "output_norm.weight":
            return RawTensor(w.norm, "f32")
        if name == "output.weight":
            return RawTensor(w.output.w, "f32")
        _, i, what, _ = name.split(".")
        layer = w.layers[int(i)]
        attr = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "wq", "attn_k": "wk",
                "attn_v": "wv", "attn_output": "wo", "ffn_gate": "w1", "ffn_down": "w2",
                "ffn_up": "w3"}[what]
        value = getattr(layer, attr)
        return RawTensor(value if isinstance(value, np.ndarray) else value.w, "f32")
