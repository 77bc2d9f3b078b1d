"""Vocabularies for the GGUF file (`tokenizer.ggml.*`), from the tokenizers people have.

Only the sentencepiece-style `llama` vocabulary for now: pieces with "\u2581" for spaces,
scores, and llama.cpp's token types, as llama.cpp's own converter writes them.
"""
from dataclasses import dataclass, field
from typing import List

from pecca.errors import TokenizerFormatError
from pecca.tokenizers.base import BYTE_PIECE
from pecca.tokenizers.llama2c import BYTE, CONTROL, NORMAL, SPM_SPACE, UNKNOWN, UNUSED, Llama2cTokenizer


@dataclass
class Vocab:
    tokens: List[str]
    scores: List[float]
    types: List[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    add_bos: bool = True
    add_space_prefix: bool = True
    model: str = "llama"
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.tokens)


def vocab_from_sentencepiece(path: str) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise TokenizerFormatError(f"{path}: not a sentencepiece model ({e})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        elif sp.IsByte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return Vocab(tokens, scores, types, bos_id=max(sp.bos_id(), 0), eos_id=max(sp.eos_id(), 0),
                 unk_id=max(sp.unk_id(), 0), source=path)


def vocab_from_llama2c(path: str) -> Vocab:
    """llama2.c's tokenizer.bin: ids 0, 1, 2 are <unk>, BOS, EOS (stored as "\\n<s>\\n" ...),
    pieces hold plain spaces; <0xXX> are byte tokens."""
    tok = Llama2cTokenizer.from_file(path)
    tokens, types = [], []
    for i, p in enumerate(tok.pieces):
        if i < 3:
            tokens.append(("<unk>", "<s>", "</s>")[i])
            types.append(UNKNOWN if i == 0 else CONTROL)
            continue
        try:
            text = p.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerFormatError(f"{path}: token {i} is not UTF-8") from None
        tokens.append(text.replace(" ", SPM_SPACE))
        types.append(BYTE if BYTE_PIECE.match(p) else NORMAL)
    return Vocab(tokens, [float(s) for s in tok.scores], types, source=path)
