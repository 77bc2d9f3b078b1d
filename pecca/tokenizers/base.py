"""What every tokenizer provides.

A subclass implements `_encode(text, add_bos)` (its own algorithm on plain text) and `piece`;
`encode` adds the common options on top: BOS by the tokenizer's own default, and
`parse_special`, which cuts the text at the names of special tokens ("<s>", "</s>", ...) and
encodes the pieces between them on their own, as llama.cpp does (each piece gets the
sentencepiece dummy-prefix space, as in transformers' legacy Llama tokenizer).
"""
import codecs
import re
from typing import Dict, Iterable, List, Optional

from pecca.errors import InvalidArgumentError

BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    vocab_size: int
    bos_id: int = 1
    eos_id: int = 2
    path: str = ""
    add_bos_default: bool = True  # whether a prompt starts with BOS for this model
    control_ids: frozenset = frozenset()  # tokens that print nothing (besides BOS and EOS)
    parse_special_default: bool = False  # whether encode() finds special-token names in text
    chat_template: Optional[str] = None  # Jinja source stored with the tokenizer, if any
    chat_template_origin: str = ""  # where it came from, for messages

    @staticmethod
    def from_file(path: str) -> "Tokenizer":
        """A tokenizer.json (or a folder holding one), sentencepiece tokenizer.model, llama2.c
        tokenizer.bin, or the vocabulary of a GGUF model file; the kind is read from the file."""
        from pecca.tokenizers import load_tokenizer  # the loaders import this module

        return load_tokenizer(path)

    @property
    def eot_ids(self) -> frozenset:
        """Tokens that end a turn: EOS, and in chat vocabularies <|eot_id|>, <|im_end|> ..."""
        return frozenset({self.eos_id})

    @property
    def add_bos(self) -> bool:
        """Whether encode() puts BOS in front by default (the tokenizer's add_bos_token)."""
        return self.add_bos_default

    def encode(self, text: str, add_bos: Optional[bool] = None,
               parse_special: Optional[bool] = None) -> List[int]:
        """Token ids of `text`. add_bos: put BOS in front (default: the tokenizer's own
        add_bos_token). parse_special: take special-token names in the text ("</s>",
        "<|eot_id|>") as those tokens (default: True for tokenizer.json, as transformers;
        False for sentencepiece and llama2.c, as they do)."""
        add_bos = self.add_bos_default if add_bos is None else bool(add_bos)
        if parse_special is None:
            parse_special = self.parse_special_default
        if not parse_special:
            return self._encode(text, add_bos)
        return self._encode_with_specials(text, add_bos)

    def _encode(self, text: str, add_bos: bool) -> List[int]:
        raise NotImplementedError

    def _encode_with_specials(self, text: str, add_bos: bool) -> List[int]:
        specials = self.special_tokens()
        if not specials:
            return self._encode(text, add_bos)
        names = sorted(specials, key=len, reverse=True)  # longest first: "<|a|>" before "<|"
        ids = [self.bos_id] if add_bos else []
        for part in re.split("(" + "|".join(map(re.escape, names)) + ")", text):
            if part in specials:
                ids.append(specials[part])
            elif part:
                ids.extend(self._encode(part, False))
        return ids

    def special_tokens(self) -> Dict[str, int]:
        """Name -> id of the special tokens that parse_special finds in a text."""
        out = {}
        for i in sorted(self.control_ids):
            name = self.token_text(i)
            if name:
                out.setdefault(name, i)
        return out

    def piece(self, token: int) -> bytes:
        """The raw vocabulary entry of `token`, spaces as b' ', byte tokens as b'<0xXX>'."""
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        """The token as a person reads it: its vocabulary entry as text ("<|eot_id|>", " the",
        "<0x0A>"); bytes that are not UTF-8 on their own are shown as \\xNN."""
        return self.piece(token).decode("utf-8", "backslashreplace")

    @property
    def bos_token(self) -> str:
        return self.token_text(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self.token_text(self.eos_id)

    def special_token_strings(self) -> Dict[str, str]:
        """bos_token, eos_token ... as strings: what a chat template sees (transformers passes
        its special_tokens_map)."""
        return {"bos_token": self.bos_token, "eos_token": self.eos_token}

    def token_bytes(self, prev: int, token: int) -> bytes:
        """Bytes `token` contributes after `prev`, as llama2.c's decode(): a leading space
        is dropped right after BOS, and <0xXX> byte tokens become that byte."""
        if token in (self.bos_id, self.eos_id) or token in self.control_ids:
            return b""
        p = self.piece(token)
        if prev == self.bos_id and p[:1] == b" ":
            p = p[1:]
        m = BYTE_PIECE.match(p)
        if m:
            return bytes([int(m.group(1), 16)])
        return p

    def check_ids(self, ids: Iterable[int]) -> List[int]:
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(f"token id {bad[0]} is outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a leading BOS is skipped; the space after it is dropped)."""
        ids = self.check_ids(ids)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out, prev = [], self.bos_id
        for t in ids:
            out.append(dec.decode(self.token_bytes(prev, t)))
            prev = t
        out.append(dec.decode(b"", final=True))
        return "".join(out)
