"""q8: llama2.c version-2 files and GGUF Q8_0, end to end.

- runq.c's references are reproduced by tests/e2e/test_llama2c_reference.py (all entries);
- the q8_0 export of stories260K has perplexity within 1% of its f32 export (on the text
  run.c wrote for it), through `pecca perplexity`;
- llama.cpp runs pecca's Q8_0 export with the same greedy tokens, and pecca runs a Q8_0 file
  that llama.cpp's own quantizer wrote.
"""
import re
import struct

import numpy as np
import pytest

import pecca
from export import export
from pecca.cli import main
from pecca.errors import ModelFormatError
from pecca.generate import GenerationStats
from pecca.sampling import Sampler
from shared_data import llama2c_model, shared_file


def story_text():
    ref = shared_file("reference", "llama2c")
    names = ["stories260K__once_upon_a_time__greedy_n0.txt", "stories260K__lily__t0.8_p0.95_s1337_n256.txt",
             "stories260K__the_little_dog__t1_p0_s7_n256_multinomial.txt"]
    return "\n".join((ref / n).read_text() for n in names)


def ppl_cli(capsys, model, textfile, ctx, *extra):
    assert main(["perplexity", str(model), str(textfile), "--ctx", str(ctx), *extra]) == 0
    out = capsys.readouterr().out
    return float(re.search(r"perplexity: ([0-9.]+)", out).group(1))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("q8")
    out = {}
    for dtype in ("f32", "q8_0"):
        out[dtype] = d / f"s260k-{dtype}.gguf"
        export(str(shared_file("models", "hf", "stories260K-f32")), str(out[dtype]), dtype)
    return out


def test_q8_0_export_types(exports):
    m = pecca.load(str(exports["q8_0"]))
    types = m.info()["tensor_types"]
    assert types["Q8_0"] == 1 + 6 * 5  # token_embd + q, k, v, o, gate, up per layer
    assert types["F16"] == 5  # ffn_down: rows of 172 are not whole 32-blocks
    assert m.loaded.weights.layers[0].wq.kind == "q8_0"


def test_q8_0_perplexity_within_one_percent_of_f32(exports, tmp_path, capsys):
    text = tmp_path / "stories.txt"
    text.write_text(story_text())
    p32 = ppl_cli(capsys, exports["f32"], text, 128)
    p8 = ppl_cli(capsys, exports["q8_0"], text, 128)
    assert 1.0 < p32 < 100
    assert abs(p8 - p32) / p32 < 0.01, (p32, p8)


def test_f16_kv_cache_perplexity_close_to_f32(exports, tmp_path, capsys):
    """What rounding the KV cache to half costs, as `pecca perplexity --kv-type f16` measures it
    (stories260K at ctx 128: 3.75390 with an f32 cache, 3.75370 with f16)."""
    text = tmp_path / "stories.txt"
    text.write_text(story_text())
    p32 = ppl_cli(capsys, exports["f32"], text, 128)
    p16 = ppl_cli(capsys, exports["f32"], text, 128, "--kv-type", "f16")
    print(f"perplexity f32 KV {p32:.5f}, f16 KV {p16:.5f}")
    assert p16 != p32 and abs(p16 - p32) / p32 < 0.002, (p32, p16)


def test_llama2c_v2_perplexity_close_to_f32(tmp_path, capsys):
    text = tmp_path / "stories.txt"
    text.write_text(story_text())
    p32 = ppl_cli(capsys, llama2c_model("stories260K.bin"), text, 256)
    p8 = ppl_cli(capsys, llama2c_model("stories260K_q80_gs4.bin"), text, 256)
    assert abs(p8 - p32) / p32 < 0.01, (p32, p8)


def test_perplexity_matches_a_direct_computation():
    from pecca.perplexity import nll, perplexity

    m = pecca.load(str(llama2c_model()))
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    r = perplexity(m, text, ctx=8)
    ids = m.tokenizer.encode(text, add_bos=False)
    total, n = 0.0, 0
    for s in range(0, len(ids), 7):
        window = [1] + ids[s:s + 7]
        logits = np.stack([m.forward(t, p) for p, t in enumerate(window)])
        total += nll(logits[:-1], window[1:]).sum()
        n += len(window) - 1
    assert r.tokens == n == len(ids) and abs(r.perplexity - np.exp(total / n)) < 1e-3 * r.perplexity


# ---- bad input ---------------------------------------------------------------------------

def writable(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(llama2c_model(name).read_bytes())
    return p


def test_group_size_that_does_not_divide_rows(tmp_path):
    p = writable(tmp_path, "stories260K_q80_gs4.bin")
    data = bytearray(p.read_bytes())
    struct.pack_into("<i", data, 37, 3)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="group_size 3 does not divide"):
        pecca.load(str(p))


def test_version2_truncated_inside_the_scales(tmp_path, capsys):
    p = writable(tmp_path, "stories260K_q80_gs4.bin")
    p.write_bytes(p.read_bytes()[:-100])  # the last tensor's scales lose their tail
    with pytest.raises(ModelFormatError, match="truncated"):
        pecca.load(str(p), tokenizer=str(llama2c_model("tok512.bin")))
    assert main(["generate", str(p), "-z", str(llama2c_model("tok512.bin"))]) == 1
    assert "truncated" in capsys.readouterr().err


def test_q8_0_byte_size_that_disagrees_with_shape(tmp_path, exports):
    import gguf

    data = bytearray(exports["q8_0"].read_bytes())
    r = gguf.GGUFReader(str(exports["q8_0"]))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    dims_at = t.field.offset + 8 + len(t.name) + 4  # name length, name, n_dims, then dims
    assert struct.unpack_from("<Q", data, dims_at)[0] == 64
    struct.pack_into("<Q", data, dims_at, 48)  # 48 values a row: not whole 32-value blocks
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError):
        pecca.load(str(bad))


# ---- llama.cpp ---------------------------------------------------------------------------

def greedy(m, ids, n):
    return list(m.stream_ids(ids, Sampler(m.config.vocab_size, 0.0), n, GenerationStats()))


def test_llama_cpp_runs_pecca_q8_0(exports):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(exports["q8_0"]), n_ctx=512, n_threads=2, verbose=False,
                          logits_all=True)
    ids = llm.tokenize(b"Once upon a time", add_bos=True)
    llm.eval(ids)
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert greedy(pecca.load(str(exports["q8_0"])), ids, 32) == theirs


def test_pecca_runs_a_q8_0_file_llama_cpp_wrote(exports, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "by-llama-cpp.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    rc = llama_cpp.llama_model_quantize(str(exports["f32"]).encode(), str(out).encode(), params)
    assert rc == 0 and out.exists()
    m = pecca.load(str(out))
    assert "Q8_0" in m.info()["tensor_types"]
    ref = pecca.load(str(exports["q8_0"]))
    ids = ref.tokenizer.encode("Once upon a time")
    assert greedy(m, ids, 32) == greedy(ref, ids, 32)
