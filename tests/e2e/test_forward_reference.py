"""pecca's logits vs a float64 NumPy forward pass written here from llama2.c's model.py
(sharing no code with pecca), on stories260K and a random-weight model of stories15M shapes,
positions 0..31; and vs the logits run.c itself printed.

Tolerance: for each position, max |pecca - ref| / max |ref| <= 1e-4.
"""
import numpy as np
import pytest

import pecca
from export.llama2c import STORIES_SHAPES, random_weights, write_llama2c
from shared_data import shared_file

TOL = 1e-4


def read_legacy(path):
    """Parse a version-0 llama2.c file with plain NumPy (independent of pecca's reader)."""
    raw = np.fromfile(path, dtype=np.int32, count=7)
    dim, hidden, L, nh, nkv, vocab, seq = (int(v) for v in raw)
    shared = vocab > 0
    vocab = abs(vocab)
    hs = dim // nh
    kv = nkv * hs
    data = np.fromfile(path, dtype=np.float32, offset=28).astype(np.float64)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        out = data[off:off + n].reshape(shape)
        off += n
        return out

    w = {"emb": take(vocab, dim), "att_norm": take(L, dim), "wq": take(L, dim, dim),
         "wk": take(L, kv, dim), "wv": take(L, kv, dim), "wo": take(L, dim, dim),
         "ffn_norm": take(L, dim), "w1": take(L, hidden, dim), "w2": take(L, dim, hidden),
         "w3": take(L, hidden, dim), "norm": take(dim)}
    take(seq * hs)
    w["out"] = w["emb"] if shared else take(vocab, dim)
    return dict(dim=dim, L=L, nh=nh, nkv=nkv, hs=hs, seq=seq), w


def reference_logits(path, tokens):
    """Logits at every position for `tokens`, float64, full-sequence causal attention."""
    p, w = read_legacy(path)
    T, hs, nh, nkv = len(tokens), p["hs"], p["nh"], p["nkv"]

    def rms(x, g):
        return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)

    def rope(x, n):  # x: (T, n * hs), adjacent pairs rotated
        x = x.reshape(T, n, hs // 2, 2)
        ang = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, hs, 2) / hs)[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(T, n * hs)

    x = w["emb"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(p["L"]):
        h = rms(x, w["att_norm"][l])
        q = rope(h @ w["wq"][l].T, nh).reshape(T, nh, hs)
        k = rope(h @ w["wk"][l].T, nkv).reshape(T, nkv, hs)
        v = (h @ w["wv"][l].T).reshape(T, nkv, hs)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("thd,uhd->htu", q, k) / np.sqrt(hs) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("htu,uhd->thd", a, v).reshape(T, -1)
        x = x + o @ w["wo"][l].T
        h = rms(x, w["ffn_norm"][l])
        g, u = h @ w["w1"][l].T, h @ w["w3"][l].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w["w2"][l].T
    return rms(x, w["norm"]) @ w["out"].T


def pecca_logits(m, tokens):
    return np.stack([m.forward(t, pos) for pos, t in enumerate(tokens)])


def assert_close(got, ref, tol=TOL):
    err = np.max(np.abs(got - ref), axis=1) / np.max(np.abs(ref), axis=1)
    assert err.max() <= tol, f"max relative error {err.max():.3g} at position {err.argmax()}"


@pytest.fixture(scope="module")
def stories15m_shape(tmp_path_factory):
    c = STORIES_SHAPES["stories15M"]
    path = tmp_path_factory.mktemp("models") / "random15M.bin"
    write_llama2c(str(path), c, random_weights(c, seed=7), version=0, shared=True)
    return path


@pytest.mark.parametrize("threads", [1, 2])
def test_stories260k_matches_float64_reference(threads):
    path = shared_file("models", "llama2c", "stories260K.bin")
    m = pecca.load(str(path), threads=threads)
    tokens = m.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    tokens = (tokens + list(range(300, 332)))[:32]
    assert_close(pecca_logits(m, tokens), reference_logits(str(path), tokens))


@pytest.mark.parametrize("threads", [1, 2])
def test_random_stories15m_shape_matches_float64_reference(stories15m_shape, threads):
    tok = shared_file("models", "llama2c", "tokenizer.bin")
    m = pecca.load(str(stories15m_shape), threads=threads, tokenizer=str(tok))
    tokens = [1] + np.random.default_rng(0).integers(3, 32000, 31).tolist()
    assert_close(pecca_logits(m, tokens), reference_logits(str(stories15m_shape), tokens))


def test_matches_run_c_logits():
    """run.c's own logits for its greedy 'Once upon a time' run, all 256 positions."""
    import json
    ref_dir = shared_file("reference", "llama2c")
    logits = np.load(ref_dir / "stories260K__once_upon_a_time__greedy_n256__logits.npy")
    ids = json.loads((ref_dir / "stories260K__once_upon_a_time__greedy_n256.ids.json").read_text())
    seq = ids["prompt_ids"] + ids["next_ids"][len(ids["prompt_ids"]) - 1:]
    m = pecca.load(str(shared_file("models", "llama2c", "stories260K.bin")))
    got = pecca_logits(m, seq[:logits.shape[0]])
    assert_close(got, logits.astype(np.float64), 1e-5)


@pytest.mark.parametrize("threads,n_tokens", [(1, 40), (2, 40), (2, 39)])
def test_prefill_matches_reference_and_fills_the_same_cache(stories15m_shape, threads, n_tokens,
                                                            monkeypatch):
    """Batched prefill (in batches of 13 here, to cross batch boundaries) gives the reference's
    last-position logits and the same KV cache as feeding the tokens one at a time. The last
    layer computes only keys and values for the chunks before the last, and all but the last
    position of the last chunk (40 tokens: a last chunk of 1; 39: of 13)."""
    tok = shared_file("models", "llama2c", "tokenizer.bin")
    tokens = [1] + np.random.default_rng(1).integers(3, 32000, n_tokens - 1).tolist()
    a = pecca.load(str(stories15m_shape), threads=threads, tokenizer=str(tok))
    monkeypatch.setattr(a.model, "PREFILL_BATCH", 13)
    got = a.model.prefill(tokens, 0).copy()
    ref = reference_logits(str(stories15m_shape), tokens)[-1:]
    assert_close(got[None, :], ref)
    b = pecca.load(str(stories15m_shape), threads=threads, tokenizer=str(tok))
    pecca_logits(b, tokens)
    n = len(tokens)
    np.testing.assert_allclose(a.model.state.key_cache[:, :n], b.model.state.key_cache[:, :n], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.model.state.value_cache[:, :n], b.model.state.value_cache[:, :n], rtol=1e-4, atol=1e-5)
    # decoding continues from the prefilled cache exactly as from the token-by-token one
    assert_close(a.forward(5, n)[None, :], b.forward(5, n)[None, :], 1e-5)
