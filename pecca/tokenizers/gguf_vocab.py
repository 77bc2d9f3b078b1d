"""The tokenizer stored in a GGUF file (tokenizer.ggml.*).

`llama`: sentencepiece pieces with scores and token types, encoded by merge scores
(Llama2cTokenizer's algorithm, which llama.cpp's SPM tokenizer also follows). `gpt2`
(byte-level BPE with merges, Llama 3) is not read yet.
"""
from pecca.errors import TokenizerFormatError, UnsupportedModelError
from pecca.tokenizers.llama2c import NORMAL, Llama2cTokenizer


def tokenizer_from_gguf(path: str, meta):
    """The file's tokenizer, or None when it holds none."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None
    if kind != "llama":
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.model {kind!r}; pecca reads the 'llama' "
                                    "(sentencepiece) vocabulary so far")
    tokens = meta.require("tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)) or not tokens:
        raise TokenizerFormatError(f"{path}: tokenizer.ggml.tokens/scores/token_type lengths differ "
                                   f"({len(tokens)}, {len(scores)}, {len(types)})")
    n = len(tokens)
    bos = int(meta.get("tokenizer.ggml.bos_token_id", 1))
    eos = int(meta.get("tokenizer.ggml.eos_token_id", 2))
    if not (0 <= bos < n and 0 <= eos < n):
        raise TokenizerFormatError(f"{path}: bos/eos token ids {bos}/{eos} outside the vocabulary of {n}")
    return Llama2cTokenizer.from_spm_vocab(
        list(tokens), scores, types, path=path, bos_id=bos, eos_id=eos,
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))
