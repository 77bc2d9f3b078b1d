"""HuggingFace `tokenizer.json` tokenizers, through the `tokenizers` package.

Two kinds of vocabulary are told apart by the file's pre-tokenizer and decoder:
  - byte-level BPE (GPT-2, Llama 3, SmolLM): every token is a string over GPT-2's 256-character
    byte alphabet ("Ġ" is the space byte, "Ċ" the newline); a token's bytes are that string
    mapped back through the alphabet. Nothing is stripped after BOS.
  - sentencepiece-style BPE (Llama 2's tokenizer.json, Mistral): "\u2581" for spaces and <0xXX>
    byte-fallback tokens; as pecca's sentencepiece tokenizers, a leading space right after BOS
    is dropped when decoding (the Strip / Metaspace decoder of those files).

Added tokens are matched in the text first (the transformers default): "<|eot_id|>" in a
prompt is the single token 128009. Special added tokens (and BOS, EOS) print nothing;
non-special ones print their text. `encode(text, add_bos=True)` puts BOS in front unless the
text's own tokens already start with it (Llama 3's first tokenizer.json has no post-processor
that adds BOS; later ones do; the result is the same either way).

tokenizer_config.json beside the file, when present, names bos_token / eos_token and says
add_bos_token; without it, the names are looked for among the special tokens.
"""
import codecs
import json
import os
from typing import Dict, List, Optional

from pecca.errors import TokenizerFormatError, UnsupportedModelError
from pecca.tokenizers.base import Tokenizer

# Llama 3's split regex (tokenizer.json's Split pre-tokenizer, llama.cpp's LLAMA3 pre-type)
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_NAMES = ("llama-bpe", "llama3", "llama-v3")
# tokenizer.ggml.pre values pecca builds a byte-level pre-tokenizer for
GPT2_PRE_NAMES = ("gpt-2", "gpt2", "default")
KNOWN_PRE = LLAMA3_PRE_NAMES + ("smollm",) + GPT2_PRE_NAMES
# tokens that end a turn (llama.cpp's end-of-generation list, the ones Llama-family models use)
EOT_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|endoftext|>",
              "<|end|>", "<end_of_turn>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def tokenizers_package():
    """The `tokenizers` package, or a clear error naming it."""
    try:
        import tokenizers
    except ImportError:
        raise UnsupportedModelError("HuggingFace tokenizer.json and GGUF 'gpt2' vocabularies need the "
                                    "`tokenizers` package: pip install tokenizers") from None
    return tokenizers


def _byte_alphabet() -> Dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: character -> byte. Printable Latin-1 bytes stand for
    themselves; the other 68 bytes are U+0100 onwards, in byte order."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(0x100 + n)] = b
            n += 1
    return chars


UNICODE_TO_BYTE = _byte_alphabet()


def byte_level_bytes(token: str) -> bytes:
    """The raw bytes of a byte-level BPE token ("Ġhello" -> b" hello")."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:  # not a byte-level string (an added token stored as text)
        return token.encode("utf-8")


def _pre_list(spec: dict) -> List[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else ([pre] if pre else [])


def is_byte_level(spec: dict) -> bool:
    dec = spec.get("decoder") or {}
    parts = _pre_list(spec) + [dec] + list(dec.get("decoders") or [])
    return any(p.get("type") == "ByteLevel" for p in parts)


def pre_name(spec: dict) -> Optional[str]:
    """llama.cpp's tokenizer.ggml.pre for a byte-level tokenizer.json's pre-tokenizer, or None
    when it is none of the ones pecca knows ("llama-bpe", "smollm", "gpt-2")."""
    pre = _pre_list(spec)
    types = [p.get("type") for p in pre]
    if not pre or pre[-1].get("type") != "ByteLevel" or pre[-1].get("add_prefix_space", False):
        return None
    regex = pre[-1].get("use_regex", True)
    if types == ["Split", "ByteLevel"] and not regex:
        split = pre[0]
        if (split.get("pattern") or {}).get("Regex") == LLAMA3_REGEX and \
                split.get("behavior") == "Isolated" and not split.get("invert"):
            return "llama-bpe"
        return None
    if types == ["ByteLevel"] and regex:
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and regex and pre[0].get("individual_digits"):
        return "smollm"
    return None


def byte_level_pre_tokenizer(pre: Optional[str], where: str = ""):
    """The `tokenizers` pre-tokenizer llama.cpp's pre-type `pre` stands for. `None` (no key in
    the file) and "default" are taken as GPT-2's regex (llama.cpp's own fallback regex for them
    differs a little: it splits punctuation and digit runs apart first)."""
    tk = tokenizers_package()
    Regex, pre_tokenizers = tk.Regex, tk.pre_tokenizers
    if pre in LLAMA3_PRE_NAMES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":  # each digit alone, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre is None or pre in GPT2_PRE_NAMES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise UnsupportedModelError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported (pecca knows "
                                f"{', '.join(KNOWN_PRE)})")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurd nesting
        raise TokenizerFormatError(f"{path}: not readable as JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise TokenizerFormatError(f"{path}: not a JSON object")
    return data


def read_config(path: str) -> dict:
    """tokenizer_config.json (and special_tokens_map.json) beside `path`, merged; {} if absent."""
    d = os.path.dirname(os.path.abspath(path))
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        p = os.path.join(d, name)
        if os.path.isfile(p):
            cfg.update(read_json(p))
    return cfg


def _token_name(v) -> Optional[str]:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def special_ids(tok, cfg: dict):
    """(bos_id, eos_id) of a `tokenizers.Tokenizer`: the config's names, else known names."""
    def find(key, names):
        name = _token_name(cfg.get(key))
        if name is not None and tok.token_to_id(name) is not None:
            return tok.token_to_id(name)
        for n in names:
            if tok.token_to_id(n) is not None:
                return tok.token_to_id(n)
        return None

    bos, eos = find("bos_token", BOS_NAMES), find("eos_token", EOS_NAMES)
    bos = bos if bos is not None else eos
    eos = eos if eos is not None else bos
    return (0 if bos is None else bos), (0 if eos is None else eos)


def default_add_bos(spec: dict, cfg: dict, bos_name: Optional[str]) -> bool:
    """Whether a prompt starts with BOS: tokenizer_config's add_bos_token; else whether the
    post-processor's template adds it; else True for Llama 3's pre-tokenizer (its first
    tokenizer.json adds none, but the models expect it: llama.cpp decides the same)."""
    if isinstance(cfg.get("add_bos_token"), bool):
        return cfg["add_bos_token"]
    post = spec.get("post_processor") or {}
    for p in [post] + list(post.get("processors") or []):
        if p.get("type") == "TemplateProcessing":
            return any((item.get("SpecialToken") or {}).get("id") == bos_name for item in p.get("single") or [])
    return pre_name(spec) == "llama-bpe"


MAX_VOCAB = 1 << 22  # ids beyond this are a broken file, not a vocabulary (pecca's llama2.c limit)


def vocabulary_by_id(tok, path: str = "") -> List[Optional[str]]:
    """The token strings of a `tokenizers.Tokenizer` by id; None where an id has none."""
    vocab = tok.get_vocab(with_added_tokens=True)
    n = max([tok.get_vocab_size(with_added_tokens=True)] + [i + 1 for i in vocab.values()]
            + [i + 1 for i in tok.get_added_tokens_decoder()])
    if n > MAX_VOCAB:  # checked before the list is made: an id of 2^32 would ask for 32 GB
        raise TokenizerFormatError(f"{path}: a token id of {n - 1} is beyond any vocabulary (at most {MAX_VOCAB})")
    tokens = [None] * n
    for s, i in vocab.items():
        tokens[i] = s
    return tokens


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with pecca's interface. `tokens` (the vocabulary strings by id)
    defaults to the tokenizer's own; `control` are ids that print nothing."""

    def __init__(self, tok, path: str = "", bos_id: int = 1, eos_id: int = 2, add_bos: bool = True,
                 byte_level: bool = True, tokens: Optional[List[Optional[str]]] = None,
                 control=(), added=()):
        self.tok, self.path = tok, path
        self.parse_special_default = True
        self.config_tokens: Dict[str, str] = {}  # unk_token, pad_token ... from tokenizer_config.json
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos_default = add_bos
        self.byte_level = byte_level
        if tokens is None:
            tokens = vocabulary_by_id(tok, path)
        self.vocab_size = len(tokens)
        added = set(added)
        holes = {i for i, t in enumerate(tokens) if t is None}
        self._pieces = [self._raw(t, i in added) for i, t in enumerate(tokens)]
        self.control_ids = frozenset(set(control) | holes | {bos_id, eos_id})
        self._eot = frozenset({eos_id} | {i for i, t in enumerate(tokens)
                                          if t in EOT_TOKENS and i in self.control_ids})

    def _raw(self, token: Optional[str], added: bool) -> bytes:
        if token is None:
            return b""
        if added:  # added tokens are stored as their text
            return token.encode("utf-8")
        if self.byte_level:
            return byte_level_bytes(token)
        return token.replace("\u2581", " ").encode("utf-8")

    @property
    def eot_ids(self) -> frozenset:
        """Tokens that end a turn: EOS and those of <|eot_id|>, <|end_of_text|>, </s>,
        <|im_end|> ... that the vocabulary has as control tokens."""
        return self._eot

    @classmethod
    def from_file(cls, path: str) -> "HFTokenizer":
        """`path`: a tokenizer.json, or a directory holding one."""
        RustTokenizer = tokenizers_package().Tokenizer
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        spec = read_json(path)
        try:
            tok = RustTokenizer.from_str(json.dumps(spec))
        except Exception as e:  # the package raises plain Exception for a bad file
            raise TokenizerFormatError(f"{path}: not a tokenizer.json the tokenizers package "
                                       f"can load ({e})") from None
        cfg = read_config(path)
        bos, eos = special_ids(tok, cfg)
        decoder = tok.get_added_tokens_decoder()
        special = {i for i, a in decoder.items() if a.special}
        out = cls(tok, path, bos, eos,
                  add_bos=default_add_bos(spec, cfg, tok.id_to_token(bos)),
                  byte_level=is_byte_level(spec), control=special, added=decoder)
        out.config_tokens = {k: _token_name(v) for k, v in cfg.items()
                             if k.endswith("_token") and _token_name(v) is not None}
        return out

    def encode(self, text: str, add_bos: Optional[bool] = None,
               parse_special: Optional[bool] = None) -> List[int]:
        """As Tokenizer.encode; special-token names in the text are those tokens unless
        parse_special=False (transformers' split_special_tokens=True)."""
        add_bos = self.add_bos_default if add_bos is None else bool(add_bos)
        plain = parse_special is not None and not parse_special
        self.tok.encode_special_tokens = plain
        try:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def special_token_strings(self) -> Dict[str, str]:
        """bos/eos, and unk/pad ... as tokenizer_config.json names them."""
        return {**self.config_tokens, **super().special_token_strings()}

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens print nothing and leave the token before them in
        place (so a sentencepiece-style leading space is dropped after BOS and any specials
        that open the text, as the tokenizer.json's own decoder does)."""
        ids = self.check_ids(ids)
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        out, prev = [], self.bos_id
        for t in ids:
            out.append(dec.decode(self.token_bytes(prev, t)))
            if t not in self.control_ids:
                prev = t
        out.append(dec.decode(b"", final=True))
        return "".join(out)

    def piece(self, token: int) -> bytes:
        return self._pieces[token]

    def token_bytes(self, prev: int, token: int) -> bytes:
        if not self.byte_level:  # "\u2581" pieces and <0xXX> byte tokens, as sentencepiece's
            return super().token_bytes(prev, token)
        return b"" if token in self.control_ids else self._pieces[token]
