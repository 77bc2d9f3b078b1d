"""Llama 3's byte-level BPE vocabulary (tokenizer.json) in pecca's GGUF files: the `gpt2`
vocabulary as llama.cpp writes it (tokens, token types, merges, tokenizer.ggml.pre
"llama-bpe"), read back by pecca and by llama.cpp.

Reference: the transformers ids of ../shared/reference/tokenizers/llama3.jsonl (67 strings);
`ids_with_bos` for encode(text), `ids_no_special` for encode(text, add_bos=False).

The models are tiny (width 8 or 16, one layer) but keep the 128256-token vocabulary, written
in f16: a few MB. Opening such a file takes seconds: the gguf package's reader parses the
128256 tokens and 280147 merges one string at a time.
"""
import json
import shutil

import numpy as np
import pytest

import pecca
from export import export
from export.gguf import tensor_plan, write_gguf
from export.vocab import vocab_from_tokenizer_json
from pecca.config import ModelConfig
from pecca.errors import ModelFormatError, UnsupportedModelError
from pecca.formats.tensors import RawTensor
from pecca.tokenizers import HFTokenizer
from pecca.tokenizers.llama2c import CONTROL, NORMAL
from shared_data import shared_file

pytest.importorskip("tokenizers")

N_MERGES = 280147


def llama3_dir():
    return shared_file("models", "tokenizers", "llama3")


def corpus():
    path = shared_file("reference", "tokenizers", "llama3.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_corpus(tok):
    for r in corpus():
        assert tok.encode(r["text"], add_bos=False) == r["ids_no_special"], repr(r["text"])
        assert tok.encode(r["text"]) == r["ids_with_bos"], repr(r["text"])
        assert tok.decode(r["ids_no_special"]) == r["decoded_skip_special"], repr(r["text"])


class TinySource:
    """An export source: random weights of a width-8 model around a given vocabulary."""

    def __init__(self, vocab):
        self.vocab, self.name, self.tied = vocab, "tiny-llama3-vocab", True
        self.config = ModelConfig(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                  vocab_size=len(vocab), seq_len=64, rope_theta=500000.0,
                                  bos_id=vocab.bos_id, eos_id=vocab.eos_id)
        self.shapes = dict(tensor_plan(self.config, True))

    def tensor(self, name):
        shape = self.shapes[name]
        rng = np.random.default_rng(sum(map(ord, name)))
        x = rng.standard_normal(shape) * 0.3 + (1.0 if len(shape) == 1 else 0.0)
        return RawTensor(x.astype(np.float32), "f32")


@pytest.fixture(scope="module")
def vocab():
    return vocab_from_tokenizer_json(str(llama3_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_gguf(vocab, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(str(out), TinySource(vocab), "f16")
    return out


def test_vocab_from_tokenizer_json(vocab):
    assert (vocab.model, vocab.pre, len(vocab), len(vocab.merges)) == ("gpt2", "llama-bpe", 128256, N_MERGES)
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.add_bos, vocab.scores) == (128000, 128001, None, True, [])
    assert vocab.types[:128000] == [NORMAL] * 128000 and vocab.types[128000:] == [CONTROL] * 256
    assert vocab.tokens[220] == "Ġ" and vocab.tokens[128009] == "<|eot_id|>" and vocab.merges[0] == "Ġ Ġ"
    padded = vocab_from_tokenizer_json(str(llama3_dir() / "tokenizer.json"), 128260)
    assert padded.tokens[128256:] == [f"[PAD{i}]" for i in range(128256, 128260)]


def test_gguf_round_trip(tiny_gguf):
    """The file's metadata are what llama.cpp's converter writes, and its tokenizer encodes like
    tokenizer.json. (The reader is opened once here: pecca.load of the same kind of file is
    checked on the HF export below.)"""
    from pecca.formats.gguf import Metadata, open_reader
    from pecca.tokenizers.gguf_vocab import tokenizer_from_gguf

    meta = Metadata(str(tiny_gguf), open_reader(str(tiny_gguf)))
    assert meta.get("tokenizer.ggml.model") == "gpt2" and meta.get("tokenizer.ggml.pre") == "llama-bpe"
    assert len(meta.get("tokenizer.ggml.merges")) == N_MERGES
    assert meta.get("tokenizer.ggml.scores") is None and meta.get("tokenizer.ggml.unknown_token_id") is None
    assert meta.get("tokenizer.ggml.add_bos_token") is True
    assert list(meta.get("tokenizer.ggml.token_type")[127998:128002]) == [NORMAL, NORMAL, CONTROL, CONTROL]
    tok = tokenizer_from_gguf(str(tiny_gguf), meta)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.add_bos_default) == (128000, 128001, True)
    assert {128001, 128009} <= tok.eot_ids and len(tok.control_ids) == 256
    check_corpus(tok)


def test_tokenizer_api_reads_the_gguf(tiny_gguf):
    """pecca.Tokenizer.from_file on the GGUF (its vocabulary only, no weights): the corpus, and
    special-token names as plain text (transformers' split_special_tokens=True)."""
    tok = pecca.Tokenizer.from_file(str(tiny_gguf))
    assert isinstance(tok, HFTokenizer) and (tok.vocab_size, tok.bos_id, tok.add_bos) == (128256, 128000, True)
    check_corpus(tok)
    for r in corpus():
        assert tok.encode(r["text"], add_bos=False, parse_special=False) == r["ids_specials_as_plain_text"]


# --- a HuggingFace directory: tiny random LlamaForCausalLM + Llama 3's tokenizer files ---

@pytest.fixture(scope="module")
def hf_export(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = llama3_dir()
    d = tmp_path_factory.mktemp("hf") / "tiny-llama3"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0) if p.ndim == 2 else p.copy_(1 + 0.3 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(d)
    # tokenizer.model here is Meta's tiktoken file, not sentencepiece: export must use tokenizer.json
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        shutil.copy(src / name, d / name)
    out = d.parent / "tiny-llama3.gguf"
    export(str(d), str(out), "f16")
    ref = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return d, out, ref, torch


@pytest.fixture(scope="module")
def hf_loaded(hf_export):
    return pecca.load(str(hf_export[1]))


def test_hf_export_with_tokenizer_json(hf_export, hf_loaded):
    d, out, ref, torch = hf_export
    m = hf_loaded
    assert isinstance(m.tokenizer, HFTokenizer) and m.config.vocab_size == 128256
    assert m.info()["vocab"] == "gpt2, 128256 tokens" and m.tokenizer.add_bos_default
    check_corpus(m.tokenizer)
    assert isinstance(m.generate("Hello", max_tokens=4, temperature=0), str)
    ids = m.tokenizer.encode("Hello world, this is Llama 3's vocabulary.")
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].double().numpy()
    got = np.stack([m.forward(t, p) for p, t in enumerate(ids)])
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_hf_export_tokenizer_choice(tmp_path, hf_export):
    d = hf_export[0]
    e = tmp_path / "e"
    shutil.copytree(d, e)
    (e / "tokenizer.json").unlink()
    (e / "tokenizer.model").unlink()
    with pytest.raises(ModelFormatError, match="no tokenizer.model or tokenizer.json"):
        export(str(e), str(tmp_path / "o.gguf"), "f16")
    # a tokenizer.json that is not byte-level BPE: a clear refusal
    (e / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(UnsupportedModelError, match="tokenizer.model"):
        export(str(e), str(tmp_path / "o.gguf"), "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_llama_cpp_tokenizes_the_export_like_pecca(hf_export, hf_loaded):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install ../shared/wheels/llama_cpp_python-*.whl)")
    out = hf_export[1]
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    tok = hf_loaded.tokenizer
    for r in corpus():
        text = r["text"]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == r["ids_no_special"], repr(text)
        if not text.startswith("<|begin_of_text|>"):  # llama.cpp would put a second BOS there
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tok.encode(text), repr(text)
        if r["ids_no_special"] and not any(t >= 128000 for t in r["ids_no_special"]):
            assert llm.detokenize(r["ids_no_special"]).decode("utf-8") == r["decoded"]


def test_export_keeps_the_chat_template(hf_export):
    import gguf

    d, out = hf_export[0], hf_export[1]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    r = gguf.GGUFReader(str(out))
    assert r.fields["tokenizer.chat_template"].contents() == cfg["chat_template"]


def test_chats_rendered_from_the_gguf_template(hf_loaded):
    """The template the export stored (tokenizer.chat_template) renders the Llama 3 chat references
    of ../shared/reference/tokenizers, text and ids, with the GGUF's own vocabulary."""
    from pecca.chat_template import ChatTemplate, chat_ids

    tok = hf_loaded.tokenizer
    assert "tokenizer.chat_template" in tok.chat_template_origin
    t = ChatTemplate.for_tokenizer(tok)
    refs = [json.loads(line) for line in shared_file("reference", "tokenizers", "llama3_chat.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    for r in refs:
        text = t.render(r["messages"], add_generation_prompt=r["add_generation_prompt"])
        assert text == r["rendered"] and chat_ids(tok, text) == r["ids"], r["name"]


def test_reexport_of_a_gpt2_vocabulary_to_q8_0(hf_export, tmp_path):
    """A GGUF with Llama 3's vocabulary written again as Q8_0: same vocabulary and template."""
    import gguf

    out = tmp_path / "q8.gguf"
    export(str(hf_export[1]), str(out), "q8_0")
    a, b = gguf.GGUFReader(str(hf_export[1])), gguf.GGUFReader(str(out))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.chat_template"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    assert len(b.fields["tokenizer.ggml.merges"].contents()) == len(a.fields["tokenizer.ggml.merges"].contents())
