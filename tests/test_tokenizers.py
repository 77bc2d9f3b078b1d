"""Tokenizers against run.c's own encode() and the sentencepiece package, on the 31 strings of
../shared/reference/llama2c/tokenizer_encode_reference.json (ordinary text and edge cases)."""
import json

import pytest

from pecca.errors import TokenizerFormatError
from pecca.tokenizers import Llama2cTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from shared_data import shared_file

CASES = [("llama2_32000", "tokenizer.bin", "run_c_encode"),
         ("tok512", "tok512.bin", "run_c_encode"),
         ("llama2_32000", "tokenizer.model", "sentencepiece"),
         ("tok512", "tok512.model", "sentencepiece")]


def reference():
    return json.loads(shared_file("reference", "llama2c", "tokenizer_encode_reference.json").read_text())


@pytest.mark.parametrize("vocab,fname,key", CASES)
def test_encode_matches_reference(vocab, fname, key):
    ref = reference()
    tok = Tokenizer.from_file(str(shared_file("models", "llama2c", fname)))
    assert isinstance(tok, Llama2cTokenizer if fname.endswith(".bin") else SentencePieceTokenizer)
    for text, expected in zip(ref["strings"], ref[vocab][key]):
        assert tok.encode(text) == expected, repr(text)


@pytest.mark.parametrize("fname", ["tokenizer.bin", "tok512.bin", "tokenizer.model"])
def test_decode_round_trip(fname):
    tok = load_tokenizer(str(shared_file("models", "llama2c", fname)))
    for text in ["Once upon a time", "Lily and Ben were", "héllo wörld 123", "日本"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert tok.decode(ids) == text
        assert tok.encode(text, add_bos=False) == ids[1:]


def test_vocab_sizes():
    assert load_tokenizer(str(shared_file("models", "llama2c", "tok512.bin"))).vocab_size == 512
    assert load_tokenizer(str(shared_file("models", "llama2c", "tokenizer.bin"))).vocab_size == 32000


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerFormatError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.bin"))
    p = tmp_path / "t.bin"
    p.write_bytes(b"\x07\0\0\0" + b"\0\0\x80\x3f" + b"\xff\xff\0\0")  # length 65535, no bytes
    with pytest.raises(TokenizerFormatError, match="beyond the end"):
        load_tokenizer(str(p))
    p.write_bytes(b"\x07\0")
    with pytest.raises(TokenizerFormatError, match="too short"):
        load_tokenizer(str(p))
    m = tmp_path / "t.model"
    m.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerFormatError):
        load_tokenizer(str(m))
