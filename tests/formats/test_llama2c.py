"""The llama2.c reader: both versions, memory-mapped, shared/unshared classifier, GQA, and
clear errors for every kind of bad file."""
import struct

import numpy as np
import pytest

from export.llama2c import random_weights, write_llama2c
from pecca.config import ModelConfig
from pecca.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from pecca.formats import open_model
from shared_data import llama2c_model

CFG = ModelConfig(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=40)


def write(tmp_path, name="m.bin", version=0, shared=True, c=CFG, seed=0):
    p = tmp_path / name
    write_llama2c(str(p), c, random_weights(c, seed), version=version, shared=shared)
    return p


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_reads_what_was_written(tmp_path, version, shared):
    p = write(tmp_path, version=version, shared=shared)
    get = random_weights(CFG, 0)
    lm = open_model(str(p))
    assert lm.config == CFG and lm.format == f"llama2c-v{version}"
    w = lm.weights
    assert w.shared_classifier == shared
    np.testing.assert_array_equal(w.token_embedding, get("tok_embeddings"))
    np.testing.assert_array_equal(w.output.w, get("tok_embeddings" if shared else "output"))
    np.testing.assert_array_equal(w.norm, get("norm"))
    for i, layer in enumerate(w.layers):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            np.testing.assert_array_equal(getattr(layer, name).w, get(f"{name}.{i}"))
        np.testing.assert_array_equal(layer.attn_norm, get(f"attention_norm.{i}"))
        np.testing.assert_array_equal(layer.ffn_norm, get(f"ffn_norm.{i}"))


def test_weights_are_views_of_one_memmap(tmp_path):
    lm = open_model(str(write(tmp_path)))
    for arr in (lm.weights.token_embedding, lm.weights.layers[1].w2.w, lm.weights.norm):
        base = arr
        while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap)
        assert not arr.flags.writeable


def test_real_v0_and_v1_files_agree():
    v0 = open_model(str(llama2c_model("stories260K.bin")))
    v1 = open_model(str(llama2c_model("stories260K_v1.bin")))
    assert v0.config == v1.config
    c = v0.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len) == \
        (64, 172, 5, 8, 4, 512, 512)
    assert c.kv_dim == 32  # grouped-query attention
    for a, b in [(v0.weights.token_embedding, v1.weights.token_embedding),
                 (v0.weights.layers[4].w3.w, v1.weights.layers[4].w3.w),
                 (v0.weights.layers[2].wk.w, v1.weights.layers[2].wk.w)]:
        np.testing.assert_array_equal(a, b)


# ---- bad files ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        open_model(str(tmp_path / "nope.bin"))


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"\x01\x02\x03"):
        p = tmp_path / "tiny.bin"
        p.write_bytes(data)
        with pytest.raises(ModelFormatError, match="too short"):
            open_model(str(p))


def test_wrong_magic_is_a_clear_error(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"XXXX" + b"\xff" * 400)  # neither llama2.c magic nor a sane legacy header
    with pytest.raises(ModelFormatError, match="header field"):
        open_model(str(p))
    p.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 400)
    with pytest.raises(ModelFormatError, match="GGUF"):
        open_model(str(p))


@pytest.mark.parametrize("version", [0, 1])
def test_truncated(tmp_path, version):
    p = write(tmp_path, version=version)
    data = p.read_bytes()
    p.write_bytes(data[:-4])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_model(str(p))
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        open_model(str(p))


def test_trailing_garbage(tmp_path):
    p = write(tmp_path)
    p.write_bytes(p.read_bytes() + b"\0" * 8)
    with pytest.raises(ModelFormatError, match="longer than its header"):
        open_model(str(p))


@pytest.mark.parametrize("field,value", [(0, 0), (0, -5), (2, 0), (3, 0), (4, -1), (5, 0),
                                         (6, 0), (0, 2**31 - 1), (6, 2**30), (5, 2**30)])
@pytest.mark.parametrize("version", [0, 1])
def test_zero_negative_absurd_sizes(tmp_path, field, value, version):
    p = write(tmp_path, version=version)
    data = bytearray(p.read_bytes())
    off = 0 if version == 0 else 8
    struct.pack_into("<i", data, off + 4 * field, value)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError):
        open_model(str(p))


@pytest.mark.parametrize("dims,msg", [((48, 100, 2, 5, 5), "multiple of n_heads"),
                                      ((48, 100, 2, 6, 4), "multiple of n_kv_heads"),
                                      ((45, 100, 2, 5, 5), "odd")])
def test_inconsistent_heads(tmp_path, dims, msg):
    p = write(tmp_path)
    data = bytearray(p.read_bytes())
    struct.pack_into("<5i", data, 0, *dims)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=msg):
        open_model(str(p))


def test_header_sizes_that_disagree_with_file(tmp_path):
    p = write(tmp_path)
    data = bytearray(p.read_bytes())
    struct.pack_into("<i", data, 4, 101)  # hidden_dim off by one
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="expected"):
        open_model(str(p))


def test_unknown_versions_refused(tmp_path):
    p = write(tmp_path, version=1)
    data = bytearray(p.read_bytes())
    struct.pack_into("<i", data, 4, 7)
    p.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="version 7"):
        open_model(str(p))


def test_directory_is_refused(tmp_path):
    with pytest.raises(ModelFormatError, match="directory"):
        open_model(str(tmp_path))
