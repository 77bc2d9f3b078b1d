"""BPE by merge scores: llama2.c's `tokenizer.bin`, and the sentencepiece-style `llama`
vocabulary stored in GGUF files. Encoding is exactly run.c's encode() (which equals
sentencepiece for the Llama 2 vocabulary, and llama.cpp's SPM tokenizer):

BOS, a dummy-prefix " " token (non-empty text), each UTF-8 code point as a token or as
<0xXX> byte tokens, then repeatedly merge the adjacent pair whose concatenation is in the
vocabulary with the highest score (the leftmost on ties).

tokenizer.bin: uint32 max_token_length, then per token: float32 score, int32 length, bytes.
"""
import struct
from typing import Iterable, List, Optional

import numpy as np

from pecca.errors import TokenizerFormatError
from pecca.tokenizers.base import BYTE_PIECE, Tokenizer

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"


class Llama2cTokenizer(Tokenizer):
    def __init__(self, pieces: List[bytes], scores, max_token_length: int = 0, path: str = "",
                 bos_id: int = 1, eos_id: int = 2, types: Optional[Iterable[int]] = None,
                 add_space_prefix: bool = True, add_bos: bool = True, spm_spaces: bool = False):
        self.pieces = pieces
        self.spm_spaces = spm_spaces  # "\u2581" in a text is a space (sentencepiece, llama.cpp)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.max_token_length = max_token_length
        self.vocab_size = len(pieces)
        self.path = path
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_space_prefix = add_space_prefix
        self.add_bos_default = add_bos
        types = list(types) if types is not None else [NORMAL] * len(pieces)
        # tokens that text never turns into and that print nothing (BOS, EOS, <unk>, ...)
        self.control_ids = {i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL, UNUSED)}
        self.control_ids |= {bos_id, eos_id}
        # run.c finds pieces by binary search in a sorted copy; with duplicate pieces that
        # returns any of them, here the lowest id.
        self.lookup = {}
        for i, p in enumerate(pieces):
            if types[i] not in (UNKNOWN, CONTROL, UNUSED):
                self.lookup.setdefault(p, i)
        # run.c: the byte b is token b + 3; in a vocabulary too small for that, <unk> (id 0)
        # rather than an id past its end
        self.byte_ids = [b + 3 if b + 3 < len(pieces) else 0 for b in range(256)]
        for i, p in enumerate(pieces):
            m = BYTE_PIECE.match(p)
            if m:
                self.byte_ids[int(m.group(1), 16)] = i

    @classmethod
    def from_file(cls, path: str) -> "Llama2cTokenizer":
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 4:
            raise TokenizerFormatError(f"{path}: too short for a llama2.c tokenizer")
        max_len = struct.unpack_from("<I", data, 0)[0]
        pieces, scores, off = [], [], 4
        while off < len(data):
            if off + 8 > len(data):
                raise TokenizerFormatError(f"{path}: truncated entry at byte {off} (token {len(pieces)})")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise TokenizerFormatError(
                    f"{path}: token {len(pieces)} has length {n}, beyond the end of the file")
            pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        if len(pieces) < 3:
            raise TokenizerFormatError(f"{path}: not a llama2.c tokenizer ({len(pieces)} tokens)")
        return cls(pieces, scores, max_len, path)

    @classmethod
    def from_spm_vocab(cls, tokens: List[str], scores, types, path: str = "", bos_id: int = 1,
                       eos_id: int = 2, add_space_prefix: bool = True, add_bos: bool = True):
        """From sentencepiece pieces ("\u2581" for spaces), as GGUF's `llama` vocabulary holds."""
        pieces = [t.replace(SPM_SPACE, " ").encode("utf-8") for t in tokens]
        return cls(pieces, scores, max((len(p) for p in pieces), default=0), path, bos_id, eos_id,
                   types, add_space_prefix, add_bos, spm_spaces=True)

    def piece(self, token: int) -> bytes:
        return self.pieces[token]

    def token_text(self, token: int) -> str:
        p = self.pieces[token]
        if token in self.control_ids:  # llama2.c stores BOS/EOS as "\n<s>\n", "\n</s>\n"
            p = p.strip(b"\n")
        return p.decode("utf-8", "backslashreplace")

    def _encode(self, text: str, add_bos: bool) -> List[int]:
        if self.spm_spaces:
            text = text.replace(SPM_SPACE, " ")
        raw = text.encode("utf-8")
        tokens = [self.bos_id] if add_bos else []
        if raw and self.add_space_prefix:
            tokens.append(self.lookup[b" "] if b" " in self.lookup else self.byte_ids[32])
        # split into code points as run.c does (at most 4 bytes, stray continuations alone)
        i = 0
        while i < len(raw):
            j = i + 1
            while j < len(raw) and (raw[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            cp = raw[i:j]
            tid = self.lookup.get(cp)
            if tid is not None:
                tokens.append(tid)
            else:
                tokens.extend(self.byte_ids[b] for b in cp)
            i = j
        return self._merge(tokens)

    def _merge(self, tokens: List[int]) -> List[int]:
        pieces, scores, lookup = self.pieces, self.scores, self.lookup
        # BOS takes part in merging like any token, as in run.c (it never forms a piece)
        while True:
            best_score, best_id, best_idx = -1e10, -1, -1
            for i in range(len(tokens) - 1):
                tid = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
                if tid is not None and scores[tid] > best_score:
                    best_score, best_id, best_idx = scores[tid], tid, i
            if best_idx < 0:
                return tokens
            tokens[best_idx:best_idx + 2] = [best_id]
