"""The standalone tokenizer API (pecca.Tokenizer.from_file, encode/decode, special ids) and
`pecca tokenize`, against the transformers / sentencepiece references of
../shared/reference/tokenizers, from the HF files and from GGUF files pecca exported with
those tokenizers. (Llama 3's vocabulary in a GGUF is checked in
tests/export/test_export_llama3_vocab.py, which builds that file.)

Llama 2 (llama2-chat.jsonl): `ids_sentencepiece` is sentencepiece on plain text (special-token
names are text); `ids_no_special` is transformers, which reads "<s>", "</s>", "<unk>" in the
text as those tokens: pecca's parse_special=True. One string, "<unk> and </s> as text" (a
special token followed by a space), is left out of the second comparison: transformers' legacy
Llama tokenizer drops the dummy-prefix space after a special token there, llama.cpp and pecca
keep it (see test_tokenizers_hf.py for the same string between tokenizers versions).
"""
import json

import pytest

import pecca
from chat_models import stories_gguf, vocab_gguf
from pecca.cli import main
from pecca.errors import (InvalidArgumentError, ModelFormatError, TokenizerFormatError,
                          TokenizerMismatchError)
from pecca.tokenizers import HFTokenizer, Llama2cTokenizer, SentencePieceTokenizer
from shared_data import llama2c_model, shared_file

SPACE_AFTER_SPECIAL = "<unk> and </s> as text"


def rows(name):
    path = shared_file("reference", "tokenizers", name)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def llama2_gguf(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    tok = shared_file("models", "tokenizers", "llama2-chat", "tokenizer.model")
    return vocab_gguf(tmp_path_factory.mktemp("llama2"), tok, 32000, "llama2-vocab")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    return stories_gguf(tmp_path_factory.mktemp("stories"))


def check_llama2(tok):
    refs = rows("llama2-chat.jsonl")
    assert len(refs) == 67
    for r in refs:
        text = r["text"]
        assert tok.encode(text) == r["sentencepiece_with_bos"], repr(text)
        assert tok.encode(text, add_bos=False) == r["ids_sentencepiece"], repr(text)
        if text != SPACE_AFTER_SPECIAL:
            assert tok.encode(text, add_bos=False, parse_special=True) == r["ids_no_special"], repr(text)
        if not r["specials_differ"]:
            assert tok.decode(r["ids_no_special"]) == r["decoded_skip_special"], repr(text)


def test_llama2_from_tokenizer_model():
    pytest.importorskip("sentencepiece")
    tok = pecca.Tokenizer.from_file(shared_file("models", "tokenizers", "llama2-chat", "tokenizer.model"))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_ids, tok.add_bos) == (32000, 1, 2, {2}, True)
    assert tok.special_tokens() == {"<unk>": 0, "<s>": 1, "</s>": 2}
    check_llama2(tok)


def test_llama2_from_pecca_gguf(llama2_gguf):
    """The `llama` vocabulary pecca wrote, read back: run.c's merge algorithm with sentencepiece's
    scores gives sentencepiece's ids on all 67 strings ("\u2581" in a text is a space, as in
    sentencepiece and llama.cpp)."""
    tok = pecca.Tokenizer.from_file(llama2_gguf)
    assert isinstance(tok, Llama2cTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (32000, 1, 2, True)
    assert tok.token_text(1) == "<s>" and tok.token_text(13) == "<0x0A>"
    check_llama2(tok)
    assert pecca.load(str(llama2_gguf)).tokenizer.encode("Hello world") == tok.encode("Hello world")


def test_llama3_from_tokenizer_json():
    """parse_special=False is transformers' split_special_tokens=True (`ids_specials_as_plain_text`);
    the default parses them (the corpus itself: test_tokenizers_hf.py)."""
    tok = pecca.Tokenizer.from_file(str(shared_file("models", "tokenizers", "llama3", "tokenizer.json")))
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (128256, 128000, 128001, True)
    assert {128001, 128009} <= tok.eot_ids
    assert tok.special_tokens()["<|eot_id|>"] == 128009 and tok.token_text(128006) == "<|start_header_id|>"
    for r in rows("llama3.jsonl"):
        assert tok.encode(r["text"], add_bos=False, parse_special=False) == r["ids_specials_as_plain_text"]
        assert tok.encode(r["text"], add_bos=False) == r["ids_no_special"]
    assert tok.token_text(9906) == "Hello" and tok.token_text(220) == " "


def test_llama2c_files_and_gguf(stories):
    bin_tok = pecca.Tokenizer.from_file(llama2c_model("tok512.bin"))
    gguf_tok = pecca.Tokenizer.from_file(stories)
    for tok in (bin_tok, gguf_tok):
        assert isinstance(tok, Llama2cTokenizer)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 1, 2, True)
    assert bin_tok.special_tokens() == {"<s>": 1, "</s>": 2}  # tokenizer.bin has no token types
    assert gguf_tok.special_tokens() == {"<unk>": 0, "<s>": 1, "</s>": 2}  # the GGUF's types say more
    text = "Once upon a time, Lily saw a big dog."
    assert gguf_tok.encode(text) == bin_tok.encode(text) == pecca.load(str(stories)).tokenizer.encode(text)
    assert gguf_tok.decode(gguf_tok.encode(text)) == text
    assert bin_tok.encode("a</s>", add_bos=False, parse_special=True)[-1] == 2
    assert 2 not in bin_tok.encode("a</s>", add_bos=False)


def test_decode_checks_ids():
    tok = pecca.Tokenizer.from_file(llama2c_model("tok512.bin"))
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        tok.decode([5, 512])


def test_pecca_tokenize_command(capsys, stories):
    code = main(["tokenize", str(stories), "Once upon a time"])
    out = capsys.readouterr()
    assert code == 0
    lines = out.out.splitlines()
    assert lines[0].split() == ["1", '"<s>"'] and len(lines) == 5 and "5 tokens" in out.err
    assert main(["tokenize", str(llama2c_model()), "Once upon a time", "--ids", "--no-bos"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == pecca.Tokenizer.from_file(llama2c_model("tok512.bin")).encode("Once upon a time", add_bos=False)
    llama3 = shared_file("models", "tokenizers", "llama3")
    assert main(["tokenize", str(llama3), "Hi<|eot_id|>", "--ids"]) == 0
    assert json.loads(capsys.readouterr().out) == [128000, 13347, 128009]
    assert main(["tokenize", str(llama3), "Hi<|eot_id|>", "--ids", "--no-special", "--no-bos"]) == 0
    assert 128009 not in json.loads(capsys.readouterr().out)


# --- bad input ---

def one_line_error(capsys, argv, pattern):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


def test_tokenizer_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    for content in (b"{ this is not JSON", b"\x00\x01\x02binary", b"[1, 2, 3]"):
        bad.write_bytes(content)
        with pytest.raises(TokenizerFormatError, match="tokenizer.json: not"):
            pecca.Tokenizer.from_file(bad)
    with pytest.raises(TokenizerFormatError, match="JSON"):
        pecca.load(str(llama2c_model()), tokenizer=str(bad))
    bad.write_text('{"model": {"type": "BPE", "vocab": 7}}')  # JSON, but not a tokenizer
    with pytest.raises(TokenizerFormatError, match="tokenizers package"):
        pecca.Tokenizer.from_file(bad)
    bad.write_text("{ not JSON")
    one_line_error(capsys, ["generate", llama2c_model(), "hi", "-z", bad], "not readable as JSON")
    one_line_error(capsys, ["tokenize", bad, "hi"], "not readable as JSON")
    one_line_error(capsys, ["chat", llama2c_model(), "-z", bad], "not readable as JSON")


def test_tokenizer_larger_than_the_model(stories, capsys):
    """A vocabulary with more tokens than the model has embedding rows would sample ids the
    model cannot embed: refused when loading, naming both sizes."""
    llama3 = shared_file("models", "tokenizers", "llama3", "tokenizer.json")
    with pytest.raises(TokenizerMismatchError, match=r"128256 tokens but the model .* has vocab_size 512"):
        pecca.load(str(llama2c_model()), tokenizer=str(llama3))
    llama2 = shared_file("models", "tokenizers", "llama2-chat", "tokenizer.model")
    with pytest.raises(TokenizerMismatchError, match="32000 tokens"):
        pecca.load(str(stories), tokenizer=str(llama2))  # overriding the GGUF's own vocabulary
    one_line_error(capsys, ["chat", stories, "-z", llama3], "128256 tokens")
    one_line_error(capsys, ["generate", stories, "hi", "-z", llama2], "32000 tokens")


def test_gguf_without_a_vocabulary(tmp_path):
    import gguf

    p = tmp_path / "novocab.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with pytest.raises(TokenizerFormatError, match="holds no vocabulary"):
        pecca.Tokenizer.from_file(p)
    p.write_bytes(b"GGUF\x03\x00\x00\x00")  # truncated
    with pytest.raises(ModelFormatError, match="not a valid GGUF"):
        pecca.Tokenizer.from_file(p)


def test_folders(tmp_path):
    llama2 = shared_file("models", "tokenizers", "llama2-chat")  # tokenizer.model only
    assert isinstance(pecca.Tokenizer.from_file(llama2), SentencePieceTokenizer)
    assert isinstance(pecca.Tokenizer.from_file(shared_file("models", "tokenizers", "llama3")), HFTokenizer)
    with pytest.raises(TokenizerFormatError, match="folder without tokenizer.json"):
        pecca.Tokenizer.from_file(tmp_path)
