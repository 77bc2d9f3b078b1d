"""Vocabularies for the GGUF file (`tokenizer.ggml.*`), from the tokenizers people have,
as llama.cpp's own converter writes them:

  - `llama` (sentencepiece tokenizer.model, llama2.c tokenizer.bin): pieces with "\u2581" for
    spaces, scores, and llama.cpp's token types.
  - `gpt2` (a byte-level BPE tokenizer.json: Llama 3, SmolLM): tokens in GPT-2's byte alphabet,
    no scores, merges "a b" in rank order, tokenizer.ggml.pre naming the pre-tokenizer
    ("llama-bpe", "smollm", "gpt-2"); added tokens are CONTROL when special, USER_DEFINED when
    not; ids the tokenizer lacks below the model's vocabulary size are "[PAD<id>]", UNUSED.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from pecca.errors import TokenizerFormatError, UnsupportedModelError
from pecca.tokenizers.base import BYTE_PIECE
from pecca.tokenizers.llama2c import (BYTE, CONTROL, NORMAL, SPM_SPACE, UNKNOWN, UNUSED, USER_DEFINED,
                                      Llama2cTokenizer)


@dataclass
class Vocab:
    tokens: List[str]
    scores: List[float]  # empty for `gpt2`
    types: List[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: Optional[int] = 0  # None: no unknown token (`gpt2`)
    add_bos: bool = True
    add_space_prefix: bool = True
    model: str = "llama"
    source: str = ""
    extra: dict = field(default_factory=dict)
    merges: List[str] = field(default_factory=list)  # `gpt2`: "a b", in rank order
    pre: Optional[str] = None  # `gpt2`: tokenizer.ggml.pre
    chat_template: Optional[str] = None  # tokenizer_config.json's Jinja template, if any

    def __len__(self):
        return len(self.tokens)


def vocab_from_sentencepiece(path: str) -> Vocab:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(path)
        pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    except (OSError, RuntimeError, ValueError) as e:  # ValueError: a piece (or the file) not UTF-8
        raise TokenizerFormatError(f"{path}: not a sentencepiece model ({str(e)[:200]})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(pieces[i])
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


def vocab_from_tokenizer_json(path: str, vocab_size: Optional[int] = None) -> Vocab:
    """A byte-level BPE tokenizer.json (with tokenizer_config.json beside it when present) as a
    `gpt2` vocabulary; padded with UNUSED "[PAD<id>]" tokens up to `vocab_size`."""
    from pecca.tokenizers.hf_json import HFTokenizer, is_byte_level, pre_name, read_json

    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not is_byte_level(spec):
        raise UnsupportedModelError(
            f"{path}: a {model.get('type')} tokenizer.json{'' if is_byte_level(spec) else ' (not byte-level)'}; "
            "pecca exports byte-level BPE tokenizer.json vocabularies (Llama 3, SmolLM); for a sentencepiece "
            "vocabulary pass its tokenizer.model")
    pre = pre_name(spec)
    if pre is None:
        raise UnsupportedModelError(f"{path}: pre_tokenizer {json_brief(spec.get('pre_tokenizer'))} is not one "
                                    "pecca knows (Llama 3's split regex, GPT-2's, SmolLM's digits + GPT-2's)")
    for key, want in (("normalizer", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None)):
        got = spec.get(key) if key == "normalizer" else model.get(key)
        if got not in (want, ""):
            raise UnsupportedModelError(f"{path}: {key} {json_brief(got)} is not supported in a gpt2 vocabulary")
    tok = HFTokenizer.from_file(path)
    n = max(tok.vocab_size, vocab_size or 0)
    strings = [None] * n
    for s, i in tok.tok.get_vocab(with_added_tokens=True).items():
        strings[i] = s
    added = tok.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i, s in enumerate(strings):
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(s)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        else:
            tokens.append(s)
            types.append(NORMAL)
    merges = []
    for k, m in enumerate(model.get("merges") or []):
        if isinstance(m, str):
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            # the newer [a, b] form; a space inside a token is written as U+0120, as llama.cpp does
            merges.append(" ".join(x.replace(" ", "\u0120") for x in m))
        else:
            raise TokenizerFormatError(f"{path}: model.merges[{k}] is neither \"a b\" nor [a, b]")
    return Vocab(tokens, [], types, bos_id=tok.bos_id, eos_id=tok.eos_id, unk_id=None,
                 add_bos=tok.add_bos_default, add_space_prefix=False,
                 model="gpt2", source=path, merges=merges, pre=pre)


def json_brief(v, limit: int = 120) -> str:
    import json

    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= limit else s[:limit] + "..."
