"""Generation controls: repetition penalty and min-p (against transformers' logits processors),
stop strings (also across tokens, and held back while streaming), UTF-8-safe streaming,
non-finite logits, and argument validation. (run.c's exact greedy and seeded sampling with the
defaults: tests/e2e/test_llama2c_reference.py.)"""
import numpy as np
import pytest

import pecca
from pecca.cli import main
from pecca.errors import InvalidArgumentError
from pecca.generate import StopStrings, stream_text
from pecca.sampling import NonFiniteLogitsError, Sampler, apply_min_p, penalize
from shared_data import llama2c_model, shared_file

GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def m():
    return pecca.load(str(llama2c_model()), threads=2)


def test_repetition_penalty_is_transformers_and_llama_cpp():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)
    previous = [3, 7, 7, 12, 40, 3, 0]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([previous]), torch.tensor(logits[None]))[0].numpy()
    got = logits.copy()
    penalize(got, previous, np.float32(1.3))
    np.testing.assert_array_equal(got, want)
    assert got[7] == (logits[7] / np.float32(1.3) if logits[7] > 0 else logits[7] * np.float32(1.3))
    # the window: only the last repeat_last_n tokens count
    s = Sampler(50, temperature=0, repetition_penalty=100.0, repeat_last_n=2)
    x = np.zeros(50, np.float32)
    x[5], x[6] = 2.0, 1.0
    assert s.sample(x.copy(), [5, 9, 9]) == 5 and s.sample(x.copy(), [9, 9, 5]) == 6
    assert Sampler(50, temperature=0, repetition_penalty=100.0, repeat_last_n=0).sample(x.copy(), [5]) == 5
    assert Sampler(50, temperature=0, repetition_penalty=100.0, repeat_last_n=-1).sample(x.copy(), [5, 1, 1]) == 6


def test_min_p_is_transformers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import MinPLogitsWarper

    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(200) * 2).astype(np.float32)
    for p in (0.01, 0.1, 0.5):
        want = MinPLogitsWarper(p)(None, torch.tensor(logits[None]))[0].numpy()
        got = logits.copy()
        apply_min_p(got, p)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    # sampling never picks a dropped token
    s = Sampler(200, temperature=1.0, top_p=1.0, min_p=0.5, seed=7)
    kept = logits >= logits.max() + np.log(0.5)
    assert all(kept[s.sample(logits.copy())] for _ in range(200))


def test_penalty_and_min_p_in_generate(m):
    assert m.generate("Once upon a time", max_tokens=20, temperature=0).startswith(GREEDY[:40])
    penalized = m.generate("Once upon a time", max_tokens=60, temperature=0, repetition_penalty=1.5)
    assert penalized != m.generate("Once upon a time", max_tokens=60, temperature=0)
    a = m.generate("Lily", max_tokens=40, seed=5, min_p=0.2)
    assert a == m.generate("Lily", max_tokens=40, seed=5, min_p=0.2) != m.generate("Lily", max_tokens=40, seed=5)


def test_stop_strings(m):
    full = m.generate("Once upon a time", max_tokens=30, temperature=0)
    assert full.startswith(GREEDY[:60])
    # "girl nam" ends inside the token " named": the text stops before it, and so does generation
    assert m.generate("Once upon a time", max_tokens=30, temperature=0, stop="girl nam") == ", there was a little "
    assert m.last_stats.stop_reason == "stop" and m.last_stats.generated_tokens < 12
    pieces = list(m.generate("Once upon a time", max_tokens=30, temperature=0, stop=["Lily.", "little"],
                             stream=True))
    assert "".join(pieces) == ", there was a " and not any("lit" in p for p in pieces)
    # a stop string that never comes: everything, including text held back as a possible start
    assert m.generate("Once upon a time", max_tokens=30, temperature=0, stop=["park.zzz", "Lily!"]) == full


def test_stop_strings_held_back_across_pieces():
    s = StopStrings(["<|end|>", "STOP"])
    assert s.push("Hello <|") == ("Hello ", False)
    assert s.push("en") == ("", False)
    assert s.push("x and ST") == ("<|enx and ", False)
    assert s.push("OP now") == ("", True)
    s = StopStrings(["ab"])
    assert s.push("xa") == ("x", False) and s.flush() == "a"


def test_streaming_never_breaks_utf8(m):
    llama3 = pecca.Tokenizer.from_file(shared_file("models", "tokenizers", "llama3", "tokenizer.json"))
    text = "Emoji 😀👍🏽 and 日本語 and é"
    ids = llama3.encode(text, add_bos=False)
    assert any(len(llama3.token_bytes(0, t)) and not _utf8(llama3.token_bytes(0, t)) for t in ids)
    pieces = list(stream_text(llama3, 0, iter(ids)))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    tok = m.tokenizer  # tok512: these characters are <0xXX> byte tokens, one byte each
    ids = tok.encode("日本 😀", add_bos=False)
    pieces = list(stream_text(tok, tok.bos_id, iter(ids)))
    assert "".join(pieces) == "日本 😀" and not any("\ufffd" in p for p in pieces)


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_non_finite_logits_are_a_clear_error():
    s = Sampler(4, temperature=0)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits.*token 2"):
        s.sample(np.array([0.0, 1.0, np.nan, 2.0], np.float32))
    with pytest.raises(NonFiniteLogitsError):
        Sampler(4, temperature=1.0).sample(np.array([0.0, np.inf, 1.0, 2.0], np.float32))


@pytest.mark.parametrize("kw", [dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=float("nan")),
                                dict(repetition_penalty=0), dict(repetition_penalty=-1.2),
                                dict(repetition_penalty=float("inf")), dict(repeat_last_n=-2),
                                dict(repeat_last_n=1.5), dict(stop=""), dict(stop=[1]), dict(stop=["ok", ""]),
                                dict(max_tokens=-1), dict(max_tokens=True), dict(top_k=2.0)])
def test_nonsense_controls(m, kw):
    with pytest.raises(InvalidArgumentError):
        m.generate("Lily", **kw)


@pytest.mark.parametrize("args,pattern", [(["--min-p", "2"], "min_p"), (["--repeat-penalty", "0"],
                                                                        "repetition_penalty"),
                                          (["--repeat-last-n", "-5"], "repeat_last_n"), (["--stop", ""], "stop")])
def test_cli_nonsense_controls(capsys, args, pattern):
    code = main(["generate", str(llama2c_model()), "Lily", *args])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and pattern in err and "Traceback" not in err


def test_cli_stop_and_penalty(capsys):
    code = main(["generate", str(llama2c_model()), "Once upon a time", "-t", "0", "-n", "30", "--stop", "girl nam",
                 "--repeat-penalty", "1.0", "--min-p", "0.05"])
    out = capsys.readouterr().out
    assert code == 0 and out == "Once upon a time, there was a little \n"
