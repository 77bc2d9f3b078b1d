"""HuggingFace tokenizer.json tokenizers (pecca.tokenizers.hf_json) against transformers' ids
for the 67-string stress corpus of ../shared/reference/tokenizers, and the GGUF `gpt2`
vocabulary against llama.cpp's ids for SmolLM2 (../shared/reference/gguf/tokenize.jsonl).

What is compared, per corpus string:
  - encode(text, add_bos=False) == `ids_no_special` (special tokens in the text are parsed as
    special tokens, as transformers does by default);
  - encode(text) == `ids_with_bos` (BOS in front, never doubled: Llama 3's first tokenizer.json
    adds none itself, and "<|begin_of_text|>Hi" already starts with it);
  - decode(ids_no_special) == `decoded_skip_special`: pecca prints nothing for special tokens
    (they are control tokens, also when streaming), which is transformers'
    skip_special_tokens=True. On ordinary text (no special token in it) this is `decoded` as
    well, and the text itself;
  - the bytes of token_bytes() over the ids, joined (what streaming prints), are that text.
"""
import json

import pytest

from pecca.errors import TokenizerFormatError, UnsupportedModelError
from pecca.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from pecca.tokenizers.hf_json import byte_level_bytes, byte_level_pre_tokenizer
from shared_data import shared_file, smollm2_gguf

pytest.importorskip("tokenizers")


def rows(name):
    path = shared_file("reference", "tokenizers", name)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def streamed(tok, ids, prev):
    out = []
    for t in ids:
        out.append(tok.token_bytes(prev, t))
        prev = t
    return b"".join(out).decode("utf-8")


@pytest.fixture(scope="module")
def llama3():
    return HFTokenizer.from_file(str(shared_file("models", "tokenizers", "llama3", "tokenizer.json")))


def test_llama3_corpus(llama3):
    refs = rows("llama3.jsonl")
    assert len(refs) == 67
    for r in refs:
        text = r["text"]
        assert llama3.encode(text, add_bos=False) == r["ids_no_special"], repr(text)
        assert llama3.encode(text) == r["ids_with_bos"], repr(text)
        assert llama3.decode(r["ids_no_special"]) == r["decoded_skip_special"], repr(text)
        assert llama3.decode(r["ids_with_bos"]) == r["decoded_skip_special"], repr(text)
        assert streamed(llama3, r["ids_with_bos"][1:], r["ids_with_bos"][0]) == r["decoded_skip_special"]
        if not any(t in llama3.control_ids for t in r["ids_no_special"]):  # ordinary text
            assert r["decoded"] == r["decoded_skip_special"] == text
            assert streamed(llama3, r["ids_no_special"], 13) == text  # after any token: no space dropped


def test_llama3_special_tokens(llama3):
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)  # tokenizer_config.json's names
    assert llama3.add_bos_default
    assert {128009, 128001} <= llama3.eot_ids and 128006 not in llama3.eot_ids
    assert {128000, 128001, 128006, 128007, 128009, 128255} <= llama3.control_ids
    assert len(llama3.control_ids) == 256 and max(llama3.control_ids) == 128255
    for t in (128006, 128007, 128009):
        assert llama3.token_bytes(9906, t) == b""
    assert llama3.piece(128009) == b"<|eot_id|>"
    assert llama3.piece(220) == b" " and llama3.piece(198) == b"\n"  # "Ġ", "Ċ"
    # a byte-level token that is only part of a UTF-8 character: streaming holds it back
    ids = llama3.encode("😀", add_bos=False)
    assert len(ids) > 1 and all(len(llama3.token_bytes(0, t)) < 4 for t in ids)


def test_byte_level_alphabet():
    assert byte_level_bytes("Ġhello") == b" hello"
    assert byte_level_bytes("ĊĉĠ") == b"\n\t "
    alphabet = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100), *range(0x100, 0x144)]
    assert bytes(sorted(byte_level_bytes(chr(c))[0] for c in alphabet)) == bytes(range(256))


def test_load_tokenizer_picks_hf_json(tmp_path):
    src = shared_file("models", "tokenizers", "llama3")
    assert isinstance(load_tokenizer(str(src / "tokenizer.json")), HFTokenizer)
    assert isinstance(load_tokenizer(str(src)), HFTokenizer)  # a directory holding tokenizer.json
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(TokenizerFormatError, match="JSON"):
        load_tokenizer(str(tmp_path / "t.json"))
    (tmp_path / "t.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerFormatError, match="tokenizers package"):
        load_tokenizer(str(tmp_path / "t.json"))


def test_unknown_pre_tokenizer_name():
    with pytest.raises(UnsupportedModelError, match="'qwen2'"):
        byte_level_pre_tokenizer("qwen2", "x.gguf")


# --- Llama 2: the sentencepiece tokenizer.model, and a sentencepiece-style tokenizer.json ---

def test_llama2_sentencepiece_model_corpus():
    """pecca's sentencepiece tokenizer and the GGUF `llama` vocabulary path (run.c's merge
    algorithm) against `ids_sentencepiece` (sentencepiece treats "<s>" in text as text)."""
    from export.vocab import vocab_from_sentencepiece
    from pecca.tokenizers import Llama2cTokenizer

    path = str(shared_file("models", "tokenizers", "llama2-chat", "tokenizer.model"))
    sp = SentencePieceTokenizer(path)
    v = vocab_from_sentencepiece(path)
    gguf_like = Llama2cTokenizer.from_spm_vocab(v.tokens, v.scores, v.types, bos_id=v.bos_id, eos_id=v.eos_id)
    for r in rows("llama2-chat.jsonl"):
        text, ids = r["text"], r["ids_sentencepiece"]
        assert sp.encode(text, add_bos=False) == ids, repr(text)
        assert sp.encode(text) == r["sentencepiece_with_bos"], repr(text)
        if "\u2581" not in text:
            # run.c's algorithm takes a "\u2581" in the text as that character (byte tokens);
            # sentencepiece (and llama.cpp) as a space: the one string with it differs
            assert gguf_like.encode(text) == r["sentencepiece_with_bos"], repr(text)
        expect = r["decoded_skip_special"] if not r["specials_differ"] else text  # "<s>" was text
        assert sp.decode(ids) == expect, repr(text)
        assert streamed(sp, ids, sp.bos_id) == expect


def spm_tokenizer_json(model_path, out):
    """Llama 2's tokenizer.json as transformers 4 converts tokenizer.model (legacy): the pieces,
    merges of every split of a piece into two pieces ordered by the piece's score, byte
    fallback, a "\u2581" prefix and spaces as "\u2581", and the Replace/ByteFallback/Fuse/Strip
    decoder. Built here because no genuine Llama 2 tokenizer.json could be vendored."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in vocab.items():
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(a, b, sp.get_score(i)) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: m[2], reverse=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(out))


def test_llama2_sentencepiece_style_tokenizer_json(tmp_path):
    """The other tokenizer.json kind: "\u2581" pieces and <0xXX> byte tokens. Against the
    transformers 4 reference (its fast tokenizer is this conversion), and against the
    `tokenizers` package's own decode(skip_special_tokens=True)."""
    pytest.importorskip("sentencepiece")
    src = shared_file("models", "tokenizers", "llama2-chat")
    spm_tokenizer_json(src / "tokenizer.model", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and not tok.byte_level
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos_default) == (32000, 1, 2, True)
    assert tok.eot_ids == {2}
    for r in rows("llama2-chat.jsonl"):
        text, ids = r["text"], r["ids_no_special"]
        if text != "<unk> and </s> as text":
            # (this one string, a special token followed by a space, tokenizes differently in
            # the reference's tokenizers 0.22 than in this hand-made file under 0.23)
            assert tok.encode(text, add_bos=False) == ids, repr(text)
            bos = r["ids_with_bos"]  # transformers puts BOS before a text that starts with "<s>"
            assert tok.encode(text) == (bos[1:] if bos[:2] == [1, 1] else bos), repr(text)
        assert tok.decode(ids) == r["decoded_skip_special"] == tok.tok.decode(ids, skip_special_tokens=True)
        if not r["specials_differ"]:
            assert streamed(tok, ids, tok.bos_id) == r["decoded_skip_special"]
    # <0xXX> byte-fallback tokens are bytes; the leading space goes only right after BOS
    ids = tok.encode("\U0001F600 x", add_bos=False)
    assert [tok.piece(t) for t in ids[1:5]] == [b"<0xF0>", b"<0x9F>", b"<0x98>", b"<0x80>"]
    assert b"".join(tok.token_bytes(5, t) for t in ids[1:5]) == "\U0001F600".encode()
    assert tok.token_bytes(1, 921) == b"x" and tok.token_bytes(5, 921) == b" x"  # "\u2581x"


# --- GGUF `gpt2` vocabulary: SmolLM2 as llama.cpp converted it ---

def test_smollm2_gguf_vocabulary_matches_llama_cpp():
    """The `smollm` pre-tokenizer (each digit alone, then GPT-2's regex) with llama.cpp's own
    converted vocabulary: llama.cpp's ids for the 20 strings of reference/gguf/tokenize.jsonl.
    (Only the tokenizer: pecca does not run Q4_1 weights.)"""
    from pecca.formats.gguf import Metadata, open_reader
    from pecca.tokenizers.gguf_vocab import tokenizer_from_gguf

    path = str(smollm2_gguf())
    meta = Metadata(path, open_reader(path))
    assert (meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")) == ("gpt2", "smollm")
    tok = tokenizer_from_gguf(path, meta)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 49152 and not tok.add_bos_default
    assert tok.eot_ids == {0, 2}  # <|endoftext|>, <|im_end|>
    refs = [json.loads(line) for line in shared_file("reference", "gguf", "tokenize.jsonl").read_text().splitlines()]
    assert len(refs) == 20
    for r in refs:
        assert tok.encode(r["text"], add_bos=tok.add_bos_default) == r["ids"] == r["ids_add_special"], repr(r["text"])
        if r["ids"] == r["ids_no_parse_special"]:  # no special tokens in the text
            assert tok.decode(r["ids"]) == r["text"]
