"""A sentencepiece `tokenizer.model`, through the sentencepiece package."""
from typing import Dict, List

from pecca.errors import TokenizerFormatError
from pecca.tokenizers.base import Tokenizer


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError, ValueError) as e:  # ValueError: UnicodeDecodeError of a bad file
            raise TokenizerFormatError(f"{path}: not a sentencepiece model ({str(e)[:200]})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if not (0 <= self.bos_id < self.vocab_size and 0 <= self.eos_id < self.vocab_size):
            raise TokenizerFormatError(f"{path}: bos_id {self.bos_id} / eos_id {self.eos_id} are not pieces of "
                                       f"the {self.vocab_size}; pecca needs both")
        try:
            pieces = [self.sp.IdToPiece(i) for i in range(self.vocab_size)]
        except UnicodeDecodeError as e:
            raise TokenizerFormatError(f"{path}: a piece is not UTF-8 ({e})") from None
        self._pieces = [p.replace("\u2581", " ").encode("utf-8") for p in pieces]
        self._specials = {pieces[i]: i for i in range(self.vocab_size)
                          if self.sp.IsControl(i) or self.sp.IsUnknown(i)}

    def _encode(self, text: str, add_bos: bool) -> List[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if add_bos else []) + list(ids)

    def special_tokens(self) -> Dict[str, int]:
        return dict(self._specials)  # <unk>, <s>, </s>: control and unknown pieces, as llama.cpp

    def piece(self, token: int) -> bytes:
        return self._pieces[token]
