"""The CLI: bad input gives one clear line on stderr and a non-zero exit, never a traceback."""
import os
import struct
import subprocess
import sys
import time

import pytest

from export.llama2c import random_weights, write_llama2c
from pecca.cli import main
from pecca.config import ModelConfig
from shared_data import llama2c_model, shared_file

SMALL = ModelConfig(dim=16, hidden_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=512, seq_len=32)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code, err, pattern):
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


@pytest.fixture
def small_model(tmp_path):
    p = tmp_path / "small.bin"
    write_llama2c(str(p), SMALL, random_weights(SMALL, 3))
    return p


def test_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "generate", tmp_path / "missing.bin", "hi")
    assert_one_line_error(code, err, "missing.bin")


def test_wrong_magic(capsys, tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(os.urandom(64) + b"\xff" * 4096)
    struct.pack_into("<i", bytearray(8), 0, 1)
    code, _, err = run(capsys, "generate", p)
    assert_one_line_error(code, err, "junk.bin")


def test_truncated(capsys, small_model):
    small_model.write_bytes(small_model.read_bytes()[:-100])
    code, _, err = run(capsys, "info", small_model)
    assert_one_line_error(code, err, "truncated")


@pytest.mark.parametrize("value", [0, -7, 2**31 - 1])
def test_zero_negative_absurd_header(capsys, small_model, value):
    data = bytearray(small_model.read_bytes())
    struct.pack_into("<i", data, 0, value)  # dim
    small_model.write_bytes(bytes(data))
    code, _, err = run(capsys, "generate", small_model, "-z", shared_file("models", "llama2c", "tok512.bin"))
    assert_one_line_error(code, err, "dim")


def test_absurd_seq_len_allocates_nothing(capsys, small_model):
    data = bytearray(small_model.read_bytes())
    struct.pack_into("<i", data, 24, 2**30)  # seq_len: also changes the expected file size
    small_model.write_bytes(bytes(data))
    code, _, err = run(capsys, "generate", small_model)
    assert_one_line_error(code, err, "seq_len")


def test_tokenizer_vocab_mismatch(capsys):
    code, _, err = run(capsys, "generate", llama2c_model(), "hi", "-z", llama2c_model("tokenizer.bin"))
    assert_one_line_error(code, err, "32000 tokens")


def test_no_tokenizer_beside_model(capsys, small_model):
    code, _, err = run(capsys, "generate", small_model, "hi")
    assert_one_line_error(code, err, "--tokenizer")


@pytest.mark.parametrize("args,pattern", [(["-t", "-0.5"], "temperature"),
                                          (["-t", "nan"], "temperature"),
                                          (["--top-p", "0"], "top_p"),
                                          (["--top-p", "1.5"], "top_p"),
                                          (["--top-p", "-0.1"], "top_p"),
                                          (["--top-k", "-1"], "top_k"),
                                          (["-n", "-3"], "max-tokens"),
                                          (["--threads", "-2"], "threads"),
                                          (["--ctx", "100000"], "context length")])
def test_nonsense_sampling_values(capsys, args, pattern):
    code, out, err = run(capsys, "generate", llama2c_model(), "Lily", *args)
    assert_one_line_error(code, err, pattern)


def test_max_tokens_beyond_context_stops_and_says_so(capsys):
    code, out, err = run(capsys, "generate", llama2c_model(), "Once upon a time", "-n", "5000", "-t", "0",
                         "--ctx", "64")
    assert code == 0
    assert "context of 64 positions is full" in err and "decode: 60 tokens" in err
    ref = shared_file("reference", "llama2c", "stories260K__once_upon_a_time__greedy_n256.txt").read_text()
    assert len(out) > 100 and ref.startswith(out.rstrip("\n"))


def test_prompt_longer_than_context(capsys):
    code, _, err = run(capsys, "generate", llama2c_model(), "Once upon a time " * 10, "--ctx", "8")
    assert_one_line_error(code, err, "longer than the context of 8")


def test_unknown_model_name(capsys):
    code, _, err = run(capsys, "generate", "stories9000B", "hi")
    assert_one_line_error(code, err, "not a known model name")


def test_known_name_resolves_from_pecca_models(capsys, monkeypatch):
    monkeypatch.setenv("PECCA_MODELS", str(llama2c_model().parent))
    code, out, err = run(capsys, "generate", "stories260K", "Once upon a time", "-n", "20", "-t", "0")
    assert code == 0 and out.startswith("Once upon a time, there was a little girl named Lily.")
    assert "decode:" in err and "tok/s" in err


def test_known_name_download_fails_fast_and_clearly(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PECCA_MODELS", str(tmp_path / "empty"))
    monkeypatch.setenv("PECCA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    t0 = time.time()
    code, _, err = run(capsys, "generate", "stories15M", "hi")
    assert time.time() - t0 < 15
    assert_one_line_error(code, err, "cannot be reached")
    assert str(tmp_path / "empty") in err and str(tmp_path / "cache") in err


def test_info_reports_kernels(capsys):
    code, out, _ = run(capsys, "info", llama2c_model())
    assert code == 0
    for word in ("dim: 64", "n_kv_heads: 4", "llama2c-v0", "f32", "openmp", "simd", "threads", "file_size"):
        assert word in out


def test_bench_runs(capsys):
    code, out, _ = run(capsys, "bench", llama2c_model(), "--threads", "1,2", "-p", "8", "-n", "8", "-r", "1")
    assert code == 0 and "pp8" in out and "tg8" in out


def test_console_entry_point_exit_code():
    r = subprocess.run([sys.executable, "-m", "pecca", "generate", "/nonexistent/model.bin"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "no such file" in r.stderr
