"""Tokenizers: llama2.c `tokenizer.bin`, sentencepiece `tokenizer.model` and HuggingFace
`tokenizer.json` (a file, or a directory holding one).

`Tokenizer.from_file(path)` picks the kind from the file. Every tokenizer gives
`encode(text, add_bos=True) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`,
`eos_id`, and `token_bytes(prev, token)`, the bytes that token adds to the text when it
follows `prev` (the unit of streaming).
"""
import os

from pecca.errors import TokenizerFormatError
from pecca.tokenizers.base import Tokenizer
from pecca.tokenizers.hf_json import HFTokenizer
from pecca.tokenizers.llama2c import Llama2cTokenizer
from pecca.tokenizers.sentencepiece import SentencePieceTokenizer


def load_tokenizer(path: str) -> Tokenizer:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    if not os.path.isfile(path):
        raise TokenizerFormatError(f"{path}: tokenizer file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".json") or (head[:1] == b"{" and head[1:2] in b' \t\r\n"'):
        return HFTokenizer.from_file(path)
    if path.endswith(".model") or head[:1] == b"\x0a":  # sentencepiece ModelProto starts with field 1
        return SentencePieceTokenizer(path)
    return Llama2cTokenizer.from_file(path)


Tokenizer.from_file = staticmethod(load_tokenizer)

__all__ = ["Tokenizer", "Llama2cTokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer"]
