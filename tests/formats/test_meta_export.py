"""Meta checkpoint directories: a tiny Llama in Meta's names, split into model-parallel shards
exactly as fairscale's layers split it, saved with torch.save, merged back bit-exactly; and a
clear error for every kind of broken directory."""
import json
import mmap

import numpy as np
import pytest

import export.meta as meta
from export.meta import hidden_dim, iter_merged_tensors, read_params, shard_paths
from pecca.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

torch = pytest.importorskip("torch")

PARAMS = {"dim": 72, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
          "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0}
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

# Meta's split axes (fairscale: ColumnParallelLinear 0, RowParallelLinear 1, ParallelEmbedding 1)
AXES = {"output.weight": 0, "attention.wq.weight": 0, "attention.wk.weight": 0,
        "attention.wv.weight": 0, "attention.wo.weight": 1, "feed_forward.w1.weight": 0,
        "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1}


def tiny_llama(params, dtype=torch.bfloat16, seed=0):
    """A state dict in Meta's names and order (llama/model.py Transformer)."""
    g = torch.Generator().manual_seed(seed)
    d, V, H = params["dim"], params["vocab_size"], hidden_dim(params)
    kv = params.get("n_kv_heads", params["n_heads"]) * d // params["n_heads"]
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    sd = {"tok_embeddings.weight": r(V, d)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd.update({p + "attention.wq.weight": r(d, d), p + "attention.wk.weight": r(kv, d),
                   p + "attention.wv.weight": r(kv, d), p + "attention.wo.weight": r(d, d),
                   p + "feed_forward.w1.weight": r(H, d), p + "feed_forward.w2.weight": r(d, H),
                   p + "feed_forward.w3.weight": r(H, d), p + "attention_norm.weight": r(d),
                   p + "ffn_norm.weight": r(d)})
    sd.update({"norm.weight": r(d), "output.weight": r(V, d)})
    return sd


def split(sd, n, tok_axis=1, rope_freqs=False):
    """Meta's model-parallel shards of a full state dict."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        axis = tok_axis if name == "tok_embeddings.weight" else AXES.get(name.split(".", 2)[-1]
                                                                          if name.startswith("layers.") else name)
        parts = [t] * n if axis is None else torch.chunk(t, n, dim=axis)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone().contiguous()
    if rope_freqs:  # Llama 1 checkpoints carry it; every reader recomputes it
        for shard in shards:
            shard["rope.freqs"] = torch.ones(9)
    return shards


def save_dir(path, params, shards, json_params=None):
    path.mkdir(exist_ok=True)
    (path / "params.json").write_text(json.dumps(params if json_params is None else json_params))
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path


def bits(t):
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def is_memmap_view(a):
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, mmap.mmap)


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_merged_shards_equal_the_original(tmp_path, n_shards, dtype):
    sd = tiny_llama(PARAMS, TORCH_DTYPES[dtype])
    d = save_dir(tmp_path / "m", PARAMS, split(sd, n_shards, rope_freqs=True))
    got = list(iter_merged_tensors(str(d)))
    assert [n for n, _ in got] == list(sd)  # Meta's order, rope.freqs skipped
    for name, t in got:
        assert t.dtype == dtype and t.shape == tuple(sd[name].shape), name
        assert t.data.tobytes() == bits(sd[name]), name
        if n_shards == 1:  # nothing to merge: the memmap views themselves
            assert is_memmap_view(t.data), name


def test_llama3_vocab_parallel_embedding(tmp_path):
    """Llama 3's VocabParallelEmbedding splits tok_embeddings along the vocabulary."""
    params = dict(PARAMS, ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True)
    sd = tiny_llama(params)
    d = save_dir(tmp_path / "m", params, split(sd, 2, tok_axis=0))
    got = dict(iter_merged_tensors(str(d)))
    assert got["tok_embeddings.weight"].data.tobytes() == bits(sd["tok_embeddings.weight"])
    assert got["layers.0.feed_forward.w1.weight"].shape == (256, 72)


@pytest.mark.parametrize("tok_axis", [0, 1])
def test_vocab_size_minus_one_comes_from_tok_embeddings(tmp_path, tok_axis):
    sd = tiny_llama(PARAMS)
    d = save_dir(tmp_path / "m", PARAMS, split(sd, 2, tok_axis=tok_axis),
                 json_params=dict(PARAMS, vocab_size=-1))
    assert read_params(str(d))["vocab_size"] == 64
    assert dict(iter_merged_tensors(str(d)))["output.weight"].shape == (64, 72)


def test_read_params_fills_defaults(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "params.json").write_text(json.dumps({"dim": 4096, "multiple_of": 256, "n_heads": 32,
                                               "n_layers": 32, "norm_eps": 1e-06, "vocab_size": 32000}))
    p = read_params(str(d))
    assert p == {"dim": 4096, "n_layers": 32, "n_heads": 32, "norm_eps": 1e-06, "vocab_size": 32000,
                 "n_kv_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": None,
                 "rope_theta": 10000.0, "use_scaled_rope": False}
    assert hidden_dim(p) == 11008


@pytest.mark.parametrize("dim, multiple_of, mult, want", [
    (4096, 256, None, 11008),   # Llama 2 7B
    (5120, 256, None, 13824),   # Llama 2 13B
    (8192, 4096, 1.3, 28672),   # Llama 2 70B, Llama 3 70B
    (4096, 1024, 1.3, 14336),   # Llama 3 8B
    (2048, 256, 1.5, 8192),     # Llama 3.2 1B
    (3072, 256, 1.0, 8192),     # Llama 3.2 3B
    (8192, 256, 1.0, 22016),    # Code Llama 34B
    (72, 32, None, 192),
])
def test_hidden_dim_matches_meta(dim, multiple_of, mult, want):
    assert hidden_dim({"dim": dim, "multiple_of": multiple_of, "ffn_dim_multiplier": mult}) == want


def test_merges_one_tensor_at_a_time(tmp_path, monkeypatch):
    d = save_dir(tmp_path / "m", PARAMS, split(tiny_llama(PARAMS), 2))
    calls = []
    real = np.concatenate
    monkeypatch.setattr(meta.np, "concatenate", lambda *a, **k: calls.append(1) or real(*a, **k))
    it = iter_merged_tensors(str(d))
    assert calls == []
    next(it)
    assert len(calls) == 1


# --- broken directories --------------------------------------------------------------------

def test_missing_shard(tmp_path):
    d = save_dir(tmp_path / "m", PARAMS, split(tiny_llama(PARAMS), 2))
    (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")
    with pytest.raises(ModelFormatError, match=r"shard\(s\) 01 missing"):
        list(iter_merged_tensors(str(d)))
    with pytest.raises(ModelFormatError, match="shard"):
        shard_paths(str(d))


def test_no_shards_no_dir(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(ModelFormatError, match="no consolidated.NN.pth"):
        iter_merged_tensors(str(d))
    with pytest.raises(ModelNotFoundError):
        read_params(str(tmp_path / "absent"))


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_heads", "norm_eps", "vocab_size"])
def test_missing_params_field(tmp_path, field):
    bad = {k: v for k, v in PARAMS.items() if k != field}
    d = save_dir(tmp_path / "m", PARAMS, split(tiny_llama(PARAMS), 1), json_params=bad)
    with pytest.raises(ModelFormatError, match=f"params.json: required field '{field}' is missing"):
        read_params(str(d))
    with pytest.raises(ModelFormatError, match=f"'{field}'"):
        iter_merged_tensors(str(d))


@pytest.mark.parametrize("change, msg", [
    ({"dim": "72"}, "dim = '72' must be a positive integer"),
    ({"n_heads": 0}, "n_heads = 0 must be a positive integer"),
    ({"n_heads": 5}, "dim 72 is not a multiple of n_heads 5"),
    ({"n_kv_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
    ({"norm_eps": -1}, "norm_eps = -1 must be a positive number"),
    ({"vocab_size": -2}, "vocab_size = -2"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope"),
])
def test_bad_params_values(tmp_path, change, msg):
    d = tmp_path / "m"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(dict(PARAMS, **change)))
    with pytest.raises(ModelFormatError, match=msg):
        read_params(str(d))


def test_params_json_not_json(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "params.json").write_text("{dim: 1")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        read_params(str(d))
    (d / "params.json").unlink()
    with pytest.raises(ModelFormatError, match="no params.json"):
        read_params(str(d))


def test_shapes_that_cannot_concatenate(tmp_path):
    shards = split(tiny_llama(PARAMS), 2)
    shards[1]["layers.1.attention.wq.weight"] = torch.zeros(36, 71, dtype=torch.bfloat16)
    d = save_dir(tmp_path / "m", PARAMS, shards)
    with pytest.raises(ModelFormatError, match=r"layers.1.attention.wq.weight shards of shapes .* cannot be "
                                               r"concatenated along dim 0"):
        iter_merged_tensors(str(d))


def test_merged_shape_disagrees_with_params(tmp_path):
    shards = split(tiny_llama(PARAMS), 2)
    shards[1]["layers.0.attention.wk.weight"] = torch.zeros(24, 72, dtype=torch.bfloat16)
    d = save_dir(tmp_path / "m", PARAMS, shards)
    with pytest.raises(ModelFormatError, match=r"layers.0.attention.wk.weight merges to shape \(42, 72\), "
                                               r"but params.json implies \(36, 72\)"):
        iter_merged_tensors(str(d))


def test_hidden_dim_disagrees_with_w1(tmp_path):
    d = save_dir(tmp_path / "m", PARAMS, split(tiny_llama(PARAMS), 2),
                 json_params=dict(PARAMS, ffn_dim_multiplier=1.3))
    with pytest.raises(ModelFormatError, match=r"layers.0.feed_forward.w1.weight merges to shape \(192, 72\), "
                                               r"but hidden_dim 256 .* implies \(256, 72\)"):
        iter_merged_tensors(str(d))


def test_replicated_norm_shapes_differ(tmp_path):
    shards = split(tiny_llama(PARAMS), 2)
    shards[1]["norm.weight"] = torch.zeros(71, dtype=torch.bfloat16)
    d = save_dir(tmp_path / "m", PARAMS, shards)
    with pytest.raises(ModelFormatError, match="norm.weight is replicated, yet its shards have different shapes"):
        iter_merged_tensors(str(d))


def test_shards_with_different_names(tmp_path):
    shards = split(tiny_llama(PARAMS), 2)
    del shards[1]["layers.1.ffn_norm.weight"]
    d = save_dir(tmp_path / "m", PARAMS, shards)
    with pytest.raises(ModelFormatError, match=r"consolidated.01.pth and consolidated.00.pth hold different "
                                               r"tensors \(only in shard 0: \['layers.1.ffn_norm.weight'\]"):
        iter_merged_tensors(str(d))


def test_missing_and_unknown_tensors(tmp_path):
    sd = tiny_llama(PARAMS)
    del sd["output.weight"]
    d = save_dir(tmp_path / "a", PARAMS, split(sd, 2))
    with pytest.raises(ModelFormatError, match=r"tensors missing from the shards: \['output.weight'\]"):
        iter_merged_tensors(str(d))
    sd = tiny_llama(PARAMS)
    sd["layers.0.attention.bias"] = torch.zeros(72, dtype=torch.bfloat16)
    shards = split(sd, 1)
    d = save_dir(tmp_path / "b", PARAMS, shards)
    with pytest.raises(UnsupportedModelError, match="layers.0.attention.bias"):
        iter_merged_tensors(str(d))


def test_dtypes_differ_across_shards(tmp_path):
    shards = split(tiny_llama(PARAMS), 2)
    shards[1]["output.weight"] = shards[1]["output.weight"].half()
    d = save_dir(tmp_path / "m", PARAMS, shards)
    with pytest.raises(ModelFormatError, match="output.weight has different dtypes across shards"):
        iter_merged_tensors(str(d))
