"""The tokenizer stored in a GGUF file (tokenizer.ggml.*).

`llama`: sentencepiece pieces with scores and token types, encoded by merge scores
(Llama2cTokenizer's algorithm, which llama.cpp's SPM tokenizer also follows).
`gpt2`: byte-level BPE (Llama 3, SmolLM): tokens in GPT-2's byte alphabet, merges "a b" in rank
order, and tokenizer.ggml.pre naming the pre-tokenizer regex (llama.cpp's pre-type). It is
built as a `tokenizers` BPE model with that pre-tokenizer: "llama-bpe" is Llama 3's split
regex with ignore_merges (a whole pre-token found in the vocabulary is taken as it is, as in
llama.cpp and Llama 3's tokenizer.json); "smollm" splits digits one by one before GPT-2's
regex; "gpt-2" (also "gpt2", "default" and a file without the key) is GPT-2's regex. CONTROL
tokens are special added tokens and USER_DEFINED ones plain added tokens: both are matched in
the text first.
"""
from pecca.errors import TokenizerFormatError, UnsupportedModelError
from pecca.tokenizers.llama2c import CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Llama2cTokenizer


def tokenizer_from_gguf(path: str, meta):
    """The file's tokenizer, or None when it holds none; it carries the file's
    tokenizer.chat_template, when there is one."""
    tok = _vocabulary(path, meta)
    template = meta.string("tokenizer.chat_template", None)
    if tok is not None and isinstance(template, str) and template:
        tok.chat_template, tok.chat_template_origin = template, f"{path} (tokenizer.chat_template)"
    return tok


def _vocabulary(path: str, meta):
    kind = meta.string("tokenizer.ggml.model", None)
    if kind is None:
        return None
    if kind not in ("llama", "gpt2"):
        raise UnsupportedModelError(f"{path}: tokenizer.ggml.model {kind!r}; pecca reads the 'llama' "
                                    "(sentencepiece) and 'gpt2' (byte-level BPE) vocabularies")
    tokens = meta.strings("tokenizer.ggml.tokens")
    scores = meta.numbers("tokenizer.ggml.scores", None) or [0.0] * len(tokens)
    types = meta.integers("tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)) or not tokens:
        raise TokenizerFormatError(f"{path}: tokenizer.ggml.tokens/scores/token_type lengths differ "
                                   f"({len(tokens)}, {len(scores)}, {len(types)})")
    n = len(tokens)
    bos = meta.integer("tokenizer.ggml.bos_token_id", 1)
    eos = meta.integer("tokenizer.ggml.eos_token_id", 2)
    if not (0 <= bos < n and 0 <= eos < n):
        raise TokenizerFormatError(f"{path}: bos/eos token ids {bos}/{eos} outside the vocabulary of {n}")
    if kind == "gpt2":
        return byte_level_bpe(path, list(tokens), list(types), list(meta.strings("tokenizer.ggml.merges")),
                              meta.string("tokenizer.ggml.pre", None), bos, eos,
                              meta.flag("tokenizer.ggml.add_bos_token", None))
    return Llama2cTokenizer.from_spm_vocab(
        list(tokens), scores, types, path=path, bos_id=bos, eos_id=eos,
        add_space_prefix=meta.flag("tokenizer.ggml.add_space_prefix", True),
        add_bos=meta.flag("tokenizer.ggml.add_bos_token", True))


def byte_level_bpe(path, tokens, types, merges, pre, bos, eos, add_bos=None):
    """An HFTokenizer for a `gpt2` vocabulary. add_bos None: llama.cpp's default (true for
    Llama 3's pre-type only)."""
    from pecca.tokenizers.hf_json import LLAMA3_PRE_NAMES, HFTokenizer, byte_level_pre_tokenizer, tokenizers_package

    tk = tokenizers_package()
    pre_tokenizer = byte_level_pre_tokenizer(pre, path)  # refuses unknown names first
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for k, m in enumerate(merges):
        cut = m.find(" ", 1)  # as llama.cpp splits them
        if cut < 0:
            raise TokenizerFormatError(f"{path}: tokenizer.ggml.merges[{k}] {m!r} is not two tokens")
        pairs.append((m[:cut], m[cut + 1:]))
    try:
        model = tk.models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in LLAMA3_PRE_NAMES)
    except Exception as e:  # the package raises plain Exception for merges outside the vocabulary
        raise TokenizerFormatError(f"{path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = tk.decoders.ByteLevel()
    control = [i for i, t in enumerate(types) if t == CONTROL]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED]
    tok.add_special_tokens([tk.AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([tk.AddedToken(tokens[i], special=False, normalized=False) for i in user])
    silent = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN, UNUSED)]
    if add_bos is None:
        add_bos = pre in LLAMA3_PRE_NAMES
    return HFTokenizer(tok, path, bos, eos, add_bos=bool(add_bos), byte_level=True, tokens=tokens,
                       control=silent, added=control + user)
