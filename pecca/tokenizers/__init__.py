"""Tokenizers: llama2.c `tokenizer.bin`, sentencepiece `tokenizer.model`, HuggingFace
`tokenizer.json` (a file, or a directory holding one) and the vocabulary inside a GGUF file.

`Tokenizer.from_file(path)` picks the kind from the file. Every tokenizer gives
`encode(text, add_bos=None, parse_special=None) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id`, `eot_ids`, `token_text(id)`, `chat_template` (from the GGUF
file, or chat_template.jinja / tokenizer_config.json beside the tokenizer file), and
`token_bytes(prev, token)`, the bytes that token adds to the text when it follows `prev` (the
unit of streaming).
"""
import os

from pecca.errors import TokenizerFormatError
from pecca.tokenizers.base import Tokenizer
from pecca.tokenizers.hf_json import HFTokenizer
from pecca.tokenizers.llama2c import Llama2cTokenizer
from pecca.tokenizers.sentencepiece import SentencePieceTokenizer

GGUF_MAGIC = b"GGUF"


def load_tokenizer(path: str) -> Tokenizer:
    path = str(path)
    tok = _load(path)
    if tok.chat_template is None:  # a GGUF file carries its own; others may have one beside them
        from pecca.chat_template import template_beside

        found = template_beside(path)
        if found is not None:
            tok.chat_template, tok.chat_template_origin = found
    return tok


def _load(path: str) -> Tokenizer:
    if os.path.isdir(path):  # a model folder: its tokenizer file, tokenizer.json first
        found = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model", "tokenizer.bin")]
        found = [p for p in found if os.path.isfile(p)]
        if not found:
            raise TokenizerFormatError(f"{path}: a folder without tokenizer.json, tokenizer.model or "
                                       "tokenizer.bin")
        path = found[0]
    if not os.path.isfile(path):
        raise TokenizerFormatError(f"{path}: tokenizer file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == GGUF_MAGIC:
        return tokenizer_of_gguf(path)
    if path.endswith(".json") or (head[:1] == b"{" and head[1:2] in b' \t\r\n"'):
        return HFTokenizer.from_file(path)
    if path.endswith(".bin"):  # llama2.c's: its first byte may be 0x0a too (max_token_length 10)
        return Llama2cTokenizer.from_file(path)
    if path.endswith(".model") or head[:1] == b"\x0a":  # sentencepiece ModelProto starts with field 1
        return SentencePieceTokenizer(path)
    return Llama2cTokenizer.from_file(path)


def tokenizer_of_gguf(path: str) -> Tokenizer:
    """The vocabulary stored in a GGUF model file (its weights are not read)."""
    from pecca.formats.gguf import Metadata, open_reader
    from pecca.tokenizers.gguf_vocab import tokenizer_from_gguf

    tok = tokenizer_from_gguf(path, Metadata(path, open_reader(path)))
    if tok is None:
        raise TokenizerFormatError(f"{path}: this GGUF file holds no vocabulary (tokenizer.ggml.model)")
    return tok


__all__ = ["Tokenizer", "Llama2cTokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer"]
