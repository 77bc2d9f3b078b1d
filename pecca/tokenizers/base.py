"""What every tokenizer provides."""
import codecs
import re
from typing import Iterable, List

BYTE_PIECE = re.compile(rb"^<0x([0-9A-Fa-f]{2})>$")


class Tokenizer:
    vocab_size: int
    bos_id: int = 1
    eos_id: int = 2
    path: str = ""
    add_bos_default: bool = True  # whether a prompt starts with BOS for this model
    control_ids: frozenset = frozenset()  # tokens that print nothing (besides BOS and EOS)

    @property
    def eot_ids(self) -> frozenset:
        """Tokens that end a turn: EOS, and in chat vocabularies <|eot_id|>, <|im_end|> ..."""
        return frozenset({self.eos_id})

    def encode(self, text: str, add_bos: bool = True) -> List[int]:
        raise NotImplementedError

    def piece(self, token: int) -> bytes:
        """The raw vocabulary entry of `token`, spaces as b' ', byte tokens as b'<0xXX>'."""
        raise NotImplementedError

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

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a leading BOS is skipped; the space after it is dropped)."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out, prev = [], self.bos_id
        for t in ids:
            out.append(dec.decode(self.token_bytes(prev, t)))
            prev = t
        out.append(dec.decode(b"", final=True))
        return "".join(out)
