"""export.llama2c writes llama2.c's version-2 (runq.c, int8) files: pecca reads back exactly
quantize_q8_groups of the weights, and the real stories260K comes out byte for byte as
llama2.c's own export.py wrote it."""
import struct

import numpy as np
import pytest

from export.llama2c import random_weights, write_llama2c
from pecca.config import ModelConfig
from pecca.formats import llama2c
from pecca.quant import quantize_q8_groups
from shared_data import llama2c_model

# Odd sizes: head size 6, GQA (kv_dim 18), vocab 67, rows of 36 and 100 values.
CFG = ModelConfig(dim=36, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=67,
                  seq_len=40)
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def assert_quantized(lin_q, lin_s, weights, gs):
    q, s = quantize_q8_groups(weights, gs)
    np.testing.assert_array_equal(lin_q, q)
    np.testing.assert_array_equal(np.reshape(lin_s, -1), s)


@pytest.mark.parametrize("gs", [2, 4])
@pytest.mark.parametrize("shared", [True, False])
def test_reads_back_the_quantized_weights(tmp_path, gs, shared):
    p = tmp_path / "m.bin"
    get = random_weights(CFG, seed=3)
    write_llama2c(str(p), CFG, get, version=2, shared=shared, group_size=gs)
    head = p.read_bytes()[:256]
    assert struct.unpack_from("<Ii", head) == (0x616B3432, 2)
    assert struct.unpack_from("<i", head, 37)[0] == gs and head[36] == int(shared)

    lm = llama2c.read(str(p))
    assert lm.config == CFG and lm.format == "llama2c-v2" and lm.extra["group_size"] == gs
    w = lm.weights
    assert w.shared_classifier == shared
    np.testing.assert_array_equal(w.norm, get("norm"))
    assert_quantized(w.token_embedding.q, w.token_embedding.scales, get("tok_embeddings"), gs)
    assert_quantized(w.output.q, w.output.s, get("tok_embeddings" if shared else "output"), gs)
    for i, layer in enumerate(w.layers):
        np.testing.assert_array_equal(layer.attn_norm, get(f"attention_norm.{i}"))
        np.testing.assert_array_equal(layer.ffn_norm, get(f"ffn_norm.{i}"))
        for name in MATRICES:
            lin = getattr(layer, name)
            assert_quantized(lin.q, lin.s, get(f"{name}.{i}"), gs)


@pytest.mark.parametrize("gs", [0, 8, 12, 64])
def test_refuses_a_group_size_that_does_not_divide_both_row_lengths(tmp_path, gs):
    p = tmp_path / "m.bin"
    with pytest.raises(ValueError, match="group_size"):
        write_llama2c(str(p), CFG, random_weights(CFG), version=2, group_size=gs)
    assert not p.exists() and not list(tmp_path.iterdir())


def llama2c_tensors(w):
    """get(name) over a loaded version-0 model, in llama2.c's tensor names."""
    def get(name):
        if name in ("tok_embeddings", "norm"):
            return w.token_embedding if name == "tok_embeddings" else w.norm
        kind, i = name.split(".")
        layer = w.layers[int(i)]
        if kind in ("attention_norm", "ffn_norm"):
            return layer.attn_norm if kind == "attention_norm" else layer.ffn_norm
        return getattr(layer, kind).w
    return get


def test_stories260K_matches_llama2c_export(tmp_path):
    src = llama2c.read(str(llama2c_model("stories260K.bin")))
    ref = llama2c_model("stories260K_q80_gs4.bin").read_bytes()
    p = tmp_path / "q80.bin"
    write_llama2c(str(p), src.config, llama2c_tensors(src.weights), version=2, shared=True,
                  group_size=4)
    assert p.read_bytes() == ref
