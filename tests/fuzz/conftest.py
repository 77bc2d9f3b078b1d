"""Seeds (valid small model files, from ../shared or made from them) and one fuzz worker per
reader; the terminal summary prints how every mutated file ended, per reader."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import FAILURES, STATS, TIMES, Fuzzer, Quiet, fuzz_examples  # noqa: E402
from shared_data import shared_file  # noqa: E402


@pytest.fixture(scope="session")
def fuzz_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="session")
def fuzzers(fuzz_root):
    """reader name -> Fuzzer (its worker started on first use, stopped at the end)."""
    made = {}

    class Pool(dict):
        def __missing__(self, reader):
            root = fuzz_root / reader
            root.mkdir()
            made[reader] = self[reader] = Fuzzer(reader, root)
            return self[reader]

    Pool.__repr__ = lambda self: "<fuzzers>"
    pool = Pool()
    yield pool
    for f in made.values():
        f.worker.stop()


@pytest.fixture(scope="session")
def seeds(fuzz_root, bytelevel_tokenizer):
    """Valid files made once from ../shared: GGUF exports of stories260K (f32, q8_0, q4_0, with
    a byte-level `gpt2` vocabulary, and the q4g layout of its GPTQ checkpoint), and the q4g
    export of a random checkpoint with an ffn_down in column slices."""
    from export import export

    d = fuzz_root / "seeds"
    d.mkdir()
    hf = shared_file("models", "hf", "stories260K-f32")
    gptq = shared_file("models", "gptq", "stories260K-gptq-4bit-g32-actorder")
    out = Quiet()
    for dtype in ("f32", "q8_0", "q4_0"):
        out[f"gguf-{dtype}"] = d / f"stories260K-{dtype}.gguf"
        export(str(hf), str(out[f"gguf-{dtype}"]), dtype=dtype)
    out["gguf-gpt2"] = d / "stories260K-gpt2.gguf"
    export(str(hf), str(out["gguf-gpt2"]), tokenizer=str(bytelevel_tokenizer))
    out["gguf-q4g"] = d / "stories260K-q4g.gguf"
    export(str(gptq), str(out["gguf-q4g"]))
    # a random GPTQ checkpoint whose ffn_down (8192 inputs) is written in column slices
    from gptq_helpers import bench_script

    bench_script().make_checkpoint(d / "gptq-sliced", layers=1, dim=128, hidden=8192, heads=4, kv_heads=2,
                                   vocab=600, group_size=128, act_order=True, sym=False)
    out["gguf-q4g-sliced"] = d / "gptq-sliced.gguf"
    export(str(d / "gptq-sliced"), str(out["gguf-q4g-sliced"]))
    return out


@pytest.fixture(scope="session")
def meta_seed(fuzz_root):
    """A Meta checkpoint directory of stories260K in two model-parallel shards (torch.save),
    with the 512-token tokenizer.model."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from pecca.formats.llama2c import read

    loaded = read(str(shared_file("models", "llama2c", "stories260K.bin")))
    c, w = loaded.config, loaded.weights
    t = lambda a: torch.from_numpy(np.array(a, np.float32)).to(torch.bfloat16)  # noqa: E731
    sd = {"tok_embeddings.weight": t(w.token_embedding)}
    names = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
             "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}
    for i, layer in enumerate(w.layers):
        for attr, meta in names.items():
            sd[f"layers.{i}.{meta}.weight"] = t(getattr(layer, attr).w)
        sd[f"layers.{i}.attention_norm.weight"] = t(layer.attn_norm)
        sd[f"layers.{i}.ffn_norm.weight"] = t(layer.ffn_norm)
    sd["norm.weight"] = t(w.norm)
    sd["output.weight"] = t(w.output.w)
    column = ("output.weight", "wq", "wk", "wv", "w1", "w3")
    shards = [{}, {}]
    for name, x in sd.items():
        axis = None if x.ndim == 1 else 0 if name.split(".")[-2] in column or name == "output.weight" else 1
        parts = [x, x] if axis is None else torch.chunk(x, 2, dim=axis)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone().contiguous()
    d = fuzz_root / "meta-seed"
    d.mkdir()
    import json

    (d / "params.json").write_text(json.dumps({"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
                                               "n_kv_heads": c.n_kv_heads, "vocab_size": c.vocab_size,
                                               "multiple_of": 4, "norm_eps": 1e-5, "max_seq_len": c.seq_len}))
    for i, shard in enumerate(shards):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    shutil.copyfile(shared_file("models", "llama2c", "tok512.model"), d / "tokenizer.model")
    return d


@pytest.fixture(scope="session")
def bytelevel_tokenizer(fuzz_root):
    """A byte-level BPE tokenizer.json (GPT-2's pre-tokenizer, as SmolLM's and Llama 3's
    vocabularies are) of exactly 512 tokens, so that it fits stories260K: trained here on the
    words of stories260K's own vocabulary, in a fraction of a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pecca.tokenizers import load_tokenizer

    words = [p.decode("utf-8", "ignore") for p in load_tokenizer(
        str(shared_file("models", "llama2c", "tok512.bin"))).pieces[259:]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] * 3, trainer)
    tok.add_special_tokens([f"<|extra_{i}|>" for i in range(512 - tok.get_vocab_size())])
    assert tok.get_vocab_size() == 512
    d = fuzz_root / "bytelevel"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def pytest_terminal_summary(terminalreporter):
    if not STATS:
        return
    tr = terminalreporter
    total = sum(sum(c.values()) for c in STATS.values())
    tr.section(f"fuzz: {total} files loaded ({fuzz_examples()} mutated files per reader asked)")
    for reader in sorted(STATS):
        c = STATS[reader]
        tr.write_line(f"{reader}: {sum(c.values())} files, {TIMES[reader]:.1f} s in the worker")
        for what, n in c.most_common():
            tr.write_line(f"    {n:6d}  {what}")
    if FAILURES:
        tr.section(f"fuzz: {len(FAILURES)} distinct failures")
        for sig, (n, report) in sorted(FAILURES.items()):
            tr.write_line(f"{n:6d}  {sig}")
            tr.write_line("        " + report[-1500:].replace("\n", "\n        "))


def pytest_sessionfinish(session):
    if FAILURES:  # the long run records failures instead of stopping at the first
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
