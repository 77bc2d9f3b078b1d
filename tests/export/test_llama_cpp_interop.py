"""llama.cpp runs pecca's GGUF files: its greedy tokens for "Once upon a time" equal pecca's.

Needs llama-cpp-python (a prebuilt wheel is in ../shared/wheels; .ci/run installs it there).
"""
import numpy as np
import pytest

import pecca
from export import export
from pecca.generate import GenerationStats
from pecca.sampling import Sampler
from shared_data import llama2c_model, shared_file

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(pip install ../shared/wheels/llama_cpp_python-*.whl)")

SOURCES = [("hf/stories260K", None), ("hf/stories260K-bf16", None), ("llama2c/stories260K.bin", "tok512.bin")]


def llama_cpp_greedy(path, prompt, n):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False, logits_all=True)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return ids, out


@pytest.mark.parametrize("src,tok", SOURCES)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_runs_pecca_exports(tmp_path, src, tok, dtype):
    kind, name = src.split("/")
    path = shared_file("models", kind, name)
    out = tmp_path / "m.gguf"
    export(str(path), str(out), dtype, str(llama2c_model(tok)) if tok else None)
    ids, theirs = llama_cpp_greedy(out, "Once upon a time", 32)
    m = pecca.load(str(out))
    assert m.tokenizer.encode("Once upon a time") == ids
    ours = list(m.stream_ids(ids, Sampler(m.config.vocab_size, 0.0), 32, GenerationStats()))
    assert ours == theirs
