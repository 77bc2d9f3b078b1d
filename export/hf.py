"""HuggingFace Llama directories as an export source: config.json, weights in safetensors
(one file or shards with an index) or pytorch_model*.bin, and tokenizer.model (sentencepiece)
or else tokenizer.json (written as a `gpt2` vocabulary for byte-level BPE such as Llama 3's).

Safetensors files are parsed here rather than with `safetensors.safe_open`: numpy has no
bfloat16 (safe_open refuses it) and we want memory-mapped views, not copies. The format is an
8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
`.bin` files are PyTorch zip pickles, read without torch by pecca.formats.pth.

HF stores q and k rows permuted for its rotate-half RoPE; GGUF (like Meta and llama2.c) keeps
the interleaved order, so those rows are permuted back, exactly as llama.cpp's converter does.
"""
import json
import os
import struct
from typing import Dict, Tuple

import numpy as np

from pecca.config import ModelConfig, llama3_rope_factors
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.llama2c import LIMITS
from pecca.formats.tensors import RawTensor, release_pages

SAFETENSORS_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
MAX_HEADER = 100 << 20


def read_safetensors(path: str) -> Dict[str, RawTensor]:
    """Every tensor of a .safetensors file as a memory-mapped RawTensor."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: too short for a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise ModelFormatError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{path}: tensor {name}: malformed header entry") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedModelError(f"{path}: tensor {name} has dtype {dtype}; pecca exports F32, F16 and BF16")
        kind, np_dtype = SAFETENSORS_DTYPES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize if shape else np.dtype(np_dtype).itemsize
        if any(d < 0 for d in shape) or not 0 <= begin <= end or end - begin != nbytes:
            raise ModelFormatError(f"{path}: tensor {name}: offsets {begin}..{end} do not match shape {shape}")
        if 8 + n + end > size:
            raise ModelFormatError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
        data = mm[8 + n + begin:8 + n + end].view(np_dtype).reshape(shape) if nbytes else np.zeros(shape, np_dtype)
        out[name] = RawTensor(data, kind)
    return out


def weight_files(d: str):
    """(kind, [files]) of the checkpoint in directory `d`."""
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(d, index)):
            try:
                with open(os.path.join(d, index)) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise ModelFormatError(f"{d}/{index}: not a weight index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            missing = [x for x in files if not os.path.isfile(os.path.join(d, x))]
            if missing:
                raise ModelFormatError(f"{d}: shard {missing[0]} named in {index} is missing")
            return kind, [os.path.join(d, x) for x in files]
        if os.path.isfile(os.path.join(d, single)):
            return kind, [os.path.join(d, single)]
    raise ModelFormatError(f"{d}: no model.safetensors, pytorch_model.bin or their index")


def _get(cfg, key, path, default=None, required=False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ModelFormatError(f"{path}: config field {key} is missing")
    return default


def _positive(cfg, key, path, limit, default=None):
    v = _get(cfg, key, path, default, required=default is None)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= limit:
        raise ModelFormatError(f"{path}: config field {key} = {v!r}, expected an integer in 1..{limit}")
    return v


def rope_settings(cfg, path, head_size):
    """(theta, per-pair factors or None) from rope_theta/rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta") or 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, (float(scaling["factor"]),) * (head_size // 2)
    if kind == "llama3":
        try:
            return theta, llama3_rope_factors(
                head_size, theta, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        except KeyError as e:
            raise ModelFormatError(f"{path}: rope_scaling of type llama3 lacks {e}") from None
    raise UnsupportedModelError(f"{path}: rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def read_config(d: str) -> Tuple[ModelConfig, dict]:
    """The ModelConfig of directory `d`, and config.json as read (for the fields it leaves out)."""
    path = os.path.join(d, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelFormatError(f"{d}: no config.json") from None
    except ValueError as e:
        raise ModelFormatError(f"{path}: not JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise UnsupportedModelError(f"{path}: architecture {archs or cfg.get('model_type')!r}; pecca exports "
                                    "LlamaForCausalLM")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("sliding_window", None)):
        if cfg.get(key, ok) != ok:
            raise UnsupportedModelError(f"{path}: config field {key} = {cfg[key]!r} is not supported "
                                        f"(expected {ok!r})")
    dim = _positive(cfg, "hidden_size", path, LIMITS["dim"])
    n_heads = _positive(cfg, "num_attention_heads", path, LIMITS["n_heads"])
    n_kv = _positive(cfg, "num_key_value_heads", path, LIMITS["n_kv_heads"], default=n_heads)
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ModelFormatError(f"{path}: hidden_size {dim}, num_attention_heads {n_heads}, "
                               f"num_key_value_heads {n_kv} do not divide evenly (or odd head size)")
    head_dim = cfg.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise UnsupportedModelError(f"{path}: head_dim {head_dim} differs from hidden_size / heads")
    theta, factors = rope_settings(cfg, path, dim // n_heads)

    def token_id(key, default):
        v = cfg.get(key, default)
        return int(v[0] if isinstance(v, list) else (default if v is None else v))

    return ModelConfig(
        dim=dim, hidden_dim=_positive(cfg, "intermediate_size", path, LIMITS["hidden_dim"]),
        n_layers=_positive(cfg, "num_hidden_layers", path, LIMITS["n_layers"]),
        n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=_positive(cfg, "vocab_size", path, LIMITS["vocab_size"]),
        seq_len=_positive(cfg, "max_position_embeddings", path, LIMITS["seq_len"], default=2048),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        bos_id=token_id("bos_token_id", 1), eos_id=token_id("eos_token_id", 2),
        rope_freq_factors=factors), cfg


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half row order -> interleaved pairs (llama.cpp's LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


class HFSource:
    """A HuggingFace Llama directory as an export source."""

    def __init__(self, d: str, tokenizer_path: str = None):
        from export.vocab import chat_template_beside, vocab_from_sentencepiece, vocab_from_tokenizer_json

        self.dir = d
        self.config, cfg = read_config(d)
        kind, files = weight_files(d)
        self.tensors: Dict[str, RawTensor] = {}
        for f in files:
            if kind == "safetensors":
                self.tensors.update(read_safetensors(f))
            else:
                from pecca.formats.pth import read_pth

                self.tensors.update(read_pth(f))
        self.tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in self.tensors
        self.name = os.path.basename(os.path.normpath(d))
        tok = tokenizer_path or self.tokenizer_file(d)
        if tok.endswith(".json"):
            self.vocab = vocab_from_tokenizer_json(tok, self.config.vocab_size)
        else:
            self.vocab = vocab_from_sentencepiece(tok)
        self.vocab.chat_template = chat_template_beside(tok)

    @staticmethod
    def tokenizer_file(d: str) -> str:
        """A sentencepiece tokenizer.model when there is one, else tokenizer.json (Llama 3's
        directories may hold a tiktoken-format tokenizer.model beside it, which is skipped)."""
        spm, js = os.path.join(d, "tokenizer.model"), os.path.join(d, "tokenizer.json")
        if os.path.isfile(spm):
            with open(spm, "rb") as f:
                if f.read(1) == b"\x0a" or not os.path.isfile(js):  # a sentencepiece ModelProto
                    return spm
        if os.path.isfile(js):
            return js
        raise ModelFormatError(f"{d}: no tokenizer.model or tokenizer.json; pass the tokenizer with "
                               "--tokenizer")

    def hf(self, name: str) -> RawTensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.dir}: tensor {name} is missing from the checkpoint")
        return t

    def tensor(self, name: str) -> RawTensor:
        c = self.config
        if name == "token_embd.weight":
            return self.hf("model.embed_tokens.weight")
        if name == "output_norm.weight":
            return self.hf("model.norm.weight")
        if name == "output.weight":
            return self.hf("lm_head.weight")
        if name == "rope_freqs.weight":
            return RawTensor(np.asarray(c.rope_freq_factors, np.float32), "f32")
        _, i, what, _ = name.split(".")
        t = self.hf(f"model.layers.{i}.{HF_NAMES[what]}.weight")
        if what in ("attn_q", "attn_k"):
            heads = c.n_heads if what == "attn_q" else c.n_kv_heads
            expect = (c.dim if what == "attn_q" else c.kv_dim, c.dim)
            if tuple(t.shape) != expect:
                raise ModelFormatError(f"{self.dir}: tensor model.layers.{i}.{HF_NAMES[what]}.weight has "
                                       f"shape {list(t.shape)}, expected {list(expect)} from the config")
            out = RawTensor(unpermute(t.data, heads), t.dtype)
            release_pages(t.data)  # the copy is made: the source pages can leave the RSS
            return out
        return t
