"""The Python API: pecca.load, generate (text and stream), forward, tokenizer, config, info."""
import numpy as np
import pytest

import pecca
from pecca.errors import ContextLengthError, InvalidArgumentError
from shared_data import llama2c_model


@pytest.fixture(scope="module")
def m():
    return pecca.load(str(llama2c_model()), threads=2)


def test_config_and_info(m):
    assert m.config.dim == 64 and m.config.n_kv_heads == 4 and m.config.head_size == 8
    info = m.info()
    assert info["format"] == "llama2c-v0" and info["precision"] == "f32"
    assert info["simd"] in ("portable", "avx2", "avx512") and isinstance(info["openmp"], bool)


def test_forward_returns_a_fresh_float32_vector(m):
    a = m.forward(1, 0)
    b = m.forward(1, 0)
    assert a.dtype == np.float32 and a.shape == (512,)
    np.testing.assert_array_equal(a, b)
    a[:] = 0
    assert np.any(m.forward(1, 0) != 0)


def test_forward_bad_arguments(m):
    with pytest.raises(InvalidArgumentError):
        m.forward(512, 0)
    with pytest.raises(ContextLengthError):
        m.forward(1, 512)


def test_generate_stream_yields_pieces(m):
    pieces = list(m.generate("Lily", max_tokens=30, temperature=0, stream=True))
    assert len(pieces) > 5 and all(isinstance(p, str) for p in pieces)
    assert m.last_stats.generated_tokens == 30 and m.last_stats.stop_reason == "length"


def test_top_k_one_is_greedy(m):
    greedy = m.generate("Lily", max_tokens=40, temperature=0)
    assert m.generate("Lily", max_tokens=40, temperature=1.5, top_k=1, top_p=1.0, seed=3) == greedy


def test_seeds(m):
    a = m.generate("Lily", max_tokens=40, temperature=1.0, seed=1)
    assert a == m.generate("Lily", max_tokens=40, temperature=1.0, seed=1)
    assert a != m.generate("Lily", max_tokens=40, temperature=1.0, seed=2)


def test_tokenizer_round_trip(m):
    ids = m.tokenizer.encode("Once upon a time")
    assert ids[0] == 1 and m.tokenizer.decode(ids) == "Once upon a time"


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.01),
                                dict(top_k=-1), dict(max_tokens=-1), dict(seed=-1)])
def test_bad_generation_arguments(m, kw):
    with pytest.raises(InvalidArgumentError):
        m.generate("Lily", **kw)


def test_ctx_limits_the_context():
    m = pecca.load(str(llama2c_model()), ctx=16)
    out = m.generate("Lily", max_tokens=100, temperature=0)
    assert m.last_stats.stop_reason == "context" and m.last_stats.generated_tokens == 16 - 2 + 1
    assert out
