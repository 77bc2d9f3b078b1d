"""HuggingFace GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum), loaded directly from the
directory, memory-mapped and never rewritten. `pecca export` turns one into a GGUF with the
kernel-friendly q4g layout (export.gptq); this module is also the reader export builds on.

A directory holds config.json with a `quantization_config` block (or a quantize_config.json
beside it) and safetensors files. Every quantized Linear P (in_features K, out_features N,
G groups) is four tensors (../shared/models/gptq/FORMAT.md has the details and sources):
    P.qweight int32 (K/8, N)  4-bit codes packed along the input: row 8r+k in bits 4k..4k+3
    P.qzeros  int32 (G, N/8)  zero points packed along the output; in the original ("gptq", v1)
                              format stored minus 0x11111111 per whole word, "gptq_v2" as they are
    P.scales  f16   (G, N)
    P.g_idx   int32 (K,)      group of each input (not monotone with act-order); absent in old
                              files: i // group_size
    P.bias    (N,)            optional (AutoGPTQ writes zeros)
W[j, i] = scales[g_idx[i], j] * (code(i, j) - zero(g_idx[i], j)). A module GPTQModel left in
floating point (its `dynamic` config) keeps P.weight: each module is judged by which tensors it
has. Embeddings and norms stay as stored; lm_head too, unless the config quantized it.
"""
import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from pecca.config import ModelConfig
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.hf import HF_NAMES, find_weights, need_tensor, read_config, unpermute
from pecca.formats.safetensors import read_safetensors
from pecca.formats.tensors import RawTensor

V1_ZERO_ADD = 0x11111111
FORMATS = ("gptq", "gptq_v2")
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class QuantConfig:
    """The settings of a GPTQ checkpoint that matter for reading its tensors."""
    bits: int
    group_size: int  # -1: one group spanning the whole input
    desc_act: bool
    sym: bool
    format: str  # "gptq" (v1: zeros stored minus one) or "gptq_v2"
    lm_head: bool
    dynamic: dict  # GPTQModel's per-module overrides: regex -> settings, "-:" prefix = not quantized
    base_name: Optional[str]  # AutoGPTQ's model_file_base_name
    source: str  # the file it was read from

    @property
    def zero_add(self) -> int:
        return V1_ZERO_ADD if self.format == "gptq" else 0

    def override(self, module: str) -> dict:
        """The settings GPTQModel's `dynamic` gives `module` (first matching pattern wins, as
        in GPTQModel's dynamic_get); {} when none matches."""
        for pattern, settings in self.dynamic.items():
            if pattern.startswith("-:"):
                if re.match(pattern[2:], module):
                    return {}
            elif re.match(pattern[2:] if pattern.startswith("+:") else pattern, module):
                return settings if isinstance(settings, dict) else {}
        return {}

    def summary(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "format": self.format, "lm_head": self.lm_head}


def _field(q, key, path, kinds, default):
    v = q.get(key, default)
    if v is None:
        v = default
    if not isinstance(v, kinds) or (int in kinds and isinstance(v, bool) and bool not in kinds):
        raise ModelFormatError(f"{path}: quantization field {key} = {v!r} has the wrong type")
    return v


def quant_block(d: str, cfg: dict):
    """(quantization settings dict, the file it came from), or (None, None) for a plain model.
    config.json's quantization_config first (transformers' choice), else quantize_config.json."""
    q = cfg.get("quantization_config")
    if q is not None:
        return q, os.path.join(d, "config.json")
    for name in ("quantize_config.json", "quant_config.json"):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f), path
            except (ValueError, RecursionError) as e:  # RecursionError: absurd nesting
                raise ModelFormatError(f"{path}: not JSON ({str(e)[:100]})") from None
    return None, None


def read_quant_config(d: str, cfg: dict) -> Optional[QuantConfig]:
    """The GPTQ settings of directory `d` (config.json already read as `cfg`), or None when the
    directory is not quantized. Refuses, naming the field, every layout pecca cannot read."""
    q, path = quant_block(d, cfg)
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelFormatError(f"{path}: the quantization config is not a JSON object")
    method = q.get("quant_method", q.get("method", "gptq"))
    if method != "gptq":
        raise UnsupportedModelError(f"{path}: quant_method {method!r} is not supported; pecca reads GPTQ "
                                    "checkpoints (quant_method 'gptq')")
    bits = q.get("bits")
    if bits is None:
        raise ModelFormatError(f"{path}: quantization field bits is missing")
    if bits != 4:
        raise UnsupportedModelError(f"{path}: bits = {bits!r}; pecca runs 4-bit GPTQ only")
    if q.get("is_marlin_format"):
        raise UnsupportedModelError(f"{path}: is_marlin_format = true (Marlin-repacked weights); pecca "
                                    "reads the plain GPTQ layout")
    fmt = q.get("format") or q.get("checkpoint_format") or "gptq"
    if fmt not in FORMATS:
        field = "format" if q.get("format") else "checkpoint_format"
        raise UnsupportedModelError(f"{path}: {field} = {fmt!r} is not supported; pecca reads 'gptq' and "
                                    "'gptq_v2'")
    pack = q.get("pack_dtype", "int32") or "int32"
    if str(pack).replace("torch.", "") != "int32":
        raise UnsupportedModelError(f"{path}: pack_dtype = {pack!r}; pecca reads int32-packed GPTQ")
    gs = _field(q, "group_size", path, (int,), -1)
    if gs != -1 and gs <= 0:
        raise ModelFormatError(f"{path}: group_size = {gs}; expected -1 or a positive integer")
    dynamic = q.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ModelFormatError(f"{path}: dynamic = {dynamic!r:.60} is not a JSON object")
    for pattern in dynamic:  # checked here: re.error later would not name the file
        try:
            re.compile(pattern[2:] if pattern.startswith(("+:", "-:")) else pattern)
        except re.error as e:
            raise ModelFormatError(f"{path}: dynamic pattern {pattern!r:.60} is not a regular expression ({e})") from None
    base = q.get("model_file_base_name")
    return QuantConfig(bits, gs, bool(_field(q, "desc_act", path, (bool,), False)),
                       bool(_field(q, "sym", path, (bool,), True)), fmt,
                       bool(_field(q, "lm_head", path, (bool,), False)), dynamic,
                       base if isinstance(base, str) and base else None, path)


def linear_shapes(c: ModelConfig) -> Dict[str, tuple]:
    """(out_features, in_features) of each Linear of a layer, by GGUF name."""
    d, h, kv = c.dim, c.hidden_dim, c.kv_dim
    return {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
            "ffn_gate": (h, d), "ffn_up": (h, d), "ffn_down": (d, h)}


def q_k_heads(c: ModelConfig, what: str) -> Optional[int]:
    """The head count whose rotary row order HF permuted (q and k), else None."""
    return {"attn_q": c.n_heads, "attn_k": c.n_kv_heads}.get(what)


def rope_row_order(rows: int, heads: int) -> np.ndarray:
    """out_perm: row i of the Meta-order (interleaved RoPE) matrix is row out_perm[i] of HF's."""
    return np.ascontiguousarray(unpermute(np.arange(rows, dtype=np.int32), heads))


@dataclass
class GPTQTensors:
    """One quantized Linear's tensors, checked against each other and the config."""
    name: str  # HF module prefix, e.g. model.layers.3.self_attn.q_proj
    file: str
    qweight: np.ndarray  # int32 (K/8, N)
    qzeros: np.ndarray  # int32 (G, N/8)
    scales: np.ndarray  # float16 (G, N)
    g_idx: np.ndarray  # int32 (K,)
    bias: Optional[np.ndarray]  # float32 (N,), None when absent or all zero
    group_size: int  # as configured, -1 allowed
    zero_add: int  # 0x11111111 for v1 zeros, 0 for v2

    @property
    def shape(self):
        """(out_features, in_features)"""
        return self.scales.shape[1], self.g_idx.shape[0]

    @property
    def groups(self) -> int:
        return self.scales.shape[0]


class GPTQCheckpoint:
    """A GPTQ directory: config, quantization settings, and its tensors as memory-maps."""

    def __init__(self, d: str):
        self.dir = d
        self.config, self.cfg = read_config(d)
        quant = read_quant_config(d, self.cfg)
        if quant is None:
            raise UnsupportedModelError(f"{d}: a HuggingFace directory without a quantization config; "
                                        f"convert it first: pecca export {d} model.gguf")
        self.quant = quant
        self.files = gptq_weight_files(d, quant)
        self.tensors: Dict[str, RawTensor] = {}
        self.file_of: Dict[str, str] = {}
        for f in self.files:
            for name, t in read_safetensors(f, ints=True).items():
                self.tensors[name] = t
                self.file_of[name] = f
        has_head = "lm_head.weight" in self.tensors or "lm_head.qweight" in self.tensors
        self.tied = bool(self.cfg.get("tie_word_embeddings", False)) or not has_head
        self.name = os.path.basename(os.path.normpath(d))

    def raw(self, name: str) -> RawTensor:
        return need_tensor(self.tensors, name, self.dir)

    def where(self, name: str) -> str:
        return self.file_of.get(name, self.dir)

    def is_quantized(self, prefix: str) -> bool:
        """Whether module `prefix` is stored as GPTQ tensors (else as a plain .weight)."""
        if prefix + ".qweight" in self.tensors:
            return True
        if prefix + ".weight" in self.tensors:
            return False
        raise ModelFormatError(f"{self.dir}: module {prefix} has neither {prefix}.qweight (GPTQ) nor "
                               f"{prefix}.weight")

    def module(self, prefix: str, shape) -> GPTQTensors:
        """The checked GPTQ tensors of module `prefix` with (out_features, in_features) `shape`."""
        n, k = shape
        settings = self.quant.override(prefix)
        bits = settings.get("bits", self.quant.bits)
        if bits != 4:
            raise UnsupportedModelError(f"{self.quant.source}: dynamic gives {prefix} bits = {bits!r}; "
                                        "pecca runs 4-bit GPTQ only")
        gs = settings.get("group_size", self.quant.group_size)
        if gs != -1 and (not isinstance(gs, int) or gs <= 0 or k % gs):
            raise UnsupportedModelError(f"{self.quant.source}: group_size {gs} does not divide the "
                                        f"{k} inputs of {prefix}")
        if k % 8 or n % 8:
            raise ModelFormatError(f"{self.dir}: {prefix} is {n}x{k}; 4-bit packing needs both "
                                   "multiples of 8")
        g = 1 if gs == -1 else k // gs
        qweight = self._checked(prefix + ".qweight", "i32", (k // 8, n), "in_features / 8, out_features")
        qzeros = self._checked(prefix + ".qzeros", "i32", (g, n // 8), "groups, out_features / 8")
        scales = self._checked(prefix + ".scales", "f16", (g, n), "groups, out_features")
        if prefix + ".g_idx" in self.tensors:
            g_idx = self._checked(prefix + ".g_idx", "i32", (k,), "in_features")
            bad = (g_idx < 0) | (g_idx >= g)
            if bad.any():
                i = int(np.argmax(bad))
                raise ModelFormatError(f"{self.where(prefix + '.g_idx')}: tensor {prefix}.g_idx[{i}] = "
                                       f"{int(g_idx[i])}, expected a group in 0..{g - 1}")
        else:  # files from before act-order: contiguous groups
            g_idx = (np.arange(k, dtype=np.int32) // (k if gs == -1 else gs)).astype(np.int32)
        return GPTQTensors(prefix, self.where(prefix + ".qweight"), qweight, qzeros, scales, g_idx,
                           self._bias(prefix, n), gs, self.quant.zero_add)

    def _checked(self, name, dtype, shape, meaning) -> np.ndarray:
        t = self.raw(name)
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ModelFormatError(f"{self.where(name)}: tensor {name} is {t.dtype} {list(t.shape)}, "
                                   f"expected {dtype} {list(shape)} ({meaning})")
        return t.data

    def _bias(self, prefix, n) -> Optional[np.ndarray]:
        """float32 bias, or None when absent or all zero (AutoGPTQ writes zero biases)."""
        t = self.tensors.get(prefix + ".bias")
        if t is None:
            return None
        if t.dtype == "i32" or tuple(t.shape) != (n,):
            raise ModelFormatError(f"{self.where(prefix + '.bias')}: tensor {prefix}.bias is {t.dtype} "
                                   f"{list(t.shape)}, expected a float vector of {n}")
        b = t.to_f32()
        return b if np.any(b) else None

    def float_matrix(self, name: str, shape) -> RawTensor:
        t = self.raw(name)
        if t.dtype == "i32" or tuple(t.shape) != tuple(shape):
            raise ModelFormatError(f"{self.where(name)}: tensor {name} is {t.dtype} {list(t.shape)}, "
                                   f"expected a float matrix {list(shape)} from the config")
        return t

    def module_kinds(self) -> Dict[str, int]:
        """How many Linears are GPTQ and how many plain, for `pecca info`."""
        kinds = {}
        for i in range(self.config.n_layers):
            for what in LINEARS:
                p = f"model.layers.{i}.{HF_NAMES[what]}"
                k = "GPTQ-4bit" if self.is_quantized(p) else self.raw(p + ".weight").dtype.upper()
                kinds[k] = kinds.get(k, 0) + 1
        return kinds


def gptq_weight_files(d: str, q: QuantConfig):
    """The safetensors files of a GPTQ directory: model_file_base_name when the config names
    one, model.safetensors (GPTQModel, TheBloke), AutoGPTQ's default gptq_model-4bit-128g, each
    possibly sharded with an index; else the directory's only .safetensors file."""
    bases = ([q.base_name] if q.base_name else []) + ["model", f"gptq_model-{q.bits}bit-{q.group_size}g"]
    found = find_weights(d, [("safetensors", f"{b}.safetensors", f"{b}.safetensors.index.json")
                             for b in bases])
    if found is not None:
        return found[1]
    files = sorted(glob.glob(os.path.join(glob.escape(d), "*.safetensors")))
    if len(files) == 1:
        return files
    raise ModelFormatError(f"{d}: cannot tell the weight file: looked for "
                           f"{', '.join(b + '.safetensors' for b in bases)} (or an index), found "
                           f"{len(files)} .safetensors files")


def is_gptq_dir(d: str) -> bool:
    """Whether directory `d` is a quantized HF checkpoint (of any method: the reader then says
    which it refuses)."""
    if os.path.isfile(os.path.join(d, "quantize_config.json")) or \
            os.path.isfile(os.path.join(d, "quant_config.json")):
        return True
    try:
        with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("quantization_config") is not None
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def read(d: str):
    """A GPTQ directory as a LoadedModel (pecca.formats), weights memory-mapped."""
    from pecca.formats import LoadedModel

    ck = GPTQCheckpoint(d)
    weights = build_weights(ck)
    size = sum(os.path.getsize(f) for f in ck.files)
    extra = {"architecture": "llama", "name": ck.name, "tokenizer": None, "gptq": ck.quant.summary(),
             "tensor_types": ck.module_kinds()}
    return LoadedModel(ck.config, weights, d, "hf-gptq", size, extra=extra)


def build_weights(ck: GPTQCheckpoint):
    from pecca.weights import LayerWeights, Weights

    c = ck.config
    emb = ck.float_matrix("model.embed_tokens.weight", (c.vocab_size, c.dim))
    layers = []
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        lin = {what: linear(ck, p + HF_NAMES[what], shape, q_k_heads(c, what))
               for what, shape in linear_shapes(c).items()}
        layers.append(LayerWeights(
            attn_norm=_norm(ck, p + "input_layernorm.weight", c.dim),
            wq=lin["attn_q"], wk=lin["attn_k"], wv=lin["attn_v"], wo=lin["attn_output"],
            ffn_norm=_norm(ck, p + "post_attention_layernorm.weight", c.dim),
            w1=lin["ffn_gate"], w2=lin["ffn_down"], w3=lin["ffn_up"]))
    if ck.tied:
        output = float_linear(emb.data, "model.embed_tokens.weight", ck)
    else:
        output = linear(ck, "lm_head", (c.vocab_size, c.dim), None)
    return Weights(emb.data, layers, _norm(ck, "model.norm.weight", c.dim), output, ck.tied)


def _norm(ck, name, n) -> np.ndarray:
    t = ck.raw(name)
    if t.dtype == "i32" or tuple(t.shape) != (n,):
        raise ModelFormatError(f"{ck.where(name)}: tensor {name} is {t.dtype} {list(t.shape)}, "
                               f"expected a float vector of {n}")
    return np.ascontiguousarray(t.to_f32())


def linear(ck: GPTQCheckpoint, prefix: str, shape, heads: Optional[int]):
    """The Linear of module `prefix`: GPTQLinear over the memory-mapped tensors (q/k rows put in
    Meta order by an output gather), or a float Linear for a module left unquantized."""
    if ck.is_quantized(prefix):
        m = ck.module(prefix, shape)
        from pecca.weights import GPTQLinear

        out_perm = rope_row_order(shape[0], heads) if heads else None
        try:
            return GPTQLinear(m.qweight, m.qzeros, m.scales, m.g_idx, m.zero_add != 0, out_perm, m.bias)
        except ValueError as e:
            raise ModelFormatError(f"{m.file}: {prefix}: {e}") from None
    t = ck.float_matrix(prefix + ".weight", shape)
    data = np.ascontiguousarray(unpermute(t.data, heads)) if heads else t.data  # a copy for q/k only
    return float_linear(data, prefix + ".weight", ck)


def float_linear(data: np.ndarray, name: str, ck: GPTQCheckpoint):
    from pecca import weights as W

    cls = {np.dtype(np.float32): W.F32Linear, np.dtype(np.float16): W.F16Linear,
           np.dtype(np.uint16): W.BF16Linear}[data.dtype]
    try:
        return cls(data)
    except ValueError as e:
        raise ModelFormatError(f"{ck.where(name)}: tensor {name}: {e}") from None
