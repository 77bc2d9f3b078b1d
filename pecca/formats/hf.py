"""HuggingFace Llama directories: config.json, the weight files, and the q/k row order.

Used by the runtime (a GPTQ directory loads directly) and by export (export.hf). transformers
>= 5 writes `rope_parameters` instead of a top-level `rope_theta`; both are read.

HF stores q and k rows permuted for its rotate-half RoPE; GGUF (like Meta and llama2.c) keeps
the interleaved order, so those rows are permuted back (`unpermute`), exactly as llama.cpp's
converter does.
"""
import json
import os
from typing import Tuple

import numpy as np

from pecca.config import ModelConfig, llama3_rope_factors
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.llama2c import LIMITS


def indexed_files(d: str, index: str):
    """The shard files that `index` (a *.index.json in `d`) names in its weight_map."""
    try:
        with open(os.path.join(d, index)) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelFormatError(f"{d}/{index}: not a weight index (no weight_map)") from None
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
