"""HuggingFace Llama directories: config.json, the weight files, and the q/k row order.

Used by the runtime (a GPTQ directory loads directly) and by export (export.hf). transformers
>= 5 writes `rope_parameters` instead of a top-level `rope_theta`; both are read.

HF stores q and k rows permuted for its rotate-half RoPE; GGUF (like Meta and llama2.c) keeps
the interleaved order, so those rows are permuted back (`unpermute`), exactly as llama.cpp's
converter does.
"""
import json
import math
import os
from typing import Tuple

import numpy as np

from pecca.config import ModelConfig, llama3_rope_factors
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.llama2c import LIMITS


def indexed_files(d: str, index: str):
    """The shard files that `index` (a *.index.json in `d`) names in its weight_map."""
    try:
        with open(os.path.join(d, index), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ModelFormatError(f"{d}/{index}: not a weight index (no weight_map)") from None
    bad = [x for x in files if not isinstance(x, str) or x != os.path.basename(x) or x in ("", ".", "..")]
    if bad:  # a shard is a file in the folder, never a path leading out of it
        raise ModelFormatError(f"{d}/{index}: weight_map names {bad[0]!r:.60}, not a file name in the folder")
    missing = [x for x in files if not os.path.isfile(os.path.join(d, x))]
    if missing:
        raise ModelFormatError(f"{d}: shard {missing[0]} named in {index} is missing")
    return [os.path.join(d, x) for x in files]


def find_weights(d: str, candidates):
    """(kind, [files]) of the first (kind, single file, index file) of `candidates` present in
    `d` (an index first), or None."""
    for kind, single, index in candidates:
        if os.path.isfile(os.path.join(d, index)):
            return kind, indexed_files(d, index)
        if os.path.isfile(os.path.join(d, single)):
            return kind, [os.path.join(d, single)]
    return None


def weight_files(d: str):
    """(kind, [files]) of the checkpoint in directory `d`."""
    found = find_weights(d, (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                             ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")))
    if found is None:
        raise ModelFormatError(f"{d}: no model.safetensors, pytorch_model.bin or their index")
    return found


def need_tensor(tensors: dict, name: str, where: str):
    """tensors[name], or an error naming the checkpoint and the tensor."""
    t = tensors.get(name)
    if t is None:
        raise ModelFormatError(f"{where}: tensor {name} is missing from the checkpoint")
    return t


def _get(cfg, key, path, default=None, required=False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise ModelFormatError(f"{path}: config field {key} is missing")
    return default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(cfg, key, path, limit, default=None):
    v = _get(cfg, key, path, default, required=default is None)
    if not _is_int(v) or not 0 < v <= limit:
        raise ModelFormatError(f"{path}: config field {key} = {v!r:.60}, expected an integer in 1..{limit}")
    return v


def _number(d, key, path, default, lo=0.0, hi=math.inf, what="config field"):
    """A finite number in (lo, hi) (exclusive): a string, a list or NaN is an error naming the key."""
    v = d.get(key)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo < v < hi):
        raise ModelFormatError(f"{path}: {what} {key} = {v!r:.60}, expected a finite number in ({lo:g}, {hi:g})")
    return float(v)


def _object(v, path, what) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ModelFormatError(f"{path}: {what} = {v!r:.60} is not a JSON object")
    return v


def rope_settings(cfg, path, head_size):
    """(theta, per-pair factors or None) from rope_theta/rope_scaling (transformers 4) or
    rope_parameters (transformers 5)."""
    params = _object(cfg.get("rope_parameters"), path, "rope_parameters")
    theta = _number(params if params.get("rope_theta") is not None else cfg, "rope_theta", path, 10000.0)
    kind = params.get("rope_type", "default")
    scaling = _object(cfg.get("rope_scaling"), path, "rope_scaling") or (params if kind != "default" else {})
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    factor = lambda key: _number(scaling, key, path, None, what="rope_scaling")  # noqa: E731
    if kind == "linear":
        return theta, (factor("factor"),) * (head_size // 2)
    if kind == "llama3":
        original = scaling.get("original_max_position_embeddings")
        if not _is_int(original) or original <= 0:
            raise ModelFormatError(f"{path}: rope_scaling original_max_position_embeddings = {original!r:.40}, "
                                   "expected a positive integer")
        low, high = factor("low_freq_factor"), factor("high_freq_factor")
        if low == high:
            raise ModelFormatError(f"{path}: rope_scaling low_freq_factor equals high_freq_factor ({low})")
        return theta, llama3_rope_factors(head_size, theta, factor("factor"), low, high, original)
    raise UnsupportedModelError(f"{path}: rope_scaling type {kind!r:.40} is not supported "
                                "(default, linear, llama3)")


def read_config(d: str) -> Tuple[ModelConfig, dict]:
    """The ModelConfig of directory `d`, and config.json as read (for the fields it leaves out)."""
    path = os.path.join(d, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelFormatError(f"{d}: no config.json") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise ModelFormatError(f"{path}: not JSON ({str(e)[:100]})") from None
    cfg = _object(cfg, path, "config.json")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not (isinstance(archs, list) and "LlamaForCausalLM" in archs):
        raise UnsupportedModelError(f"{path}: architecture {archs or cfg.get('model_type')!r:.60}; pecca exports "
                                    "LlamaForCausalLM")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("sliding_window", None)):
        if cfg.get(key, ok) != ok:
            raise UnsupportedModelError(f"{path}: config field {key} = {cfg[key]!r:.60} is not supported "
                                        f"(expected {ok!r})")
    dim = _positive(cfg, "hidden_size", path, LIMITS["dim"])
    n_heads = _positive(cfg, "num_attention_heads", path, LIMITS["n_heads"])
    n_kv = _positive(cfg, "num_key_value_heads", path, LIMITS["n_kv_heads"], default=n_heads)
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ModelFormatError(f"{path}: hidden_size {dim}, num_attention_heads {n_heads}, "
                               f"num_key_value_heads {n_kv} do not divide evenly (or odd head size)")
    head_dim = cfg.get("head_dim") or dim // n_heads
    if head_dim != dim // n_heads:
        raise UnsupportedModelError(f"{path}: head_dim {head_dim!r:.40} differs from hidden_size / heads")
    theta, factors = rope_settings(cfg, path, dim // n_heads)

    def token_id(key, default):
        v = cfg.get(key, default)
        v = v[0] if isinstance(v, list) and v else (default if v is None else v)
        if not _is_int(v) or v < 0:
            raise ModelFormatError(f"{path}: config field {key} = {cfg.get(key)!r:.40}, expected a token id")
        return v

    return ModelConfig(
        dim=dim, hidden_dim=_positive(cfg, "intermediate_size", path, LIMITS["hidden_dim"]),
        n_layers=_positive(cfg, "num_hidden_layers", path, LIMITS["n_layers"]),
        n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=_positive(cfg, "vocab_size", path, LIMITS["vocab_size"]),
        seq_len=_positive(cfg, "max_position_embeddings", path, LIMITS["seq_len"], default=2048),
        norm_eps=_number(cfg, "rms_norm_eps", path, 1e-6, hi=1.0), rope_theta=theta,
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
