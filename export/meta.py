"""Meta's LLaMA checkpoint directories (llama, llama3 and codellama repositories' downloads):

    params.json            {"dim", "n_layers", "n_heads", "norm_eps", "vocab_size",
                            optional "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
                            "rope_theta", "use_scaled_rope"}; vocab_size is -1 in Llama 1/2
    consolidated.00.pth    one torch.save state dict per model-parallel rank
    ...                    (7B/8B: 1 shard, 13B: 2, 70B: 8)
    tokenizer.model

Each shard holds every tensor, split the way fairscale's parallel layers split them:
    tok_embeddings.weight        (V, D)   ParallelEmbedding: along dim 1 (Llama 1/2);
                                          VocabParallelEmbedding: along dim 0 (Llama 3)
    output.weight                (V, D)   ColumnParallelLinear: along dim 0
    layers.N.attention.wq/wk/wv  (out, D) ColumnParallelLinear: along dim 0
    layers.N.feed_forward.w1/w3  (H, D)   ColumnParallelLinear: along dim 0
    layers.N.attention.wo        (D, D)   RowParallelLinear: along dim 1
    layers.N.feed_forward.w2     (D, H)   RowParallelLinear: along dim 1
    norms (attention_norm, ffn_norm, norm)  replicated: shard 0's is taken
    rope.freqs                   (Llama 1 only) recomputed by everyone: skipped
The tok_embeddings axis is read from the shapes: its shards are (V, D/n) or (V/n, D).

`iter_merged_tensors` checks every shard's names, dtypes and shapes against each other and
against params.json before yielding anything, then merges one tensor at a time: memory stays
near one tensor (the shards themselves are memory-mapped views).
"""
import json
import math
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from pecca.config import check_heads
from pecca.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from pecca.formats.llama2c import LIMITS
from pecca.formats.pth import read_pth
from pecca.formats.tensors import RawTensor, release_pages

SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")

# How each tensor is split across model-parallel shards: the concatenation axis, or None for
# a tensor replicated on every shard. tok_embeddings is decided from its shapes (see above).
COLUMN, ROW, REPLICATED = 0, 1, None
SPLIT_AXIS = {
    "output.weight": COLUMN,
    "norm.weight": REPLICATED,
    "attention.wq.weight": COLUMN, "attention.wk.weight": COLUMN, "attention.wv.weight": COLUMN,
    "attention.wo.weight": ROW,
    "feed_forward.w1.weight": COLUMN, "feed_forward.w3.weight": COLUMN,
    "feed_forward.w2.weight": ROW,
    "attention_norm.weight": REPLICATED, "ffn_norm.weight": REPLICATED,
}
SKIPPED = {"rope.freqs"}

REQUIRED = ("dim", "n_layers", "n_heads", "norm_eps", "vocab_size")
# far beyond any real model (pecca's llama2.c limits): checked before any loop or product
PARAM_LIMITS = {"dim": LIMITS["dim"], "n_layers": LIMITS["n_layers"], "n_heads": LIMITS["n_heads"],
                "n_kv_heads": LIMITS["n_kv_heads"], "vocab_size": LIMITS["vocab_size"],
                "multiple_of": LIMITS["hidden_dim"]}
DEFAULTS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None,
            "rope_theta": 10000.0, "use_scaled_rope": False}


# --- params.json ---------------------------------------------------------------------------

def read_params(directory: str) -> dict:
    """params.json, validated, with every optional field filled in (n_kv_heads defaults to
    n_heads, as in Meta's model.py). A vocab_size of -1 is resolved from tok_embeddings."""
    params = _read_params_json(directory)
    if params["vocab_size"] == -1:
        params["vocab_size"] = _vocab_from_shards(directory, params, _open_shards(directory))
    return params


def hidden_dim(params: dict) -> int:
    """The feed-forward width, computed as Meta's model.py FeedForward does (float maths
    included, so it rounds exactly the same way)."""
    hidden = 4 * params["dim"]
    hidden = int(2 * hidden / 3)
    multiplier = params.get("ffn_dim_multiplier")
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    multiple_of = params.get("multiple_of") or DEFAULTS["multiple_of"]
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_params_json(directory) -> dict:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ModelNotFoundError(f"{directory}: no such directory")
    path = os.path.join(directory, "params.json")
    if not os.path.isfile(path):
        raise ModelFormatError(f"{directory}: no params.json; not a Meta checkpoint directory")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; RecursionError: absurd nesting
        raise ModelFormatError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path}: holds a JSON {type(raw).__name__}, not an object")
    for name in REQUIRED:
        if name not in raw:
            raise ModelFormatError(f"{path}: required field {name!r} is missing")

    def positive_int(name, allow=()):
        v, limit = raw[name], PARAM_LIMITS[name]
        if type(v) is not int or not (0 < v <= limit or v in allow):
            raise ModelFormatError(f"{path}: {name} = {v!r:.40} must be a positive integer (at most {limit})"
                                   + (f" or one of {list(allow)}" if allow else ""))
        return v

    def positive_number(name):
        v = raw[name]
        if type(v) not in (int, float) or not (v > 0 and math.isfinite(v)):
            raise ModelFormatError(f"{path}: {name} = {v!r:.40} must be a positive number (finite)")
        return float(v)

    p = {"dim": positive_int("dim"), "n_layers": positive_int("n_layers"),
         "n_heads": positive_int("n_heads"), "norm_eps": positive_number("norm_eps"),
         "vocab_size": positive_int("vocab_size", allow=(-1,))}
    p["n_kv_heads"] = positive_int("n_kv_heads") if raw.get("n_kv_heads") is not None else p["n_heads"]
    p["multiple_of"] = (positive_int("multiple_of") if raw.get("multiple_of") is not None
                        else DEFAULTS["multiple_of"])
    p["ffn_dim_multiplier"] = (positive_number("ffn_dim_multiplier")
                               if raw.get("ffn_dim_multiplier") is not None else None)
    if p["norm_eps"] >= 1:
        raise ModelFormatError(f"{path}: norm_eps = {p['norm_eps']} must be below 1")
    if (p["ffn_dim_multiplier"] or 1) > 64:  # real ones are near 1; a huge one overflows the width
        raise ModelFormatError(f"{path}: ffn_dim_multiplier = {p['ffn_dim_multiplier']} is far beyond any model's")
    p["rope_theta"] = (positive_number("rope_theta") if raw.get("rope_theta") is not None
                       else DEFAULTS["rope_theta"])
    scaled = raw.get("use_scaled_rope", False)
    if type(scaled) is not bool:
        raise ModelFormatError(f"{path}: use_scaled_rope = {scaled!r} must be true or false")
    p["use_scaled_rope"] = scaled
    check_heads(path, p["dim"], p["n_heads"], p["n_kv_heads"])
    if not 0 < hidden_dim(p) <= LIMITS["hidden_dim"]:
        raise ModelFormatError(f"{path}: the feed-forward width {hidden_dim(p)} (dim, multiple_of, "
                               f"ffn_dim_multiplier) is outside 1..{LIMITS['hidden_dim']}")
    return p


# --- the shards ----------------------------------------------------------------------------

def shard_paths(directory: str) -> List[str]:
    """consolidated.00.pth ... consolidated.NN.pth, in rank order; every rank present."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ModelNotFoundError(f"{directory}: no such directory")
    ranks: Dict[int, str] = {}
    for entry in sorted(os.listdir(directory)):
        m = SHARD_NAME.match(entry)
        if m:
            rank = int(m.group(1))
            if rank in ranks:
                raise ModelFormatError(f"{directory}: {ranks[rank]} and {entry} are both shard {rank}")
            ranks[rank] = entry
    if not ranks:
        raise ModelFormatError(f"{directory}: no consolidated.NN.pth shards")
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise ModelFormatError(
            f"{directory}: shard(s) {', '.join(f'{r:02d}' for r in missing)} missing "
            f"(found {', '.join(ranks[r] for r in sorted(ranks))})")
    return [os.path.join(directory, ranks[r]) for r in sorted(ranks)]


def _open_shards(directory) -> List[Tuple[str, Dict[str, RawTensor]]]:
    """(path, state dict of memmap views) for each shard: reads only the pickles."""
    return [(p, read_pth(p)) for p in shard_paths(directory)]


def _vocab_from_shards(directory, params, shards) -> int:
    path, sd = shards[0]
    tok = sd.get("tok_embeddings.weight")
    if tok is None:
        raise ModelFormatError(f"{path}: no tok_embeddings.weight to take vocab_size (-1 in "
                               "params.json) from")
    return tok.shape[0] * len(shards) if _tok_axis(path, params["dim"], shards) == 0 else tok.shape[0]


def _tok_axis(directory, dim, shards) -> int:
    """tok_embeddings' split axis: 1 when each shard holds (V, D/n), 0 when (V/n, D)."""
    n = len(shards)
    shape = shards[0][1]["tok_embeddings.weight"].shape
    if len(shape) != 2:
        raise ModelFormatError(f"{directory}: tok_embeddings.weight has shape {shape}, not 2-D")
    cols = shape[1]
    if cols == dim:
        return 0
    if n > 1 and cols * n == dim:
        return 1
    raise ModelFormatError(f"{directory}: tok_embeddings.weight shard shape {shape} fits neither (V, {dim}) "
                           f"nor (V, {dim}/{n})")


# --- merging -------------------------------------------------------------------------------

def expected_shapes(params: dict) -> Dict[str, tuple]:
    """Every tensor's full (merged) shape, in Meta's names."""
    d, V, H = params["dim"], params["vocab_size"], hidden_dim(params)
    kv = params["n_kv_heads"] * (d // params["n_heads"])
    out = {"tok_embeddings.weight": (V, d)}
    for i in range(params["n_layers"]):
        pre = f"layers.{i}."
        out.update({pre + "attention.wq.weight": (d, d), pre + "attention.wk.weight": (kv, d),
                    pre + "attention.wv.weight": (kv, d), pre + "attention.wo.weight": (d, d),
                    pre + "feed_forward.w1.weight": (H, d), pre + "feed_forward.w2.weight": (d, H),
                    pre + "feed_forward.w3.weight": (H, d), pre + "attention_norm.weight": (d,),
                    pre + "ffn_norm.weight": (d,)})
    out.update({"norm.weight": (d,), "output.weight": (V, d)})
    return out


def _split_axis(name: str) -> Optional[int]:
    if name in SPLIT_AXIS:
        return SPLIT_AXIS[name]
    return SPLIT_AXIS[name.split(".", 2)[2]]  # layers.N.<rest>


def _plan(directory, shards, params) -> List[Tuple[str, Optional[int]]]:
    """Check the shards against each other and params.json; (name, axis) in shard 0's order."""
    names0 = [n for n in shards[0][1] if n not in SKIPPED]
    keys0 = set(shards[0][1])
    for path, sd in shards[1:]:
        if set(sd) != keys0:
            only0, only_this = sorted(keys0 - set(sd)), sorted(set(sd) - keys0)
            raise ModelFormatError(
                f"{directory}: {os.path.basename(path)} and {os.path.basename(shards[0][0])} hold "
                f"different tensors (only in shard 0: {only0[:5]}; only in this one: {only_this[:5]})")
    expected = expected_shapes(params)
    missing = [n for n in expected if n not in keys0]
    if missing:
        raise ModelFormatError(f"{directory}: tensors missing from the shards: {missing[:8]}"
                               + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    unknown = [n for n in names0 if n not in expected]
    if unknown:
        raise UnsupportedModelError(f"{directory}: tensors pecca does not know: {unknown[:8]}"
                                    + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    tok_axis = _tok_axis(directory, params["dim"], shards)
    plan = []
    for name in names0:
        parts = [sd[name] for _, sd in shards]
        axis = tok_axis if name == "tok_embeddings.weight" else _split_axis(name)
        dtypes = {t.dtype for t in parts}
        if len(dtypes) > 1:
            raise ModelFormatError(f"{directory}: {name} has different dtypes across shards: "
                                   f"{[t.dtype for t in parts]}")
        merged = _merged_shape(directory, name, [t.shape for t in parts], axis)
        if merged != expected[name]:
            what = (f"hidden_dim {hidden_dim(params)} (dim={params['dim']}, multiple_of="
                    f"{params['multiple_of']}, ffn_dim_multiplier={params['ffn_dim_multiplier']})"
                    if "feed_forward" in name else "params.json")
            raise ModelFormatError(f"{directory}: {name} merges to shape {merged}, but {what} "
                                   f"implies {expected[name]}")
        plan.append((name, axis))
    return plan


def _merged_shape(directory, name, shapes, axis) -> tuple:
    if axis is None or len(shapes) == 1:
        if any(s != shapes[0] for s in shapes):
            raise ModelFormatError(f"{directory}: {name} is replicated, yet its shards have "
                                   f"different shapes {shapes}")
        return shapes[0]
    first = shapes[0]
    for s in shapes:
        if len(s) != len(first) or len(s) <= axis or any(
                a != b for k, (a, b) in enumerate(zip(s, first)) if k != axis):
            raise ModelFormatError(f"{directory}: {name} shards of shapes {shapes} cannot be "
                                   f"concatenated along dim {axis}")
    return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1:]


def iter_merged_tensors(directory: str, params: Optional[dict] = None) -> Iterator[Tuple[str, RawTensor]]:
    """(name, RawTensor) for every tensor of the checkpoint, its model-parallel shards merged,
    in Meta's names and order (rope.freqs skipped). `params` is read_params' result (read from
the directory when not given). Everything is checked before the first
    tensor is yielded; each merged tensor is a new array (one at a time), a single shard's are
    the memmap views themselves."""
    if params is None:
        params = _read_params_json(directory)
    shards = _open_shards(directory)
    if params["vocab_size"] == -1:
        params = dict(params, vocab_size=_vocab_from_shards(directory, params, shards))
    plan = _plan(os.fspath(directory), shards, params)
    return _merge(shards, plan)


def _merge(shards, plan):
    for name, axis in plan:
        parts = [sd[name] for _, sd in shards]
        if len(parts) == 1 or axis is None:
            yield name, parts[0]
        else:
            yield name, RawTensor(np.concatenate([t.data for t in parts], axis=axis), parts[0].dtype)


# --- as an export source -------------------------------------------------------------------

META_NAMES = {"attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq",
              "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}


def context_length(params: dict) -> int:
    """params.json has no context length; llama.cpp's converter guesses it the same way:
    Llama 3 (rope_theta 500000) 8192 (131072 with scaled RoPE), Llama 2 (32000 tokens,
    norm_eps 1e-5) 4096, Llama 1 2048."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params["rope_theta"] >= 500000:
        return 131072 if params.get("use_scaled_rope") else 8192
    if params["vocab_size"] == 32000 and params["norm_eps"] == 1e-5:
        return 4096
    return 2048


class MetaSource:
    """A Meta checkpoint directory as an export source. Meta's q/k rows are already in the
    interleaved order GGUF uses; shards are merged one tensor at a time, on request."""

    def __init__(self, directory: str, tokenizer_path: Optional[str] = None):
        from export.vocab import vocab_from_sentencepiece
        from pecca.config import ModelConfig, llama3_rope_factors

        self.dir = os.fspath(directory)
        params = _read_params_json(self.dir)
        self.shards = _open_shards(self.dir)
        if params["vocab_size"] == -1:
            params = dict(params, vocab_size=_vocab_from_shards(self.dir, params, self.shards))
        self.axes = dict(_plan(self.dir, self.shards, params))
        head = params["dim"] // params["n_heads"]
        factors = None
        if params.get("use_scaled_rope"):
            factors = llama3_rope_factors(head, params["rope_theta"],
                                          float(params.get("rope_scaling_factor", 8.0)), 1.0, 4.0, 8192)
        self.config = ModelConfig(
            dim=params["dim"], hidden_dim=hidden_dim(params), n_layers=params["n_layers"],
            n_heads=params["n_heads"], n_kv_heads=params["n_kv_heads"],
            vocab_size=params["vocab_size"], seq_len=context_length(params),
            norm_eps=float(params["norm_eps"]), rope_theta=float(params["rope_theta"]),
            rope_freq_factors=factors)
        self.tied = False
        self.name = os.path.basename(os.path.normpath(self.dir))
        tok = tokenizer_path or os.path.join(self.dir, "tokenizer.model")
        if not os.path.isfile(tok):
            raise ModelNotFoundError(f"{self.dir}: no tokenizer.model (pass --tokenizer)")
        self.vocab = vocab_from_sentencepiece(tok)

    def tensor(self, name: str) -> RawTensor:
        if name == "rope_freqs.weight":
            return RawTensor(np.asarray(self.config.rope_freq_factors, np.float32), "f32")
        meta = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}.get(name)
        if meta is None:
            _, i, what, _ = name.split(".")
            meta = f"layers.{i}.{META_NAMES[what]}.weight"
        parts = [sd[meta] for _, sd in self.shards]
        axis = self.axes[meta]
        if len(parts) == 1 or axis is None:
            return parts[0]
        merged = RawTensor(np.concatenate([t.data for t in parts], axis=axis), parts[0].dtype)
        for t in parts:  # merged into a copy: the shards' pages can leave the RSS
            release_pages(t.data)
        return merged
