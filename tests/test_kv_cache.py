"""The f16 KV cache (kv_type="f16", llama.cpp's default cache type) against the float32 one:
each stored key and value is the float32 one rounded to half, the logits stay within a stated
tolerance of the float32 cache's, the greedy text is the same, and the cache takes half the
memory. The kernels' own checks (store vs numpy, attention over half vs float32 bit for bit)
are in tests/kernels/test_ops.py; the serving batch's in tests/serve/test_serve_batching.py."""
import numpy as np
import pytest

import pecca
from pecca.cli import main
from pecca.errors import InvalidArgumentError
from pecca.generate import prompt_tokens
from pecca.model import Model, kv_cache_bytes
from shared_data import llama2c_model

PROMPT = "Once upon a time, there was a little girl who"
# stories260K over 64 positions: max |f16 - f32| / max |f32 logit| measured 6.1e-4
LOGIT_TOL = 3e-3


@pytest.fixture(scope="module")
def pair():
    path = str(llama2c_model())
    return pecca.load(path, threads=2), pecca.load(path, threads=2, kv_type="f16")


def prompt_ids(m):
    return prompt_tokens(m.tokenizer, PROMPT) * 4


def test_f16_cache_is_half_bits_and_half_the_memory(pair):
    f32, f16 = pair
    s32, s16 = f32.model.state, f16.model.state
    assert s16.key_cache.dtype == s16.value_cache.dtype == np.uint16
    assert s16.key_cache.shape == s32.key_cache.shape
    assert s16.key_cache.nbytes * 2 == s32.key_cache.nbytes
    c = f32.config
    assert kv_cache_bytes(c, 100, "f16") * 2 == kv_cache_bytes(c, 100, "f32")
    assert f16.info()["kv_type"] == "f16" and f32.info()["kv_type"] == "f32"


@pytest.mark.parametrize("how", ["prefill", "forward"])
def test_stored_rows_are_the_f32_rows_rounded(pair, how):
    """Layer 0's keys and values depend on the embeddings alone, so the f16 cache holds exactly
    the f32 cache's rows rounded to half (numpy's astype(float16)), whichever path stored them;
    rows past the prompt stay untouched."""
    f32, f16 = pair
    ids = prompt_ids(f32)
    for m in pair:
        m.model.state.key_cache[:] = 0
        m.model.state.value_cache[:] = 0
        if how == "prefill":
            m.model.prefill(ids, 0)
        else:
            for p, t in enumerate(ids):
                m.model.forward(t, p)
    n = len(ids)
    for name in ("key_cache", "value_cache"):
        want = getattr(f32.model.state, name)[0, :n].astype(np.float16).view(np.uint16)
        got = getattr(f16.model.state, name)
        np.testing.assert_array_equal(got[0, :n], want)
        assert not got[:, n:].any()
        later = got[1:, :n].view(np.float16).astype(np.float32)  # later layers: close, not equal
        np.testing.assert_allclose(later, getattr(f32.model.state, name)[1:, :n], rtol=2e-2, atol=2e-3)


def test_logits_within_tolerance_of_the_f32_cache(pair):
    f32, f16 = pair
    ids = prompt_ids(f32)
    a, b = f32.model.logits_all(ids), f16.model.logits_all(ids)
    scale = np.abs(a).max()
    err = np.abs(a - b).max() / scale
    print(f"f16 KV vs f32 KV over {len(ids)} positions: max |d| / scale = {err:.2e}")
    assert 0 < err < LOGIT_TOL  # 0 would mean the cache was not rounded at all
    assert np.array_equal(a.argmax(axis=1), b.argmax(axis=1))
    # the decode path (one token at a time) and the batched prefill agree over a half cache too
    for p, t in enumerate(ids):
        last = f16.model.forward(t, p)
    np.testing.assert_allclose(last, b[-1], atol=1e-4 * scale)


def test_greedy_text_equals_the_f32_cache(pair):
    f32, f16 = pair
    want = f32.generate("Once upon a time", max_tokens=80, temperature=0)
    assert f16.generate("Once upon a time", max_tokens=80, temperature=0) == want
    assert len(want) > 100


def test_unknown_kv_type_is_refused():
    with pytest.raises(InvalidArgumentError, match="KV-cache type 'q8_0'"):
        pecca.load(str(llama2c_model()), kv_type="q8_0")
    m = pecca.load(str(llama2c_model()))
    with pytest.raises(InvalidArgumentError, match="f32, f16"):
        Model(m.config, m.model.weights, 1, 16, "float16")


def test_memory_error_suggests_the_f16_cache(monkeypatch):
    import pecca.model as model
    from pecca.errors import InsufficientMemoryError

    m = pecca.load(str(llama2c_model()))
    monkeypatch.setattr(model, "_total_memory", lambda: 1000)
    with pytest.raises(InsufficientMemoryError, match="--kv-type f16"):
        Model(m.config, m.model.weights, 1, 256)
    with pytest.raises(InsufficientMemoryError, match=r"x 2 x 2 bytes") as e:
        Model(m.config, m.model.weights, 1, 256, "f16")
    assert "kv-type" not in str(e.value)


def test_cli_generate_and_bench_take_kv_type(capsys):
    path = str(llama2c_model())
    args = ["generate", path, "Once upon a time", "-n", "30", "-t", "0"]
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main(args + ["--kv-type", "f16"]) == 0
    assert capsys.readouterr().out == want
    assert main(["bench", path, "--threads", "1", "-p", "8", "-n", "8", "-r", "1", "--kv-type", "f16",
                 "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)[0]["kv_type"] == "f16"
    assert main(args + ["--kv-type", "bf16"]) == 1
    assert "KV-cache type 'bf16'" in capsys.readouterr().err
